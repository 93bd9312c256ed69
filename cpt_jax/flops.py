"""Model FLOPs per token, accelerator peak FLOP/s and model FLOPs utilization (MFU).

Convention (PaLM, Chowdhery et al. 2022, appendix B; also MaxText's and Levanter's): training costs
3 matmuls per weight matmul of the forward pass (the forward, the gradient of the input, the
gradient of the weight), each 2 FLOPs per multiply-add, so

    flops_per_token = 6 * N_matmul + 12 * n_layers * n_heads * head_dim * seq_len

- N_matmul (`model.matmul_params`): per layer wq, wk, wv, wo and the MLP, plus the output head, tied
  or not (the matmul runs either way). Not counted: the input embedding (a lookup, not a matmul),
  norms and qkv biases (elementwise).
- The attention term: per query token and layer the forward computes QK^T (2 * T * n_heads * head_dim
  FLOPs) and AV (as many), 4 * T * N * H; times 3 for training gives 12 * L * N * H * T. The full T is
  counted, as in PaLM, although a causal mask makes half of those products useless; the masked half
  is what MFU numbers quoted elsewhere include too, so ours compare with theirs.
- Elementwise work (softmax, norms, activations, RoPE) is not counted, nor is recomputation under
  remat: MFU measures useful model work, not what the hardware executed (that would be HFU).
"""

from __future__ import annotations

import re
from typing import Any

import jax

from cpt_jax.model import ModelConfig, matmul_params


def flops_per_token(c: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token: 6 * N_matmul + 12 * L * N * H * T (see the module doc)."""
    attention = 12 * c.n_layers * c.n_heads * c.hd * seq_len
    return float(6 * matmul_params(c) + attention)


# Dense (no sparsity) bf16 matrix peak per JAX device, FLOP/s. Vendor datasheets quote the
# sparse figure for NVIDIA parts; the dense one is half of it.
PEAK_BF16_FLOPS: dict[str, float] = {
    # NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): BF16 Tensor Core 312 TFLOPS, SXM and PCIe.
    "a100": 312e12,
    # NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): BF16 Tensor Core 1,979 TFLOPS (SXM),
    # 1,513 (PCIe), 1,671 (NVL), all "with sparsity".
    "h100-sxm": 989e12,
    "h100-pcie": 756e12,
    "h100-nvl": 835e12,
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): BF16 1,979 TFLOPS (SXM), 1,671 (NVL),
    # with sparsity. Same tensor cores as H100 SXM, more and faster HBM.
    "h200": 989e12,
    "h200-nvl": 835e12,
    # Google Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e): bf16
    # peak per chip; on v4 and later one JAX device is one chip.
    "tpu-v4": 275e12,
    "tpu-v5e": 197e12,
    "tpu-v5p": 459e12,
    "tpu-v6e": 918e12,
}

# device.device_kind as JAX reports it (lower-cased) -> key of PEAK_BF16_FLOPS; first match wins,
# so the more specific patterns come first. Anything else (CPU, other GPUs, TPU v2/v3 whose
# devices are single cores, "TPU v4 lite" inference chips) has no entry: no MFU rather than a guess.
_DEVICE_KINDS: tuple[tuple[str, str], ...] = (
    (r"^nvidia a100\b", "a100"),  # A100-SXM4-40GB, A100-SXM4-80GB, A100-PCIE-40GB, A100 80GB PCIe
    (r"^nvidia h100\b.*\bpcie\b", "h100-pcie"),  # NVIDIA H100 PCIe
    (r"^nvidia h100\b.*\bnvl\b", "h100-nvl"),  # NVIDIA H100 NVL
    (r"^nvidia h100\b", "h100-sxm"),  # NVIDIA H100 80GB HBM3 (SXM5)
    (r"^nvidia h200\b.*\bnvl\b", "h200-nvl"),  # NVIDIA H200 NVL
    (r"^nvidia h200\b", "h200"),  # NVIDIA H200
    (r"^tpu v4$", "tpu-v4"),
    (r"^tpu v5 ?(lite|e)$", "tpu-v5e"),  # JAX says "TPU v5 lite"
    (r"^tpu v5p?$", "tpu-v5p"),  # JAX says "TPU v5" (older releases) or "TPU v5p"
    (r"^tpu v6 ?(lite|e)$", "tpu-v6e"),  # JAX says "TPU v6 lite"
)


def peak_flops_for_kind(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device of this `device_kind`, or None when not in the table."""
    kind = " ".join(device_kind.lower().split())
    for pattern, key in _DEVICE_KINDS:
        if re.search(pattern, kind):
            return PEAK_BF16_FLOPS[key]
    return None


def peak_flops(device: Any | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of `device` (default: the first JAX device); None for CPU and unknown kinds."""
    if device is None:
        device = jax.devices()[0]
    if getattr(device, "platform", None) == "cpu":
        return None
    return peak_flops_for_kind(str(getattr(device, "device_kind", "")))


def flops_per_sec_per_device(tokens_per_sec_global: float, c: ModelConfig, seq_len: int, num_devices: int) -> float:
    """Model FLOP/s each device achieves (MaxText's 'TFLOP/s/device' times 1e12)."""
    return tokens_per_sec_global * flops_per_token(c, seq_len) / num_devices


def mfu(tokens_per_sec_global: float, c: ModelConfig, seq_len: int, num_devices: int,
        peak: float | None) -> float | None:
    """Model FLOPs utilization in [0, 1]: achieved model FLOP/s per device over the device's peak.

    `tokens_per_sec_global` counts the tokens of all hosts; `peak` is per device (`peak_flops()`).
    None when the peak is unknown.
    """
    if peak is None:
        return None
    return flops_per_sec_per_device(tokens_per_sec_global, c, seq_len, num_devices) / peak

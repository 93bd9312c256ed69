"""FLOPs per token, the peak table and MFU."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from cpt_jax import flops, model

# 2 layers, grouped-query attention (4 query heads over 2 kv heads), SwiGLU, untied head.
GQA = model.ModelConfig(
    n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96, vocab_size=256, max_seq_len=32
)


def hand_count(L, D, N, K, H, F, V, T, swiglu=True):
    """Forward FLOPs per token, every matmul written out (2 FLOPs per multiply-add), times 3 for training."""
    per_layer = {
        "q = h @ wq [D, N*H]": 2 * D * N * H,
        "k = h @ wk [D, K*H]": 2 * D * K * H,
        "v = h @ wv [D, K*H]": 2 * D * K * H,
        "scores = q @ k^T, one query against T keys in each of N heads": 2 * T * N * H,
        "out = probs @ v, T values in each of N heads": 2 * T * N * H,
        "o @ wo [N*H, D]": 2 * N * H * D,
        "h @ w_up [D, F]": 2 * D * F,
        "a @ w_down [F, D]": 2 * F * D,
    }
    if swiglu:
        per_layer["h @ w_gate [D, F]"] = 2 * D * F
    head = 2 * D * V  # hidden @ head [D, V]; the embedding lookup costs no matmul
    forward = L * sum(per_layer.values()) + head
    return 3 * forward  # forward, gradient of the inputs, gradient of the weights


def test_gqa_swiglu_against_hand_count():
    got = flops.flops_per_token(GQA, 32)
    want = hand_count(L=2, D=64, N=4, K=2, H=16, F=96, V=256, T=32)
    assert got == want
    # The same number, spelled as the PaLM formula.
    assert got == 6 * flops.matmul_params(GQA) + 12 * 2 * 4 * 16 * 32
    assert isinstance(got, float)


def test_squared_relu_has_two_mlp_matmuls():
    c = dataclasses.replace(GQA, mlp="squared_relu")
    assert flops.flops_per_token(c, 32) == hand_count(L=2, D=64, N=4, K=2, H=16, F=96, V=256, T=32, swiglu=False)
    assert flops.flops_per_token(GQA, 32) - flops.flops_per_token(c, 32) == 3 * 2 * (2 * 64 * 96)


def test_tied_head_still_counts_its_matmul_and_bias_norms_do_not():
    tied = dataclasses.replace(GQA, tie_embeddings=True)
    assert flops.flops_per_token(tied, 32) == flops.flops_per_token(GQA, 32)
    # num_params drops a tied head; the FLOP count must not.
    assert tied.num_params(include_embedding=False) == GQA.num_params(include_embedding=False) - 64 * 256
    biased = dataclasses.replace(GQA, qkv_bias=True, norm="layernorm")
    assert flops.flops_per_token(biased, 32) == flops.flops_per_token(GQA, 32)


def test_attention_term_grows_with_seq_len_and_uses_head_dim():
    c = dataclasses.replace(GQA, head_dim=32)  # head_dim != d_model / n_heads
    assert flops.flops_per_token(c, 64) - flops.flops_per_token(c, 32) == 12 * 2 * 4 * 32 * 32
    # head_dim unset: d_model / n_heads
    c0 = dataclasses.replace(GQA, head_dim=0)
    assert flops.flops_per_token(c0, 32) == hand_count(L=2, D=64, N=4, K=2, H=16, F=96, V=256, T=32)


def test_matches_xla_cost_analysis():
    """XLA's own count of the lowered forward and backward agrees (it adds elementwise work)."""
    c = model.ModelConfig(n_layers=2, d_model=128, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=384, vocab_size=512,
                          max_seq_len=64, dtype="float32", scan_layers=False)
    B, T = 2, 64
    params = model.abstract_params(c)
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def cost(fn):
        ca = jax.jit(fn).lower(params, tokens).cost_analysis()
        return (ca[0] if isinstance(ca, list) else ca)["flops"] / (B * T)

    ours = flops.flops_per_token(c, T)
    forward = cost(lambda p, t: model.apply(p, t, c))
    assert forward == pytest.approx(ours / 3, rel=0.02)
    train = cost(jax.grad(lambda p, t: model.apply(p, t, c).sum()))
    assert train == pytest.approx(ours, rel=0.05)


@pytest.mark.parametrize(
    "kind,peak",
    [
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5e", 197e12),
        ("TPU v5", 459e12),
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
        ("TPU v6e", 918e12),
        # Not in the table: no number rather than a guess.
        ("TPU v4 lite", None),
        ("TPU v3", None),
        ("TPU7x", None),
        ("NVIDIA GeForce RTX 4090", None),
        ("NVIDIA A10G", None),
        ("cpu", None),
        ("", None),
    ],
)
def test_peak_for_device_kind(kind, peak):
    assert flops.peak_flops_for_kind(kind) == peak


@dataclasses.dataclass
class FakeDevice:
    platform: str
    device_kind: str


def test_peak_flops_of_devices():
    assert flops.peak_flops(FakeDevice("gpu", "NVIDIA H200")) == 989e12
    assert flops.peak_flops(FakeDevice("tpu", "TPU v5 lite")) == 197e12
    assert flops.peak_flops(FakeDevice("gpu", "Some Future GPU")) is None
    # The real CPU devices of the test run, explicitly and by default.
    assert flops.peak_flops(jax.devices("cpu")[0]) is None
    assert flops.peak_flops() is None


def test_mfu_arithmetic():
    fpt = flops.flops_per_token(GQA, 32)
    # 8 devices at 1e12 FLOP/s each, exactly busy: MFU 1.
    tps = 8 * 1e12 / fpt
    assert flops.mfu(tps, GQA, 32, 8, 1e12) == pytest.approx(1.0)
    assert flops.mfu(tps / 4, GQA, 32, 8, 1e12) == pytest.approx(0.25)
    assert flops.mfu(tps, GQA, 32, 16, 1e12) == pytest.approx(0.5)
    assert flops.mfu(tps, GQA, 32, 8, None) is None
    assert flops.flops_per_sec_per_device(tps, GQA, 32, 8) == pytest.approx(1e12)


def test_llama2_7b_parameter_count():
    """Llama-2-7B has 6,738,415,616 parameters: N_matmul + the input embedding + 65 RMSNorm scales."""
    llama7b = model.ModelConfig(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, d_ff=11008, vocab_size=32000,
                                max_seq_len=4096)
    assert flops.matmul_params(llama7b) + 32000 * 4096 + 65 * 4096 == 6_738_415_616
    assert llama7b.num_params() == 6_738_415_616
    # 6 * 6.6e9 + attention 6.4e9: 4.6e10 FLOPs per token at 4096 tokens.
    assert flops.flops_per_token(llama7b, 4096) == pytest.approx(6 * 6_607_077_376 + 12 * 32 * 4096 * 4096)

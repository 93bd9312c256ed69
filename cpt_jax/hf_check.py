"""Compare the logits of a Hugging Face model (transformers, torch) and a cpt_jax checkpoint.

transformers and torch are imported only here, and only when the check runs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cpt_jax import checkpoint_model
from cpt_jax.config import ConfigError, first_line


def check_logits(model_dir: str, checkpoint_dir: str, *, batch_size: int = 2, seq_len: int = 64,
                 seed: int = 0) -> dict[str, Any]:
    """Run the transformers model and the cpt_jax checkpoint on the same random tokens in float32.

    Returns max_abs_diff, max_rel_diff (max |diff| / max |logit| of transformers), max_abs_logit and
    shape [B, T, V]. T is seq_len capped at the model's max_seq_len.
    """
    import torch
    from transformers import AutoModelForCausalLM

    decoder, c = checkpoint_model.load(checkpoint_dir, dtype="float32")
    try:
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model_dir {model_dir}: transformers cannot load it ({first_line(e)})") from None
    hf.eval()
    T = min(seq_len, c.max_seq_len)
    vocab = min(c.vocab_size, int(hf.config.vocab_size))
    tokens = np.random.default_rng(seed).integers(0, vocab, (batch_size, T), dtype=np.int32)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()
    # fp32 matmuls at full precision on every backend (GPUs default to TF32 otherwise).
    with jax.default_matmul_precision("highest"):
        got = np.asarray(decoder(jnp.asarray(tokens)), np.float32)
    if ref.shape != got.shape:
        raise ConfigError(f"--checkpoint {checkpoint_dir}: logits of shape {got.shape}, transformers gives "
                          f"{ref.shape}, expected the same model")
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    scale = float(np.abs(ref).max())
    return {
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(diff.max() / max(scale, np.finfo(np.float32).tiny)),
        "max_abs_logit": scale,
        "shape": list(ref.shape),
    }

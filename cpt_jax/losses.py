"""Next-token cross-entropy in fp32, optionally in chunks of the sequence.

Chunking keeps the fp32 logits of a large vocabulary from being materialized whole: each chunk's
logits are computed, reduced to a loss and dropped, and recomputed in the backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunk_loss(hidden_BTD, w_DV, targets_BT, mask_BT, dtype):
    logits = jnp.einsum("btd,dv->btv", hidden_BTD, w_DV.astype(dtype), preferred_element_type=jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    return jnp.sum((logz - gold) * mask_BT)


def cross_entropy_sum(hidden_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array,
                      dtype: str = "bfloat16", chunk_tokens: int = 0) -> jax.Array:
    """Sum over unmasked positions of -log p(target); fp32. chunk_tokens > 0 splits the sequence."""
    mask_BT = mask_BT.astype(jnp.float32)
    T = hidden_BTD.shape[1]
    if chunk_tokens <= 0 or chunk_tokens >= T:
        return _chunk_loss(hidden_BTD, w_DV, targets_BT, mask_BT, dtype)
    if T % chunk_tokens:
        raise ValueError(f"seq_len {T} is not a multiple of the loss chunk {chunk_tokens}")
    n = T // chunk_tokens

    def split(x):
        return jnp.moveaxis(x.reshape(x.shape[0], n, chunk_tokens, *x.shape[2:]), 1, 0)

    body = jax.checkpoint(lambda h, t, m: _chunk_loss(h, w_DV, t, m, dtype))

    def step(total, xs):
        return total + body(*xs), None

    total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), (split(hidden_BTD), split(targets_BT), split(mask_BT)))
    return total

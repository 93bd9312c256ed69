"""The optimizer: global-norm clipping and AdamW with a weight-decay mask.

The transformation returned here gives the update direction; the train step scales it by
-lr(step) with the step taken from the train state, not from optax's internal counter, so the
learning rate stays a function of the global step even when a non-finite step is skipped.
That product is exactly optax.adamw (decoupled weight decay multiplied by the learning rate).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import optax

# Parameters that are not decayed by default: norm scales/biases and projection biases.
_NO_DECAY_MARKERS = ("norm", "bias", "bq", "bk", "bv")


def decay_mask(params: Any, decay_norms_and_biases: bool = False) -> Any:
    """True for every parameter that gets weight decay."""

    def one(path, _):
        key = jax.tree_util.keystr(path, simple=True, separator=".")
        leaf = key.rsplit(".", 1)[-1]
        return decay_norms_and_biases or not any(m in leaf for m in _NO_DECAY_MARKERS)

    return jax.tree_util.tree_map_with_path(one, params)


def build(cfg_optim) -> optax.GradientTransformation:
    """clip_by_global_norm (when clip_norm > 0), Adam moments, decoupled weight decay; no LR."""
    parts = [optax.clip_by_global_norm(cfg_optim.clip_norm)] if cfg_optim.clip_norm > 0 else []
    parts.append(optax.scale_by_adam(b1=cfg_optim.b1, b2=cfg_optim.b2, eps=cfg_optim.eps))
    if cfg_optim.weight_decay > 0:
        mask = functools.partial(decay_mask, decay_norms_and_biases=cfg_optim.decay_norms_and_biases)
        parts.append(optax.add_decayed_weights(cfg_optim.weight_decay, mask=mask))
    return optax.chain(*parts)

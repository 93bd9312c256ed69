"""The summed negative log-likelihood of each row of fixed-shape batches, what the source and task
evaluators both compute.

Each call puts the batches on the devices (split as training splits them) and runs one jitted
function that returns each row's summed NLL; the row sums are added in float64 on the host, so a
result does not depend on the mesh or the batch size (beyond float32 rounding of each row). One
program is compiled per row length and shared by every evaluator of the same model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from cpt_jax import losses, model
from cpt_jax.config import ConfigError
from cpt_jax.data import pipeline as pipeline_lib
from cpt_jax.model import ModelConfig
from cpt_jax.placement import Placement


def positive(key: str, value: Any) -> int:
    """`value` as an int; ConfigError naming `key` unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"{key}: {value!r}, expected a positive integer")
    return int(value)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def empty_rows(rows: int, length: int) -> dict[str, np.ndarray]:
    """Padding: token 0, segment 0, positions 0..length-1, loss mask 0."""
    arrays = {k: np.zeros((rows, length), dt) for k, dt in pipeline_lib.BATCH_DTYPES.items()}
    arrays["positions"][:] = np.arange(length, dtype=np.int32)
    return arrays


class RowScorer:
    """Scores rows of at most `seq_len` tokens in batches of `batch_size` rows, with the parameters
    placed by `mesh` and `rules` (see Placement); `chunk_tokens` is the cross-entropy chunk of
    train.loss_chunk_tokens (0: the whole sequence). ConfigError for a bad setting."""

    def __init__(self, model_config: ModelConfig, *, batch_size: int, seq_len: int, mesh: Any = None,
                 rules: Any = None, chunk_tokens: int = 0):
        self.batch_size = positive("eval.batch_size", batch_size)
        self.seq_len = positive("eval seq_len", seq_len)
        if self.seq_len > model_config.max_seq_len:
            raise ConfigError(f"eval seq_len: {seq_len}, expected at most model.max_seq_len {model_config.max_seq_len}")
        self.model_config = model_config
        self.placement = Placement(mesh, rules)
        ways = self.placement.ways
        if self.batch_size % ways:
            key = "eval.batch_size"
            raise ConfigError(f"{key}: {batch_size}, expected a multiple of the {ways} devices the eval batch "
                              "is split over")
        self.chunk_tokens = int(chunk_tokens or 0)

    def step(self, length: int) -> Callable:
        """The jitted (params, batch) -> summed NLL of each row [B] for rows of `length` tokens."""
        chunk = self.chunk_tokens if 0 < self.chunk_tokens < length and length % self.chunk_tokens == 0 else 0
        return _row_nll_step(self.model_config, self.placement.rules_tuple, chunk, self.placement.replicated)

    def row_nll(self, params: Any, rows: int, length: int, batch: Callable[[int, int], dict]) -> np.ndarray:
        """Summed NLL (float64) of `rows` rows (a multiple of the batch size) of `length` tokens;
        batch(lo, hi) gives the host arrays of rows [lo, hi)."""
        step = self.step(length)
        outs = []
        with self.placement.context():
            for lo in range(0, rows, self.batch_size):  # every batch is dispatched before any result is read
                arrays = batch(lo, lo + self.batch_size)
                outs.append(step(params, {k: self.placement.put(v) for k, v in arrays.items()}))
            return np.concatenate([np.asarray(jax.device_get(o), np.float64) for o in outs])


@functools.lru_cache(maxsize=32)
def _row_nll_step(c: ModelConfig, rules: tuple, chunk_tokens: int, out_sharding: Any) -> Callable:
    """One jitted function per (model, rules, loss chunk, output sharding), shared by all evaluators."""

    def step(params, batch):
        hidden = model.forward(params, batch["inputs"], c, batch["segment_ids"], batch["positions"], rules)
        w = model.head_weights(params, c)

        def row(h, t, m):
            return losses.cross_entropy_sum(h[None], w, t[None], m[None], c.dtype, chunk_tokens)

        return jax.vmap(row)(hidden, batch["targets"], batch["loss_mask"])

    return jax.jit(step, out_shardings=out_sharding)

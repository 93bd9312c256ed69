"""Where evaluation and decoding put their arrays (`Placement`), and the summed negative
log-likelihood of each row of fixed-shape batches (`RowScorer`, what the source and task
evaluators compute). The row sums are added in float64 on the host, so a result does not depend
on the mesh or the batch size (beyond float32 rounding of each row).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from cpt_jax import losses, model, sharding
from cpt_jax.config import ConfigError
from cpt_jax.model import ModelConfig


class Placement:
    """The mesh the parameters live on (None: the default device) and the rules they were placed
    with (a dict or the model's tuple of pairs; None: the training defaults)."""

    def __init__(self, mesh: jax.sharding.Mesh | None = None, rules: Any = None):
        self.mesh = mesh
        self.rules = dict(rules or sharding.DEFAULT_RULES) if mesh is not None else {}
        self.rules_tuple = sharding.rules_tuple(self.rules)  # hashable: what the model takes
        self.ways = sharding.batch_divisor(mesh, self.rules) if mesh is not None else 1
        # Every process reads what the programs return, so their outputs come back replicated.
        self.replicated = sharding.replicated(mesh) if mesh is not None else None

    def context(self):
        """The mesh as the ambient mesh of the code inside (nothing without a mesh)."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def put(self, x: np.ndarray, names: Sequence[str | None] = ("batch", "length")) -> jax.Array:
        """A host array (the same on every process) on the devices, its dimensions sharded as the
        logical axes `names` say."""
        if self.mesh is None:
            return jax.device_put(x)
        where = jax.sharding.NamedSharding(self.mesh, sharding.spec_for(names, self.rules))
        return jax.make_array_from_callback(x.shape, where, lambda idx: x[idx])


def positive(key: str, value: Any) -> int:
    """`value` as an int; ConfigError naming `key` unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"{key}: {value!r}, expected a positive integer")
    return int(value)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def bucket_length(longest: int) -> int:
    """The power of two (at least 16) that rows of up to `longest` tokens are padded to, so that
    similar lengths share one compiled program."""
    return max(16, 1 << max(0, longest - 1).bit_length())


class RowScorer:
    """Scores rows of at most `seq_len` tokens in batches of `batch_size` rows (a multiple of the
    devices the batch is split over as training splits it), the parameters placed by `mesh` and
    `rules` (see Placement), with one jitted program per row length shared by every scorer of the
    model. `chunk_tokens`: train.loss_chunk_tokens (0: the whole sequence). ConfigError for a bad
    setting."""

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

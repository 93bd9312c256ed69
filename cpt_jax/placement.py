"""Where evaluation and decoding put their arrays: as training does, or on the default device."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from cpt_jax import sharding


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

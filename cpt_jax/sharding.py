"""The device mesh (data, fsdp, tensor), logical-axis rules, and the shardings they give.

Every parameter carries logical axis names (model.py); rules map each name to mesh axes. The
defaults follow MaxText: parameters sharded over fsdp along `embed` and over tensor along heads,
MLP width and vocabulary; batches over (data, fsdp). `mesh.rules` in the config overrides any rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cpt_jax.config import ConfigError

AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None

DEFAULT_RULES: dict[str, MeshAxes] = {
    # Activations.
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    # Parameters.
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    "norm": None,
}


def mesh_shape(cfg_mesh, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with one -1 inferred; ConfigError when they do not fit the devices."""
    sizes = [int(cfg_mesh[a]) for a in AXES]
    if sizes.count(-1) > 1:
        raise ConfigError(f"mesh: {dict(zip(AXES, sizes, strict=True))}, expected at most one axis set to -1")
    for a, s in zip(AXES, sizes, strict=True):
        if s == 0 or s < -1:
            raise ConfigError(f"mesh.{a}: {s}, expected a positive size or -1 (infer)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"mesh: {dict(zip(AXES, sizes, strict=True))} cannot fill {num_devices} devices, "
                f"expected the fixed sizes to divide the device count"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh: data*fsdp*tensor = {math.prod(sizes)} ({dict(zip(AXES, sizes, strict=True))}), "
            f"expected the device count {num_devices}"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg_mesh, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with Auto axis types (GSPMD propagates shardings between
    the annotated points); TPU chips in their physical order."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg_mesh, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


def rules_from_config(cfg_mesh) -> dict[str, MeshAxes]:
    """The default rules with the config's 'name=axis[+axis]' overrides applied."""
    rules = dict(DEFAULT_RULES)
    for item in cfg_mesh.rules:
        name, sep, value = str(item).partition("=")
        name = name.strip()
        if not sep or name not in rules:
            raise ConfigError(
                f"mesh.rules: {item!r}, expected 'name=axis[+axis]' with name one of {', '.join(rules)}"
            )
        axes = tuple(a.strip() for a in value.split("+") if a.strip())
        bad = [a for a in axes if a not in AXES]
        if bad:
            raise ConfigError(f"mesh.rules: {item!r} names mesh axis {bad[0]!r}, expected one of {AXES}")
        rules[name] = None if not axes else axes[0] if len(axes) == 1 else axes
    return rules


def rules_tuple(rules: dict[str, MeshAxes]) -> tuple:
    """Rules in the hashable form the model keeps as a static attribute."""
    return tuple(sorted(rules.items()))


def spec_for(names: Sequence[str | None], rules: dict[str, MeshAxes]) -> PartitionSpec:
    """PartitionSpec of an array whose dimensions have these logical names."""
    return PartitionSpec(*(rules.get(n) if n else None for n in names))


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def param_shardings(abstract: Any, names: Any, mesh: Mesh, rules: dict[str, MeshAxes]) -> Any:
    """NamedSharding of every parameter; ConfigError when a dimension does not divide its axes."""

    def one(path, leaf, axis_names):
        spec = spec_for(axis_names, rules)
        for dim, axes, name in zip(leaf.shape, spec, axis_names, strict=True):
            size = _axis_size(mesh, axes)
            if dim % size:
                key = jax.tree_util.keystr(path, simple=True, separator=".")
                raise ConfigError(
                    f"parameter {key}: dimension '{name}' of size {dim} is sharded over mesh axes "
                    f"{axes} of size {size}, expected a multiple; change the mesh or mesh.rules"
                )
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, abstract, names)


def batch_sharding(mesh: Mesh, rules: dict[str, MeshAxes]) -> NamedSharding:
    """Sharding of [batch, length] arrays."""
    return NamedSharding(mesh, spec_for(("batch", "length"), rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_divisor(mesh: Mesh, rules: dict[str, MeshAxes]) -> int:
    """How many ways the batch dimension is split."""
    return _axis_size(mesh, rules["batch"])

"""Compile the train step for a target before booking it: per-device memory and FLOPs
(`--compile_only [--topology v5p-256|cpu:N]`; the README lists the targets).

The same jitted step as the trainer's, for the run of `resolve.for_compile`, on abstract arrays
only: nothing is written, no data or checkpoint is read. Whether it fits: the TPU compiler itself
refuses a program that exceeds the chip's HBM (RESOURCE_EXHAUSTED), so a TPU slice either compiles
or reports that refusal; this process's own GPUs or TPUs are compared with the allocator's limit;
CPU devices have no memory of their own (None). JAX has no compile-only GPU topology, so a GPU
target is checked on one host of its type.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time
from typing import Any

import jax

from cpt_jax import flops, optim, resolve, sharding, train_step
from cpt_jax.config import ConfigError

_TPU_FAMILIES = {
    # family: (libtpu topology prefix, TensorCores per chip as Cloud TPU names count them, grid rank,
    # chip config, HBM GiB of one chip (one JAX device, megacore too) as Cloud TPU's pages give it:
    # only printed next to a program that compiled, the TPU compiler checks the real limit itself)
    "v4": ("v4", 2, 3, "megacore", 32),
    "v5p": ("v5", 2, 3, "megacore", 95),
    "v5e": ("v5e", 1, 2, "default", 16),
    "v5litepod": ("v5e", 1, 2, "default", 16),
    "v6e": ("v6e", 1, 2, "default", 32),
}
_GPU_WORDS = ("gpu", "cuda", "rocm", "a100", "h100", "h200", "b200", "gb200", "l4", "a3", "a4")


@dataclasses.dataclass
class Target:
    name: str
    platform: str
    devices: list
    tpu_grid: tuple[int, ...] | None = None
    tpu_family: str | None = None  # set for a compile-only TPU slice


def libtpu_available() -> bool:
    """Whether a TPU compiler (libtpu) can be loaded here; TPU hardware is not needed."""
    return os.path.isfile(os.environ.get("TPU_LIBRARY_PATH", "")) or importlib.util.find_spec("libtpu") is not None


def tpu_grid(name: str) -> tuple[str, tuple[int, ...]] | None:
    """('v5p', (4, 4, 8)) for 'v5p-256' or 'v5p:4x4x8'; None when `name` is not a TPU name."""
    m = re.fullmatch(rf"({'|'.join(_TPU_FAMILIES)})([-:])(\S+)", name.strip().lower())
    if not m:
        return None
    family, sep, rest = m.groups()
    _, cores_per_chip, rank, _, _ = _TPU_FAMILIES[family]
    if sep == ":":
        dims = tuple(int(d) for d in rest.split("x")) if re.fullmatch(r"\d+(x\d+)*", rest) else ()
        if len(dims) != rank or min(dims) < 1:
            raise ConfigError(f"--topology: {name!r}, expected a {rank}-D chip grid such as "
                              f"{family}:{'x'.join(['4'] * rank)}")
        return family, dims
    if not rest.isdigit() or int(rest) % cores_per_chip:
        raise ConfigError(f"--topology: {name!r}, expected {family}-N with N a number of "
                          f"{'TensorCores' if cores_per_chip > 1 else 'chips'}")
    chips = int(rest) // cores_per_chip
    # Cloud TPU's slice shapes grow by doubling the last of the smallest sides:
    # v5p 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8 ...; v5e/v6e 1x1, 2x2, 2x4, 4x4, 4x8 ...
    dims = [1] * rank if chips == 1 else ([2, 2] + [1] * (rank - 2))
    while math.prod(dims) < chips:
        smallest = min(dims)
        last = max(i for i, d in enumerate(dims) if d == smallest)
        dims[last] *= 2
    if math.prod(dims) != chips:
        raise ConfigError(f"--topology: {name!r} is not a power-of-two slice; give its chip grid as "
                          f"{family}:{'x'.join(['A', 'B', 'C'][:rank])}")
    return family, tuple(dims)


def target(topology: str | None) -> Target:
    """The devices to compile for; ConfigError (one line) when this machine cannot compile for them."""
    if not topology:
        devices = jax.devices()
        return Target("this process", devices[0].platform, devices)
    name = topology.strip()
    m = re.fullmatch(r"cpu:(\d+)", name.lower())
    if m:
        n = int(m.group(1))
        have = jax.devices("cpu")
        if n < 1:
            raise ConfigError(f"--topology: {name!r}, expected cpu:N with N >= 1")
        if n > len(have):
            raise ConfigError(
                f"--topology {name}: this process has {len(have)} CPU devices, expected at least {n}; start it with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={n} (JAX_PLATFORMS=cpu on a GPU/TPU host)"
            )
        return Target(name, "cpu", have[:n])
    grid = tpu_grid(name)
    if grid is not None:
        if not libtpu_available():
            raise ConfigError(
                f"compiling for TPU topology {name} needs libtpu (pip install 'cpt_jax[tpu]'); "
                f"on this machine only --topology cpu:N is available"
            )
        return _tpu_target(name, *grid)
    if any(word in name.lower() for word in _GPU_WORDS):
        raise ConfigError(
            f"--topology {name}: JAX cannot compile for GPUs on a host without them (jax.experimental.topologies "
            f"offers TPU topologies only); run --compile_only without --topology on one host of the target type, "
            f"or use --topology cpu:N to check the sharding on N devices"
        )
    raise ConfigError(f"--topology: {name!r}, expected cpu:N or a TPU slice such as v5p-256, v5e-16, v6e-8, v4-32")


def _tpu_target(name: str, family: str, dims: tuple[int, ...]) -> Target:
    """Compile-only TPU devices for a slice (the chip grid, host bounds and wraparound as Cloud TPU has them)."""
    from jax.experimental import topologies

    prefix, _, rank, chip_config, _ = _TPU_FAMILIES[family]
    grid = "x".join(map(str, dims))
    if jax.default_backend() != "tpu":
        # No TPU here: libtpu would look for this host's place in a slice and log two screens of
        # warnings about it; tell it the slice and that this host is all of it. With no chip to
        # guard, its one-process-at-a-time lock (/tmp/libtpu_lockfile) would only stop a second
        # compile-only process (a parallel test worker, another user's check) for nothing.
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", name)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if rank == 3:
        wrap = (all(d % 4 == 0 for d in dims),) * 3  # full tori from 4x4x4 up
        host_bounds = (2, 2, 1)
    else:
        wrap = tuple(d == 16 for d in dims) + (False,)  # a side of 16 chips wraps around
        host_bounds = (2, 2, 1) if math.prod(dims) >= 4 else (*dims, 1)
    try:
        desc = topologies.get_topology_desc(topology_name=f"{prefix}:{grid}", platform="tpu", num_slices=1,
                                            chip_config_name=chip_config, chips_per_host_bounds=host_bounds, wrap=wrap)
    except Exception as e:  # libtpu present but the slice is unknown to it
        reason = " ".join(str(e).split())[:200]
        raise ConfigError(f"--topology {name}: libtpu cannot describe {prefix}:{grid} ({reason})") from None
    return Target(name, "tpu", list(desc.devices), dims, family)


def compile_only(run: Any, topology: str | None) -> dict[str, Any]:
    """The report (target, mesh, per-device memory and FLOPs) of compiling the train step of `run`
    (`resolve.for_compile`'s) for `topology`. ConfigError for a target this machine cannot compile
    for, or a config that does not fit the target's devices."""
    cfg, mc = run.cfg, run.model_config
    tgt = target(topology)
    mesh = sharding.make_mesh(cfg.mesh, tgt.devices)
    param_shardings = resolve.devices(cfg, mc, mesh, run.rules, tgt.platform, of=f" of {tgt.name}")
    tx = optim.build(cfg.optim)
    state, shardings = train_step.abstract_state(mc, param_shardings, mesh, tx)
    with jax.set_mesh(mesh):
        batch_sharding = sharding.batch_sharding(mesh, run.rules)
        t0 = time.perf_counter()
        lowered = train_step.lower(cfg.train, mc, tx, run.schedule, run.rules, state, shardings, batch_sharding)
        # A compile-only TPU executable cannot be loaded back from JAX's persistent compilation
        # cache (there is no TPU client to load it into): keep it out of the cache.
        cached = jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", cached and not tgt.tpu_family)
        try:
            compiled, refusal = lowered.compile(), None
        except jax.errors.JaxRuntimeError as e:
            if tgt.platform != "tpu" or "RESOURCE_EXHAUSTED" not in str(e):
                raise
            compiled, refusal = None, " ".join(str(e).split("RESOURCE_EXHAUSTED:", 1)[-1].split())
        finally:
            jax.config.update("jax_enable_compilation_cache", cached)
        seconds = time.perf_counter() - t0
    return _report(tgt, mesh, compiled, refusal, seconds, int(cfg.train.batch_size), int(cfg.train.seq_len), mc)


def _device_memory_limit(tgt: Target) -> int | None:
    """Bytes one device of the target can hold: the allocator's limit on real accelerators, the
    documented HBM of a compile-only TPU chip, None for CPU devices."""
    if tgt.tpu_family:
        return _TPU_FAMILIES[tgt.tpu_family][4] * 2**30
    if tgt.platform == "cpu":
        return None
    return (tgt.devices[0].memory_stats() or {}).get("bytes_limit")


def _report(tgt: Target, mesh, compiled, refusal: str | None, seconds: float, B: int, T: int, mc) -> dict[str, Any]:
    memory = None
    mem = compiled.memory_analysis() if compiled is not None else None
    if mem is not None:
        memory = {f"{k}_bytes": int(getattr(mem, f"{k}_size_in_bytes"))
                  for k in ("argument", "output", "alias", "temp", "generated_code")}
        # Donated state is aliased: its buffers are counted once, as arguments, not again as outputs.
        memory["total_bytes"] = sum(v for k, v in memory.items() if k != "alias_bytes") - memory["alias_bytes"]
        if getattr(mem, "peak_memory_in_bytes", 0):
            memory["peak_bytes"] = int(mem.peak_memory_in_bytes)
    limit = _device_memory_limit(tgt)
    if refusal is not None:
        fits = False
    elif tgt.tpu_family:
        fits = True  # the TPU compiler refuses what does not fit
    elif limit is not None and memory is not None:
        fits = memory.get("peak_bytes", memory["total_bytes"]) <= limit
    else:
        fits = None
    cost = compiled.cost_analysis() if compiled is not None else {}
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    xla_flops = float((cost or {}).get("flops", float("nan")))
    model_flops = flops.flops_per_token(mc, T) * B * T
    n = len(tgt.devices)
    return {
        "topology": tgt.name,
        "platform": tgt.platform,
        "devices": n,
        "tpu_grid": list(tgt.tpu_grid) if tgt.tpu_grid else None,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "batch": [B, T],
        "params": int(mc.num_params()),
        "compile_secs": round(seconds, 3),
        "memory_per_device": memory,
        "device_memory_bytes": limit,
        "fits": fits,
        "refusal": refusal,
        # XLA's count of the compiled per-device program. It counts a loop body once, so with
        # model.scan_layers it covers one layer of the stack: compare with the model FLOPs.
        "flops_per_device": xla_flops,
        "flops_per_step": xla_flops * n,
        "scan_layers": bool(mc.scan_layers),
        # 6 x matmul weights + attention, per token (cpt_jax.flops: what MFU is computed from).
        "model_flops_per_step": float(model_flops),
        "model_flops_per_device": float(model_flops) / n,
    }


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_report(report: dict[str, Any], workdir: str) -> str:
    """The report as a few lines for a person."""
    mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items())
    lines = [
        f"compile-only: {report['topology']} ({report['devices']} {report['platform']} devices), mesh {mesh}, "
        f"batch {report['batch'][0]} x {report['batch'][1]}, {report['params']:,} parameters; "
        + ("compiled" if report["refusal"] is None else "refused") + f" in {report['compile_secs']:.1f}s",
    ]
    m = report["memory_per_device"]
    if m:
        lines.append(
            f"memory per device: arguments {_size(m['argument_bytes'])}, outputs {_size(m['output_bytes'])} "
            f"(of which {_size(m['alias_bytes'])} reuse donated arguments), temporaries {_size(m['temp_bytes'])}, "
            f"total {_size(m['total_bytes'])}" + (f", XLA's peak {_size(m['peak_bytes'])}" if "peak_bytes" in m else "")
        )
    elif report["refusal"] is None:
        lines.append("memory per device: not reported by this backend")
    limit = report["device_memory_bytes"]
    used = _size(m.get("peak_bytes", m["total_bytes"])) if m else None
    if report["fits"] is False and report["refusal"]:
        lines.append(f"fits: NO: the TPU compiler refused the step ({report['refusal']})")
    elif report["fits"] is False:
        lines.append(f"fits: NO: {used} per device, the device holds {_size(limit)}")
    elif report["fits"] and report["tpu_grid"]:
        lines.append(f"fits: yes: the TPU compiler placed every buffer in the chip's HBM (about {_size(limit)})")
    elif report["fits"]:
        lines.append(f"fits: yes: {used} of the device's {_size(limit)}")
    else:
        lines.append("fits: not checked: CPU devices have no memory of their own")
    if report["refusal"] is None:
        lines.append(
            f"FLOPs per step: {report['flops_per_device']:.4g} per device, {report['flops_per_step']:.4g} in all "
            f"(XLA cost analysis of the compiled step"
            + ("; it counts the scanned layer loop once" if report["scan_layers"] else "")
            + f"); model FLOPs {report['model_flops_per_device']:.4g} per device, "
            f"{report['model_flops_per_step']:.4g} in all (6 x matmul weights + attention per token)"
        )
    else:
        lines.append(f"model FLOPs per step {report['model_flops_per_device']:.4g} per device, "
                     f"{report['model_flops_per_step']:.4g} in all (6 x matmul weights + attention per token)")
    lines.append(f"nothing was written to {workdir}")
    return "\n".join(lines)

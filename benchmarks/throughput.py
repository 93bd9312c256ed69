"""Train-step throughput on synthetic data, and the compile-time and loss-memory comparisons.

    python benchmarks/throughput.py [--config configs/tiny.py] [--steps 20] [--config.x=y ...]
    python benchmarks/throughput.py --depth        # compile time, 4 vs 32 layers, scan on and off
    python benchmarks/throughput.py --loss_memory  # peak temp memory, plain vs chunked cross-entropy

Throughput: compile time, step time (median of timed steps, each synced), tokens/s, MFU (null on
devices without a known peak) and per-device memory from XLA's memory analysis. The comparisons
compile side by side in one run and print the ratios the performance targets name.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cpt_jax import cli, flops, losses, optim, schedules, sharding, train_step  # noqa: E402
from cpt_jax.data import pipeline as data_pipeline  # noqa: E402
from cpt_jax.train import _abstract_state, resolve_run  # noqa: E402


def _build(cfg):
    run = resolve_run(cfg, "/tmp/cpt_jax_benchmark_unused_workdir")
    tx = optim.build(cfg.optim)
    abstract, shardings = _abstract_state(run, tx)
    step_fn = train_step.make_train_step(run.model_config, tx, run.schedule, sharding.rules_tuple(run.rules),
                                         cfg.train.micro_batches, cfg.train.loss_chunk_tokens)
    batch_sh = {k: run.pipeline.batch_sharding for k in data_pipeline.BATCH_KEYS}
    jitted = jax.jit(step_fn, in_shardings=(shardings, batch_sh),
                     out_shardings=(shardings, sharding.replicated(run.mesh)), donate_argnums=(0,))
    B, T = cfg.train.batch_size, cfg.train.seq_len
    batch_shapes = {k: jax.ShapeDtypeStruct((B, T), v, sharding=run.pipeline.batch_sharding)
                    for k, v in data_pipeline.BATCH_DTYPES.items()}
    abstract_state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings["step"]), **abstract}
    return run, tx, jitted, abstract_state, batch_shapes, shardings


def compile_seconds(cfg) -> tuple[float, object]:
    with jax.set_mesh(sharding.make_mesh(cfg.mesh)):
        run, tx, jitted, abstract_state, batch_shapes, _ = _build(cfg)
        t0 = time.perf_counter()
        compiled = jitted.lower(abstract_state, batch_shapes).compile()
        return time.perf_counter() - t0, compiled


def throughput(cfg, steps: int) -> None:
    from cpt_jax.train import initial_state

    mesh = sharding.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        run, tx, jitted, abstract_state, batch_shapes, _ = _build(cfg)
        t0 = time.perf_counter()
        compiled = jitted.lower(abstract_state, batch_shapes).compile()
        compile_s = time.perf_counter() - t0
        state, _ = initial_state(run, tx)
        batch = run.pipeline.global_batch(0)
        times = []
        for i in range(steps + 2):
            t = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics["loss"])
            if i >= 2:  # the first steps pay for allocation and caches
                times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    B, T = cfg.train.batch_size, cfg.train.seq_len
    tps = B * T / step_s
    mc = run.model_config
    mem = compiled.memory_analysis()
    mfu = flops.mfu(tps, mc, T, jax.device_count(), flops.peak_flops())
    print(f"model: {mc.num_params() / 1e6:.2f}M params, {mc.n_layers} layers, d_model {mc.d_model}; "
          f"batch {B} x {T}; mesh {dict(run.mesh.shape)}; {jax.device_count()} x {jax.devices()[0].device_kind}")
    print(f"compile: {compile_s:.2f} s")
    print(f"step: {1000 * step_s:.1f} ms (median of {len(times)}), {tps:,.0f} tokens/s, "
          f"{flops.flops_per_sec_per_device(tps, mc, T, jax.device_count()) / 1e12:.3f} TFLOP/s/device, "
          f"MFU {'n/a (no peak known for this device)' if mfu is None else f'{mfu:.1%}'}")
    if mem is not None:
        mib = {k: getattr(mem, f"{k}_size_in_bytes") / 2**20 for k in ("argument", "temp", "output")}
        print(f"memory per device: arguments {mib['argument']:.1f} MiB, temporaries {mib['temp']:.1f} MiB, "
              f"outputs {mib['output']:.1f} MiB")


def depth_comparison(base_cfg) -> None:
    results = {}
    for scan in (True, False):
        for layers in (4, 32):
            cfg = base_cfg.copy_and_resolve_references()
            cfg.model.n_layers, cfg.model.scan_layers = layers, scan
            results[(scan, layers)] = compile_seconds(cfg)[0]
            print(f"scan_layers={scan!s:5} n_layers={layers:2}: compile {results[(scan, layers)]:.2f} s", flush=True)
    print(f"32 vs 4 layers with scan: {results[(True, 32)] / results[(True, 4)]:.2f}x (target <= 1.5x); "
          f"unrolled: {results[(False, 32)] / results[(False, 4)]:.2f}x")


def loss_memory(vocab: int = 256000, seq_len: int = 4096, d_model: int = 1024, chunk: int = 512) -> None:
    """Peak temporary memory of loss + gradient for one sequence, plain vs chunked (compiled, not run)."""
    h = jax.ShapeDtypeStruct((1, seq_len, d_model), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((d_model, vocab), jnp.float32)
    t = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    m = jax.ShapeDtypeStruct((1, seq_len), jnp.float32)
    temp = {}
    for c in (0, chunk):
        fn = jax.jit(jax.grad(lambda h, w, t, m, c=c: losses.cross_entropy_sum(h, w, t, m, "bfloat16", c), (0, 1)))
        temp[c] = fn.lower(h, w, t, m).compile().memory_analysis().temp_size_in_bytes
    print(f"cross-entropy + grad, vocab {vocab}, seq {seq_len}, d_model {d_model}: plain {temp[0] / 2**30:.2f} GiB, "
          f"chunked ({chunk}) {temp[chunk] / 2**30:.2f} GiB temporaries: {temp[chunk] / temp[0]:.2f}x (target <= 0.5x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--depth", action="store_true", help="compile time vs depth, scan on and off")
    parser.add_argument("--loss_memory", action="store_true", help="plain vs chunked cross-entropy memory")
    args, rest = parser.parse_known_args()
    if args.loss_memory:
        loss_memory()
        return
    if not any(a.startswith("--config=") or a == "--config" for a in rest):
        rest = ["--config=configs/tiny.py", *rest]
    cfg, _ = cli.parse(["throughput", *rest])
    schedules.build(cfg.schedule, cfg.train.steps, cfg.schedule.start_lr or 1e-4)  # fail early on a bad schedule
    if cfg.schedule.start_lr is None and cfg.schedule.name in ("recipe", "constant"):
        cfg.schedule.start_lr = 1e-4  # no checkpoint to read it from: any value times the same
    if args.depth:
        depth_comparison(cfg)
    else:
        throughput(cfg, args.steps)


if __name__ == "__main__":
    sys.exit(main())

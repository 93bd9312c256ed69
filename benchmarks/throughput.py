"""Train-step throughput on synthetic data, and the compile-time and loss-memory comparisons.

    python benchmarks/throughput.py [--config configs/tiny.py] [--steps 20] [--config.x=y ...]
                                    [--profile DIR] [--json FILE]
    python benchmarks/throughput.py --depth [--depth_layers 4,32]   # compile time vs depth, scan on/off
    python benchmarks/throughput.py --loss_memory [--loss_shape 256000,4096,1024,512]  # plain vs chunked CE

Throughput: compile time, step time (median of timed steps, each synced), tokens/s, TFLOP/s per
device, MFU (null on devices without a known peak), per-device memory from XLA's plan and the
allocator's peak (accelerators). --profile traces three more steps and prints where their time
went (by category and top kernels). The comparisons compile side by side in one run and print
the ratios the performance targets name. Every mode returns its figures (and --json writes them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cpt_jax import cli, flops, losses, optim, resolve, schedules, sharding, train_step  # noqa: E402


def _compiled(cfg):
    """(run, tx, the compiled train step, the seconds its lowering and compiling took)."""
    run = resolve.for_training(cfg, "/tmp/cpt_jax_benchmark_unused_workdir")
    tx = optim.build(cfg.optim)
    abstract_state, shardings = train_step.abstract_state(run.model_config, run.param_shardings, run.mesh, tx)
    t0 = time.perf_counter()
    compiled = train_step.lower(cfg.train, run.model_config, tx, run.schedule, run.rules, abstract_state, shardings,
                                run.pipeline.batch_sharding).compile()
    return run, tx, compiled, time.perf_counter() - t0


def compile_seconds(cfg) -> tuple[float, object]:
    with jax.set_mesh(sharding.make_mesh(cfg.mesh)):
        _, _, compiled, seconds = _compiled(cfg)
        return seconds, compiled


def prepare(cfg):
    """(run, compiled step, its compile seconds, the initial state, batch 0); call it inside the mesh."""
    run, tx, compiled, compile_s = _compiled(cfg)
    state, _ = resolve.initial_state(run, tx)
    return run, compiled, compile_s, state, run.pipeline.global_batch(0)


def throughput(cfg, steps: int, profile_dir: str | None = None) -> dict:
    mesh = sharding.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        run, compiled, compile_s, state, batch = prepare(cfg)
        times = []
        for i in range(steps + 2):
            t = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics["loss"])
            if i >= 2:  # the first steps pay for allocation and caches
                times.append(time.perf_counter() - t)
        peak_bytes = _peak_device_bytes()
        if profile_dir:
            with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
                for _ in range(3):
                    state, metrics = compiled(state, batch)
                jax.block_until_ready(metrics["loss"])
    step_s = statistics.median(times)
    B, T = cfg.train.batch_size, cfg.train.seq_len
    tps = B * T / step_s
    mc = run.model_config
    mem = compiled.memory_analysis()
    n_dev = jax.device_count()
    mfu = flops.mfu(tps, mc, T, n_dev, flops.peak_flops())
    result = {
        "params": mc.num_params(), "layers": mc.n_layers, "d_model": mc.d_model, "batch": B, "seq_len": T,
        "mesh": dict(run.mesh.shape), "devices": f"{n_dev} x {jax.devices()[0].device_kind}",
        "compile_sec": compile_s, "step_sec": step_s, "tokens_per_sec": tps,
        "tflops_per_device": flops.flops_per_sec_per_device(tps, mc, T, n_dev) / 1e12, "mfu": mfu,
        "peak_device_bytes": peak_bytes,
    }
    print(f"model: {mc.num_params() / 1e6:.2f}M params, {mc.n_layers} layers, d_model {mc.d_model}; "
          f"batch {B} x {T}; mesh {result['mesh']}; {result['devices']}; dtype {mc.dtype}, "
          f"scan_layers={mc.scan_layers}, remat={mc.remat}")
    print(f"compile: {compile_s:.2f} s")
    print(f"step: {1000 * step_s:.1f} ms (median of {len(times)}), {tps:,.0f} tokens/s, "
          f"{result['tflops_per_device']:.3f} TFLOP/s/device, "
          f"MFU {'n/a (no peak known for this device)' if mfu is None else f'{mfu:.1%}'}")
    if mem is not None:
        mib = {k: getattr(mem, f"{k}_size_in_bytes") / 2**20 for k in ("argument", "temp", "output")}
        result.update({f"{k}_mib": v for k, v in mib.items()})
        print(f"memory per device (XLA's plan): arguments {mib['argument']:.1f} MiB, temporaries {mib['temp']:.1f} "
              f"MiB, outputs {mib['output']:.1f} MiB")
    if peak_bytes is not None:
        print(f"peak device memory (allocator): {peak_bytes / 2**30:.2f} GiB")
    if profile_dir:
        result["profile"] = profile_summary(profile_dir)
    return result


# Kernel and op names -> what they are, first match wins (GPU kernel names, then XLA op names).
_CATEGORIES = (
    ("attention", ("fmha", "flash", "cudnn", "attention", "softmax")),
    ("collectives", ("nccl", "all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective")),
    ("matmul", ("gemm", "cublas", "cutlass", "nvjet", "sm90_xmma", "dot", "convolution", "matmul")),
    ("copies", ("memcpy", "memset", "copy", "transpose")),
    ("fusions", ("fusion", "loop_", "input_", "reduce", "wrapped_")),
)


def profile_summary(profile_dir: str, top: int = 12) -> dict:
    """Where the time of the profiled steps went: total time by category and the top ops.

    Reads the perfetto trace jax.profiler wrote: device timelines on accelerators, the host's XLA
    ops on a CPU (no device timeline there)."""
    import collections
    import glob
    import gzip
    import json

    files = sorted(glob.glob(os.path.join(profile_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not files:
        print(f"profile: no trace under {profile_dir}")
        return {}
    with gzip.open(files[-1]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    # Device timelines that hold ops (a loaded but unused plugin, e.g. libtpu for a compile-only
    # check in the same process, adds an empty one: the ops are then the host's).
    busy = {e.get("pid") for e in events if e.get("ph") == "X"}
    device = {pid for pid, name in names.items() if "/device:" in name and pid in busy}
    ops: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or (device and e.get("pid") not in device):
            continue
        name = e.get("name", "")
        if not device and (name.startswith(("$", "ThunkExecutor", "Wait")) or "PjRt" in name or "Pjit" in name):
            continue  # host-side Python, runtime bookkeeping and the spans enclosing the ops
        ops[name] += e.get("dur", 0.0)
    total = sum(ops.values()) or 1.0
    by_category: collections.Counter = collections.Counter()
    for name, dur in ops.items():
        lower = name.lower()
        by_category[next((c for c, keys in _CATEGORIES if any(k in lower for k in keys)), "other")] += dur
    where = "device" if device else "host (no device timeline)"
    print(f"profile ({where}, {files[-1]}):")
    print("  " + ", ".join(f"{c} {d / total:.0%}" for c, d in by_category.most_common()))
    for name, dur in ops.most_common(top):
        print(f"  {dur / total:6.1%}  {name[:100]}")
    return {"categories": {c: d / total for c, d in by_category.items()},
            "top_ops": [(n, d / total) for n, d in ops.most_common(top)]}


def _peak_device_bytes() -> int | None:
    """The allocator's high-water mark on device 0 (GPUs and TPUs report it; CPUs do not)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def depth_comparison(base_cfg, shallow: int = 4, deep: int = 32) -> dict:
    results = {}
    for scan in (True, False):
        for layers in (shallow, deep):
            cfg = base_cfg.copy_and_resolve_references()
            cfg.model.n_layers, cfg.model.scan_layers = layers, scan
            results[(scan, layers)] = compile_seconds(cfg)[0]
            print(f"scan_layers={scan!s:5} n_layers={layers:2}: compile {results[(scan, layers)]:.2f} s", flush=True)
    scan_ratio = results[(True, deep)] / results[(True, shallow)]
    unrolled_ratio = results[(False, deep)] / results[(False, shallow)]
    print(f"{deep} vs {shallow} layers with scan: {scan_ratio:.2f}x (target <= 1.5x); unrolled: {unrolled_ratio:.2f}x")
    return {"scan_ratio": scan_ratio, "unrolled_ratio": unrolled_ratio,
            "compile_sec": {f"{'scan' if k[0] else 'unrolled'}_{k[1]}": v for k, v in results.items()}}


def loss_memory(vocab: int = 256000, seq_len: int = 4096, d_model: int = 1024, chunk: int = 512) -> dict:
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
    return {"plain_bytes": temp[0], "chunked_bytes": temp[chunk], "ratio": temp[chunk] / temp[0]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--depth", action="store_true", help="compile time vs depth, scan on and off")
    parser.add_argument("--depth_layers", default="4,32", help="with --depth: the shallow and deep layer counts")
    parser.add_argument("--profile", default=None, help="trace 3 more steps into this directory and summarise them")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--loss_memory", action="store_true", help="plain vs chunked cross-entropy memory")
    parser.add_argument("--loss_shape", default="256000,4096,1024,512",
                        help="with --loss_memory: vocab, seq_len, d_model, chunk")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    result = _run(args, rest)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv[1:] if argv is None else argv, **result}, f, indent=1, default=str)
    return result


def _run(args, rest: list[str]) -> dict:
    if args.loss_memory:
        vocab, seq_len, d_model, chunk = (int(x) for x in args.loss_shape.split(","))
        return loss_memory(vocab, seq_len, d_model, chunk)
    if not any(a.startswith("--config=") or a == "--config" for a in rest):
        rest = ["--config=configs/tiny.py", *rest]
    cfg, _ = cli.parse(["throughput", *rest])
    if cfg.schedule.start_lr is None and cfg.schedule.name in schedules.NEEDS_START_LR:
        cfg.schedule.start_lr = resolve.PLACEHOLDER_START_LR  # no checkpoint to read it from: any value times the same
    if args.depth:
        shallow, deep = (int(x) for x in args.depth_layers.split(","))
        return depth_comparison(cfg, shallow, deep)
    return throughput(cfg, args.steps, args.profile)


if __name__ == "__main__":
    main()

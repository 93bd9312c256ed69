"""What both sides of the peer benchmark measure, the same way: importable from either virtualenv."""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import shapes


def time_steps(step: Callable[[Any], tuple[Any, Any]], state: Any, run: shapes.Run, t0: float) -> dict:
    """Run WARMUP_STEPS + run.steps steps of `step(state) -> (state, loss)`, each waited for.

    Returns the median step time of the timed steps (wall and CPU), tokens/s from the wall time, the wall time from the
    process's start (t0, time.time()) to the end of the first step, the first and last loss, and
    the peaks of device memory (accelerators' allocators) and of the process's resident memory.
    With PEER_PROFILE set, three more steps are traced into that directory.
    """
    times, cpu_times, losses, first_step_sec = [], [], [], None
    for i in range(shapes.WARMUP_STEPS + run.steps):
        t, c = time.perf_counter(), time.process_time()
        state, loss = step(state)
        losses.append(float(jax.block_until_ready(loss)))
        if i == 0:
            first_step_sec = time.time() - t0
        if i >= shapes.WARMUP_STEPS:
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
    profile_dir = os.environ.get("PEER_PROFILE")
    if profile_dir:  # three more steps under the profiler, as benchmarks/throughput.py --profile
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            for _ in range(3):
                state, loss = step(state)
            jax.block_until_ready(loss)
    step_sec = statistics.median(times)
    stats = jax.local_devices()[0].memory_stats() or {}
    return {
        "first_step_sec": first_step_sec,
        "step_sec": step_sec,
        "step_secs": times,
        # CPU time of all the process's threads: on a CPU host, the work of a step, which other
        # load on a shared machine disturbs less than the wall time.
        "cpu_sec": statistics.median(cpu_times),
        "tokens_per_sec": run.tokens_per_step / step_sec,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "peak_device_bytes": stats.get("peak_bytes_in_use"),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    }


def memory_figures(compiled) -> dict:
    """XLA's plan of the compiled step on one device: what it holds at once, in bytes."""
    m = compiled.memory_analysis()
    if m is None:
        return {"plan_bytes": None}
    # Donated state is aliased: its buffers are counted once, as arguments.
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return {"plan_bytes": int(total), "temp_bytes": int(m.temp_size_in_bytes),
            "argument_bytes": int(m.argument_size_in_bytes)}

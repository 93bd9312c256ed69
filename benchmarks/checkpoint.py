"""Checkpoint cost: training with a save every step vs never, side by side in one run.

    python benchmarks/checkpoint.py [--steps 100] [--repeats 3] [--config configs/tiny.py] [--config.x=y ...]

The two runs alternate `--repeats` times, so that load from elsewhere on the machine hits both
alike. Prints steps/s of each, the slowdown of every-step checkpointing (target: at most 1.5x)
as the median of the alternating pairs and their range, how long a step waited for the previous
asynchronous write to finish, how long starting a save took (the host copy and the finiteness
check), how long each write took on the writer thread, and the restore time of the last
checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from cpt_jax import checkpoint, model, train  # noqa: E402


def _event(workdir: str) -> dict:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "event"][-1]


def run(config: str, steps: int, every: int, workdir: str, extra: list[str]) -> dict:
    argv = ["train", f"--config={config}", f"--workdir={workdir}", f"--config.train.steps={steps}",
            f"--config.checkpoint.every_steps={every}", "--config.checkpoint.max_to_keep=2",
            "--config.tensorboard=False", "--config.train.log_every_steps=1000000",
            "--config.train.progress=False", *extra]
    if train.main(argv) != 0:
        sys.exit(f"training run failed: {argv}")
    return _event(workdir)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="alternate the two runs this many times")
    args, args.overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    pairs: list[tuple[dict, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            never = run(args.config, args.steps, 0, os.path.join(tmp, f"never_{r}"), args.overrides)
            every = run(args.config, args.steps, 1, os.path.join(tmp, f"every_{r}"), args.overrides)
            pairs.append((never, every))
        last = os.path.join(tmp, f"every_{args.repeats - 1}", "checkpoints")
        meta = checkpoint.read_metadata(last)
        abstract = model.abstract_params(model.ModelConfig.from_config(meta["model"]))
        t0 = time.perf_counter()
        checkpoint.restore_from(last, params=abstract)
        restore_sec = time.perf_counter() - t0

    def rate(e: dict) -> float:
        return e["steps_run"] / e["loop_sec"]

    ratios = [rate(n) / rate(e) for n, e in pairs]
    every = [e for _, e in pairs]
    saves = sum(e["checkpoint_saves"] for e in every)
    result = {
        "never_steps_per_sec": statistics.median(rate(n) for n, _ in pairs),
        "every_steps_per_sec": statistics.median(rate(e) for e in every),
        "slowdown": statistics.median(ratios),
        "slowdown_range": (min(ratios), max(ratios)),
        "wait_ms_per_save": 1000 * sum(e["checkpoint_wait_sec"] for e in every) / saves,
        "start_ms_per_save": 1000 * sum(e["checkpoint_start_sec"] for e in every) / saves,
        "write_ms_per_save": 1000 * sum(e["checkpoint_write_sec"] for e in every) / saves,
        "restore_ms": 1000 * restore_sec,
    }
    print(f"config: {args.config} steps={args.steps} repeats={args.repeats} {' '.join(args.overrides)}")
    print(f"never checkpointing:       {result['never_steps_per_sec']:8.2f} steps/s (median)")
    print(f"checkpoint every step:     {result['every_steps_per_sec']:8.2f} steps/s (median, "
          f"{every[-1]['checkpoint_saves']} saves a run)")
    print(f"slowdown (target <= 1.5x): {result['slowdown']:8.2f}x median of {len(ratios)} alternating pairs "
          f"(range {min(ratios):.2f}-{max(ratios):.2f})")
    print(f"step waits for the save:   {result['wait_ms_per_save']:8.1f} ms per save (the previous write still "
          f"running)")
    print(f"starting a save:           {result['start_ms_per_save']:8.1f} ms per save (host copy and finiteness "
          f"check; on a CPU, with the wait for the step's result)")
    print(f"write (writer thread):     {result['write_ms_per_save']:8.1f} ms per save")
    print(f"restore (params):          {result['restore_ms']:8.1f} ms")
    return result


if __name__ == "__main__":
    main()

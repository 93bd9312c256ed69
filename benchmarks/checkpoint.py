"""Checkpoint cost: training with a save every 25 steps vs never, side by side in one run.

    python benchmarks/checkpoint.py [--steps 100] [--every 25] [--repeats 3] [--config configs/tiny.py]
                                    [--config.x=y ...]

The two runs alternate `--repeats` times, so that load from elsewhere on the machine hits both
alike (both save once at the end, as every run does). Prints steps/s of each, the slowdown of
saving every `--every` steps (target: at most 1.1x) as the median of the alternating pairs and
their range, the loop's stall per save (its seconds inside save(): waiting for the previous save
to commit, then the finiteness check and orbax's host copy), orbax's write per save (in the
background), and the restore time of the last checkpoint.
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
    parser.add_argument("--every", type=int, default=25, help="save every this many steps")
    parser.add_argument("--repeats", type=int, default=3, help="alternate the two runs this many times")
    args, args.overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    pairs: list[tuple[dict, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            never = run(args.config, args.steps, 0, os.path.join(tmp, f"never_{r}"), args.overrides)
            every = run(args.config, args.steps, args.every, os.path.join(tmp, f"every_{r}"), args.overrides)
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
        "stall_ms_per_save": 1000 * sum(e["checkpoint_wait_sec"] + e["checkpoint_start_sec"] for e in every) / saves,
        "wait_ms_per_save": 1000 * sum(e["checkpoint_wait_sec"] for e in every) / saves,
        "start_ms_per_save": 1000 * sum(e["checkpoint_start_sec"] for e in every) / saves,
        "write_ms_per_save": 1000 * sum(e["checkpoint_write_sec"] for e in every) / saves,
        "restore_ms": 1000 * restore_sec,
    }
    print(f"config: {args.config} steps={args.steps} every={args.every} repeats={args.repeats} "
          f"{' '.join(args.overrides)}")
    print(f"never checkpointing:       {result['never_steps_per_sec']:8.2f} steps/s (median)")
    print(f"{f'checkpoint every {args.every}:':27s}{result['every_steps_per_sec']:8.2f} steps/s (median, "
          f"{every[-1]['checkpoint_saves']} saves a run)")
    print(f"slowdown (target <= 1.1x): {result['slowdown']:8.2f}x median of {len(ratios)} alternating pairs "
          f"(range {min(ratios):.2f}-{max(ratios):.2f})")
    print(f"loop's stall per save:     {result['stall_ms_per_save']:8.1f} ms: waiting for the previous save "
          f"{result['wait_ms_per_save']:.1f}, then the finiteness check and host copy "
          f"{result['start_ms_per_save']:.1f} (on a CPU, with the wait for the step's result; a step takes "
          f"{1000 / result['never_steps_per_sec']:.1f} ms)")
    print(f"orbax's write:             {result['write_ms_per_save']:8.1f} ms per save (from its start until the "
          f"files are written, in the background)")
    print(f"restore (params):          {result['restore_ms']:8.1f} ms")
    return result


if __name__ == "__main__":
    main()

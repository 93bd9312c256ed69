"""Checkpoint cost: training with a save every step vs never, side by side in one run.

    python benchmarks/checkpoint.py [--steps 60] [--config configs/tiny.py]

Prints steps/s of both runs, their ratio (target: every-step checkpointing at most 1.5x slower),
how long the loop blocked inside save() per checkpoint (async saves copy to host, then write in
the background), and the restore time of the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
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
            "--config.tensorboard=False", "--config.train.log_every_steps=1000", *extra]
    if train.main(argv) != 0:
        sys.exit(f"training run failed: {argv}")
    return _event(workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2, help="alternate the two runs this many times")
    parser.add_argument("overrides", nargs="*", help="extra --config.x=y overrides")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"never": [], "every step": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, every in (("never", 0), ("every step", 1)):
                workdir = os.path.join(tmp, f"{name.replace(' ', '_')}_{r}")
                results[name].append(run(args.config, args.steps, every, workdir, args.overrides))
        last = os.path.join(tmp, f"every_step_{args.repeats - 1}")
        meta = checkpoint.read_metadata(os.path.join(last, "checkpoints"))
        abstract = model.abstract_params(model.ModelConfig.from_config(meta["model"]))
        t0 = time.perf_counter()
        checkpoint.restore_from(os.path.join(last, "checkpoints"), params=abstract)
        restore_sec = time.perf_counter() - t0

    def rate(evs: list[dict]) -> float:  # best of the repeats: the least disturbed by other load
        return max(e["steps_run"] / e["loop_sec"] for e in evs)

    never, every = rate(results["never"]), rate(results["every step"])
    ev = results["every step"][-1]
    print(f"config: {args.config} steps={args.steps} {' '.join(args.overrides)}")
    print(f"never checkpointing:       {never:8.2f} steps/s")
    print(f"checkpoint every step:     {every:8.2f} steps/s  ({ev['checkpoint_saves']} saves)")
    print(f"slowdown (target <= 1.5x): {never / every:8.2f}x")
    print(f"loop blocked in save():    {1000 * ev['checkpoint_blocked_sec'] / max(ev['checkpoint_saves'], 1):8.1f} ms "
          f"per save; final wait {1000 * ev['checkpoint_final_wait_sec']:.1f} ms")
    print(f"restore (params):          {1000 * restore_sec:8.1f} ms")


if __name__ == "__main__":
    main()

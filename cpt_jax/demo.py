"""The recipe end to end on generated data: `python -m cpt_jax.demo [--workdir DIR]`.

1. Pretrain the tiny model with warmup + cosine; its checkpoint records its final (min) LR.
2. Continue it with the recipe: start at that LR (read from the checkpoint), no warmup, cosine to
   1/100 of it.
3. Print what happened: losses, the LRs and where each came from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cpt_jax import checkpoint, train


def _records(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo_out", help="Where the runs are written.")
    parser.add_argument("--pretrain_steps", type=int, default=150)
    parser.add_argument("--cpt_steps", type=int, default=100)
    args = parser.parse_args(argv)
    base, cpt = os.path.join(args.workdir, "base"), os.path.join(args.workdir, "cpt")
    common = ["--config=configs/tiny.py", "--config.tensorboard=False"]

    print(f"[1/2] pretraining the tiny model (warmup + cosine) in {base}", flush=True)
    status = train.main(["train", *common, f"--workdir={base}", f"--config.train.steps={args.pretrain_steps}"])
    if status:
        return status
    meta = checkpoint.read_metadata(os.path.join(base, "checkpoints"))

    print(f"[2/2] continuing it with the recipe from its checkpoint in {cpt}", flush=True)
    status = train.main(
        [
            "train",
            *common,
            f"--workdir={cpt}",
            "--config.schedule.name=recipe",
            f"--config.init_from={os.path.join(base, 'checkpoints')}",
            f"--config.train.steps={args.cpt_steps}",
        ]
    )
    if status:
        return status
    b, c = _records(base), _records(cpt)
    print(
        "\nsummary\n"
        f"  pretraining: {len(b) and b[-1]['step'] + 1} steps, loss {b[0]['loss']:.3f} -> {b[-1]['loss']:.3f}, "
        f"lr peak {meta['lr_max']:.2e}, final (lr_min) {meta['lr_min']:.2e}\n"
        f"  recipe run:  starts at lr {c[0]['lr']:.2e} (read from the checkpoint), ends at {c[-1]['lr']:.2e} "
        f"(1/100 of the start), loss {c[0]['loss']:.3f} -> {c[-1]['loss']:.3f}\n"
        f"  outputs: {base}/metrics.jsonl, {cpt}/metrics.jsonl, checkpoints under each"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

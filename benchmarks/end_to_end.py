"""End-to-end training throughput: the grain loader on prepared data against synthetic batches.

    python benchmarks/end_to_end.py [--config configs/tiny.py] [--steps 60] [--repeats 3] [--config.x=y ...]

Writes prepared sources for the model's vocabulary and the run's sequence length (prepare's
format: ArrayRecord shards and a manifest, random-token documents ending in EOS), then runs the
trainer (`cpt_jax.train`, the whole loop: metrics, progress, the final checkpoint) the same number
of steps on
  (a) data.kind=synthetic: generated batches (grain's iterator too, no files);
  (b) data.kind=mixture over three prepared sources, a General Blend then a QA-like blend for the
      last 30% of the run: the mixture's selection map, per-epoch shuffled reads, host slicing,
      grain's reading threads.
The two alternate `--repeats` times so that other load on the machine hits both alike. Prints the
steady tokens/s of each (steps 1 to the last, from the run's own records; the median over repeats)
and the ratio (b)/(a) (target: at least 0.95, the loader keeps up with the device).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402
from data_loader import make_tokenizer, write_source  # noqa: E402

from cpt_jax import cli, resolve, train  # noqa: E402

SOURCES = ("general", "domain", "qa")


def _seconds_per_step(cfg, workdir: str) -> float:
    """Seconds per step of one training run, steady state: its last record's tokens/s covers the
    steps after the first (compilation, first allocations) and before the final checkpoint."""
    if train.train(resolve.for_training(cfg, workdir)) != 0:
        sys.exit(f"training run in {workdir} failed")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        last = [r for r in map(json.loads, f) if r["kind"] == "train"][-1]
    return cfg.train.batch_size * cfg.train.seq_len / last["tokens_per_sec"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3, help="alternate the two runs this many times")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if not any(a.startswith("--config=") for a in rest):
        rest = ["--config=configs/tiny.py", *rest]
    common = [*rest, f"--config.train.steps={args.steps}", "--config.tensorboard=False",
              "--config.train.progress=False", "--config.train.log_every_steps=1000000",
              "--config.checkpoint.every_steps=0", "--config.eval.every_steps=0"]
    synthetic_cfg, _ = cli.parse(["end_to_end", *common])
    synthetic_cfg.data.kind = "synthetic"
    B, T, vocab = synthetic_cfg.train.batch_size, synthetic_cfg.train.seq_len, synthetic_cfg.model.vocab_size

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_tokenizer(tmp)
        # Enough examples that no source repeats within a run, the way a real run reads its data.
        examples = -(-args.steps * B // len(SOURCES)) + 1
        mixture_cfg = synthetic_cfg.copy_and_resolve_references()
        mixture_cfg.data.kind = "mixture"
        mixture_cfg.data.tokenizer = tokenizer
        mixture_cfg.data.sources = ml_collections.ConfigDict({
            name: write_source(tmp, name, examples, T, tokenizer, examples, seed=i, vocab=vocab)
            for i, name in enumerate(SOURCES)
        })
        mixture_cfg.data.phases = (
            {"weights": {"general": 0.7, "domain": 0.3, "qa": 0.0}},
            {"weights": {"general": 0.55, "domain": 0.35, "qa": 0.1}, "start_at": {"fraction": 0.7}},
        )
        synthetic, real = [], []
        for r in range(args.repeats):
            synthetic.append(_seconds_per_step(synthetic_cfg, f"{tmp}/synthetic_{r}"))
            real.append(_seconds_per_step(mixture_cfg, f"{tmp}/mixture_{r}"))

    ratios = [a / b for a, b in zip(synthetic, real, strict=True)]  # tokens/s of (b) over (a)
    result = {
        "synthetic_step_sec": statistics.median(synthetic),
        "end_to_end_step_sec": statistics.median(real),
        "synthetic_tokens_per_sec": B * T / statistics.median(synthetic),
        "end_to_end_tokens_per_sec": B * T / statistics.median(real),
        "ratio": statistics.median(ratios),
        "ratio_range": (min(ratios), max(ratios)),
        "tokens_per_step": B * T,
    }
    print(f"config: {' '.join(rest)}; batch {B} x {T}, {args.steps} steps, {args.repeats} alternating repeats")
    print(f"(a) synthetic batches:       {result['synthetic_tokens_per_sec']:10,.0f} tokens/s "
          f"({1000 * result['synthetic_step_sec']:.1f} ms/step)")
    print(f"(b) prepared data, mixture:  {result['end_to_end_tokens_per_sec']:10,.0f} tokens/s "
          f"({1000 * result['end_to_end_step_sec']:.1f} ms/step)")
    print(f"ratio (b)/(a) of tokens/s (target >= 0.95): {result['ratio']:.3f} median "
          f"(range {min(ratios):.3f}-{max(ratios):.3f})")
    return result


if __name__ == "__main__":
    main()

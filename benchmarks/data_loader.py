"""Data loader throughput: the whole grain pipeline against what training consumes.

    python benchmarks/data_loader.py [--seq_len 4096] [--batch 64] [--examples 2000] [--sources 3]

Builds prepared sources (ArrayRecord shards and manifests written directly, in prepare's format,
random tokens with EOS-separated documents; a small real tokenizer for the fingerprint), a mixture
over them that switches from a General Blend to a QA-like blend at lr = start/5 (inside the
measured steps), and measures, in tokens/s (train.seq_len tokens per example), this process's
batches coming out of `Pipeline.iterate(..., to_devices=False)` as host arrays (every batch field:
inputs, targets, segment ids and positions from EOS, loss mask), for each setting of
(data.num_threads, data.workers) in --settings. The settings alternate round by round, so that
other load on a shared machine slows them alike. The need, for comparison: an 8-GPU H200 host
training the 1B preset at 50% MFU consumes about 0.55M tokens/s.

Target: >= 5M tokens/s per host (ten times that need: the loader is never what a GPU waits on).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cpt_jax import schedules  # noqa: E402
from cpt_jax.config import default_config  # noqa: E402
from cpt_jax.data import pipeline as pipeline_lib  # noqa: E402
from cpt_jax.data.packing import FORMAT_VERSION, MANIFEST, RECORD_OPTIONS, VAL_FILE, shard_name  # noqa: E402
from cpt_jax.data.tokenization import describe, load_tokenizer  # noqa: E402

VOCAB = 32000
NEED = 0.55e6  # tokens/s an 8 x H200 host consumes with the 1B preset at 50% MFU


def make_tokenizer(directory: str) -> str:
    """A tiny byte-level BPE tokenizer.json with an end-of-text token (only its fingerprint and EOS
    id matter: the benchmark's tokens are generated, not encoded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["continued pretraining reads mixed data"] * 10, trainer)
    path = os.path.join(directory, "tokenizer.json")
    tok.save(path)
    return path


def write_source(directory: str, name: str, examples: int, seq_len: int, tokenizer_path: str,
                 examples_per_shard: int, seed: int, vocab: int = VOCAB) -> str:
    """A prepared source of random documents (mean 600 tokens, each ending in EOS) over a
    vocabulary of `vocab` tokens."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tok = load_tokenizer(tokenizer_path)
    out = os.path.join(directory, name)
    os.makedirs(out)
    length = seq_len + 1
    rng = np.random.default_rng(seed)
    total = examples + 1
    tokens = rng.integers(1, vocab, size=total * length, dtype=np.uint16)
    # EOS after documents of geometric length: about one boundary every 600 tokens.
    tokens[rng.random(total * length) < 1 / 600] = tok.eos_id
    rows = tokens.astype("<u2").reshape(total, length)
    shards, sizes = [], []
    count = -(-examples // examples_per_shard)
    for s in range(count):
        part = rows[s * examples_per_shard:min((s + 1) * examples_per_shard, examples)]
        shards.append(shard_name(s, count))
        sizes.append(len(part))
        writer = ArrayRecordWriter(os.path.join(out, shards[-1]), RECORD_OPTIONS)
        for row in part:
            writer.write(row.tobytes())
        writer.close()
    writer = ArrayRecordWriter(os.path.join(out, VAL_FILE), RECORD_OPTIONS)
    writer.write(rows[-1].tobytes())
    writer.close()
    manifest = {
        "format_version": FORMAT_VERSION, "name": name, "inputs": ["benchmark"], **describe(tok),
        "vocab_size": vocab, "seq_len": seq_len, "example_length": length, "dtype": "uint16",
        "byte_order": "little", "examples": examples, "val_examples": 1, "tokens": examples * length,
        "val_tokens": length, "documents": int(np.sum(tokens == tok.eos_id)), "empty_documents": 0,
        "document_tokens": total * length, "dropped_tokens": 0, "text_bytes": 4 * total * length,
        "bytes_per_token": 4.0, "shards": shards, "shard_examples": sizes, "val_file": VAL_FILE,
        "skipped_records": 0, "record_options": RECORD_OPTIONS, "created": "", "bos": "never", "add_bos": False,
    }
    with open(os.path.join(out, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    return out


def mixture_config(directories: list[str], tokenizer_path: str, batch: int, seq_len: int, steps: int):
    """A run over the sources: a General Blend, then every source alike from lr = start/5 on."""
    cfg = default_config()
    cfg.train.update(steps=steps, batch_size=batch, seq_len=seq_len)
    cfg.model.update(vocab_size=VOCAB, max_seq_len=seq_len)
    cfg.schedule.start_lr = 4.5e-5
    cfg.data.kind = "mixture"
    cfg.data.tokenizer = tokenizer_path
    names = [os.path.basename(d) for d in directories]
    cfg.data.sources = dict(zip(names, directories, strict=True))
    first = {n: float(len(names) - i) for i, n in enumerate(names)}
    cfg.data.phases = ({"weights": first}, {"weights": dict.fromkeys(names, 1.0), "start_at": {"lr_ratio": 0.2}})
    return cfg


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--examples", type=int, default=2000, help="train examples per source")
    parser.add_argument("--sources", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help="steps measured per setting and round")
    parser.add_argument("--settings", default="2:0,1:0,2:2",
                        help="comma-separated data.num_threads:data.workers pairs")
    parser.add_argument("--rounds", type=int, default=3, help="each setting is measured this many times")
    parser.add_argument("--dir", default=None, help="where to build the sources (default: a temp dir)")
    args = parser.parse_args(argv)
    settings = [tuple(int(x) for x in s.split(":")) for s in args.settings.split(",")]

    root = args.dir or tempfile.mkdtemp(prefix="cpt_jax_loader_bench_")
    try:
        t0 = time.perf_counter()
        tokenizer_path = make_tokenizer(root)
        directories = [write_source(root, f"src{i}", args.examples, args.seq_len, tokenizer_path, args.examples, i)
                       for i in range(args.sources)]
        # The run is long enough that the switch (at 71.1% of it) falls inside the measured steps.
        steps = max(2 * args.steps, int(args.steps / 0.3) + 2)
        cfg = mixture_config(directories, tokenizer_path, args.batch, args.seq_len, steps)
        schedule = schedules.build(cfg.schedule, steps, cfg.schedule.start_lr)
        pipe = pipeline_lib.Pipeline(cfg, schedule)
        switch = pipe.mixture.phases[1].start_step
        start = max(0, switch - args.steps // 2)
        print(f"built {args.sources} sources x {args.examples} examples of {args.seq_len + 1} tokens in "
              f"{time.perf_counter() - t0:.1f}s; batch {args.batch}, steps {start}..{start + args.steps} of "
              f"{steps}, switch to phase 1 at step {switch}")
        pipe.host_batch(start)  # warm the page cache
        best: dict[tuple[int, int], float] = {}
        for _ in range(args.rounds):
            for threads, workers in settings:
                cfg.data.num_threads, cfg.data.workers = threads, workers
                with pipe.iterate(start, start + args.steps, to_devices=False) as batches:
                    _, batch = next(batches)  # starts threads and workers: not what a long run pays for
                    t = time.perf_counter()
                    for _, batch in batches:  # noqa: B007 -- every batch is built
                        pass
                    rate = (args.steps - 1) * args.batch * args.seq_len / (time.perf_counter() - t)
                best[(threads, workers)] = max(best.get((threads, workers), 0.0), rate)
        assert batch["inputs"].shape == (args.batch, args.seq_len)
        print(f"the need: {NEED / 1e6:.2f}M tokens/s (8 x H200, 1B preset, 50% MFU); target >= 5M tokens/s")
        print("data.num_threads  data.workers   M tokens/s (best of rounds)   x the need")
        for (threads, workers), rate in best.items():
            print(f"{threads:>16}  {workers:>12}   {rate / 1e6:26.2f}   {rate / NEED:9.1f}")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return {"tokens_per_sec": {f"{t}:{w}": r for (t, w), r in best.items()}, "need_tokens_per_sec": NEED,
            "best_tokens_per_sec": max(best.values())}


if __name__ == "__main__":
    main()

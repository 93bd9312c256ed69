"""Data loader throughput: the mixed, shuffled, host-sliced batches against plain sequential reads.

    python benchmarks/data_loader.py [--seq_len 2048] [--batch 64] [--examples 6000] [--sources 3]

Builds a few prepared sources (ArrayRecord shards and manifests written directly, in prepare's
format, with random tokens and EOS-separated documents; a small real tokenizer for the
fingerprint), then measures in one run, in tokens/s (train.seq_len tokens per example):

  (a) sequential: every record of every source read in file order, B at a time, decoded to an
      int32 [B, seq_len + 1] array: the I/O and decoding floor, no mixing, no shuffle;
  (b) pipeline: `Pipeline.host_batch` over the same number of examples: two mixture phases
      switching at lr = start/5, per-epoch shuffled reads of every source, all batch fields
      (inputs, targets, segment ids and positions from EOS, loss mask);
  (c) iterate: `Pipeline.iterate` with its threads, up to jax.Arrays (best of the rounds).

(a) and (b) alternate batch by batch so that other processes slow both alike (the ratio that
matters on a shared machine); they are also timed in separate passes, where (a) streams with warm
caches.

Targets: (b) >= 0.5 x (a) and (b) >= 1M tokens/s.
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
from cpt_jax.data.prepare import (  # noqa: E402
    FORMAT_VERSION,
    MANIFEST,
    RECORD_OPTIONS,
    SHARD_BYTES,
    VAL_FILE,
    shard_name,
)
from cpt_jax.data.tokenizer import describe, load_tokenizer  # noqa: E402

VOCAB = 32000


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
        "skipped_records": 0, "record_options": RECORD_OPTIONS, "created": "",
    }
    with open(os.path.join(out, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    return out


class SequentialReader:
    """(a): every train record of every source in file order, `batch` records per call.

    The fastest plain way to read the files: default (sequential, readahead) reader options and
    range reads, decoded to int32 like the loader's tokens.
    """

    def __init__(self, directories: list[str], batch: int, seq_len: int):
        from array_record.python.array_record_module import ArrayRecordReader

        self.length = seq_len + 1
        self.readers = []
        self.batches = []  # (reader, first record, end record)
        for directory in directories:
            with open(os.path.join(directory, MANIFEST)) as f:
                manifest = json.load(f)
            for shard in manifest["shards"]:
                reader = ArrayRecordReader(os.path.join(directory, shard))
                self.readers.append(reader)
                n = reader.num_records()
                self.batches += [(reader, lo, min(lo + batch, n)) for lo in range(0, n, batch)]

    def read(self, i: int) -> np.ndarray:
        reader, lo, hi = self.batches[i % len(self.batches)]
        data = b"".join(reader.read(lo, hi))
        return np.frombuffer(data, dtype="<u2").reshape(-1, self.length).astype(np.int32)


def make_pipeline(directories: list[str], tokenizer_path: str, batch: int, seq_len: int, steps: int,
                  threads: int) -> pipeline_lib.Pipeline:
    cfg = default_config()
    cfg.train.steps = steps
    cfg.train.batch_size = batch
    cfg.train.seq_len = seq_len
    cfg.model.vocab_size = VOCAB
    cfg.model.max_seq_len = seq_len
    cfg.schedule.start_lr = 4.5e-5
    cfg.data.kind = "mixture"
    cfg.data.tokenizer = tokenizer_path
    cfg.data.num_threads = threads
    names = [os.path.basename(d) for d in directories]
    cfg.data.sources = dict(zip(names, directories, strict=True))
    # General blend, then a QA-like blend from lr = start/5 on (the recipe's switch).
    first = {n: float(len(names) - i) for i, n in enumerate(names)}
    second = {n: 1.0 for n in names}
    cfg.data.phases = ({"weights": first}, {"weights": second, "start_at": {"lr_ratio": 0.2}})
    schedule = schedules.build(cfg.schedule, steps, cfg.schedule.start_lr)
    return pipeline_lib.Pipeline(cfg, schedule, None)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--examples", type=int, default=6000, help="train examples per source")
    parser.add_argument("--sources", type=int, default=3)
    parser.add_argument("--examples_per_shard", type=int, default=0,
                        help="0: prepare's default (shards of about 256 MiB)")
    parser.add_argument("--threads", type=int, default=2, help="data.num_threads")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the data for each measurement")
    parser.add_argument("--dir", default=None, help="where to build the sources (default: a temp dir)")
    args = parser.parse_args(argv)

    root = args.dir or tempfile.mkdtemp(prefix="cpt_jax_loader_bench_")
    try:
        t0 = time.perf_counter()
        per_shard = args.examples_per_shard or max(1, SHARD_BYTES // ((args.seq_len + 1) * 2))
        tokenizer_path = make_tokenizer(root)
        directories = [
            write_source(root, f"src{i}", args.examples, args.seq_len, tokenizer_path, per_shard, i)
            for i in range(args.sources)
        ]
        total = args.examples * args.sources
        steps = total // args.batch
        print(f"built {args.sources} sources x {args.examples} examples of {args.seq_len + 1} tokens "
              f"({-(-args.examples // per_shard)} shard(s) each) "
              f"in {time.perf_counter() - t0:.1f}s; batch {args.batch}, {steps} steps")

        pipe = make_pipeline(directories, tokenizer_path, args.batch, args.seq_len, steps, args.threads)
        plain = SequentialReader(directories, args.batch, args.seq_len)
        # Warm the page cache first so that both read from memory alike.
        for i in range(len(plain.batches)):
            plain.read(i)
        pipe.host_batch(0)

        # (a) and (b) alternate batch by batch, so that other processes on a small shared machine
        # slow both alike: the ratio stays meaningful when the absolute rates do not.
        t_a = t_b = 0.0
        n_a = n_b = 0
        for _ in range(args.rounds):
            for step in range(steps):
                start = time.perf_counter()
                n_a += plain.read(step).shape[0]
                middle = time.perf_counter()
                batch = pipe.host_batch(step)
                t_a += middle - start
                t_b += time.perf_counter() - middle
                n_b += batch["inputs"].shape[0]
        assert batch["inputs"].shape == (args.batch, args.seq_len)
        rate_a = n_a * args.seq_len / t_a
        rate_b = n_b * args.seq_len / t_b

        # The same two, each in passes of its own (best pass): (a) keeps its caches warm here.
        s_a = s_b = float("inf")
        for _ in range(args.rounds):
            start = time.perf_counter()
            for i in range(len(plain.batches)):
                plain.read(i)
            s_a = min(s_a, time.perf_counter() - start)
            start = time.perf_counter()
            for step in range(steps):
                pipe.host_batch(step)
            s_b = min(s_b, time.perf_counter() - start)
        alone_a = args.sources * args.examples * args.seq_len / s_a
        alone_b = steps * args.batch * args.seq_len / s_b

        t_c = float("inf")
        for _ in range(args.rounds):
            start = time.perf_counter()
            last = None
            for _, last in pipe.iterate(0, steps):  # noqa: B007 -- the last batch is waited for
                pass
            last["inputs"].block_until_ready()
            t_c = min(t_c, time.perf_counter() - start)
        rate_c = steps * args.batch * args.seq_len / t_c

        switch = pipe.phases[1].start_step
        print(f"phases: {[p.weights for p in pipe.phases]}, switch at step {switch} of {steps}")
        print("                                   interleaved   separate passes")
        print(f"(a) sequential reads, no mixing : {rate_a / 1e6:8.2f}      {alone_a / 1e6:8.2f}   M tokens/s")
        print(f"(b) Pipeline.host_batch (mixed) : {rate_b / 1e6:8.2f}      {alone_b / 1e6:8.2f}   M tokens/s")
        print(f"ratio (b)/(a)                   : {rate_b / rate_a:8.2f}      {alone_b / alone_a:8.2f}"
              "   (targets: >= 0.5, and (b) >= 1 M tokens/s)")
        print(f"(c) Pipeline.iterate (prefetch) : {rate_c / 1e6:8.2f} M tokens/s "
              f"(to jax.Arrays, {args.threads} reading threads)")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return {"sequential_tokens_per_sec": rate_a, "mixed_tokens_per_sec": rate_b, "ratio": rate_b / rate_a,
            "ratio_separate_passes": alone_b / alone_a, "iterate_tokens_per_sec": rate_c}


if __name__ == "__main__":
    main()

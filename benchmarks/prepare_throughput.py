"""Throughput of `prepare` against bare sentencepiece batch encoding of the same documents.

  python benchmarks/prepare_throughput.py [--docs 20000] [--workers 2]

Generates synthetic documents (Zipf-distributed made-up words, so a trained tokenizer has real
pieces to find), trains a sentencepiece model on a sample, then measures in the same run:
  (a) bare encoding: `sp.encode(texts, num_threads=workers)` on the documents in memory;
  (b) `prepare` end to end: JSONL on disk -> worker processes -> packed ArrayRecord shards.
and prints tokens/s of both and their ratio (the target: prepare >= 0.5x bare encoding).
Token counts exclude the EOS that prepare appends, so both count the same tokens.
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

from cpt_jax.data.packing import prepare  # noqa: E402
from cpt_jax.data.tokenization import train_sentencepiece  # noqa: E402


def make_documents(n: int, seed: int, mean_words: int) -> list[str]:
    """n documents of about `mean_words` words drawn from a Zipf distribution over 20k made-up words."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(2, 11, size=20_000)
    vocab = np.array(["".join(rng.choice(letters, size=k)) for k in lengths])
    ranks = np.minimum(rng.zipf(1.2, size=n * mean_words * 2), len(vocab)) - 1
    words = vocab[ranks]
    doc_lengths = rng.integers(mean_words // 4, mean_words * 7 // 4, size=n)
    docs, start = [], 0
    for i, k in enumerate(doc_lengths):
        if start + k > len(words):
            start = 0
        body = " ".join(words[start:start + k])
        start += k
        # Sentences and paragraphs, so documents have punctuation and newlines like real text.
        docs.append(f"Document {i}. " + body.replace(" the", ". The").replace(" and", ",\nand"))
    return docs


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print its figures and return them."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=20_000, help="number of synthetic documents")
    p.add_argument("--words", type=int, default=300, help="mean words per document")
    p.add_argument("--workers", type=int, default=2, help="prepare workers and sentencepiece threads")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--vocab_size", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=2, help="runs of each measurement; the best is reported")
    args = p.parse_args(argv)

    import sentencepiece as spm

    work = tempfile.mkdtemp(prefix="prepare_bench-")
    try:
        t = time.perf_counter()
        docs = make_documents(args.docs, seed=0, mean_words=args.words)
        text_mb = sum(len(d) for d in docs) / 1e6
        corpus = os.path.join(work, "corpus.jsonl")
        with open(corpus, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        tok_path = os.path.join(work, "tok.model")
        train_sentencepiece(docs[:1500], tok_path, args.vocab_size)
        print(f"setup: {len(docs):,} documents, {text_mb:.1f} MB of text, tokenizer of {args.vocab_size} pieces "
              f"({time.perf_counter() - t:.1f} s); {os.cpu_count()} CPUs, {args.workers} workers", flush=True)

        sp = spm.SentencePieceProcessor(model_file=tok_path)
        bare = {}
        for return_type in ("int lists", "numpy"):
            best = float("inf")
            for _ in range(args.repeats):
                t = time.perf_counter()
                if return_type == "numpy":
                    ids = sp.encode(docs, num_threads=args.workers, return_type="numpy")
                else:
                    ids = sp.encode(docs, num_threads=args.workers)
                best = min(best, time.perf_counter() - t)
            tokens = bare_tokens = sum(len(x) for x in ids)
            bare[return_type] = tokens / best
            print(f"(a) bare sp.encode ({return_type}), {args.workers} threads: {tokens:,} tokens in {best:.2f} s = "
                  f"{tokens / best / 1e6:.2f} M tokens/s", flush=True)
        del ids
        baseline = max(bare.values())

        best = float("inf")
        for r in range(args.repeats):
            out = os.path.join(work, f"out{r}")
            t = time.perf_counter()
            manifest = prepare([f"jsonl:{corpus}"], tok_path, args.seq_len, out, 10, workers=args.workers)
            best = min(best, time.perf_counter() - t)
            shutil.rmtree(out)
        # without the EOS after and the BOS before (--bos auto: a sentencepiece model adds it) each document
        tokens = manifest["document_tokens"] - manifest["documents"] * (1 + manifest["add_bos"])
        if tokens != bare_tokens:
            raise AssertionError(f"prepare tokenized {tokens} tokens, bare encoding {bare_tokens}")
        rate = tokens / best
        print(f"(b) prepare end to end, {args.workers} workers: {tokens:,} tokens in {best:.2f} s = "
              f"{rate / 1e6:.2f} M tokens/s ({manifest['documents'] / best:,.0f} docs/s)")
        print(f"ratio prepare / bare encoding: {rate / baseline:.2f}x (against the faster bare variant; "
              f"{rate / bare['int lists']:.2f}x against the default int lists); target >= 0.5x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"bare_tokens_per_sec": baseline, "prepare_tokens_per_sec": rate, "ratio": rate / baseline}


if __name__ == "__main__":
    main()

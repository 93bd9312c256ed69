"""python -m cpt_jax.tokenizer train|info: train a sentencepiece tokenizer on `--input` specs (those of
`python -m cpt_jax.prepare`), or describe one. User errors print one line, `error: ...`, on stderr
and exit with status 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator

from cpt_jax import cli
from cpt_jax.data.documents import SPEC_HELP, iter_documents
from cpt_jax.data.tokenization import SENTENCEPIECE_MODEL_TYPES, describe, load_tokenizer, train_sentencepiece


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of `python -m cpt_jax.tokenizer`."""
    p = argparse.ArgumentParser(prog="python -m cpt_jax.tokenizer",
                                description="Train a sentencepiece tokenizer or describe a tokenizer file.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a sentencepiece model on documents",
                       description="Train a sentencepiece model in-process (unk 0, bos 1, eos 2, pad 3; text kept "
                                   "as is; byte fallback on by default).")
    t.add_argument("--input", action="append", required=True, metavar="SPEC",
                   help=f"{SPEC_HELP}; repeatable")
    t.add_argument("--vocab_size", type=int, required=True, help="number of pieces")
    t.add_argument("--out", required=True, help="path of the .model file to write (must not exist)")
    t.add_argument("--model_type", default="unigram", choices=SENTENCEPIECE_MODEL_TYPES)
    t.add_argument("--character_coverage", type=float, default=0.9995,
                   help="fraction of characters covered by pieces; the rest fall back to bytes (default 0.9995)")
    t.add_argument("--byte_fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="encode characters outside the vocabulary as UTF-8 bytes instead of unk (default on)")
    t.add_argument("--max_sentences", type=int, default=10_000_000,
                   help="read at most this many lines of the inputs (default 10M)")
    t.add_argument("--skip_bad_records", action="store_true", help="skip bad JSONL lines / non-UTF-8 records")
    t.add_argument("--tfds_data_dir", default=None, help="data dir of tfds: inputs")
    t.add_argument("--verbose", action="store_true", help="show sentencepiece's training log")
    i = sub.add_parser("info", help="print a tokenizer's ids, vocabulary size and fingerprint as JSON")
    i.add_argument("path", help="sentencepiece .model or tokenizer.json")
    return p


def _documents(args: argparse.Namespace) -> Iterator[str]:
    yield from iter_documents(args.input, skip_bad_records=args.skip_bad_records,
                              tfds_data_dir=args.tfds_data_dir)


@cli.reports_config_errors
def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "train":
        tok = train_sentencepiece(_documents(args), args.out, args.vocab_size, model_type=args.model_type,
                                  character_coverage=args.character_coverage,
                                  byte_fallback=args.byte_fallback, max_sentences=args.max_sentences,
                                  quiet=not args.verbose)
        print(f"trained {tok.path}: vocab_size {tok.vocab_size}, eos {tok.eos_id}, sha256 {tok.fingerprint}",
              file=sys.stderr)
    else:
        print(json.dumps(describe(load_tokenizer(args.path)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

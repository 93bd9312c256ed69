"""python -m cpt_jax.prepare: tokenize jsonl / text / Parquet / Arrow / TFDS inputs into a prepared source
(cpt_jax.data.packing). User errors print one line, `error: ...`, on stderr and exit with status 2
(nothing is written)."""

from __future__ import annotations

import argparse
import sys

from cpt_jax import cli
from cpt_jax.data.documents import SPEC_HELP
from cpt_jax.data.packing import DEFAULT_VAL_EXAMPLES, prepare
from cpt_jax.data.tokenization import BOS_CHOICES


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of `python -m cpt_jax.prepare`."""
    p = argparse.ArgumentParser(
        prog="python -m cpt_jax.prepare",
        description="Tokenize documents (each followed by EOS, preceded by BOS as the tokenizer does), pack "
                    "them into examples of seq_len + 1 tokens and write ArrayRecord train shards, a val split and "
                    "manifest.json.")
    p.add_argument("--input", action="append", required=True, metavar="SPEC",
                   help=f"{SPEC_HELP}; repeatable, read in the order given")
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model or Hugging Face tokenizer.json")
    p.add_argument("--seq_len", type=int, required=True, help="tokens per training sequence")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must be new or empty)")
    p.add_argument("--val_examples", type=int, default=DEFAULT_VAL_EXAMPLES, metavar="K",
                   help=f"examples held out at the end of the data for validation (default {DEFAULT_VAL_EXAMPLES}: "
                        "what an in-loop evaluation reads of each source by default)")
    p.add_argument("--bos", default="auto", choices=BOS_CHOICES,
                   help="BOS before every document: auto (default) when the tokenizer itself adds one "
                        "(sentencepiece with a BOS piece as Llama 2; tokenizer.json with add_bos_token or a template "
                        "starting with BOS, as Llama 3 and Mistral; not Qwen2), always or never")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--name", default=None, help="source name (default: basename of --out)")
    p.add_argument("--skip_bad_records", action="store_true",
                   help="skip (and count) bad JSONL lines and non-UTF-8 records instead of failing")
    p.add_argument("--tfds_data_dir", default=None,
                   help="data dir of tfds: inputs (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    return p


@cli.reports_config_errors
def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        prepare(args.input, args.tokenizer, args.seq_len, args.out, args.val_examples, workers=args.workers,
                name=args.name, skip_bad_records=args.skip_bad_records, tfds_data_dir=args.tfds_data_dir,
                bos=args.bos)
    except KeyboardInterrupt:
        print(f"error: interrupted; {args.out} was not written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The command line of `decode`: continue prompts with any checkpoint and its tokenizer, the
parameters sharded over every device as `python -m cpt_jax.evaluate` shards them (flags: `--help`
and the README). Each prompt is printed followed by its continuation (--json: one JSON object per
prompt); nothing is written. User errors are one line, `error: ...`, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

import jax

from cpt_jax import checkpoint, cli, decode, resolve
from cpt_jax.checkpoint_model import add_checkpoint_flags, checkpoint_bos, checkpoint_tokenizer, restore_params
from cpt_jax.config import ConfigError
from cpt_jax.data.tokenization import load_tokenizer
from cpt_jax.metrics import log

DEFAULT_NEW_TOKENS = 64


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cpt_jax.sample", description="Continue prompts with a checkpoint.")
    add_checkpoint_flags(p, "prompt")
    p.add_argument("--prompt", action="append", required=True, help="text to continue (repeat for several)")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help=f"tokens to generate per prompt (default: {DEFAULT_NEW_TOKENS}, or what fits in max_seq_len)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sampling")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: the smallest set of tokens with "
                   "this much probability (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--tokenizer", default=None, help="tokenizer file (default: the checkpoint's)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt instead of text")
    return p


def run(args: argparse.Namespace, log) -> list[dict[str, Any]]:
    """Everything `main` does but printing: validate, restore, generate. Returns one record per
    prompt: prompt, continuation (text), tokens (the new ids), stopped ('eos' or 'length')."""
    ckpt = os.path.abspath(os.path.expanduser(args.checkpoint))
    meta, mc = checkpoint.read_model_config(ckpt, key="--checkpoint", dtype=args.dtype)
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ConfigError(f"--temperature: {args.temperature}, expected 0 (greedy) or a positive number")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top_p: {args.top_p}, expected a probability in (0, 1]")
    path = args.tokenizer or checkpoint_tokenizer(ckpt, meta)
    if not path:
        raise ConfigError(f"--tokenizer: the checkpoint {ckpt} names no tokenizer found on disk, expected "
                          "--tokenizer FILE")
    tok = load_tokenizer(path)
    fingerprint = meta.get("tokenizer_fingerprint")
    if fingerprint and tok.fingerprint != fingerprint:
        log(f"warning: tokenizer {tok.path} differs from the one the checkpoint records ({fingerprint[:16]}...)")
    prompts = decode.prompt_tokens(tok, args.prompt, max_new_tokens=args.max_new_tokens, max_seq_len=mc.max_seq_len,
                                   add_bos=checkpoint_bos(meta, tok, args.bos))
    # Unless told, as many as fit, up to the default (prompt_tokens left room for at least one).
    new_tokens = args.max_new_tokens or min(DEFAULT_NEW_TOKENS, mc.max_seq_len - max(len(p) for p in prompts))

    mesh, rules, shardings = resolve.mesh_for(mc)
    # Cast to the compute dtype at once, so that the float32 copy is freed before decoding.
    params = decode.compute_params(restore_params(ckpt, meta, mc, shardings), mc)
    generator = decode.Generator(mc, mesh=mesh, rules=rules, vocab_limit=tok.vocab_size)
    outs = generator.generate(params, prompts, new_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed, eos_id=tok.eos_id)
    return [{"prompt": text, "continuation": decode.text_of(tok, o), "tokens": o.tokens, "stopped": o.stopped}
            for text, o in zip(args.prompt, outs, strict=True)]


@cli.reports_config_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    records = run(args, log)
    if jax.process_index() == 0:
        for i, r in enumerate(records):
            if args.json:
                print(json.dumps(r, ensure_ascii=False))
            else:
                print(("" if i == 0 else "\n") + f"--- prompt {i + 1} ({len(r['tokens'])} new tokens, stopped at "
                      f"{r['stopped']})\n{r['prompt']}{r['continuation']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The command line of the evaluation library: validation loss, perplexity and bits per byte per
source and multiple-choice accuracy of one checkpoint (flags: `--help` and the README).

Parameters are restored sharded (FSDP) over every local device. User errors print one line,
`error: ...`, and exit with status 2; a progress line per source and task goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from cpt_jax import checkpoint, cli, resolve, sharding
from cpt_jax import checkpoint_model as ckpt_model
from cpt_jax.config import ConfigError
from cpt_jax.data import sources as sources_lib
from cpt_jax.data.tokenization import load_tokenizer
from cpt_jax.metrics import log
from cpt_jax.scoring import SourceEvaluator, TaskEvaluator, round_up


def parse_pairs(values: Sequence[str] | None, flag: str) -> dict[str, str]:
    """{name: path} from 'name=path,name=path' values (the flag may repeat)."""
    out: dict[str, str] = {}
    for value in values or ():
        for item in value.split(","):
            if not item.strip():
                continue
            name, sep, path = item.partition("=")
            name, path = name.strip(), path.strip()
            if not sep or not name or not path:
                raise ConfigError(f"{flag}: {item!r}, expected name=path (comma-separated)")
            if name in out:
                raise ConfigError(f"{flag}: {name!r} given twice, expected distinct names")
            out[name] = path
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cpt_jax.evaluate", description="Validation loss/perplexity/bits "
                                "per byte per source and multiple-choice accuracy of a checkpoint.")
    ckpt_model.add_checkpoint_flags(p, "question")
    p.add_argument("--sources", action="append", metavar="NAME=DIR,...",
                   help="prepared directories whose val split is evaluated (default: the run's sources found "
                        "on disk)")
    p.add_argument("--tasks", action="append", metavar="NAME=FILE,...", help="multiple-choice task files (JSONL)")
    p.add_argument("--out", help="write the results as JSON to this file")
    p.add_argument("--batch_size", type=int, default=None,
                   help="rows per batch (default: 8, rounded up to a multiple of the devices)")
    p.add_argument("--seq_len", type=int, default=None,
                   help="eval length (default: the longest source's seq_len; for tasks model.max_seq_len)")
    p.add_argument("--examples_per_source", type=int, default=None,
                   help="val examples per source (default: the run's eval.examples_per_source, else 64)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file for --tasks (default: the checkpoint's)")
    p.add_argument("--fewshot", type=int, default=0, help="few-shot examples per prompt for every task")
    p.add_argument("--template", default=None, help="prompt template with a {context} placeholder")
    p.add_argument("--log_samples", action="store_true",
                   help="with --out: every question's choice log-likelihoods, prediction and gold in the JSON")
    return p


def format_table(results: Mapping[str, Any]) -> str:
    """The results as aligned text tables (sources, then tasks)."""
    lines = []
    src, tsk = results.get("sources") or {}, results.get("tasks") or {}
    width = max([len(n) for n in (*src, *tsk)] + [6])
    if src:
        lines.append(f"{'source':<{width}}  {'loss':>8}  {'perplexity':>10}  {'bits/byte':>9}  {'tokens':>9}")
        for name, r in src.items():
            bpb = "n/a" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.4f}"
            lines.append(f"{name:<{width}}  {r['loss']:>8.4f}  {r['perplexity']:>10.3f}  {bpb:>9}  {r['tokens']:>9}")
    if tsk:
        if lines:
            lines.append("")
        lines.append(f"{'task':<{width}}  {'acc':>8}  {'acc_norm':>10}  {'n':>9}")
        for name, r in tsk.items():
            lines.append(f"{name:<{width}}  {r['acc']:>8.4f}  {r['acc_norm']:>10.4f}  {r['n']:>9}")
    return "\n".join(lines)


def run_cli(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Everything `main` does but printing: validate, build the evaluators, restore, evaluate."""
    ckpt = os.path.abspath(os.path.expanduser(args.checkpoint))
    meta, mc = checkpoint.read_model_config(ckpt, key="--checkpoint", dtype=args.dtype)
    run_cfg = meta.get("config") or {}
    sources = parse_pairs(args.sources, "--sources") if args.sources else ckpt_model.checkpoint_sources(meta, log)
    task_files = parse_pairs(args.tasks, "--tasks")
    if not sources and not task_files:
        raise ConfigError("--sources/--tasks: nothing to evaluate, expected --sources name=prepared_dir or --tasks "
                          "name=file.jsonl (the checkpoint's config names no data source found on disk)")
    for key in ("batch_size", "seq_len", "examples_per_source"):
        value = getattr(args, key)
        if value is not None and value <= 0:
            raise ConfigError(f"--{key}: {value}, expected a positive integer")
    if args.fewshot < 0:
        raise ConfigError(f"--fewshot: {args.fewshot}, expected an integer >= 0")

    mesh, rules, param_shardings = resolve.mesh_for(mc)
    ways = sharding.batch_divisor(mesh, rules)
    batch_size = args.batch_size or round_up(8, ways)
    if batch_size % ways:
        raise ConfigError(f"--batch_size: {batch_size}, expected a multiple of the {ways} devices the eval batch is "
                          "split over")
    fingerprint = meta.get("tokenizer_fingerprint")
    common = dict(batch_size=batch_size, mesh=mesh, rules=rules)
    source_eval = task_eval = None
    if sources:
        seq_len = args.seq_len or max(int(sources_lib.read_manifest(d)["seq_len"]) for d in sources.values())
        examples = args.examples_per_source or int((run_cfg.get("eval") or {}).get("examples_per_source") or 64)
        source_eval = SourceEvaluator(sources, mc, examples_per_source=examples, seq_len=seq_len,
                                      tokenizer_fingerprint=fingerprint, **common)
    if task_files:
        path = args.tokenizer or ckpt_model.checkpoint_tokenizer(ckpt, meta)
        if not path:
            raise ConfigError(f"--tokenizer: the checkpoint {ckpt} names no tokenizer found on disk, expected "
                              "--tokenizer FILE to tokenize --tasks")
        tok = load_tokenizer(path)
        if fingerprint and tok.fingerprint != fingerprint:
            log(f"warning: tokenizer {tok.path} differs from the one the checkpoint records "
                f"({fingerprint[:16]}...); scores may be meaningless")
        specs = {name: {"path": f, "fewshot": args.fewshot, "template": args.template}
                 for name, f in task_files.items()}
        task_eval = TaskEvaluator(specs, tok, mc, seq_len=args.seq_len or mc.max_seq_len,
                                  add_bos=ckpt_model.checkpoint_bos(meta, tok, args.bos), **common)

    t0 = time.perf_counter()
    params = ckpt_model.restore_params(ckpt, meta, mc, param_shardings)
    n = jax.device_count()
    log(f"restored {ckpt} (step {meta.get('step')}) onto {n} device{'s' if n != 1 else ''} in "
        f"{time.perf_counter() - t0:.1f}s")
    return {
        "sources": source_eval.evaluate(params, log) if source_eval is not None else {},
        "tasks": task_eval.evaluate(params, log, samples=args.log_samples) if task_eval is not None else {},
        "checkpoint": ckpt,
        "step": meta.get("step"),
    }


def _write_json(path: str, obj: Any) -> None:
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


@cli.reports_config_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.log_samples and not args.out:
        raise ConfigError("--log_samples: no --out, expected --out FILE to write the per-question records to")
    if args.out:
        out = os.path.abspath(os.path.expanduser(args.out))
        if os.path.isdir(out):
            raise ConfigError(f"--out {out}: a directory, expected a file path for the JSON results")
    results = run_cli(args, log)
    if jax.process_index() == 0:
        print(format_table(results))
        if args.out:
            _write_json(args.out, results)
            log(f"wrote {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

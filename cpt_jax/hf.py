"""Hugging Face interop: import safetensors checkpoints, export them back, compare logits.

    python -m cpt_jax.hf import --model_dir HF_DIR --out CKPT_DIR [--lr_min X] [--lr_max Y]
    python -m cpt_jax.hf export --checkpoint DIR --out HF_DIR [--dtype float32|bfloat16|float16]
    python -m cpt_jax.hf check  --model_dir HF_DIR --checkpoint DIR [--atol 1e-4]

hf_import.py, hf_export.py and hf_check.py (the only one that imports transformers and torch) do the work.
"""

from __future__ import annotations

import argparse
import os
import sys

from cpt_jax import cli, model
from cpt_jax.hf_check import check_logits
from cpt_jax.hf_export import EXPORT_DTYPES, export_hf
from cpt_jax.hf_import import import_hf


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of `python -m cpt_jax.hf`."""
    p = argparse.ArgumentParser(prog="python -m cpt_jax.hf",
                                description="Hugging Face safetensors <-> cpt_jax checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("import", help="Hugging Face model directory -> cpt_jax checkpoint")
    i.add_argument("--model_dir", required=True, help="Directory with config.json and safetensors weights.")
    i.add_argument("--out", required=True, help="New (or empty) directory for the cpt_jax checkpoint.")
    i.add_argument("--lr_min", type=float, default=None,
                   help="Final LR of the model's pretraining (the recipe starts there); default: published table.")
    i.add_argument("--lr_max", type=float, default=None, help="Peak LR of the model's pretraining (recorded).")
    e = sub.add_parser("export", help="cpt_jax checkpoint -> Hugging Face model directory")
    e.add_argument("--checkpoint", required=True, help="A checkpoint directory, its checkpoints/ or a step directory.")
    e.add_argument("--out", required=True, help="New (or empty) directory for the Hugging Face model.")
    e.add_argument("--dtype", default=None, choices=sorted(EXPORT_DTYPES),
                   help="dtype of the weights (default: the dtype the model was imported in; float32 for a model "
                        "cpt_jax trained from scratch).")
    k = sub.add_parser("check", help="compare the logits of a Hugging Face model and a cpt_jax checkpoint (fp32)")
    k.add_argument("--model_dir", required=True)
    k.add_argument("--checkpoint", required=True)
    k.add_argument("--atol", type=float, default=1e-4, help="Largest allowed |logit difference|.")
    k.add_argument("--batch_size", type=int, default=2)
    k.add_argument("--seq_len", type=int, default=64)
    k.add_argument("--seed", type=int, default=0)
    return p


@cli.reports_config_errors
def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a user error, 1 when check exceeds --atol)."""
    args = build_parser().parse_args(argv)
    if args.command == "import":
        meta = import_hf(args.model_dir, args.out, lr_min=args.lr_min, lr_max=args.lr_max)
        mc = model.ModelConfig.from_config(meta["model"])
        sched = meta["schedule"]
        print(f"imported {meta['source']['architecture']} ({mc.num_params() / 1e6:.1f}M parameters, "
              f"{meta['source']['dtype']}) into {os.path.abspath(args.out)}; lr_min {sched['lr_min']:g} "
              f"({sched['source']}), tokenizer {meta['tokenizer'] or 'none'}; continue with "
              f"--config configs/cpt_hf.py:{os.path.abspath(args.out)}")
    elif args.command == "export":
        r = export_hf(args.checkpoint, args.out, dtype=args.dtype)
        print(f"exported {args.checkpoint} to {os.path.abspath(args.out)} as {r['architecture']} in "
              f"{r['dtype']} ({r['dtype_reason']})")
    else:
        r = check_logits(args.model_dir, args.checkpoint, batch_size=args.batch_size, seq_len=args.seq_len,
                         seed=args.seed)
        ok = r["max_abs_diff"] <= args.atol
        print(f"logits {r['shape']}: max |diff| {r['max_abs_diff']:.3e}, max relative {r['max_rel_diff']:.3e} "
              f"(|diff| / max |logit| {r['max_abs_logit']:.3g}); --atol {args.atol:g}: "
              f"{'ok' if ok else 'EXCEEDED'}")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The recipe end to end on generated data: `python -m cpt_jax.demo [--workdir DIR] [--scale tiny|small|medium]`.

Stages (each is skipped when its output is already in DIR, so an ablation after the demo reuses them):
  corpus     synthetic biographies of two disjoint populations (A: pretraining, B: the new domain),
             filler text, QA about B with held-out people (cpt_jax/demo_corpus.py)
  tokenizer  a sentencepiece model trained on the corpus
  prepare    the sources A (A bios + filler), B (B bios), qa (training QA about B)
  base       pretraining on A with warmup + cosine (its checkpoint records peak and min LR)
  runs       three continuations with the same token budget:
               baseline  A only, constant at the base's min LR (read from the checkpoint)
               recipe    cosine from the base's min LR to 1/100, General Blend (A + B), then the QA Blend
                         (A + B + qa) once the LR reaches start/5
               rewarm    warmup back to the base's peak LR, cosine to start/100, the recipe's data
  report     DIR/report.md (validation loss per source, held-out QA accuracy, switch steps, tokens per
             source, comparisons with the baseline computed from the numbers) and DIR/report.png

`--ablation switch|floor|warmup` continues the same base model with variants of one recipe setting
and adds their table to the report, with whether this scale agrees with the paper's choice.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

from cpt_jax import checkpoint, schedules
from cpt_jax.config import ConfigError, default_config
from cpt_jax.demo_corpus import generate, write

SOURCES = ("A", "B", "qa")
GENERAL_BLEND = {"A": 0.5, "B": 0.5, "qa": 0.0}
QA_BLEND = {"A": 0.4, "B": 0.4, "qa": 0.2}
SWITCH_RATIO = 0.2  # General -> QA Blend when the LR reaches start/5
FINAL_RATIO = 0.01  # cosine to 1/100 of the start
TASK = "heldout_qa"
# (label, key, lower is better) of the metrics every table shows.
METRICS = (("val loss A", "loss_A", True), ("val loss B", "loss_B", True), ("QA acc", "acc", False))


@dataclasses.dataclass(frozen=True)
class Scale:
    people_a: int
    people_b: int
    bios_per_person: int
    filler_docs: int
    vocab_size: int
    model: dict
    seq_len: int
    batch_size: int
    base_steps: int
    cpt_steps: int
    peak_lr: float
    min_lr: float
    eval_examples: int
    evals_per_run: int


SCALES = {
    # CI: the whole demo in well under 2 minutes on a 2-core CPU.
    "tiny": Scale(people_a=120, people_b=60, bios_per_person=3, filler_docs=120, vocab_size=256,
                  model=dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, dtype="float32"),
                  seq_len=64, batch_size=8, base_steps=60, cpt_steps=40, peak_lr=3e-3, min_lr=3e-4,
                  eval_examples=8, evals_per_run=2),
    # The default: a few minutes on a 2-core CPU.
    "small": Scale(people_a=300, people_b=150, bios_per_person=3, filler_docs=300, vocab_size=256,
                   model=dict(n_layers=2, d_model=128, n_heads=4, n_kv_heads=2, d_ff=384, dtype="float32"),
                   seq_len=64, batch_size=16, base_steps=400, cpt_steps=250, peak_lr=3e-3, min_lr=3e-4,
                   eval_examples=32, evals_per_run=4),
    # One GPU, tens of minutes.
    "medium": Scale(people_a=550, people_b=300, bios_per_person=6, filler_docs=3000, vocab_size=256,
                    model=dict(n_layers=8, d_model=512, n_heads=8, n_kv_heads=4, d_ff=1536, dtype="bfloat16"),
                    seq_len=256, batch_size=32, base_steps=3000, cpt_steps=1500, peak_lr=1e-3, min_lr=1e-4,
                    eval_examples=128, evals_per_run=6),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One continuation: its schedule section, its phases, and the label in the tables."""

    name: str
    label: str
    schedule: dict
    phases: tuple
    same_as: str = ""  # a main run with exactly this setting (its results are reused)


def _recipe_phases(switch_ratio: float = SWITCH_RATIO) -> tuple:
    return (dict(weights=GENERAL_BLEND), dict(weights=QA_BLEND, start_at=dict(lr_ratio=switch_ratio)))


def main_runs(meta: dict, steps: int) -> list[Variant]:
    """The three continuations of the demo; `meta` is the base checkpoint's metadata."""
    return [
        Variant("baseline", "A only, constant at the base's min LR", dict(name="constant"),
                (dict(weights={"A": 1.0, "B": 0.0, "qa": 0.0}),)),
        Variant("recipe", "cosine from the base's min LR to 1/100, General Blend then QA Blend at start/5",
                dict(name="recipe", final_ratio=FINAL_RATIO), _recipe_phases()),
        Variant("rewarm", "warmup to the base's peak LR, cosine to start/100, the recipe's data",
                dict(name="rewarm", peak_lr=meta["lr_max"], min_lr=meta["lr_min"] * FINAL_RATIO,
                     warmup_steps=max(1, steps // 10)), _recipe_phases()),
    ]


# The paper's best setting per ablation kind (notes/recipe.md).
PAPER_BEST = {"switch": "switch_5", "floor": "floor_1pct", "warmup": "no_warmup"}


def ablation_runs(kind: str, meta: dict, steps: int) -> list[Variant]:
    recipe = dict(name="recipe", final_ratio=FINAL_RATIO)
    start = meta["lr_min"]
    if kind == "switch":
        return [Variant(f"switch_{d}", f"switch at start/{d}", recipe, _recipe_phases(1.0 / d),
                        "recipe" if d == 5 else "") for d in (2, 5, 10, 50)]
    if kind == "floor":
        return [Variant(f"floor_{name}", f"cosine floor {name.replace('pct', '%')} of the start",
                        dict(name="recipe", final_ratio=ratio), _recipe_phases(),
                        "recipe" if ratio == FINAL_RATIO else "")
                for name, ratio in (("10pct", 0.1), ("1pct", 0.01), ("0.1pct", 0.001))]
    if kind == "warmup":
        warm = max(1, steps // 20)
        return [Variant("no_warmup", "no warmup (the recipe)", recipe, _recipe_phases(), "recipe")] + [
            Variant(f"warmup_{k}x", f"warmup ({warm} steps) to {k}x the start",
                    dict(name="rewarm", peak_lr=k * start, min_lr=start * FINAL_RATIO, warmup_steps=warm),
                    _recipe_phases())
            for k in (2, 10)
        ]
    raise ValueError(f"ablation {kind!r}")


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------


def _stage(name: str, message: str) -> None:
    print(f"[demo] {name}: {message}", flush=True)


def _check_scale(workdir: str, scale: str, seed: int) -> None:
    """The workdir belongs to one scale and seed: refuse to mix runs of another."""
    path = os.path.join(workdir, "demo.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != {"scale": scale, "seed": seed}:
            raise ConfigError(f"--workdir: {workdir} holds a demo at scale {saved.get('scale')!r} seed "
                              f"{saved.get('seed')}, expected scale {scale!r} seed {seed}; use another --workdir")
        return
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"scale": scale, "seed": seed}, f)


def prepare_data(workdir: str, s: Scale, seed: int) -> dict[str, Any]:
    """Corpus, tokenizer and prepared sources (each made only when absent). Returns their paths."""
    from cpt_jax.data.prepare import prepare
    from cpt_jax.data.tokenizer import train_sentencepiece

    corpus_dir = os.path.join(workdir, "corpus")
    files = {name: os.path.join(corpus_dir, f"{name}.jsonl") for name in (*SOURCES, TASK)}
    if all(os.path.exists(p) for p in files.values()):
        _stage("corpus", f"reusing {corpus_dir}")
    else:
        _stage("corpus", f"generating biographies, filler and QA (seed {seed}) in {corpus_dir}")
        corpus = generate(seed, people_a=s.people_a, people_b=s.people_b, bios_per_person=s.bios_per_person,
                          filler_docs=s.filler_docs)
        files = write(corpus, corpus_dir)
    tok = os.path.join(workdir, "tokenizer.model")
    if os.path.exists(tok):
        _stage("tokenizer", f"reusing {tok}")
    else:
        _stage("tokenizer", f"training sentencepiece (vocab {s.vocab_size}) -> {tok}")
        docs = []
        for name in SOURCES:
            with open(files[name]) as f:
                docs.extend(json.loads(line)["text"] for line in f)
        train_sentencepiece(docs, tok, s.vocab_size, byte_fallback=False, num_threads=2)
    prepared = {}
    for name in SOURCES:
        out = os.path.join(workdir, "prepared", name)
        prepared[name] = out
        if os.path.exists(os.path.join(out, "manifest.json")):
            _stage("prepare", f"reusing {out}")
            continue
        val = s.eval_examples if name != "qa" else max(2, s.eval_examples // 4)
        manifest = prepare([f"jsonl:{files[name]}"], tok, s.seq_len, out, val_examples=val, workers=1, name=name)
        _stage("prepare", f"{name}: {manifest['documents']} documents, {manifest['tokens']} tokens, "
                          f"{manifest['examples']} examples -> {out}")
    return {"tokenizer": tok, "sources": prepared, "task": files[TASK]}


def eval_every(steps: int, evals: int) -> int:
    """The largest divisor of `steps` that gives at least `evals` evaluations: the last one is at the
    final step (the numbers of the report)."""
    return max(d for d in range(1, max(1, steps // evals) + 1) if steps % d == 0)


def _config_text(s: Scale, data: dict, steps: int, schedule: dict, phases: tuple, init_from: str) -> str:
    return f'''"""Written by cpt_jax.demo."""
from cpt_jax.presets import preset_config


def get_config():
    c = preset_config("tiny")
    c.model.update({dict(s.model, vocab_size=s.vocab_size, max_seq_len=max(256, s.seq_len))!r})
    c.train.update(steps={steps}, batch_size={s.batch_size}, seq_len={s.seq_len}, log_every_steps=1)
    c.schedule.update({schedule!r})
    c.checkpoint.update(every_steps={steps}, max_to_keep=1)
    c.tensorboard = False
    c.init_from = {init_from!r}
    c.data.kind = "mixture"
    c.data.tokenizer = {data["tokenizer"]!r}
    c.data.sources.update({data["sources"]!r})
    c.data.phases = {phases!r}
    c.eval.every_steps = {eval_every(steps, s.evals_per_run)}
    c.eval.examples_per_source = {s.eval_examples}
    c.eval.batch_size = {s.batch_size}
    c.eval.tasks.{TASK} = {data["task"]!r}
    return c
'''


def _final_eval(workdir: str, steps: int) -> dict | None:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        evals = [r for r in map(json.loads, f) if r.get("kind") == "eval" and r.get("step") == steps]
    return evals[-1] if evals else None


def train_run(workdir: str, s: Scale, data: dict, steps: int, schedule: dict, phases: tuple,
              init_from: str = "") -> None:
    """One training run in-process (skipped when its final evaluation is already there)."""
    from cpt_jax import train

    if _final_eval(workdir, steps) is not None:
        _stage("train", f"reusing {workdir}")
        return
    os.makedirs(workdir, exist_ok=True)
    cfg_file = os.path.join(workdir, "demo_config.py")
    with open(cfg_file, "w") as f:
        f.write(_config_text(s, data, steps, schedule, phases, init_from))
    start = time.monotonic()
    log_path = os.path.join(workdir, "train.log")
    # The trainer's per-step lines go to the run's log; the demo prints its stages.
    with open(log_path, "a") as log, contextlib.redirect_stderr(log):
        status = train.main(["train", f"--config={cfg_file}", f"--workdir={workdir}"])
    if status:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-5:])
        raise RuntimeError(f"training in {workdir} failed with status {status}; the end of {log_path}:\n{tail}")
    _stage("train", f"{os.path.basename(workdir)} done in {time.monotonic() - start:.0f}s")


def run_base(workdir: str, s: Scale, data: dict) -> dict:
    base = os.path.join(workdir, "base")
    _stage("base", f"pretraining on A, warmup + cosine {s.peak_lr:g} -> {s.min_lr:g}, {s.base_steps} steps")
    train_run(base, s, data, s.base_steps,
              dict(name="warmup_cosine", peak_lr=s.peak_lr, min_lr=s.min_lr, warmup_steps=max(1, s.base_steps // 10)),
              (dict(weights={"A": 1.0, "B": 0.0, "qa": 0.0}),))
    return checkpoint.read_metadata(os.path.join(base, "checkpoints"))


def run_variants(workdir: str, s: Scale, data: dict, variants: list[Variant], meta: dict) -> dict[str, str]:
    """Train each variant from the base checkpoint; {variant name: its workdir}."""
    init_from = os.path.join(workdir, "base", "checkpoints")
    out = {}
    for v in variants:
        reuse = os.path.join(workdir, "runs", v.same_as) if v.same_as else ""
        if reuse and _final_eval(reuse, s.cpt_steps) is not None:
            _stage("ablation", f"{v.name}: the same setting as the main run '{v.same_as}', reusing {reuse}")
            out[v.name] = reuse
            continue
        _stage("continue", f"{v.name}: {v.label}, {s.cpt_steps} steps")
        out[v.name] = v_dir = os.path.join(workdir, "runs" if v.name in ("baseline", "recipe", "rewarm")
                                           else "ablations", v.name)
        train_run(v_dir, s, data, s.cpt_steps, v.schedule, v.phases, init_from)
    return out


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


def planned_switch(schedule: dict, steps: int, start_lr: float, phases: tuple) -> int | None:
    """The step at which the LR first reaches the second phase's lr_ratio x start (the schedule crossing)."""
    if len(phases) < 2:
        return None
    cfg = default_config().schedule
    cfg.update(schedule)
    sched = schedules.build(cfg, steps, start_lr)
    return schedules.crossing_step(sched, phases[1]["start_at"]["lr_ratio"] * sched.start_lr)


def results(workdir: str, steps: int, variant: Variant | None, start_lr: float) -> dict[str, Any]:
    """The numbers of one finished run: final eval, switch steps, tokens per source."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = list(map(json.loads, f))
    train_recs = sorted((r for r in records if r.get("kind") == "train"), key=lambda r: r["step"])
    final = _final_eval(workdir, steps)
    if final is None:
        raise RuntimeError(f"{workdir}: no evaluation at step {steps}")
    sources = final.get("sources") or {}
    out = {
        "loss_A": sources.get("A", {}).get("loss", math.nan),
        "loss_B": sources.get("B", {}).get("loss", math.nan),
        "loss_qa": sources.get("qa", {}).get("loss", math.nan),
        "acc": (final.get("tasks") or {}).get(TASK, {}).get("acc", math.nan),
        "questions": (final.get("tasks") or {}).get(TASK, {}).get("n", 0),
        "tokens": dict(train_recs[-1]["tokens_per_source"]) if train_recs else {},
        "planned": None,
        "actual": next((r["step"] for r in train_recs if r.get("phase") == 1), None),
        "first_lr": train_recs[0]["lr"] if train_recs else math.nan,
        "last_lr": train_recs[-1]["lr"] if train_recs else math.nan,
    }
    if variant is not None:
        out["planned"] = planned_switch(variant.schedule, steps, start_lr, variant.phases)
    return out


def compare(value: float, reference: float, lower_is_better: bool) -> str:
    """'better' / 'worse' / 'same' (to 3 decimals) of a metric against a reference."""
    if math.isnan(value) or math.isnan(reference):
        return "n/a"
    a, b = round(value, 3), round(reference, 3)
    if a == b:
        return "same"
    return "better" if (a < b) == lower_is_better else "worse"


def best_variant(rows: dict[str, dict], key: str, lower_is_better: bool) -> str:
    values = {name: r[key] for name, r in rows.items() if not math.isnan(r[key])}
    if not values:
        return "n/a"
    return (min if lower_is_better else max)(values, key=values.get)


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.3f}"
    return str(x)


def metrics_table(rows: dict[str, dict], reference: str | None) -> list[str]:
    head = "| run | " + " | ".join(label for label, _, _ in METRICS)
    head += " | val loss qa | switch planned | switch actual |"
    if reference:
        head += " vs baseline (" + ", ".join(label for label, _, _ in METRICS) + ") |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in rows.items():
        cells = [name, *(_fmt(r[key]) for _, key, _ in METRICS), _fmt(r["loss_qa"]),
                 _fmt(r["planned"]), _fmt(r["actual"])]
        if reference:
            ref = rows[reference]
            cells.append("-" if name == reference else
                         ", ".join(compare(r[key], ref[key], low) for _, key, low in METRICS))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def tokens_table(rows: dict[str, dict]) -> list[str]:
    lines = ["| run | " + " | ".join(f"tokens {s}" for s in SOURCES) + " | total |",
             "|---|" + "---|" * (len(SOURCES) + 1)]
    for name, r in rows.items():
        counts = [int(r["tokens"].get(s, 0)) for s in SOURCES]
        lines.append(f"| {name} | " + " | ".join(str(c) for c in counts) + f" | {sum(counts)} |")
    return lines


def switch_agreement(rows: dict[str, dict]) -> list[str]:
    out = []
    for name, r in rows.items():
        if r["planned"] is None and r["actual"] is None:
            continue
        verdict = "agree" if r["planned"] == r["actual"] else "DISAGREE"
        out.append(f"- {name}: planned switch step {_fmt(r['planned'])}, actual {_fmt(r['actual'])}: {verdict}")
    return out


def main_section(rows: dict[str, dict], base_row: dict, meta: dict, s: Scale, scale: str) -> list[str]:
    table_rows = {"base": base_row, **rows}
    lines = [
        "## Main comparison",
        "",
        f"Scale `{scale}`: model {s.model}, {s.cpt_steps} continuation steps x {s.batch_size} x {s.seq_len} tokens "
        f"(the same budget for every run), base {s.base_steps} steps. Base checkpoint: peak LR "
        f"{meta['lr_max']:.3g}, min LR {meta['lr_min']:.3g}. Validation loss: the val split of each source "
        f"(A: forgetting, B: learning the new domain, qa: the trained QA format); QA acc: the held-out questions "
        f"about B (never trained on; {rows['recipe']['questions']} questions) as 4-way multiple choice (chance "
        f"0.25).",
        "",
        *metrics_table(table_rows, "baseline"),
        "",
        "Switch General -> QA Blend (planned: the schedule's crossing of start/5; actual: the first train "
        "record in phase 1):",
        "",
        *switch_agreement(rows),
        "",
        "Tokens per source (at the end of each run):",
        "",
        *tokens_table(rows),
        "",
        "### The recipe against the baseline (computed from the numbers above)",
        "",
    ]
    rec, ref = rows["recipe"], rows["baseline"]
    for label, key, low in METRICS:
        verdict = compare(rec[key], ref[key], low)
        lines.append(f"- {label}: recipe {_fmt(rec[key])} vs baseline {_fmt(ref[key])} -> the recipe is "
                     f"**{verdict}**" + ("" if verdict == "better" else " (it does not beat the baseline here)"))
    lines.append("")
    return lines


def ablation_section(kind: str, rows: dict[str, dict], variants: list[Variant]) -> list[str]:
    paper = PAPER_BEST[kind]
    lines = [f"## Ablation: {kind}", "", *(f"- `{v.name}`: {v.label}" for v in variants), "",
             *metrics_table(rows, None), "",
             f"The paper found `{paper}` best. At this scale (computed from the numbers above):", ""]
    for label, key, low in METRICS:
        best = best_variant(rows, key, low)
        lines.append(f"- by {label}: best is `{best}` -> " + ("agrees" if best == paper else "does not agree"))
    lines.append("")
    return lines


def write_report(workdir: str, s: Scale, scale: str, meta: dict, ablation: str | None = None) -> tuple[str, list[str]]:
    """report.md from every finished run in the workdir, report.png from the main runs. Returns the
    report's path and its main table (for printing)."""
    from cpt_jax import plot

    start = meta["lr_min"]
    base_row = results(os.path.join(workdir, "base"), s.base_steps, None, start)
    lines = [f"# cpt_jax demo report ({scale})", ""]
    printed: list[str] = []
    main = {v.name: v for v in main_runs(meta, s.cpt_steps)}
    main_dirs = {name: os.path.join(workdir, "runs", name) for name in main}
    if all(_final_eval(d, s.cpt_steps) is not None for d in main_dirs.values()):
        rows = {name: results(d, s.cpt_steps, main[name], start) for name, d in main_dirs.items()}
        section = main_section(rows, base_row, meta, s, scale)
        lines += section
        printed += section
        fig = plot.make_figure([plot.load_run(d) for d in main_dirs.values()], list(main_dirs))
        fig.savefig(os.path.join(workdir, "report.png"), dpi=90)
        lines += ["![curves](report.png)", ""]
    elif ablation is None:
        raise RuntimeError(f"{workdir}: the runs {', '.join(main_dirs)} have no final evaluation")
    for kind in PAPER_BEST:
        variants = ablation_runs(kind, meta, s.cpt_steps)
        dirs = {}
        for v in variants:
            d = os.path.join(workdir, "ablations", v.name)
            if v.same_as and _final_eval(d, s.cpt_steps) is None:
                d = os.path.join(workdir, "runs", v.same_as)
            dirs[v.name] = d
        if not all(_final_eval(d, s.cpt_steps) is not None for d in dirs.values()):
            if kind == ablation:
                raise RuntimeError(f"{workdir}: the {kind} ablation's runs have no final evaluation")
            continue
        rows = {v.name: results(dirs[v.name], s.cpt_steps, v, start) for v in variants}
        section = ablation_section(kind, rows, variants)
        lines += section
        printed += section
        fig = plot.make_figure([plot.load_run(d) for d in dirs.values()], list(dirs))
        fig.savefig(os.path.join(workdir, f"report_{kind}.png"), dpi=90)
        lines += [f"![{kind}](report_{kind}.png)", ""]
    path = os.path.join(workdir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path, printed


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cpt_jax.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo_out", help="Where the corpus, data, runs and report go.")
    parser.add_argument("--scale", default="small", choices=sorted(SCALES), help="tiny: CI; small: a CPU in "
                        "minutes (default); medium: one GPU, tens of minutes.")
    parser.add_argument("--ablation", choices=sorted(PAPER_BEST), default=None,
                        help="Instead of the main comparison, the variants of one recipe setting.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the generated corpus.")
    return parser


def run(workdir: str, scale: str = "small", ablation: str | None = None, seed: int = 0) -> str:
    """The demo (or one ablation); returns the report's path."""
    s = SCALES[scale]
    workdir = os.path.abspath(workdir)
    started = time.monotonic()
    _check_scale(workdir, scale, seed)
    data = prepare_data(workdir, s, seed)
    meta = run_base(workdir, s, data)
    _stage("base", f"checkpoint: peak LR {meta['lr_max']:.3g}, min LR {meta['lr_min']:.3g} (the continuations "
                   "start from it)")
    if ablation is None:
        run_variants(workdir, s, data, main_runs(meta, s.cpt_steps), meta)
    else:
        run_variants(workdir, s, data, ablation_runs(ablation, meta, s.cpt_steps), meta)
    _stage("report", "evaluating the numbers, writing report.md and the figures")
    path, table = write_report(workdir, s, scale, meta, ablation)
    print("\n".join(table), flush=True)
    print(f"[demo] report: {path} ({time.monotonic() - started:.0f}s)", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args.workdir, args.scale, args.ablation, args.seed)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

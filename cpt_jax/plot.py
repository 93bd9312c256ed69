"""python -m cpt_jax.plot: one PNG of a run, or of several runs overlaid (a recipe against a baseline).

    python -m cpt_jax.plot WORKDIR [WORKDIR ...] [--labels recipe,baseline] [--out figure.png]

Four panels over tokens seen (training loss, per-source validation loss, task accuracy, the LR with
the mixture phases shaded) from each WORKDIR's metrics.jsonl and config.json. A panel without data
says so instead of vanishing, so figures of different runs have the same layout. A user error
prints `error: <one line>` and exits with status 2. `load_run` gives the numbers as arrays and
`make_figure` the matplotlib Figure: tests check those, not pixels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

import numpy as np

PANELS = ("training loss", "validation loss", "task accuracy", "learning rate")
LINESTYLES = ("-", "--", ":", "-.")


class PlotError(Exception):
    """A user error, reported as one line."""


def _parse(value: Any) -> float | None:
    """A record value as a float: numbers, and the strings metrics.jsonl writes for NaN/inf ("nan",
    "inf"); None for anything else, bools included."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _num(value: Any) -> float:
    parsed = _parse(value)
    return math.nan if parsed is None else parsed


def read_records(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. An unreadable line is a PlotError naming file:line, except an
    unterminated last line (a record being written by a live run), which is skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as e:
        raise PlotError(f"{path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise PlotError(f"{path}: not UTF-8 text ({e.reason}), expected a metrics.jsonl") from None
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines) and not line.endswith("\n"):
                continue
            raise PlotError(f"{path}:{lineno}: not valid JSON ({e.msg}), expected one JSON object per line") from None
        if not isinstance(record, dict):
            raise PlotError(f"{path}:{lineno}: a JSON {type(record).__name__}, expected an object with a 'kind'")
        if record.get("kind") in ("train", "eval") and not isinstance(record.get("step"), int):
            raise PlotError(f"{path}:{lineno}: {record['kind']} record without an integer 'step'")
        record["_line"] = lineno
        records.append(record)
    return records


def _tokens_per_step_from_config(workdir: str) -> tuple[int | None, int | None]:
    """(train.batch_size * train.seq_len, train.steps) from WORKDIR/config.json; None where unknown."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None, None
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlotError(f"{path}: not readable JSON ({e}), expected the config.json a run writes") from None
    train = cfg.get("train") if isinstance(cfg, dict) else None
    if not isinstance(train, dict):
        return None, None
    B, T, steps = train.get("batch_size"), train.get("seq_len"), train.get("steps")
    tps = B * T if isinstance(B, int) and isinstance(T, int) else None
    return tps, steps if isinstance(steps, int) else None


def _last_per_step(records: list[dict]) -> list[dict]:
    """One record per step (the last written), sorted by step."""
    return sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])


def _columns(records: list[dict], skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Every numeric field of the records as a float array (NaN where a record lacks it)."""
    keys = dict.fromkeys(k for r in records for k, v in r.items()
                         if k not in skip and not k.startswith("_") and _parse(v) is not None)
    return {k: np.array([_num(r.get(k)) for r in records], dtype=np.float64) for k in keys}


def _nested(records: list[dict], field: str, tokens: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """{name: {step, tokens, metric...}} from records' `field` ({name: {metric: value}}), each name
    over the records that have it."""
    out = {}
    for name in dict.fromkeys(n for r in records for n in r.get(field) or {}):
        rows = [(i, r[field][name]) for i, r in enumerate(records) if isinstance((r.get(field) or {}).get(name), dict)]
        metrics = _columns([m for _, m in rows])
        idx = np.array([i for i, _ in rows], dtype=np.int64)
        out[name] = {"step": np.array([records[i]["step"] for i in idx], dtype=np.int64), "tokens": tokens[idx],
                     **metrics}
    return out


def load_run(workdir: str) -> dict[str, Any]:
    """The records of one run as arrays. Raises PlotError for a missing directory, file or bad line.

    Returns: workdir, name (the directory's name), tokens_per_step (config.json, else inferred from the
    train records, else None), steps (train.steps or None), train ({field: array} sorted by step, with
    tokens_per_source {source: array}), eval (step, tokens arrays; sources {name: {step, tokens, loss,
    perplexity, bits_per_byte}}; tasks {name: {step, tokens, acc, acc_norm, n}}), phases (from the last
    plan record: index, start_step, start_tokens, weights, start_at), plan (that record) and events.

    An eval record's tokens are those of the train record of the same step, else step x tokens_per_step.
    """
    workdir = os.path.abspath(workdir)
    if not os.path.isdir(workdir):
        what = "not a directory" if os.path.exists(workdir) else "no such directory"
        raise PlotError(f"{workdir}: {what}, expected a run's WORKDIR (python -m cpt_jax.train --workdir WORKDIR)")
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise PlotError(f"{path}: not found, expected the metrics.jsonl a training run writes into its WORKDIR")
    records = read_records(path)
    tps, steps = _tokens_per_step_from_config(workdir)

    train_records = _last_per_step([r for r in records if r.get("kind") == "train"])
    if tps is None:  # a train record of step s has seen (s + 1) * tokens_per_step tokens
        first = next((r for r in train_records if _parse(r.get("tokens")) is not None), None)
        if first is not None:
            tps = int(round(_num(first["tokens"]) / (first["step"] + 1)))
    train = _columns(train_records, skip=("step", "tokens"))
    train["step"] = np.array([r["step"] for r in train_records], dtype=np.int64)
    train["tokens"] = np.array([_num(r["tokens"]) if "tokens" in r else (r["step"] + 1) * tps if tps else math.nan
                                for r in train_records], dtype=np.float64)
    sources = sorted({s for r in train_records for s in (r.get("tokens_per_source") or {})})
    train["tokens_per_source"] = {
        s: np.array([_num((r.get("tokens_per_source") or {}).get(s)) for r in train_records]) for s in sources
    }

    tokens_at = {int(s): t for s, t in zip(train["step"], train["tokens"], strict=True)}
    eval_records = _last_per_step([r for r in records if r.get("kind") == "eval"])
    eval_tokens = np.array([tokens_at.get(r["step"], r["step"] * tps if tps else math.nan) for r in eval_records],
                           dtype=np.float64)
    evals = {
        "step": np.array([r["step"] for r in eval_records], dtype=np.int64),
        "tokens": eval_tokens,
        "sources": _nested(eval_records, "sources", eval_tokens),
        "tasks": _nested(eval_records, "tasks", eval_tokens),
    }

    plans = [r for r in records if r.get("kind") == "plan"]
    plan = plans[-1] if plans else None
    phases = []
    for p in (plan or {}).get("phases") or []:
        if isinstance(p, dict) and isinstance(p.get("start_step"), int):
            phases.append({"index": p.get("index", len(phases)), "start_step": p["start_step"],
                           "start_tokens": p["start_step"] * tps if tps else math.nan,
                           "weights": p.get("weights") or {}, "start_at": p.get("start_at")})
    return {"workdir": workdir, "name": os.path.basename(workdir), "tokens_per_step": tps, "steps": steps,
            "train": train, "eval": evals, "phases": phases, "plan": plan,
            "events": [r for r in records if r.get("kind") == "event"]}


def _finite_max(xs: np.ndarray) -> float:
    finite = xs[np.isfinite(xs)]
    return float(finite.max()) if finite.size else math.nan


def _token_scale(runs: list[dict]) -> tuple[float, str]:
    """(divisor, unit) for the tokens axis: T, B, M or K by the largest count in any run."""
    maxima = [_finite_max(xs) for run in runs for xs in (run["train"]["tokens"], run["eval"]["tokens"])]
    largest = max([m for m in maxima if not math.isnan(m)], default=0.0)
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if largest >= size:
            return size, unit
    return 1.0, ""


def _finish_panel(ax, ylabel: str, drawn: bool, empty: str) -> None:
    """A legend when the panel has lines, else a note of what is missing (the panel stays)."""
    ax.set_ylabel(ylabel)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", color="gray")


def make_figure(runs: list[dict], labels: list[str]):
    """The four panels (PANELS, in order, 2 x 2) for runs from load_run, overlaid; a matplotlib Figure.

    Training loss and LR: one line per run (the run's color). Validation loss and task accuracy: one
    line per run x source (x task), colored by source, one line style per run.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training hosts
    from matplotlib.figure import Figure

    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    scale, unit = _token_scale(runs)
    several = len(runs) > 1
    fig = Figure(figsize=(13, 8.5))
    axes = fig.subplots(2, 2)
    loss_ax, val_ax, task_ax, lr_ax = axes.ravel()
    for ax, title in zip(axes.ravel(), PANELS, strict=True):
        ax.set_title(title)
        ax.set_xlabel(f"tokens ({unit})" if unit else "tokens")
        ax.grid(alpha=0.3)
    run_colors = [f"C{i % 10}" for i in range(len(runs))]

    # Training loss and the learning rate: one line per run.
    for ax, field, ylabel in ((loss_ax, "loss", "loss"), (lr_ax, "lr", "learning rate")):
        drawn = False
        for run, label, color in zip(runs, labels, run_colors, strict=True):
            train = run["train"]
            if field in train and np.isfinite(train[field]).any():
                ax.plot(train["tokens"] / scale, train[field], color=color, linewidth=1.2, label=label)
                drawn = True
        _finish_panel(ax, ylabel, drawn, "no train records")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    # Mixture phases on the LR panel: shaded spans (one color per phase index), a line at each switch.
    phase_colors = matplotlib.colormaps["tab10"]
    for r, (run, label, color) in enumerate(zip(runs, labels, run_colors, strict=True)):
        phases = [p for p in run["phases"] if math.isfinite(p["start_tokens"])]
        # The run's planned end (config.json), else its last train record.
        end = (run["steps"] * run["tokens_per_step"] if run["steps"] and run["tokens_per_step"]
               else _finite_max(run["train"]["tokens"]))
        for i, p in enumerate(phases):
            lo = p["start_tokens"] / scale
            hi = phases[i + 1]["start_tokens"] / scale if i + 1 < len(phases) else end / scale
            if math.isfinite(hi) and hi > lo:
                lr_ax.axvspan(lo, hi, color=phase_colors(p["index"] % 10), alpha=0.12 / len(runs), linewidth=0)
            if i > 0:
                lr_ax.vlines(lo, 0, 1, transform=lr_ax.get_xaxis_transform(), colors=color,
                             linestyles=LINESTYLES[r % len(LINESTYLES)], linewidth=0.9)
            if not several:
                lr_ax.text(lo, 0.98, f" phase {p['index']}", transform=lr_ax.get_xaxis_transform(), va="top",
                           fontsize=8)
            elif i > 0:  # which run switched there
                lr_ax.text(lo, 0.98 - 0.06 * r, f" {label}: phase {p['index']}", transform=lr_ax.get_xaxis_transform(),
                           va="top", fontsize=8, color=color)

    # Evaluations: one line per run x source (task), colored by name, styled by run.
    for ax, field, metric, ylabel, empty in (
        (val_ax, "sources", "loss", "loss", "no eval records"),
        (task_ax, "tasks", "acc", "accuracy", "no task records"),
    ):
        names = list(dict.fromkeys(n for run in runs for n in run["eval"][field]))
        drawn = False
        for r, (run, label) in enumerate(zip(runs, labels, strict=True)):
            for name, series in run["eval"][field].items():
                if metric not in series or not np.isfinite(series[metric]).any():
                    continue
                ax.plot(series["tokens"] / scale, series[metric], color=f"C{names.index(name) % 10}",
                        linestyle=LINESTYLES[r % len(LINESTYLES)], marker="o", markersize=3, linewidth=1.2,
                        label=f"{label}: {name}" if several else name)
                drawn = True
        _finish_panel(ax, ylabel, drawn, empty)

    fig.suptitle(" vs ".join(labels) if several else labels[0])
    fig.tight_layout()
    return fig


def default_labels(workdirs: list[str]) -> list[str]:
    """The directories' names; parent/name where two runs share a name."""
    paths = [os.path.abspath(w) for w in workdirs]
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) < len(names):
        names = [os.path.join(os.path.basename(os.path.dirname(p)), os.path.basename(p)) for p in paths]
    return names


def _check_out(out: str) -> None:
    """Fail before drawing: the directory must exist and matplotlib must have a writer for the extension."""
    from matplotlib.backend_bases import FigureCanvasBase

    if not os.path.isdir(os.path.dirname(out)):
        raise PlotError(f"--out: {out}: directory {os.path.dirname(out)} does not exist, expected a writable file path")
    ext = os.path.splitext(out)[1].lstrip(".").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if ext not in formats:
        raise PlotError(f"--out: {out}: extension {ext!r} is not an image format matplotlib writes, expected one of "
                        f"{', '.join(sorted(formats))} (e.g. .png)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        raise PlotError(f"{message} (usage: python -m cpt_jax.plot WORKDIR [WORKDIR ...] [--labels a,b] [--out F])")


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 after writing the PNG, 2 with one error line otherwise."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _Parser(prog="python -m cpt_jax.plot", description="Plot one run, or several runs overlaid.")
    parser.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="a run's directory (holds metrics.jsonl)")
    parser.add_argument("--labels", help="comma-separated names of the runs (default: directory names)")
    parser.add_argument("--out", help="the PNG (default: WORKDIR/plot.png for one run, ./comparison.png for several)")
    try:
        args = parser.parse_args(argv)
        labels = default_labels(args.workdirs)
        if args.labels is not None:
            labels = [s.strip() for s in args.labels.split(",")]
            if len(labels) != len(args.workdirs) or not all(labels):
                raise PlotError(f"--labels: {args.labels!r} names {len(labels)} runs, expected {len(args.workdirs)} "
                                "non-empty names separated by commas, one per WORKDIR")
        runs = [load_run(w) for w in args.workdirs]
        out = args.out or (os.path.join(runs[0]["workdir"], "plot.png") if len(runs) == 1 else "comparison.png")
        out = os.path.abspath(out)
        _check_out(out)
        fig = make_figure(runs, labels)
        try:
            fig.savefig(out, dpi=110)
        except OSError as e:
            raise PlotError(f"--out: {out}: {e.strerror}, expected a writable file path") from None
    except PlotError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

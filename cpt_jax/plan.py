"""python -m cpt_jax.plan --config FILE [--out plan.png]: what a run will do, before it runs.

The trainer's own schedule and mixture (`resolve.for_plan`): where each phase starts, the tokens
and epochs every source gives (from its manifest; '?' when not prepared yet), warnings for sources
that repeat more than `data.max_epochs_warning` epochs, and a PNG of the LR and the mixture weights.
Nothing is compiled and no data is read beyond the manifests.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import ml_collections
import numpy as np

from cpt_jax import cli, resolve, schedules
from cpt_jax.config import ConfigError
from cpt_jax.data import sources as sources_lib


def _manifest(directory: str) -> dict | None:
    """The source's manifest, or None when it is not readable (a placeholder path, not prepared yet)."""
    try:
        return sources_lib.read_manifest(directory)
    except ConfigError:
        return None


def make_plan(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Every number the plan shows, as the dict `format_plan` prints and `write_png` draws (the LR
    at steps 0..steps, the phases with their tokens and epochs per source, warnings). Raises
    ConfigError for a bad config.
    """
    run = resolve.for_plan(cfg)
    steps, B, L = int(cfg.train.steps), int(cfg.train.batch_size), int(cfg.train.seq_len)
    schedule, mixture = run.schedule, run.mixture  # the trainer's own schedule and sampler
    lr = schedules.values(schedule)
    warnings: list[str] = []
    names, phases = mixture.source_names, mixture.phases
    manifests = {n: _manifest(cfg.data.sources[n]) if cfg.data.kind == "mixture" else None for n in names}
    examples = {n: (int(m["examples"]) if m else None) for n, m in manifests.items()}
    for name, m in manifests.items():
        if m and int(m["seq_len"]) != L:
            warnings.append(
                f"source {name}: prepared with seq_len {m['seq_len']}, train.seq_len is {L}; the trainer will "
                f"refuse it (prepare it again with --seq_len {L})"
            )

    def epochs_of(counts: dict[str, int]) -> dict[str, float | None]:
        return {n: (c / examples[n] if examples[n] else None) for n, c in counts.items()}

    plan_phases = []
    for i, phase in enumerate(phases):
        end = phases[i + 1].start_step if i + 1 < len(phases) else steps
        counts = mixture.examples_per_source(phase.start_step * B, end * B)
        plan_phases.append({
            "index": phase.index, "start_step": phase.start_step, "end_step": end,
            "lr_at_start": float(lr[phase.start_step]), "fraction": phase.start_step / steps,
            "start_tokens": phase.start_step * B * L, "tokens": (end - phase.start_step) * B * L,
            "weights": dict(phase.weights), "start_at": phase.start_at,
            "tokens_per_source": {n: c * L for n, c in counts.items()}, "epochs_per_source": epochs_of(counts),
        })
    total_counts = mixture.examples_per_source(0, steps * B)
    epochs = epochs_of(total_counts)
    limit = float(cfg.data.max_epochs_warning)
    for name, e in epochs.items():
        if e is not None and e > limit:
            warnings.append(
                f"source {name}: {e:.2f} epochs over the run, more than data.max_epochs_warning = {limit:g} "
                f"({total_counts[name]:,} examples drawn from {examples[name]:,})"
            )
    return {
        "schedule": {**schedule.metadata(), "peak_step": schedule.peak_step}, "start_lr_from": run.start_lr_from,
        "steps": steps, "batch_size": B, "seq_len": L, "tokens_per_step": B * L, "total_tokens": steps * B * L,
        "lr": lr, "sources": names, "phases": plan_phases,
        "tokens_per_source": {n: c * L for n, c in total_counts.items()}, "epochs": epochs,
        "source_examples": examples, "warnings": warnings,
    }


def human(n: float) -> str:
    """Token counts the way people say them: 213.4B, 1.2M, 950."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:g}"


def _start_text(start_at: dict | None) -> str:
    if not start_at:
        return "start"
    what, value = next(iter(start_at.items()))
    return f"{what}={value:g}"


def _epochs_text(e: float | None) -> str:
    return "?" if e is None else f"{e:.2f}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as the text the CLI prints."""
    s = plan["schedule"]
    lines = [
        f"schedule {s['name']}: start LR {s['start_lr']:.4g}, peak {s['lr_max']:.4g} at step {s['peak_step']}, "
        f"min {s['lr_min']:.4g}",
        f"start LR from {plan['start_lr_from']}",
        f"run: {plan['steps']:,} steps x {plan['batch_size']} x {plan['seq_len']} = {plan['tokens_per_step']:,} "
        f"tokens/step, {human(plan['total_tokens'])} tokens ({plan['total_tokens']:,})",
        "",
    ]
    rows = [["phase", "start", "start step", "LR there", "% of run", "start tokens", "tokens"]]
    for p in plan["phases"]:
        rows.append([str(p["index"]), _start_text(p["start_at"]), f"{p['start_step']:,}", f"{p['lr_at_start']:.4g}",
                     f"{100 * p['fraction']:.1f}%", human(p["start_tokens"]), human(p["tokens"])])
    lines += _table(rows) + [""]
    header = ["source"] + [f"phase {p['index']} tokens (epochs)" for p in plan["phases"]] + ["total", "epochs"]
    rows = [header]
    for name in plan["sources"]:
        row = [name]
        for p in plan["phases"]:
            t = p["tokens_per_source"][name]
            row.append(f"{human(t)} ({_epochs_text(p['epochs_per_source'][name])})" if t else "0")
        row += [human(plan["tokens_per_source"][name]), _epochs_text(plan["epochs"][name])]
        rows.append(row)
    lines += _table(rows)
    lines += [f"warning: {w}" for w in plan["warnings"]]
    return "\n".join(lines)


def write_png(plan: dict[str, Any], path: str) -> None:
    """LR over tokens with the phases shaded (top) and the mixture weights as stacked areas (bottom)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training hosts
    import matplotlib.pyplot as plt

    tokens_per_step = plan["tokens_per_step"]
    scale, unit = next(((s, u) for u, s in (("B", 1e9), ("M", 1e6), ("K", 1e3)) if plan["total_tokens"] >= s),
                       (1.0, ""))
    x = np.arange(plan["steps"] + 1) * tokens_per_step / scale
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=(3, 2))
    top.plot(x, plan["lr"], color="black", linewidth=1.5, label="learning rate")
    colors = plt.get_cmap("tab10")
    for p in plan["phases"]:
        lo, hi = p["start_step"] * tokens_per_step / scale, p["end_step"] * tokens_per_step / scale
        top.axvspan(lo, hi, color=colors(p["index"] % 10), alpha=0.12)
        top.text(lo, plan["lr"].max(), f" phase {p['index']}\n {_start_text(p['start_at'])}", va="top", fontsize=8)
        if p["index"] > 0:
            top.axvline(lo, color="gray", linestyle="--", linewidth=0.8)
    s = plan["schedule"]
    top.set_ylabel("learning rate")
    top.set_title(f"{s['name']}: {human(plan['total_tokens'])} tokens, {plan['steps']:,} steps")
    top.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    edges = [p["start_step"] * tokens_per_step / scale for p in plan["phases"]] + [x[-1]]
    weights = [[p["weights"][n] for p in plan["phases"]] for n in plan["sources"]]
    # One value per phase, held until the next edge ('post' steps), the last repeated at the end.
    bottom.stackplot(edges, [w + w[-1:] for w in weights], labels=plan["sources"], step="post", alpha=0.8)
    bottom.set_ylim(0, 1)
    bottom.set_ylabel("mixture weight")
    bottom.set_xlabel(f"tokens ({unit})" if unit else "tokens")
    bottom.legend(loc="upper left", fontsize=8, ncol=min(4, len(plan["sources"])))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse(argv: list[str]) -> tuple[ml_collections.ConfigDict, str]:
    """(config, --out) from the command line; every problem is a one-line ConfigError."""
    from absl import flags

    def define(fv: flags.FlagValues) -> None:
        flags.DEFINE_string("out", "plan.png", "Where to write the PNG.", flag_values=fv)

    cfg, fv = cli.parse(argv, define)
    if not isinstance(cfg, ml_collections.ConfigDict):
        kind = type(cfg).__name__
        raise ConfigError(f"--config: get_config() returned {kind}, expected an ml_collections.ConfigDict")
    return cfg, fv.out


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 after printing the plan and writing the PNG, 2 with one error line otherwise."""
    argv = list(sys.argv if argv is None else argv)
    try:
        cfg, out = _parse(argv)
        plan = make_plan(cfg)
        out = os.path.abspath(out)
        try:
            write_png(plan, out)
        except OSError as e:
            raise ConfigError(f"--out: {out}: {e.strerror}, expected a writable file path") from None
    except ConfigError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

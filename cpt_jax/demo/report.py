"""The demo's report: report.md (tables with intervals, the paper's four questions answered, the
checks) and report.png (the base's curve, accuracies with intervals), written from the finished
runs of every seed. Every number comes from the runs' own records."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

from cpt_jax.demo import stats
from cpt_jax.demo.corpus import CHOICES, TASKS
from cpt_jax.demo.runs import QUESTIONS, Question, RunResult, Scale, Variant

GROUPS = {"retention": "retention (A facts)", "acquisition": "acquisition (B facts)",
          "heldout_qa": "held-out QA (B)"}
AVERAGE = "average"
COLUMNS = (*TASKS, AVERAGE)  # the groups and their average, in table order
TARGET_HALF_WIDTH = 0.04  # +-4 points at 95%


@dataclasses.dataclass
class Table:
    """Pooled estimates of every run: accuracy per group and the average, val losses per seed."""

    accuracy: dict[str, dict[str, stats.Estimate]]  # run -> group (and AVERAGE) -> estimate
    losses: dict[str, dict[str, list[float]]]  # run -> source -> per seed


def _facts(per_seed: Sequence[RunResult]) -> dict[str, list[list[tuple[str, str]]]]:
    """{group: [seed][question] -> (name, attribute)}: the key that pairs a fact's questions."""
    return {g: [r.facts[g] for r in per_seed] for g in TASKS}


def tabulate(results: dict[str, Sequence[RunResult]]) -> Table:
    accuracy, losses = {}, {}
    for name, per_seed in results.items():
        correct = {g: [r.correct[g] for r in per_seed] for g in TASKS}
        groups = {g: stats.accuracy(correct[g]) for g in TASKS}
        accuracy[name] = {**groups, AVERAGE: stats.average(correct, _facts(per_seed))}
        losses[name] = {src: [r.losses.get(src, float("nan")) for r in per_seed] for src in ("A", "B")}
    return Table(accuracy, losses)


def differences(results: dict[str, Sequence[RunResult]], run: str, reference: str) -> dict[str, stats.Estimate]:
    """Paired differences `run` - `reference` per group and of the average (the two runs of a seed
    answered the same questions: checked fact by fact)."""
    facts = _facts(results[run])
    if facts != _facts(results[reference]):
        raise RuntimeError(f"runs {run} and {reference} answered different questions; expected the same task files")
    a = {g: [r.correct[g] for r in results[run]] for g in TASKS}
    b = {g: [r.correct[g] for r in results[reference]] for g in TASKS}
    groups = {g: stats.paired_difference(a[g], b[g]) for g in TASKS}
    diffs = {g: [[float(x) - float(y) for x, y in zip(sa, sb, strict=True)] for sa, sb in zip(a[g], b[g], strict=True)]
             for g in TASKS}
    return {**groups, AVERAGE: stats.average(diffs, facts)}


def _acc(e: stats.Estimate) -> str:
    return f"{e.value:.3f} [{e.lo:.3f}, {e.hi:.3f}]"


def _points(e: stats.Estimate) -> str:
    return f"{100 * e.value:+.1f} [{100 * e.lo:+.1f}, {100 * e.hi:+.1f}]"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def accuracy_table(table: Table, names: Sequence[str]) -> list[str]:
    lines = ["| run | " + " | ".join(GROUPS.get(c, c) for c in COLUMNS) + " | val loss A | val loss B |",
             "|---|" + "---|" * (len(COLUMNS) + 2)]
    for name in names:
        acc, loss = table.accuracy[name], table.losses[name]
        lines.append(f"| {name} | " + " | ".join(_acc(acc[c]) for c in COLUMNS)
                     + f" | {_mean(loss['A']):.3f} | {_mean(loss['B']):.3f} |")
    return lines


def seed_table(table: Table, names: Sequence[str], seeds: Sequence[int]) -> list[str]:
    lines = ["| run | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for name in names:
        acc = table.accuracy[name]
        cells = [" / ".join(f"{acc[c].per_seed[i]:.2f}" for c in COLUMNS) for i in range(len(seeds))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def difference_table(results: dict[str, Sequence[RunResult]], names: Sequence[str], reference: str) -> list[str]:
    lines = [f"| run - {reference} | " + " | ".join(GROUPS.get(c, c) for c in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for name in names:
        if name == reference:
            continue
        d = differences(results, name, reference)
        lines.append(f"| {name} | " + " | ".join(f"{_points(d[c])} {stats.outcome(d[c])}" for c in COLUMNS) + " |")
    return lines


def answer(q: Question, results: dict[str, Sequence[RunResult]]) -> tuple[str, list[str]]:
    """The verdict on one question (from the average accuracy) and a line per alternative."""
    outcomes, lines = [], []
    for alt, what in q.alternatives.items():
        d = differences(results, q.choice, alt)[AVERAGE]
        o = stats.outcome(d)
        outcomes.append(o)
        seeds = ", ".join(f"{100 * x:+.1f}" for x in d.per_seed)
        lines.append(f"{q.choice_label} (`{q.choice}`) - {what} (`{alt}`): average accuracy {_points(d)} points, "
                     f"per seed {seeds}: {o}")
    return stats.verdict(outcomes), lines


def _steps(span: tuple[float, float]) -> str:
    lo, hi = span
    return f"{math.floor(lo + 1e-9) + 1}-{math.floor(hi + 1e-9)}"


def plateau_lines(base: Sequence[RunResult], seeds: Sequence[int]) -> tuple[list[stats.Plateau], list[str]]:
    """Each seed's plateau check of the base, and its table."""
    checks = [stats.plateau(r.curve) for r in base]
    first = checks[0]
    lines = [f"| seed | mean val loss A, steps {_steps(first.before_steps)} | steps {_steps(first.last_steps)} | "
             f"relative improvement over the last 10% | flattened (< {100 * stats.PLATEAU_THRESHOLD:g}%) |",
             "|---|---|---|---|---|"]
    for seed, p in zip(seeds, checks, strict=True):
        lines.append(f"| {seed} | {p.before:.4f} | {p.last:.4f} | {100 * p.relative_improvement:+.2f}% | "
                     f"{'yes' if p.flattened else 'NO: ' + p.describe()} |")
    return checks, lines


def check_lines(results: dict[str, Sequence[RunResult]], seeds: Sequence[int]) -> list[str]:
    """`python -m cpt_jax.plan` against the trainer's own resolution of the same config: the switch
    step (the trainer's plan record) and the tokens per source (its last train record); and every
    plan warning."""
    bad, warned = [], []
    for name, per_seed in results.items():
        for seed, r in zip(seeds, per_seed, strict=True):
            if r.planned_switch != r.actual_switch:
                bad.append(f"{name} seed {seed}: switch planned at step {r.planned_switch}, the trainer resolved "
                           f"{r.actual_switch}")
            if r.planned_tokens != r.tokens:
                bad.append(f"{name} seed {seed}: tokens per source planned {r.planned_tokens}, the trainer "
                           f"counted {r.tokens}")
            warned += [f"- plan warning, {name} seed {seed}: {w}" for w in r.warnings]
    if bad:
        return ["- DISAGREE: " + b for b in bad] + warned
    switches = {name: sorted({r.actual_switch for r in rs if r.actual_switch is not None}) for name, rs in
                results.items()}
    shown = ", ".join(f"{n} {s[0]}" for n, s in switches.items() if s)
    return [f"- For every run, `python -m cpt_jax.plan` and the trainer resolve the same switch to the QA Blend "
            f"from the config's LR condition ({shown}) and the same tokens per source. Both compute them from "
            "the same schedule and mixture; the check is that plan and trainer agree, not a count of served "
            "batches.", *(warned or ["- The plans gave no warnings."])]


def build(workdir: str, scale_name: str, s: Scale, seeds: Sequence[int], base: Sequence[RunResult],
          results: dict[str, Sequence[RunResult]], runs: dict[str, Variant], meta: dict) -> tuple[str, list[str]]:
    """Write report.md and report.png; returns the report's path and the lines to print."""
    table = tabulate({"base": base, **results})
    names = list(results)
    checks, plateau = plateau_lines(base, seeds)
    ok = all(p.flattened for p in checks)
    run_tokens = s.run_steps * s.batch_size * s.seq_len
    lines = [
        f"# cpt_jax demo report (scale `{scale_name}`, seeds {', '.join(map(str, seeds))})",
        "",
        f"Per seed: a corpus of {s.people_a} people in A and {s.people_b} in B ({s.bios_per_person} biographies each), "
        f"a base model of {base[0].params:,} parameters ({s.model['n_layers']} layers, width {s.model['d_model']}) "
        f"pretrained on A for {s.base_steps} steps (warmup, cosine {s.peak_lr:g} -> {s.min_lr:g}), then {len(results)} "
        f"continued runs of {s.run_steps} steps ({run_tokens:,} tokens each, the same for every run) from its "
        f"checkpoint, which records peak LR {meta['lr_max']:.3g} and final LR {meta['lr_min']:.3g}.",
        "",
        *(f"- `{n}`: {runs[n].label}" for n in names),
        "",
        "## The base model finished pretraining",
        "",
        *plateau,
        "",
        "Relative improvement: the mean of the evaluations in the last tenth against the mean in the tenth before; "
        f"negative when the loss rose (by more than {100 * stats.PLATEAU_RISE_TOLERANCE:g}%: the base overfits, "
        "not flattened).",
        "",
        ("Its validation loss on A had flattened in every seed." if ok else
         "**The base had NOT flattened in every seed (" + "; ".join(
             f"seed {seed}: {p.describe()}" for seed, p in zip(seeds, checks, strict=True) if not p.flattened)
         + "): its continuations do not start from a finished model.**"),
        "",
        "## Accuracy",
        "",
        f"Multiple choice among {CHOICES} (chance {1 / CHOICES:.2f}), scored by log-likelihood with "
        "`python -m cpt_jax.evaluate --log_samples` on each run's final checkpoint. Retention: a cloze over every "
        "fact of A in the biographies' phrasing; acquisition: the same over every fact of B; held-out QA: the "
        "QA format asked about every fact of B (the QA data is about A only). Each cell: the accuracy pooled over "
        f"the seeds with its 95% interval ({_item_note(table)}); average: the mean of the three groups.",
        "",
        *accuracy_table(table, ["base", *names]),
        "",
        "Per seed (retention / acquisition / held-out QA / average):",
        "",
        *seed_table(table, ["base", *names], seeds),
        "",
        "Paired differences from the baseline on the same questions, in points, 95% interval; `better`/`worse` "
        "only when the interval excludes 0 and every seed agrees:",
        "",
        *difference_table(results, names, "baseline"),
        "",
        "## The paper's four questions",
        "",
    ]
    verdicts = []
    for i, q in enumerate(QUESTIONS, start=1):
        needed = [q.choice, *q.alternatives]
        if not all(n in results for n in needed):
            lines += [f"{i}. **{q.title}** (the paper: {q.paper}): not run; "
                      f"`python -m cpt_jax.demo --ablations {q.key}` runs it.", ""]
            continue
        v, detail = answer(q, results)
        verdicts.append((q, v))
        lines += [f"{i}. **{q.title}** (the paper: {q.paper}): **{v}** at this scale.", "",
                  *(f"   - {d}" for d in detail), ""]
    lines += ["## What this scale reproduces", "", *summary_lines(verdicts), "", "## Checks", "",
              *check_lines(results, seeds), "", "## Method", "", *method_lines(), "", "![evidence](report.png)", ""]
    figure(os.path.join(workdir, "report.png"), base, results, table, seeds)
    path = os.path.join(workdir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    printed = [*accuracy_table(table, ["base", *names]), ""]
    printed += [f"{q.title}: {v} (the paper: {q.paper})" for q, v in verdicts]
    printed.append("base flattened in every seed" if ok else "WARNING: the base had not flattened in every seed")
    return path, printed


def summary_lines(verdicts: Sequence[tuple[Question, str]]) -> list[str]:
    said = {stats.AGREE: "reproduced (its direction; the sizes are above)",
            stats.DISAGREE: "not reproduced: the measurement points the other way",
            stats.CANNOT_TELL: "not decided at this scale: the differences are within the noise or not in every seed"}
    lines = [f"- {q.title} (the paper: {q.paper}): {said[v]}." for q, v in verdicts]
    asked = {q.key for q, _ in verdicts}
    missing = [q.key for q in QUESTIONS if q.key not in asked]
    if missing:
        lines.append(f"- Not run: {', '.join(missing)} (`--ablations {','.join(missing)}`).")
    return lines


def _item_note(table: Table) -> str:
    counts = ", ".join(f"{table.accuracy['base'][g].n} {g}" for g in TASKS)
    widest = max(table.accuracy[name][g].half_width for name in table.accuracy for g in TASKS)
    meets = "every interval is within" if widest <= TARGET_HALF_WIDTH else "NOT every interval is within"
    return f"{counts} questions pooled; {meets} +-{100 * TARGET_HALF_WIDTH:.0f} points, the widest +-{100 * widest:.1f}"


def method_lines() -> list[str]:
    doc = stats.__doc__.split("\n\n", 1)[1] if stats.__doc__ else ""
    return doc.strip().splitlines()


def figure(path: str, base: Sequence[RunResult], results: dict[str, Sequence[RunResult]], table: Table,
           seeds: Sequence[int]) -> None:
    """report.png: the base's validation curve per seed, accuracy per group with intervals."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.6))
    curve_ax, acc_ax = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=(1, 2)))
    for seed, r in zip(seeds, base, strict=True):
        steps, losses = zip(*sorted(r.curve), strict=True)
        curve_ax.plot(steps, losses, marker="o", markersize=3, label=f"seed {seed}")
    end = max(step for r in base for step, _ in r.curve)
    curve_ax.axvspan(end * (1 - stats.PLATEAU_FRACTION), end, color="gray", alpha=0.2, label="last 10%")
    curve_ax.set(title="base: validation loss on A", xlabel="step", ylabel="loss")
    curve_ax.legend(fontsize=8)
    names = ["base", *results]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        for j, g in enumerate(COLUMNS):
            e = table.accuracy[name][g]
            acc_ax.bar(j + i * width, e.value, width, color=f"C{i}", label=name if j == 0 else None)
            acc_ax.errorbar(j + i * width, e.value, yerr=[[e.value - e.lo], [e.hi - e.value]], color="black",
                            capsize=2, linewidth=0.8)
    acc_ax.axhline(1 / CHOICES, color="gray", linestyle=":", label="chance")
    acc_ax.set_xticks([j + 0.4 - width / 2 for j in range(len(TASKS) + 1)],
                      [GROUPS.get(g, g) for g in COLUMNS])
    acc_ax.set(title="accuracy pooled over seeds, 95% intervals", ylim=(0, 1.05))
    acc_ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


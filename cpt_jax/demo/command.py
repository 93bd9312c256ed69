"""python -m cpt_jax.demo: the command line, and the loop over seeds, runs and the report."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

from cpt_jax import checkpoint
from cpt_jax.config import ConfigError
from cpt_jax.demo import report, runs
from cpt_jax.progress import format_duration


def parse_ablations(value: str) -> tuple[str, ...]:
    """'all', '' or a comma-separated list of runs.ABLATIONS -> the ablations, in canonical order."""
    if value.strip() == "all":
        return runs.ABLATIONS
    given = [v.strip() for v in value.split(",") if v.strip()]
    for v in given:
        if v not in runs.ABLATIONS:
            raise ConfigError(f"--ablations: {v!r}, expected 'all' or a comma-separated list of "
                              f"{', '.join(runs.ABLATIONS)}")
    return tuple(a for a in runs.ABLATIONS if a in given)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cpt_jax.demo",
                                     description="The recipe end to end on generated data, as evidence: "
                                                 "`python -m cpt_jax.demo`.")
    parser.add_argument("--workdir", default="demo_out", help="Where the corpora, runs and report go.")
    parser.add_argument("--scale", default="small", choices=sorted(runs.SCALES),
                        help="tiny: CI, in seconds; small (default): 2 CPU cores, minutes; medium: one GPU.")
    parser.add_argument("--seeds", type=int, default=None,
                        help="Repeat everything (corpus, base, runs) over seeds 0..N-1 (default: the scale's; for "
                             "small 3, and 8 with --ablations).")
    parser.add_argument("--ablations", default="", metavar="all|" + ",".join(runs.ABLATIONS),
                        help="Also the runs that answer the paper's other questions: where to switch blends, how far "
                             "to decay, whether to warm up.")
    return parser


def _check_workdir(workdir: str, scale: str) -> None:
    """A workdir holds one scale: refuse to mix its runs with another's."""
    path = os.path.join(workdir, "demo.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("scale") != scale:
            raise ConfigError(f"--workdir: {workdir} holds a demo at scale {saved.get('scale')!r}, expected scale "
                              f"{scale!r}; use another --workdir")
        return
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir: {workdir} exists and is not a directory")
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"scale": scale}, f)


def _compilation_cache(workdir: str) -> None:
    """Seeds after the first compile nothing: the same programs come from a cache in the workdir
    (unless the user chose a cache of their own)."""
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


class Progress:
    """One line per finished stage: what, how long, elapsed, and the time left. The rate comes from
    the stages that ran (a reused stage adds steps but took no time)."""

    def __init__(self, total_steps: int):
        self.total, self.done, self.start = total_steps, 0, time.monotonic()
        self.ran_steps, self.ran_seconds = 0, 0.0

    def say(self, message: str) -> None:
        print(f"[demo] {message}", flush=True)

    def stage(self, what: str, steps: int, run: Callable[[], bool]) -> None:
        """Runs one stage of `steps` steps (`run` returns False when its output was reused) and says so."""
        began = time.monotonic()
        ran = run()
        seconds = time.monotonic() - began
        self.done += steps
        if ran:
            self.ran_steps, self.ran_seconds = self.ran_steps + steps, self.ran_seconds + seconds
        elapsed = time.monotonic() - self.start
        left = ""
        if self.ran_steps and 0 < self.done < self.total:
            left = f", about {format_duration(self.ran_seconds / self.ran_steps * (self.total - self.done))} left"
        how = f"done in {seconds:.0f}s" if ran else "reused"
        self.say(f"{what}: {how} ({100 * self.done // self.total}% of the steps, elapsed "
                 f"{format_duration(elapsed)}{left})")


def run(workdir: str, scale: str = "small", seeds: int | None = None, ablations: Sequence[str] = ()) -> str:
    """The demo: every seed's data, base and runs, then the report. Returns the report's path."""
    s = runs.SCALES[scale]
    n_seeds = seeds if seeds is not None else (s.ablation_seeds if ablations else s.seeds)
    if n_seeds < 1:
        raise ConfigError(f"--seeds: {n_seeds}, expected a positive number of seeds")
    workdir = os.path.abspath(workdir)
    _check_workdir(workdir, scale)
    _compilation_cache(workdir)
    names = runs.run_names(tuple(ablations))
    progress = Progress(n_seeds * (s.base_steps + len(names) * s.run_steps))
    progress.say(f"scale {scale}: {n_seeds} seeds x (a base of {s.base_steps} steps + {len(names)} runs of "
                 f"{s.run_steps} steps: {', '.join(names)}) in {workdir}")
    base, results, meta = [], {n: [] for n in names}, {}
    for seed in range(n_seeds):
        seed_dir = os.path.join(workdir, f"seed_{seed}")
        tag = f"seed {seed + 1}/{n_seeds}"
        data = runs.prepare_data(seed_dir, s, seed, lambda m, tag=tag: progress.say(f"{tag} {m}"))
        progress.stage(f"{tag} base (pretraining on A, {s.base_steps} steps)", s.base_steps,
                       lambda: runs.run_base(seed_dir, s, data, seed))  # noqa: B023
        base.append(runs.load_result(os.path.join(seed_dir, "base"), s.base_steps, data.tasks))
        meta = checkpoint.read_metadata(os.path.join(seed_dir, "base", "checkpoints"))
        variants = runs.variants(meta, s.run_steps)
        for name in names:
            progress.stage(f"{tag} {name}", s.run_steps,
                           lambda: runs.run_variant(seed_dir, s, data, seed, variants[name]))  # noqa: B023
            results[name].append(runs.load_result(os.path.join(seed_dir, "runs", name), s.run_steps, data.tasks))
    path, printed = report.build(workdir, scale, s, list(range(n_seeds)), base, results, variants, meta)
    print("\n".join(printed), flush=True)
    progress.say(f"report: {path} ({format_duration(time.monotonic() - progress.start)})")
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args.workdir, args.scale, args.seeds, parse_ablations(args.ablations))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

"""cpt_jax against MaxText on the same decoder, batch and optimizer, side by side (A B A B).

    python benchmarks/peers/compare.py [--shapes tiny,llama6_32k] [--pairs 3] [--steps 10]
                                       [--dtype float32|bfloat16] [--remat full|save_dots]
                                       [--profile DIR] [--json FILE] [--dry_run]

The first call installs MaxText (the PyPI package `maxtext`, Python >= 3.12) into its own
virtualenv, .peers/maxtext (benchmarks/peers/install_maxtext.sh; about 7 minutes and 4 GB; the
network is needed then). Each shape of shapes.SHAPES is trained by both trainers, each in a
fresh process on one device (XLA_FLAGS=--xla_force_host_platform_device_count=1 on a CPU host,
the first GPU on a GPU host), with no persistent compilation cache, alternating cpt_jax and
MaxText `--pairs` times so that other load on the machine hits both alike. Per run: steady-state
tokens/s (median of `--steps` timed steps after two untimed ones, each step waited for), compile
time, time from process start to the end of the first step, XLA's memory plan of the step, the
process's peak resident memory (and the allocator's peak on accelerators), and the parameter
count, which must be equal. Per shape: the tokens/s ratio cpt_jax / MaxText of each pair and its
range, and the same by CPU time a step (on a CPU host, the work of a step: less disturbed by other
load on a shared machine than wall time). Last, the differences between the two runs that could
not be removed (DIFFERENCES).
--profile DIR traces three more steps of each side's first run and prints where their time went.
--dry_run prints both sides' settings and the differences, and installs and runs nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import shapes  # noqa: E402

DEFAULT_VENV = os.path.join(REPO, ".peers", "maxtext")

# What still differs between the two runs once the settings of shapes.py agree, and why it stays.
DIFFERENCES = (
    "loss: MaxText takes the cross-entropy of the full logits against a one-hot of the targets "
    "(jax.nn.one_hot, a [batch, seq, vocab] array); cpt_jax takes logsumexp minus the target's logit "
    "(a gather). Both unchunked here: cpt_jax's train.loss_chunk_tokens=0, MaxText's num_vocab_tiling=1.",
    "remat: MaxText wraps every scanned block in jax.checkpoint whatever remat_policy says, so there is no "
    "run without rematerialisation to compare; both sides use the same policy (--remat: 'full' saves each "
    "block's input only; 'save_dots' is MaxText's 'minimal'). cpt_jax's own default, remat='none', is faster "
    "where memory allows and is not measured here.",
    "synthetic batch: MaxText's loader gives one fixed batch of uniform random tokens, one document per row "
    "(segment ids all 1) and positions 0..T-1; cpt_jax's synthetic source gives learnable token chains with "
    "document boundaries. Each side reuses its first batch for every step. The attention does the same work "
    "either way: both build a dense [T, T] mask (causal and same-document) and XLA computes every score.",
    "initialisation: MaxText's initializers are not cpt_jax's (normal 0.02, output projections scaled by "
    "depth), so the losses differ at step 0; the work of a step does not depend on the values.",
    "step extras: MaxText's step also computes the norms of the raw gradients, the clipped gradients and "
    "the parameters, and its learning rate comes from a cosine schedule held flat (final fraction 1); "
    "cpt_jax's computes the gradient norm once and keeps the old state when the loss or gradient norm is "
    "not finite (a select over the parameters and Adam's moments).",
    "weight decay: both decay every parameter, norm scales included (MaxText's adamw_mask is empty by "
    "default; cpt_jax sets optim.decay_norms_and_biases=True here, its default exempts norms and biases).",
    "loader and loop: neither side's loader or Python loop is timed beyond the step itself (a compiled "
    "call on a batch already on the device, waited for), so MaxText's metric logging and cpt_jax's records "
    "and checkpoint checks are out of the figures; time to the first step includes each side's imports "
    "(MaxText imports TensorFlow) and its model initialisation.",
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(shapes.SHAPES), help=f"some of {', '.join(shapes.SHAPES)}")
    p.add_argument("--pairs", type=int, default=3, help="cpt_jax, MaxText runs alternated this many times")
    p.add_argument("--steps", type=int, default=10, help="timed steps a run (after 2 untimed ones)")
    p.add_argument("--dtype", default=None, help="compute dtype: float32 (default on a CPU) or bfloat16 (elsewhere)")
    p.add_argument("--remat", default="full", help=f"one of {', '.join(shapes.REMAT)}")
    p.add_argument("--batch", type=int, default=None, help="sequences a step (default: the shape's)")
    p.add_argument("--seq_len", type=int, default=None, help="tokens a sequence (default: the shape's)")
    p.add_argument("--maxtext_venv", default=os.environ.get("MAXTEXT_VENV", DEFAULT_VENV),
                   help="MaxText's virtualenv (installed there on first use)")
    p.add_argument("--profile", default=None, help="trace 3 more steps of each side's first run into this directory")
    p.add_argument("--json", default=None, help="also write every run's figures to this JSON file")
    p.add_argument("--dry_run", action="store_true", help="print both sides' settings; install and run nothing")
    return p


class UsageError(ValueError):
    """A bad argument: one line, exit status 2."""


def plan(args: argparse.Namespace, platform: str) -> list[shapes.Run]:
    """The runs the arguments ask for; UsageError (one line) for a bad one."""
    if args.pairs < 1 or args.steps < 1:
        raise UsageError(f"--pairs {args.pairs} --steps {args.steps}: expected both >= 1")
    dtype = args.dtype or ("float32" if platform == "cpu" else "bfloat16")
    runs = []
    for name in filter(None, (s.strip() for s in args.shapes.split(","))):
        try:
            runs.append(shapes.make_run(name, dtype=dtype, remat=args.remat, steps=args.steps, batch=args.batch,
                                        seq_len=args.seq_len))
        except ValueError as e:
            raise UsageError(str(e)) from None
    if not runs:
        raise UsageError(f"--shapes: {args.shapes!r}, expected some of {', '.join(shapes.SHAPES)}")
    return runs


def _platform() -> str:
    """'cpu' unless JAX would start on an accelerator here (asked in a child: this process stays jax-free)."""
    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        return "cpu"
    done = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"], capture_output=True,
                          text=True)
    return done.stdout.strip() or "cpu"


def child_env(platform: str) -> dict[str, str]:
    """One device, no persistent compilation cache (each run compiles afresh), the rest as it is."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    if platform == "cpu":
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device")]
        env["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=1"])
        env["JAX_PLATFORMS"] = "cpu"
    elif platform == "gpu":
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    env["TF_CPP_MIN_LOG_LEVEL"] = env.get("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def ensure_maxtext(venv: str) -> str:
    """MaxText's python, installing it first when its virtualenv is not there yet."""
    python = os.path.join(venv, "bin", "python")
    installed = os.path.isdir(venv) and any(f.startswith(".installed-maxtext-") for f in os.listdir(venv))
    if not installed:
        print(f"installing MaxText into {venv} (first use: several minutes, about 4 GB) ...", flush=True)
        subprocess.run(["bash", os.path.join(HERE, "install_maxtext.sh"), venv], check=True)
    return python


def run_side(python: str, script: str, run: shapes.Run, env: dict, profile_dir: str | None) -> dict:
    """One fresh process of one side; its RESULT line as a dict."""
    env = {**env, "PEER_T0": repr(time.time())}
    if profile_dir:
        env["PEER_PROFILE"] = profile_dir
    done = subprocess.run([python, os.path.join(HERE, script), json.dumps(dataclasses.asdict(run))], env=env,
                          capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-25:])
        raise RuntimeError(f"{script} failed (exit status {done.returncode}) on shape {run.name}:\n{tail}")
    return json.loads(lines[-1][len("RESULT "):])


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def summarise(run: shapes.Run, pairs: list[tuple[dict, dict]]) -> dict:
    """Figures of one shape over its pairs, printed as a few lines."""
    ours, theirs = [p[0] for p in pairs], [p[1] for p in pairs]
    if {r["params"] for r in ours} != {r["params"] for r in theirs}:
        raise RuntimeError(f"shape {run.name}: cpt_jax has {ours[0]['params']:,} parameters, MaxText "
                           f"{theirs[0]['params']:,}: the two runs do not train the same decoder")
    ratios = [a["tokens_per_sec"] / b["tokens_per_sec"] for a, b in pairs]
    # MaxText's CPU time a step over cpt_jax's: the same comparison by the work each step costs,
    # which other load on a shared CPU host disturbs less than it disturbs wall time.
    cpu_ratios = [b["cpu_sec"] / a["cpu_sec"] for a, b in pairs]

    def med(rows, key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(values) if values else None

    summary = {"shape": run.name, "params": ours[0]["params"], "tokens_per_step": run.tokens_per_step,
               "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
               "ratios": ratios, "cpu_ratio_median": statistics.median(cpu_ratios), "cpu_ratios": cpu_ratios}
    for side, rows in (("cpt_jax", ours), ("maxtext", theirs)):
        for key in ("tokens_per_sec", "step_sec", "cpu_sec", "compile_sec", "first_step_sec", "plan_bytes",
                    "peak_rss_bytes", "peak_device_bytes"):
            summary[f"{side}_{key}"] = med(rows, key)
    print(f"\n{run.name}: {summary['params']:,} parameters (both), {run.n_layers} layers, d_model {run.d_model}, "
          f"vocab {run.vocab_size}, batch {run.batch} x {run.seq_len}, {run.dtype}, remat {run.remat}; "
          f"{len(pairs)} pairs, medians:")
    print(f"  {'':8} {'tokens/s':>10} {'step ms':>9} {'CPU ms':>9} {'compile s':>10} {'1st step s':>11} "
          f"{'XLA plan':>11} {'peak RSS':>11} {'device peak':>12}")
    for side, label in (("cpt_jax", "cpt_jax"), ("maxtext", "MaxText")):
        s = {k[len(side) + 1:]: v for k, v in summary.items() if k.startswith(side + "_")}
        print(f"  {label:8} {s['tokens_per_sec']:10,.0f} {1000 * s['step_sec']:9.1f} {1000 * s['cpu_sec']:9.1f} "
              f"{s['compile_sec']:10.2f} "
              f"{s['first_step_sec']:11.2f} {_mib(s['plan_bytes']):>11} {_mib(s['peak_rss_bytes']):>11} "
              f"{_mib(s['peak_device_bytes']):>12}")
    print(f"  tokens/s cpt_jax / MaxText: {summary['ratio_median']:.2f}x (pairs: "
          + ", ".join(f"{r:.2f}" for r in ratios) + f"; range {min(ratios):.2f}-{max(ratios):.2f})")
    print(f"  CPU time a step, MaxText / cpt_jax: {summary['cpu_ratio_median']:.2f}x (pairs: "
          + ", ".join(f"{r:.2f}" for r in cpu_ratios) + f"; range {min(cpu_ratios):.2f}-{max(cpu_ratios):.2f})")
    return summary


def _profile(run: shapes.Run, side: str, root: str) -> str:
    return os.path.join(root, f"{run.name}_{side}")


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    platform = _platform()
    try:
        runs = plan(args, platform)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    env = child_env(platform)
    if args.dry_run:
        for run in runs:
            print(f"{run.name}: {shapes.params(run):,} parameters, {run.tokens_per_step} tokens a step")
            print("  cpt_jax: --config=configs/tiny.py " + " ".join(shapes.cpt_jax_overrides(run)))
            print("  MaxText: base.yml " + " ".join(shapes.maxtext_overrides(run, "OUT", platform)))
        _print_differences()
        return {"runs": [dataclasses.asdict(r) for r in runs], "differences": list(DIFFERENCES)}
    maxtext_python = ensure_maxtext(args.maxtext_venv)
    print(f"peer benchmark: cpt_jax vs MaxText, {platform}, one device, {args.pairs} pairs (cpt_jax first in each), "
          f"{args.steps} timed steps a run; machine load (1-minute average) at start {os.getloadavg()[0]:.1f}",
          flush=True)
    results = {"platform": platform, "argv": sys.argv[1:] if argv is None else argv, "shapes": [], "runs": []}
    for run in runs:
        pairs = []
        for i in range(args.pairs):
            traced = args.profile if i == 0 else None
            ours = run_side(sys.executable, "cpt_jax_side.py", run, env, traced and _profile(run, "cpt_jax", traced))
            theirs = run_side(maxtext_python, "maxtext_side.py", run, env, traced and _profile(run, "maxtext", traced))
            for r in (ours, theirs):
                print(f"  {run.name} pair {i + 1} {r['side']:8}: {r['tokens_per_sec']:10,.0f} tokens/s, step "
                      f"{1000 * r['step_sec']:.1f} ms ({1000 * r['cpu_sec']:.0f} ms CPU), compile "
                      f"{r['compile_sec']:.2f} s, first step at "
                      f"{r['first_step_sec']:.2f} s, loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}", flush=True)
                results["runs"].append({"shape": run.name, "pair": i + 1, **r})
            pairs.append((ours, theirs))
        results["shapes"].append(summarise(run, pairs))
        if args.profile:
            _print_profiles(run, args.profile)
    print(f"\nmachine load (1-minute average) at the end {os.getloadavg()[0]:.1f}")
    _print_differences()
    results["differences"] = list(DIFFERENCES)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


def _print_profiles(run: shapes.Run, root: str) -> None:
    sys.path.insert(0, os.path.dirname(HERE))
    from throughput import profile_summary

    for side in ("cpt_jax", "maxtext"):
        print(f"  {side}:", end=" ")
        profile_summary(_profile(run, side, root))


def _print_differences() -> None:
    print("\ndifferences that remain between the two runs:")
    for i, d in enumerate(DIFFERENCES, 1):
        print(f"  {i}. {d}")


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

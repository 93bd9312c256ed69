"""Train or continue pretraining a decoder.

    python -m cpt_jax.train --config configs/tiny.py --workdir DIR [--config.train.steps=50 ...]

Stages: parse -> resolve (`resolve.for_training`: everything validated, nothing written, nothing
compiled) -> state (own checkpoint | init_from | fresh) -> compile -> loop (step, records,
checkpoints) -> finish. A user error anywhere before the loop is one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import ml_collections
from absl import flags, logging

from cpt_jax import aot, checkpoint, cli, config, distributed, metrics, optim, resolve, train_step, workdir
from cpt_jax.config import ConfigError
from cpt_jax.metrics import MetricsWriter, log
from cpt_jax.progress import Progress

# ============================================================================ parse


def parse_args(argv: list[str], launch: dict | None = None) -> tuple[ml_collections.ConfigDict, str]:
    """Command line -> (config, workdir); any problem is a ConfigError. `launch`, when given,
    receives how to start: "distributed" (the validated `distributed.Settings`), "compile_only" and
    "topology"."""

    def define(fv: flags.FlagValues) -> None:
        flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and config.json.",
                            flag_values=fv)
        distributed.define_flags(fv)
        flags.DEFINE_bool("compile_only", False, "Compile the train step for --topology, report per-device "
                          "memory and FLOPs, write nothing.", flag_values=fv)
        flags.DEFINE_string("topology", None, "With --compile_only: cpu:N or a TPU slice such as v5p-256 "
                            "(default: this process's devices).", flag_values=fv)

    cfg, fv = cli.parse(argv, define)
    if not fv.workdir:
        raise ConfigError("--workdir: missing, expected a directory for this run's outputs")
    if fv.topology and not fv.compile_only:
        raise ConfigError(f"--topology: {fv.topology!r} is only used with --compile_only, expected both or neither")
    settings = distributed.settings_from_flags(fv)
    if launch is not None:
        launch.update(distributed=settings, compile_only=fv.compile_only, topology=fv.topology)
    return cfg, os.path.abspath(fv.workdir)


# ============================================================================ state, compile, loop, finish


def train(run: resolve.Run) -> int:
    """Run the loop; returns the exit status. The mesh is set for the run only, not left behind."""
    with jax.set_mesh(run.mesh):
        return _train(run)


def _train(run: resolve.Run) -> int:
    cfg, pipeline = run.cfg, run.pipeline
    steps = cfg.train.steps
    end = cfg.train.stop_at or steps

    # ---------------------------------------------------------------- state (own ckpt | init_from | fresh)
    tx = optim.build(cfg.optim)
    state, shardings = resolve.initial_state(run, tx)
    start = int(jax.device_get(state["step"]))

    # ---------------------------------------------------------------- outputs
    workdir.write_config(run.workdir, cfg)
    metrics.drop_records_from(os.path.join(run.workdir, "metrics.jsonl"), start)
    writer = MetricsWriter(run.workdir, cfg.tensorboard, cfg.wandb, json.loads(config.to_json(cfg)))
    ckpt = checkpoint.Checkpointer(run.workdir, cfg.checkpoint.every_steps, cfg.checkpoint.max_to_keep,
                                   cfg.checkpoint.async_save)
    writer.write(metrics.plan_record(start, run.schedule.metadata(), pipeline.mixture.phases, run.model_config))

    # ---------------------------------------------------------------- compile
    t0 = time.time()
    compiled = train_step.lower(cfg.train, run.model_config, tx, run.schedule, run.rules, state, shardings,
                                pipeline.batch_sharding).compile()
    log(f"compiled the train step in {time.time() - t0:.1f}s; steps {start} -> {end} of {steps}; "
        f"start LR {run.schedule.start_lr:.4g} from {run.start_lr_from}")

    # ---------------------------------------------------------------- loop
    progress = Progress(end, desc="train", start=start, enabled=None if cfg.train.progress else False)
    records = metrics.TrainRecords(start, end, cfg.train.log_every_steps, run.model_config, pipeline)
    metadata_at = resolve.checkpoint_metadata(run)
    preemption, status, step, pending, saved_at = distributed.Preemption(), 0, start, None, start

    def finish_step(step: int, step_metrics: Any) -> bool:
        """Host side of step `step` (its metrics are ready): records; True when the run must stop."""
        m = jax.device_get(step_metrics)
        progress.update(1, loss=float(m["loss"]), lr=float(m["lr"]), phase=pipeline.mixture.phase_at(step))
        record = records.record(step, m)
        if record is not None:
            writer.write(record)
            progress.fields["tokens_per_sec"] = record["tokens_per_sec"]
            if progress.enabled:
                progress.write(metrics.train_line(record))  # above the bar, which stays on the last line
            else:
                log(metrics.train_line(record))
        return records.nonfinite_run >= cfg.train.max_nonfinite_steps

    def save(step: int) -> None:
        nonlocal saved_at
        ckpt.save(step, state, metadata_at(step), batches.get_state())  # refuses non-finite parameters
        saved_at = step

    batches = pipeline.iterate(start, end)
    loop_t0 = time.perf_counter()
    try:
        for step, batch in batches:
            state, step_metrics = compiled(state, batch)
            if run.evaluation is not None and (run.evaluation.due(step + 1) or step + 1 == steps):
                writer.write(run.evaluation.run(state["params"], step + 1, log=log))  # all processes compute
            # Read the previous step's metrics only after this one is dispatched: the host never
            # waits for the device to drain.
            if pending is not None and finish_step(*pending):
                status, pending = 1, None
                break
            pending = (step, step_metrics)
            ckpt.check()
            if ckpt.should_save(step + 1, end):
                save(step + 1)
            if preemption.should_stop(step + 1):
                if saved_at != step + 1:
                    save(step + 1)
                status = 143
                break
        if pending is not None and finish_step(*pending):
            status = 1

        # ------------------------------------------------------------ finish
        t0 = time.perf_counter()
        ckpt.wait()
        writer.write(metrics.event_record(saved_at, ckpt, time.perf_counter() - t0, time.perf_counter() - loop_t0,
                                          step + 1 - start if end > start else 0))
    finally:
        batches.close()
        progress.close()
        preemption.restore()
        ckpt.close()
        writer.close()
    if status == 1:
        log(
            f"error: {cfg.train.max_nonfinite_steps} consecutive steps had a non-finite loss or gradient; "
            f"stopped at step {step}; the last good checkpoint is step {saved_at} in {ckpt.root}"
        )
    elif status == 143:
        log(f"preempted (SIGTERM): checkpoint of step {saved_at} saved in {ckpt.root}; run the same command to resume")
    return status


# ============================================================================ main


@cli.reports_config_errors  # a ConfigError, before the loop or once arrays are read: one line, exit 2
def main(argv: list[str] | None = None) -> int:
    logging.set_verbosity(logging.WARNING)
    try:
        launch: dict = {}
        cfg, workdir_path = parse_args(argv if argv is not None else sys.argv, launch)
        # Join the other processes (if any) before anything touches JAX's devices; then make sure
        # every process runs the same config into the same workdir.
        distributed.initialize(launch["distributed"])
        distributed.check_same_config({**json.loads(config.to_json(cfg)), "--workdir": workdir_path})
        if launch["compile_only"]:
            report = aot.compile_only(resolve.for_compile(cfg, workdir_path), launch["topology"])
            if jax.process_index() == 0:
                print(aot.format_report(report, workdir_path), flush=True)
            return 1 if report["fits"] is False else 0
        run = resolve.for_training(cfg, workdir_path)
    except resolve.RunFinished as e:
        log(str(e))
        return 0
    try:
        return train(run)
    except checkpoint.CheckpointError as e:  # diverged parameters, or a write that failed
        root = os.path.join(run.workdir, "checkpoints")
        steps = checkpoint.complete_steps(root)
        last = f"step {steps[-1]} in {root}" if steps else f"none in {root}"
        print(f"error: {e}; the last committed checkpoint is {last}", file=sys.stderr)
        return 1
    except OSError as e:  # the disk filled up or went away mid-run: the last committed checkpoint is intact
        print(f"error: {e.filename or run.workdir}: {e.strerror or e}; the last committed checkpoint is intact",
              file=sys.stderr)
        return 1

if __name__ == "__main__":
    sys.exit(main())

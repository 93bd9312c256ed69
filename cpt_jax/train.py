"""Train or continue pretraining a decoder.

    python -m cpt_jax.train --config configs/tiny.py --workdir DIR [--config.train.steps=50 ...]

Stages: parse -> validate everything (nothing written, nothing compiled) -> workdir -> state
(own checkpoint | init_from | fresh) -> compile -> loop (step, records, checkpoints) -> finish.
A user error anywhere before the loop is one line on stderr and exit status 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags, logging
from jax.experimental import multihost_utils

from cpt_jax import (
    aot,
    checkpoint,
    cli,
    config,
    distributed,
    flops,
    model,
    optim,
    schedules,
    sharding,
    train_step,
)
from cpt_jax import evaluation as evaluation_lib
from cpt_jax.config import ConfigError
from cpt_jax.data import pipeline as data_pipeline
from cpt_jax.metrics import MetricsWriter, log
from cpt_jax.progress import Progress


@dataclasses.dataclass
class Run:
    """Everything resolved and validated before anything is written or compiled."""

    cfg: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    rules: dict
    model_config: model.ModelConfig
    param_shardings: Any
    schedule: schedules.Schedule
    pipeline: data_pipeline.Pipeline
    resume_step: int | None  # this run's own latest checkpoint, if any
    init_from: str | None  # the checkpoint the run started from (restored only when resume_step is None)
    init_metadata: dict | None
    param_shapes: dict  # name -> shape, written into every checkpoint's metadata
    evaluation: evaluation_lib.Evaluation | None  # per-source validation and tasks every eval.every_steps
    source_dtype: str  # the dtype the weights came in (an import's), what an export writes by default


class RunFinished(Exception):
    """The workdir's latest checkpoint is the run's last step: there is nothing to do."""


# ============================================================================ parse


def parse_args(argv: list[str], launch: dict | None = None) -> tuple[ml_collections.ConfigDict, str]:
    """Command line -> (config, workdir). Any problem with the file or an override is a ConfigError.

    `launch`, when given, receives how to start: "distributed" (distributed.Settings from
    --coordinator_address/--num_processes/--process_id or CPT_*, validated without connecting),
    "compile_only" and "topology".
    """

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


# ============================================================================ validate


def resolve_run(cfg: ml_collections.ConfigDict, workdir: str) -> Run:
    """Validate the config against the devices, the workdir and any checkpoint; write nothing."""
    config.validate(cfg)

    saved_config = os.path.join(workdir, "config.json")
    if os.path.exists(saved_config):
        try:
            with open(saved_config) as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{saved_config}: unreadable ({e}), expected this run's config JSON") from None
        diff = config.run_identity_diff(saved, json.loads(config.to_json(cfg)))
        if diff:
            raise ConfigError(
                f"{saved_config}: the workdir holds a different run ({diff}); use a new --workdir or the same config"
            )
    elif os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir: {workdir} exists and is not a directory")

    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.rules_from_config(cfg.mesh)
    mc = model.ModelConfig.from_config(cfg.model)
    model.attention_implementation(mc, mesh.devices.flat[0].platform)  # 'cudnn' where it cannot run: refused here
    abstract = model.abstract_params(mc)
    param_shardings = sharding.param_shardings(abstract, model.logical_axes(mc), mesh, rules)
    divisor = sharding.batch_divisor(mesh, rules)
    micro = cfg.train.batch_size // cfg.train.micro_batches
    if micro % divisor:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} ({cfg.train.micro_batches} micro-batches of {micro}) "
            f"does not split over the {divisor} data-parallel devices, expected a multiple of {divisor}"
        )

    root = os.path.join(workdir, "checkpoints")
    resume_step = checkpoint.complete_steps(root)
    resume_step = resume_step[-1] if resume_step else None
    end = cfg.train.stop_at or cfg.train.steps
    if resume_step is not None and resume_step >= end:
        at, more = ("", "use a new --workdir for another run") if resume_step >= cfg.train.steps else (
            f", train.stop_at {cfg.train.stop_at}", "raise train.stop_at to continue")
        raise RunFinished(f"{root}: the run is finished (step {resume_step} of {cfg.train.steps} is checkpointed{at}); "
                          f"nothing to do, nothing written ({more})")
    init_from, init_meta, lineage, start_lr = None, None, None, cfg.schedule.start_lr
    if resume_step is not None:
        own = lineage = checkpoint.read_metadata(os.path.join(root, str(resume_step)), key="checkpoint")
        checkpoint.check_param_shapes(own.get("param_shapes", {}), abstract, f"checkpoint step {resume_step}")
        start_lr = own["schedule"]["start_lr"]
        init_from = own.get("init_from")  # named again in this run's checkpoints: export follows it
    elif cfg.init_from:
        init_from = cfg.init_from
        init_meta = lineage = checkpoint.read_metadata(init_from)
        checkpoint.check_param_shapes(init_meta.get("param_shapes", {}), abstract, f"init_from {init_from}")
        if cfg.init_from_optimizer and not checkpoint.has_optimizer_state(init_from):
            raise ConfigError(
                f"init_from_optimizer: {init_from} has no optimizer state (an imported model has none), "
                f"expected a checkpoint of a cpt_jax run or init_from_optimizer=False"
            )
        if start_lr is None and cfg.schedule.name in ("recipe", "constant", "rewarm"):
            if init_meta.get("lr_min") is None:
                raise ConfigError(
                    f"init_from: {init_from} has no lr_min in its metadata, expected one when "
                    f"schedule.start_lr is None; pass it with --config.schedule.start_lr=X"
                )
            start_lr = float(init_meta["lr_min"])
    schedule = schedules.build(cfg.schedule, cfg.train.steps, start_lr)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    pipeline = data_pipeline.Pipeline(cfg, schedule, batch_sharding)
    evaluation = evaluation_lib.from_config(cfg, mc, mesh=mesh, rules=rules, log=log)
    check_workdir(workdir, checkpoint.estimated_bytes(abstract) * 3)  # params + Adam's two moments
    return Run(
        cfg, workdir, mesh, rules, mc, param_shardings, schedule, pipeline, resume_step, init_from, init_meta,
        checkpoint.param_shapes(abstract), evaluation, checkpoint.source_dtype(lineage),
    )


def check_workdir(workdir: str, checkpoint_bytes: int) -> None:
    """The workdir can be created and written, and has room for a checkpoint (nothing is left behind)."""
    existing = workdir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"--workdir: {existing} is a file, expected {workdir} to be a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(
            f"--workdir: cannot write in {existing} ({e.strerror}), expected a writable directory"
        ) from None
    free = shutil.disk_usage(existing).free
    if free < checkpoint_bytes:
        raise ConfigError(
            f"--workdir: {existing} has {free / 2**20:.1f} MiB free, a checkpoint of this model needs about "
            f"{checkpoint_bytes / 2**20:.1f} MiB; free space or use another --workdir"
        )


# ============================================================================ state


def _abstract_state(run: Run, tx) -> tuple[dict, dict]:
    """(abstract state with shardings, state shardings) without allocating anything."""
    return train_step.abstract_state(run.model_config, run.param_shardings, run.mesh, tx)


def initial_state(run: Run, tx) -> tuple[dict, dict]:
    """The state to start from, and its shardings: own checkpoint, init_from, or fresh."""
    abstract, shardings = _abstract_state(run, tx)
    mc, seed = run.model_config, run.cfg.seed
    restored = None
    if run.resume_step is not None:
        root = os.path.join(run.workdir, "checkpoints")
        restored = checkpoint.restore_latest_good(root, abstract, log)
        if restored is None:
            raise ConfigError(f"{root}: no checkpoint step restores; move the directory away to start afresh")
        log(f"resumed from {root}/{restored[0]}")
        state = restored[1]
    else:
        if run.init_from:
            items = {"params": abstract["params"]}
            if run.cfg.init_from_optimizer:
                items["opt_state"] = abstract["opt_state"]
            from_ckpt = checkpoint.restore_from(run.init_from, **items)
            params = from_ckpt["params"]
            log(f"parameters from {run.init_from} (step {run.init_metadata.get('step')})")
        else:
            init = jax.jit(lambda: model.init_params(mc, seed), out_shardings=run.param_shardings)
            params, from_ckpt = init(), {}
        opt_state = from_ckpt.get("opt_state")
        if opt_state is None:
            opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
        state = {"step": np.int32(0), "params": params, "opt_state": opt_state}
    state["step"] = jax.device_put(jnp.asarray(state["step"], jnp.int32), shardings["step"])
    return state, shardings


def checkpoint_metadata(run: Run) -> Callable[[int], dict[str, Any]]:
    """step -> what a checkpoint of that step carries besides arrays: enough to continue from it or
    to plan with it. What does not depend on the step is built once; the lr comes from a host table,
    since evaluating the schedule on the device would wait for the step in flight."""
    cfg, sched = run.cfg, run.schedule
    static = {
        "schedule": sched.metadata(),
        "lr_max": sched.lr_max,
        "lr_min": sched.lr_min,
        "model": run.model_config.to_dict(),
        "param_shapes": run.param_shapes,
        "tokenizer_fingerprint": run.pipeline.tokenizer_fingerprint,
        "phases": [dataclasses.asdict(p) for p in run.pipeline.phases],
        "init_from": run.init_from,
        "source_dtype": run.source_dtype,
        "config": json.loads(config.to_json(cfg)),
    }
    lr = schedules.values(sched)  # lr at steps 0..steps

    def at(step: int) -> dict[str, Any]:
        return {
            **static,
            "step": step,
            "tokens_seen": step * cfg.train.batch_size * cfg.train.seq_len,
            "lr": float(lr[min(step, len(lr) - 1)]),
            "tokens_per_source": run.pipeline.tokens_per_source(step),
        }

    return at


# ============================================================================ loop


class Preemption:
    """SIGTERM (what TPU and cloud preemption send) asks the loop to save and stop after a step.

    With several processes, JAX's preemption service (started by `jax.distributed.initialize`)
    takes the signal on whichever host gets it and agrees on a step for all of them through the
    coordination service, off the training path: no collective and no host sync per step.
    """

    def __init__(self):
        self.requested = False
        self._multi = jax.process_count() > 1
        self._previous = None if self._multi else signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def should_stop(self, steps_done: int) -> bool:
        """True once the run should save and stop after `steps_done` steps; every process gets
        True at the same `steps_done`."""
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(steps_done)
        return self.requested

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _drop_records_from(path: str, step: int) -> None:
    """Forget what a restart from checkpoint `step` will redo, so each step has one record: train
    records of steps >= `step` and evaluations after it (an evaluation at `step` saw the very state
    that is restored, so it stays)."""
    if jax.process_index() != 0 or not os.path.exists(path):
        return

    def keep(record: dict) -> bool:
        kind, at = record.get("kind"), record.get("step", 0)
        return kind == "plan" or (at <= step if kind == "eval" else at < step)

    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if keep(json.loads(line))]
    if len(kept) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def train(run: Run) -> int:
    """Run the loop; returns the exit status. The mesh is set for the run only, not left behind."""
    with jax.set_mesh(run.mesh):
        return _train(run)


def _train(run: Run) -> int:
    cfg, workdir = run.cfg, run.workdir
    steps, B, T = cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len
    end = cfg.train.stop_at or steps

    # ---------------------------------------------------------------- state (own ckpt | init_from | fresh)
    if jax.process_index() == 0:
        checkpoint.set_aside_incomplete(os.path.join(workdir, "checkpoints"), log)
    tx = optim.build(cfg.optim)
    state, shardings = initial_state(run, tx)
    start = int(jax.device_get(state["step"]))
    if run.resume_step is not None:  # the saved iterator state must stand where the restored step does
        run.pipeline.check_resumed(start, *checkpoint.read_data_state(os.path.join(workdir, "checkpoints"), start))

    # ---------------------------------------------------------------- outputs
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(cfg))
    _drop_records_from(os.path.join(workdir, "metrics.jsonl"), start)
    writer = MetricsWriter(workdir, cfg.tensorboard, cfg.wandb, json.loads(config.to_json(cfg)))
    ckpt = checkpoint.Checkpointer(
        workdir, cfg.checkpoint.every_steps, cfg.checkpoint.max_to_keep, cfg.checkpoint.async_save
    )
    writer.write(
        {
            "kind": "plan",
            "step": start,
            "schedule": run.schedule.metadata(),
            "phases": [dataclasses.asdict(p) for p in run.pipeline.phases],
            "params": run.model_config.num_params(),
        }
    )

    # ---------------------------------------------------------------- update step
    step_fn = train_step.make_train_step(
        run.model_config,
        tx,
        run.schedule,
        sharding.rules_tuple(run.rules),
        cfg.train.micro_batches,
        cfg.train.loss_chunk_tokens,
        tuple(cfg.train.inject_nan_steps),
    )
    batch_specs = data_pipeline.batch_specs(B, T, run.pipeline.batch_sharding)
    jitted = jax.jit(
        step_fn,
        in_shardings=(shardings, {k: v.sharding for k, v in batch_specs.items()}),
        out_shardings=(shardings, sharding.replicated(run.mesh)),
        donate_argnums=(0,),
    )
    t0 = time.time()
    compiled = jitted.lower(state, batch_specs).compile()
    log(f"compiled the train step in {time.time() - t0:.1f}s; steps {start} -> {end} of {steps}")

    # ---------------------------------------------------------------- loop
    peak = flops.peak_flops()  # None on CPUs and unknown devices: MFU is then reported as null
    progress = Progress(end, desc="train", start=start, enabled=None if cfg.train.progress else False)
    nonfinite_run, pending, saved_at = 0, None, start
    last_time, last_step = time.time(), start

    def finish_step(step: int, metrics: Any) -> int:
        """Host side of step `step` (its metrics are ready): records, the non-finite counter."""
        nonlocal last_time, last_step, nonfinite_run
        m = jax.device_get(metrics)
        nonfinite_run = 0 if m["finite"] else nonfinite_run + 1
        progress.update(1, loss=float(m["loss"]), lr=float(m["lr"]), phase=run.pipeline.phase_at(step))
        if step % cfg.train.log_every_steps == 0 or step == end - 1 or not m["finite"]:
            now = time.time()
            record = {
                "kind": "train",
                "step": step,
                "loss": float(m["loss"]),
                "lr": float(m["lr"]),
                "grad_norm": float(m["grad_norm"]),
                "tokens": (step + 1) * B * T,
                "tokens_per_sec": (step + 1 - last_step) * B * T / max(now - last_time, 1e-9),
                "phase": run.pipeline.phase_at(step),
                "tokens_per_source": run.pipeline.tokens_per_source(step + 1),
            }
            n_dev = jax.device_count()
            record["mfu"] = flops.mfu(record["tokens_per_sec"], run.model_config, T, n_dev, peak)
            record["tflops_per_device"] = (
                flops.flops_per_sec_per_device(record["tokens_per_sec"], run.model_config, T, n_dev) / 1e12
            )
            if not m["finite"]:
                record["nonfinite"] = True
                record["nonfinite_consecutive"] = nonfinite_run
            writer.write(record)
            progress.fields["tokens_per_sec"] = record["tokens_per_sec"]
            line = (
                f"step {step}: loss {record['loss']:.4f} lr {record['lr']:.3e} "
                f"grad_norm {record['grad_norm']:.3f} {record['tokens_per_sec']:.0f} tok/s"
                + (f" mfu {record['mfu']:.1%}" if record["mfu"] is not None else "")
                + (" (non-finite: skipped)" if not m["finite"] else "")
            )
            if progress.enabled:
                progress.write(line)  # above the bar, which stays on the last line
            else:
                log(line)
            last_time, last_step = now, step + 1
        return nonfinite_run

    def save(step: int) -> None:
        nonlocal saved_at
        ckpt.save(step, state, metadata_at(step), batches.get_state())  # refuses non-finite parameters
        saved_at = step

    metadata_at = checkpoint_metadata(run)
    preemption, status, step = Preemption(), 0, start
    batches = run.pipeline.iterate(start, end)
    loop_t0 = time.perf_counter()
    try:
        for step, batch in batches:
            state, metrics = compiled(state, batch)
            if run.evaluation is not None and (run.evaluation.due(step + 1) or step + 1 == steps):
                writer.write(run.evaluation.run(state["params"], step + 1, log=log))  # all processes compute
            # Read the previous step's metrics only after this one is dispatched: the host never
            # waits for the device to drain.
            if pending is not None and finish_step(*pending) >= cfg.train.max_nonfinite_steps:
                status, pending = 1, None
                break
            pending = (step, metrics)
            ckpt.check()
            if ckpt.should_save(step + 1, end):
                save(step + 1)
            if preemption.should_stop(step + 1):
                if saved_at != step + 1:
                    save(step + 1)
                status = 143
                break
        if pending is not None and finish_step(*pending) >= cfg.train.max_nonfinite_steps:
            status = 1
        t0 = time.perf_counter()
        ckpt.wait()
        writer.write(
            {
                "kind": "event",
                "step": saved_at,
                "checkpoint_saves": ckpt.saves,
                "checkpoint_wait_sec": ckpt.wait_secs,
                "checkpoint_start_sec": ckpt.start_secs,
                "checkpoint_write_sec": ckpt.write_secs,
                "checkpoint_final_wait_sec": time.perf_counter() - t0,
                "loop_sec": time.perf_counter() - loop_t0,
                "steps_run": step + 1 - start if end > start else 0,
            }
        )
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


def main(argv: list[str] | None = None) -> int:
    logging.set_verbosity(logging.WARNING)
    try:
        launch: dict = {}
        cfg, workdir = parse_args(argv if argv is not None else sys.argv, launch)
        # Join the other processes (if any) before anything touches JAX's devices; then make sure
        # every process runs the same config into the same workdir.
        distributed.initialize(launch["distributed"])
        distributed.check_same_config({**json.loads(config.to_json(cfg)), "--workdir": workdir})
        if launch["compile_only"]:
            report = aot.compile_only(aot.resolve(cfg, workdir), launch["topology"])
            if jax.process_index() == 0:
                print(aot.format_report(report, workdir), flush=True)
            return 1 if report["fits"] is False else 0
        run = resolve_run(cfg, workdir)
    except RunFinished as e:
        log(str(e))
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return train(run)
    except ConfigError as e:  # found only once arrays are read (e.g. every checkpoint step damaged)
        print(f"error: {e}", file=sys.stderr)
        return 2
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

"""Config + workdir -> the run, before anything is compiled or written: one road, in stages that
each caller takes as far as it needs.

    for_plan(cfg)               the starting LR and where it came from, the schedule, the phases
    for_compile(cfg, workdir)   + the model and its sharding rules (--compile_only: no data, no arrays)
    for_training(cfg, workdir)  + the workdir's checks, the mesh, where the state comes from, data, evaluation
    initial_state(run, tx)      the state itself, restored or initialized on the devices
    mesh_for(model_config)      devices and mesh for evaluating a checkpoint (evaluate, sample)

Every user error is a ConfigError; nothing is written before `initial_state`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cpt_jax import checkpoint, config, model, schedules, sharding, train_step, workdir
from cpt_jax import evaluation as evaluation_lib
from cpt_jax.config import ConfigError
from cpt_jax.data import mixture as mixture_lib
from cpt_jax.data import pipeline as data_pipeline
from cpt_jax.metrics import log

# A placeholder start LR for schedules that take it from a checkpoint: only values in the program change.
PLACEHOLDER_START_LR = 1e-4


@dataclasses.dataclass
class Run:
    """A run resolved as far as a caller's stage goes (see the module docstring); later fields are
    None before the stage that sets them."""

    cfg: ml_collections.ConfigDict
    workdir: str | None
    schedule: schedules.Schedule
    start_lr_from: str  # where the starting LR came from, for people
    model_config: model.ModelConfig | None = None
    rules: dict | None = None
    mixture: mixture_lib.Mixture | None = None  # for_plan; for_training has it as pipeline.mixture
    mesh: jax.sharding.Mesh | None = None
    param_shardings: Any = None
    pipeline: data_pipeline.Pipeline | None = None
    evaluation: evaluation_lib.Evaluation | None = None  # per-source validation and tasks every eval.every_steps
    resume_step: int | None = None  # this run's own latest checkpoint, if any
    init_from: str | None = None  # the checkpoint the run started from (restored only when resume_step is None)
    init_metadata: dict | None = None
    param_shapes: dict | None = None  # name -> shape, written into every checkpoint's metadata
    source_dtype: str | None = None  # the dtype the weights came in (an import's), what an export writes by default


class RunFinished(Exception):
    """The workdir's latest checkpoint is the run's last step: there is nothing to do."""


def start_lr(cfg: ml_collections.ConfigDict, own: tuple[int, dict] | None = None, init_meta: dict | None = None,
             *, compile_only: bool = False) -> tuple[float | None, str]:
    """(the LR the schedule starts at, where it came from): this run's own checkpoint `own` (step,
    metadata) when resuming, else schedule.start_lr, else the lr_min of init_from (`init_meta`, read
    when not given) for the schedules that read a start LR, else a placeholder for compile-only."""
    name = cfg.schedule.name
    if own is not None:
        return own[1]["schedule"]["start_lr"], f"this run's checkpoint step {own[0]}"
    if cfg.schedule.start_lr is not None:
        return cfg.schedule.start_lr, "schedule.start_lr"
    if name not in schedules.READS_START_LR:
        return None, f"schedule '{name}' (it does not read schedule.start_lr)"
    if cfg.init_from:
        if init_meta is None:
            try:
                init_meta = checkpoint.read_metadata(cfg.init_from)
            except ConfigError:
                if not compile_only:
                    raise
                init_meta = {}  # not on this machine: the value does not change the program
        if init_meta.get("lr_min") is not None:
            return float(init_meta["lr_min"]), f"the lr_min of init_from {cfg.init_from}"
        if not compile_only:
            raise ConfigError(
                f"init_from: {cfg.init_from} has no lr_min in its metadata, expected one when "
                f"schedule.start_lr is None; pass it with --config.schedule.start_lr=X"
            )
    if name not in schedules.NEEDS_START_LR:
        return None, f"schedule '{name}' (a warmup from 0 without schedule.start_lr)"
    if compile_only:
        return PLACEHOLDER_START_LR, "a placeholder (compile-only: it changes values, not the program)"
    raise ConfigError(
        f"schedule.start_lr: None and no init_from, expected the LR to start at (schedule "
        f"'{name}'): set --config.schedule.start_lr=X (the pretrained run's final LR) or "
        "--config.init_from=CHECKPOINT to read it from the checkpoint"
    )


def _schedule(cfg: ml_collections.ConfigDict, own=None, init_meta=None, *, compile_only=False
              ) -> tuple[schedules.Schedule, str]:
    lr, where = start_lr(cfg, own, init_meta, compile_only=compile_only)
    return schedules.build(cfg.schedule, cfg.train.steps, lr), where


def for_plan(cfg: ml_collections.ConfigDict) -> Run:
    """The schedule and the mixture's phases, without devices or a workdir."""
    config.validate(cfg)
    schedule, where = _schedule(cfg)
    return Run(cfg, None, schedule, where, mixture=mixture_lib.from_config(cfg, schedule))


def for_compile(cfg: ml_collections.ConfigDict, workdir_path: str) -> Run:
    """What compiling the train step needs; reads no data and no checkpoint arrays, writes nothing."""
    config.validate(cfg)
    rules = sharding.rules_from_config(cfg.mesh)
    mc = model.ModelConfig.from_config(cfg.model)
    schedule, where = _schedule(cfg, compile_only=True)
    return Run(cfg, workdir_path, schedule, where, model_config=mc, rules=rules)


def devices(cfg: ml_collections.ConfigDict, mc: model.ModelConfig, mesh: jax.sharding.Mesh, rules: dict,
            platform: str, of: str = "") -> Any:
    """The parameters' shardings over `mesh`, once the model and the batch are known to fit it
    (`of`: the target's name in the batch message, for a compile-only target)."""
    model.attention_implementation(mc, platform)  # 'cudnn' where it cannot run is refused here
    param_shardings = sharding.param_shardings(model.abstract_params(mc), model.logical_axes(mc), mesh, rules)
    divisor = sharding.batch_divisor(mesh, rules)
    B, micro_batches = cfg.train.batch_size, cfg.train.micro_batches
    if (B // micro_batches) % divisor:
        raise ConfigError(
            f"train.batch_size: {B} ({micro_batches} micro-batches of {B // micro_batches}) does not split over "
            f"the {divisor} data-parallel devices{of}, expected a multiple of {divisor}"
        )
    return param_shardings


def _resume_step(cfg: ml_collections.ConfigDict, root: str) -> int | None:
    """This run's latest complete checkpoint step; RunFinished when it is the last one."""
    steps = checkpoint.complete_steps(root)
    step = steps[-1] if steps else None
    if step is not None and step >= (cfg.train.stop_at or cfg.train.steps):
        at, more = ("", "use a new --workdir for another run") if step >= cfg.train.steps else (
            f", train.stop_at {cfg.train.stop_at}", "raise train.stop_at to continue")
        raise RunFinished(f"{root}: the run is finished (step {step} of {cfg.train.steps} is checkpointed{at}); "
                          f"nothing to do, nothing written ({more})")
    return step


def for_training(cfg: ml_collections.ConfigDict, workdir_path: str) -> Run:
    """Validate the config against the devices, the workdir and any checkpoint; write nothing."""
    config.validate(cfg)
    workdir.check_same_run(workdir_path, cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.rules_from_config(cfg.mesh)
    mc = model.ModelConfig.from_config(cfg.model)
    param_shardings = devices(cfg, mc, mesh, rules, mesh.devices.flat[0].platform)
    abstract = model.abstract_params(mc)

    root = os.path.join(workdir_path, "checkpoints")
    resume_step = _resume_step(cfg, root)
    init_from, init_meta, own, lineage = None, None, None, None
    if resume_step is not None:
        lineage = checkpoint.read_metadata(os.path.join(root, str(resume_step)), key="checkpoint")
        checkpoint.check_param_shapes(lineage.get("param_shapes", {}), abstract, f"checkpoint step {resume_step}")
        own = (resume_step, lineage)
        init_from = lineage.get("init_from")  # named again in this run's checkpoints: export follows it
    elif cfg.init_from:
        init_from = cfg.init_from
        init_meta = lineage = checkpoint.read_metadata(init_from)
        checkpoint.check_param_shapes(init_meta.get("param_shapes", {}), abstract, f"init_from {init_from}")
        if cfg.init_from_optimizer and not checkpoint.has_optimizer_state(init_from):
            raise ConfigError(
                f"init_from_optimizer: {init_from} has no optimizer state (an imported model has none), "
                f"expected a checkpoint of a cpt_jax run or init_from_optimizer=False"
            )
    schedule, where = _schedule(cfg, own, init_meta)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    pipeline = data_pipeline.Pipeline(cfg, schedule, batch_sharding)
    evaluation = evaluation_lib.from_config(cfg, mc, mesh=mesh, rules=rules, log=log)
    workdir.check_writable(workdir_path, checkpoint.estimated_bytes(abstract) * 3)  # params + Adam's two moments
    return Run(cfg, workdir_path, schedule, where, mc, rules, mesh=mesh, param_shardings=param_shardings,
               pipeline=pipeline, evaluation=evaluation, resume_step=resume_step, init_from=init_from,
               init_metadata=init_meta, param_shapes=checkpoint.param_shapes(abstract),
               source_dtype=checkpoint.source_dtype(lineage))


def initial_state(run: Run, tx) -> tuple[dict, dict]:
    """The state to start from, and its shardings: own checkpoint (its data state checked against
    it), init_from, or fresh. Incomplete checkpoint steps are set aside first."""
    root = os.path.join(run.workdir, "checkpoints")
    if jax.process_index() == 0:
        checkpoint.set_aside_incomplete(root, log)
    abstract, shardings = train_step.abstract_state(run.model_config, run.param_shardings, run.mesh, tx)
    if run.resume_step is not None:
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
            init = jax.jit(lambda: model.init_params(run.model_config, run.cfg.seed), out_shardings=run.param_shardings)
            params, from_ckpt = init(), {}
        opt_state = from_ckpt.get("opt_state")
        if opt_state is None:
            opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
        state = {"step": np.int32(0), "params": params, "opt_state": opt_state}
    state["step"] = jax.device_put(jnp.asarray(state["step"], jnp.int32), shardings["step"])
    if run.resume_step is not None:  # the saved iterator state must stand where the restored step does
        start = int(jax.device_get(state["step"]))
        run.pipeline.check_resumed(start, *checkpoint.read_data_state(root, start))
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
        "phases": [dataclasses.asdict(p) for p in run.pipeline.mixture.phases],
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
            "tokens_per_source": run.pipeline.mixture.tokens_per_source(step, cfg.train.seq_len),
        }

    return at


def mesh_for(mc: model.ModelConfig) -> tuple[Any, dict, Any]:
    """(mesh, rules, parameter shardings) over every device: FSDP when the parameters divide,
    else data parallel with replicated parameters."""
    abstract, names = model.abstract_params(mc), model.logical_axes(mc)
    rules = dict(sharding.DEFAULT_RULES)
    for data, fsdp in ((1, -1), (-1, 1)):
        mesh = sharding.make_mesh({"data": data, "fsdp": fsdp, "tensor": 1})
        try:
            return mesh, rules, sharding.param_shardings(abstract, names, mesh, rules)
        except ConfigError:
            continue
    raise AssertionError("replicated parameters always fit a data-parallel mesh")

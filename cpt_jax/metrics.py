"""Run records: WORKDIR/metrics.jsonl (one JSON object per record) and TensorBoard events.

Only process 0 writes. Every record has a `kind` ("train", "eval", "plan", "event") and a `step`;
numbers go to TensorBoard as scalars, an evaluation's sample continuations as text. The plan, train
and event records are built here; evaluation records in the evaluation library.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from typing import Any

import jax

from cpt_jax import flops
from cpt_jax.model import ModelConfig


def _clean(x: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/inf to strings JSON can hold."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


class MetricsWriter:
    """Appends records to metrics.jsonl and scalars to TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, tensorboard: bool = True, wandb_cfg: Any = None, run_config: Any = None):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._wandb = None
        if self.active:
            self._file = open(self.path, "a", buffering=1)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            if wandb_cfg is not None and wandb_cfg.project:
                import wandb  # optional: validated as installed when wandb.project is set

                # The id is stable for the workdir, so a resumed run continues the same W&B run.
                self._wandb = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity or None,
                                         name=wandb_cfg.run_name or os.path.basename(os.path.normpath(workdir)),
                                         dir=workdir, config=run_config, resume="allow",
                                         id=hashlib.sha256(os.path.abspath(workdir).encode()).hexdigest()[:16])

    def write(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        record = _clean(record)
        self._file.write(json.dumps(record) + "\n")
        if "step" not in record:
            return
        scalars = {f"{record.get('kind', 'train')}/{k}": v for k, v in _scalars(record)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, record["step"])
            if record.get("samples"):
                self._tb.add_text(f"{record.get('kind', 'eval')}/samples", _samples_markdown(record["samples"]),
                                  record["step"])
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.active:
            self._file.close()
            if self._tb is not None:
                self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()


def _scalars(record: dict[str, Any], prefix: str = ""):
    for k, v in record.items():
        if k in ("kind", "step"):
            continue
        if isinstance(v, dict):
            yield from _scalars(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield f"{prefix}{k}", v


def _samples_markdown(samples: list[dict[str, Any]]) -> str:
    """Each sample's prompt and continuation as markdown (TensorBoard renders text summaries so);
    indented blocks keep the text verbatim."""
    def block(text: str) -> str:
        return "    " + str(text).replace("\n", "\n    ")

    return "\n\n".join(f"**prompt {i + 1}**\n\n{block(s['prompt'])}\n\n**continuation**\n\n"
                         f"{block(s['continuation'])}" for i, s in enumerate(samples))


def log(message: str) -> None:
    """A human-readable line on stderr from process 0."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def plan_record(step: int, schedule_metadata: dict[str, Any], phases: list, model_config: ModelConfig) -> dict:
    """What a run (or a resumed part of it) sets out to do: the schedule, the phases, the model size."""
    return {"kind": "plan", "step": step, "schedule": schedule_metadata,
            "phases": [dataclasses.asdict(p) for p in phases], "params": model_config.num_params()}


class TrainRecords:
    """Train records from each step's host metrics: one every `log_every` steps, at the last step and
    at every non-finite step, with the throughput since the previous record; counts non-finite steps
    in a row."""

    def __init__(self, start: int, end: int, log_every: int, model_config: ModelConfig, pipeline: Any):
        self.end, self.log_every, self.mc, self.pipeline = end, log_every, model_config, pipeline
        self.tokens_per_step = pipeline.batch_size * pipeline.seq_len
        self.peak = flops.peak_flops()  # None on CPUs and unknown devices: MFU is then reported as null
        self.nonfinite_run = 0
        self._last_time, self._last_step = time.time(), start

    def record(self, step: int, m: dict[str, Any]) -> dict[str, Any] | None:
        """The record of step `step` (its metrics `m` on the host), or None when it is not logged."""
        self.nonfinite_run = 0 if m["finite"] else self.nonfinite_run + 1
        if step % self.log_every and step != self.end - 1 and m["finite"]:
            return None
        now, T, n_dev = time.time(), self.pipeline.seq_len, jax.device_count()
        tokens_per_sec = (step + 1 - self._last_step) * self.tokens_per_step / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step + 1
        record = {
            "kind": "train",
            "step": step,
            "loss": float(m["loss"]),
            "lr": float(m["lr"]),
            "grad_norm": float(m["grad_norm"]),
            "tokens": (step + 1) * self.tokens_per_step,
            "tokens_per_sec": tokens_per_sec,
            "phase": self.pipeline.mixture.phase_at(step),
            "tokens_per_source": self.pipeline.mixture.tokens_per_source(step + 1, self.pipeline.seq_len),
            "mfu": flops.mfu(tokens_per_sec, self.mc, T, n_dev, self.peak),
            "tflops_per_device": flops.flops_per_sec_per_device(tokens_per_sec, self.mc, T, n_dev) / 1e12,
        }
        if not m["finite"]:
            record.update(nonfinite=True, nonfinite_consecutive=self.nonfinite_run)
        return record


def train_line(record: dict[str, Any]) -> str:
    """A train record as the line a person reads."""
    return (
        f"step {record['step']}: loss {record['loss']:.4f} lr {record['lr']:.3e} "
        f"grad_norm {record['grad_norm']:.3f} {record['tokens_per_sec']:.0f} tok/s"
        + (f" mfu {record['mfu']:.1%}" if record["mfu"] is not None else "")
        + (" (non-finite: skipped)" if record.get("nonfinite") else "")
    )


def event_record(step: int, ckpt: Any, final_wait_sec: float, loop_sec: float, steps_run: int) -> dict[str, Any]:
    """How the loop went at its end: the checkpointer's saves and where their time went."""
    return {
        "kind": "event",
        "step": step,
        "checkpoint_saves": ckpt.saves,
        "checkpoint_wait_sec": ckpt.wait_secs,
        "checkpoint_start_sec": ckpt.start_secs,
        "checkpoint_write_sec": ckpt.write_secs,
        "checkpoint_final_wait_sec": final_wait_sec,
        "loop_sec": loop_sec,
        "steps_run": steps_run,
    }


def drop_records_from(path: str, step: int) -> None:
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

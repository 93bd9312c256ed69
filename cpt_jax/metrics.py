"""Run records: WORKDIR/metrics.jsonl (one JSON object per record) and TensorBoard events.

Only process 0 writes. Every record has a `kind` ("train", "eval", "plan", "event") and a `step`;
numbers go to TensorBoard as scalars, an evaluation's sample continuations as text.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import jax


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

                self._wandb = wandb.init(
                    project=wandb_cfg.project,
                    entity=wandb_cfg.entity or None,
                    name=wandb_cfg.run_name or os.path.basename(os.path.normpath(workdir)),
                    dir=workdir,
                    config=run_config,
                    resume="allow",
                    id=_wandb_id(workdir),
                )

    def write(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        record = _clean(record)
        self._file.write(json.dumps(record) + "\n")
        if "step" in record and (self._tb is not None or self._wandb is not None):
            scalars = {f"{record.get('kind', 'train')}/{k}": v for k, v in _scalars(record)}
            for key, value in scalars.items():
                if self._tb is not None:
                    self._tb.add_scalar(key, value, record["step"])
            if self._tb is not None and record.get("samples"):
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


def _wandb_id(workdir: str) -> str:
    """A run id stable for the workdir, so a resumed run continues the same W&B run."""
    import hashlib

    return hashlib.sha256(os.path.abspath(workdir).encode()).hexdigest()[:16]


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

"""Run records: WORKDIR/metrics.jsonl (one JSON object per record) and TensorBoard events.

Only process 0 writes. Every record has a `kind` ("train", "eval", "plan", "event") and a `step`.
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

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.active:
            self._file = open(self.path, "a", buffering=1)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        record = _clean(record)
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None and "step" in record:
            for key, value in _scalars(record):
                self._tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["step"])

    def close(self) -> None:
        if self.active:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def _scalars(record: dict[str, Any], prefix: str = ""):
    for k, v in record.items():
        if k in ("kind", "step"):
            continue
        if isinstance(v, dict):
            yield from _scalars(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield f"{prefix}{k}", v


def log(message: str) -> None:
    """A human-readable line on stderr from process 0."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)

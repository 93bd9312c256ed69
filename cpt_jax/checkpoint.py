"""Checkpoints: an orbax CheckpointManager under WORKDIR/checkpoints/, and reading other runs'.

A step directory holds three items: `params`, `opt_state` (orbax StandardSave) and `metadata` (a
JSON file at <step>/metadata/metadata). The metadata carries the schedule (so a continued run can
start at the checkpoint's lr_min), the model config, parameter shapes (to report a mismatch
before anything is compiled), the step and tokens seen.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cpt_jax.config import ConfigError

FORMAT_VERSION = 1
# Weight files that are Python pickles: loading one can execute arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_COMMIT_MARKER = "commit_success.txt"


# ----------------------------------------------------------------------------- reading any checkpoint


def _metadata_file(step_dir: str) -> str:
    return os.path.join(step_dir, "metadata", "metadata")


def is_step_dir(path: str) -> bool:
    """A complete step directory written by cpt_jax (named by its step, with metadata)."""
    return os.path.basename(os.path.normpath(path)).isdigit() and os.path.isfile(_metadata_file(path))


def complete_steps(root: str) -> list[int]:
    """Steps under a checkpoints/ directory whose save finished (orbax's commit marker is there)."""
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        d = os.path.join(root, name)
        if name.isdigit() and os.path.isdir(d) and os.path.isfile(os.path.join(d, _COMMIT_MARKER)):
            steps.append(int(name))
    return sorted(steps)


def incomplete_steps(root: str) -> list[str]:
    """Step directories whose save never finished (no commit marker): ignored when resuming."""
    if not os.path.isdir(root):
        return []
    return sorted(
        name
        for name in os.listdir(root)
        if name.isdigit() and not os.path.isfile(os.path.join(root, name, _COMMIT_MARKER))
    )


def resolve(path: str, key: str = "init_from") -> tuple[str, int]:
    """(checkpoints root, step) for a step directory or a checkpoints/ directory (its latest step)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise ConfigError(f"{key}: {path} does not exist, expected a checkpoints/ directory or a step directory")
    pickled = [path] if os.path.isfile(path) else [
        os.path.join(path, f) for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES)
    ]
    if pickled and (os.path.isfile(path) or not complete_steps(path)):
        raise ConfigError(
            f"{key}: {pickled[0]} is a pickle-based weight file, which is never loaded (unpickling runs code); "
            f"save the model as safetensors (transformers: save_pretrained(dir, safe_serialization=True)) "
            f"and import it with `python -m cpt_jax.hf import`"
        )
    if is_step_dir(path):
        return os.path.dirname(path), int(os.path.basename(path))
    if os.path.isdir(os.path.join(path, "checkpoints")) and not complete_steps(path):
        path = os.path.join(path, "checkpoints")
    steps = [s for s in complete_steps(path) if os.path.isfile(_metadata_file(os.path.join(path, str(s))))]
    if not steps:
        raise ConfigError(
            f"{key}: {path} holds no complete cpt_jax checkpoint, expected a checkpoints/ directory "
            f"with step directories or one step directory"
        )
    return path, steps[-1]


def read_metadata(path: str, key: str = "init_from") -> dict[str, Any]:
    """The metadata JSON of a checkpoint (a step directory, or a checkpoints/ directory's latest)."""
    root, step = resolve(path, key)
    file = _metadata_file(os.path.join(root, str(step)))
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{key}: {file} is unreadable ({e}), expected the checkpoint's metadata JSON") from None


def param_shapes(params: Any) -> dict[str, list[int]]:
    """{'layers.wq': [L, D, N, H], ...} for a pytree of arrays or ShapeDtypeStructs."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="."): list(x.shape) for p, x in flat}


def check_param_shapes(saved: dict[str, list[int]], expected: Any, where: str) -> None:
    """ConfigError naming the first parameter whose shape differs between a checkpoint and the model."""
    want = param_shapes(expected)
    for name in sorted(set(saved) | set(want)):
        a, b = saved.get(name), want.get(name)
        if a != b:
            found = "missing" if a is None else f"shape {tuple(a)}"
            exp = "no such parameter" if b is None else f"shape {tuple(b)}"
            raise ConfigError(
                f"{where}: parameter {name} has {found} in the checkpoint, the model config expects {exp}"
            )


def _restore(root: str, step: int, **items: Any) -> dict[str, Any]:
    mngr = ocp.CheckpointManager(root)
    try:
        args = {k: ocp.args.StandardRestore(v) for k, v in items.items()}
        return dict(mngr.restore(step, args=ocp.args.Composite(**args)))
    finally:
        mngr.close()


def restore_from(path: str, **abstract: Any) -> dict[str, Any]:
    """Items (params=..., opt_state=...) of another checkpoint into the given abstract targets."""
    root, step = resolve(path)
    return _restore(root, step, **abstract)


def restore_latest_good(root: str, abstract_state: dict[str, Any], warn) -> tuple[int, dict[str, Any]] | None:
    """(step, state) of the newest step under `root` that restores, or None when there is none.

    A complete-looking step that fails to restore (a truncated or missing array file) is moved
    aside to `<step>.damaged` with a warning naming the error, so that `max_to_keep` can never
    delete the last restorable step while keeping a broken one.
    """
    for step in reversed(complete_steps(root)):
        try:
            out = _restore(root, step, params=abstract_state["params"], opt_state=abstract_state["opt_state"])
        except Exception as e:  # any failure to read the arrays means this step is unusable
            damaged = os.path.join(root, f"{step}.damaged")
            if jax.process_index() == 0:  # every process saw the failure; one moves the directory
                os.replace(os.path.join(root, str(step)), damaged)
            reason = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
            warn(f"warning: checkpoint step {step} failed to restore ({reason}); moved to {damaged}")
            continue
        return step, {"step": np.int32(step), "params": out["params"], "opt_state": out["opt_state"]}
    return None


def set_aside_incomplete(root: str, warn) -> None:
    """Move step directories whose save never finished to `<step>.incomplete` (orbax would
    otherwise refuse to save that step again); nothing is deleted."""
    for name in incomplete_steps(root):
        target = os.path.join(root, f"{name}.incomplete")
        os.replace(os.path.join(root, name), target)
        warn(f"warning: ignoring {os.path.join(root, name)}: its save never finished (no {_COMMIT_MARKER}); "
             f"moved to {target}")


def estimated_bytes(abstract_state: Any) -> int:
    """Bytes of the arrays a checkpoint of this state holds (what a save needs on disk)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract_state))


# ----------------------------------------------------------------------------- this run's checkpoints


class Checkpointer:
    """Saves and restores this run's checkpoints (asynchronously, atomically, max_to_keep)."""

    def __init__(self, workdir: str, every_steps: int, max_to_keep: int, async_save: bool = True):
        self.root = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.every_steps = every_steps
        self.saves = 0
        self.blocked_secs = 0.0  # time the training loop spent inside save() (device->host copies)
        self._mngr = ocp.CheckpointManager(
            self.root,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def latest_step(self) -> int | None:
        steps = complete_steps(self.root)
        return steps[-1] if steps else None

    def should_save(self, step: int, last_step: int) -> bool:
        return step == last_step or (self.every_steps > 0 and step % self.every_steps == 0)

    def save(self, step: int, state: dict[str, Any], metadata: dict[str, Any]) -> None:
        """Start saving `state` (params, opt_state) at `step`; returns before the write finishes."""
        meta = dict(metadata, format_version=FORMAT_VERSION, step=int(step))
        t0 = time.perf_counter()
        self._mngr.save(
            int(step),
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state["params"]),
                opt_state=ocp.args.StandardSave(state["opt_state"]),
                metadata=ocp.args.JsonSave(_jsonable(meta)),
            ),
            force=True,
        )
        self.blocked_secs += time.perf_counter() - t0
        self.saves += 1

    def metadata(self, step: int) -> dict[str, Any]:
        return read_metadata(os.path.join(self.root, str(step)), key="checkpoint")

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return x

"""Checkpoints: an orbax CheckpointManager under WORKDIR/checkpoints/, and reading other runs'.

A step directory (format 2) holds the orbax PyTree item `state` ({"params", "opt_state"}; imports
have no optimizer state), the data iterator's state as the item `data` (grain's orbax handler: one
JSON file per process) and our metadata as the `custom_metadata` of orbax's step metadata file,
committed with the arrays (no JSON item of our own: each item adds to a save's fixed cost). The
metadata carries the schedule (a continued run starts at its lr_min), the model config, parameter
shapes (a mismatch is reported before compiling), the step and tokens seen. Format 1 (items
`params`, `opt_state`, JSON item `metadata`) is still read.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import time
import types
from collections.abc import Iterator
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from cpt_jax.config import ConfigError, first_line, plain
from cpt_jax.model import ModelConfig

FORMAT_VERSION = 2
# Weight files that are Python pickles: loading one can execute arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_COMMIT_MARKER = "commit_success.txt"
_STATE = "state"
_DATA = "data"
_STEP_METADATA = "_CHECKPOINT_METADATA"  # orbax's per-step file; ours is its "custom_metadata"
_V1_METADATA = os.path.join("metadata", "metadata")


def _step_metadata(step_dir: str) -> dict[str, Any] | None:
    """Our metadata of a step directory (format 2, or format 1's JSON item); None if it has none.
    Raises OSError or JSONDecodeError when the file is there but unreadable."""
    v2 = os.path.join(step_dir, _STEP_METADATA)
    if os.path.isfile(v2):
        with open(v2) as f:
            custom = json.load(f).get("custom_metadata") or {}
        if "format_version" in custom:
            return custom
    v1 = os.path.join(step_dir, _V1_METADATA)
    if os.path.isfile(v1):
        with open(v1) as f:
            return json.load(f)
    return None


def is_step_dir(path: str) -> bool:
    """A complete step directory written by cpt_jax (named by its step, with metadata)."""
    if not os.path.basename(os.path.normpath(path)).isdigit():
        return False
    try:
        return _step_metadata(path) is not None
    except (OSError, json.JSONDecodeError):
        return True  # it is there; read_metadata reports what is wrong with it


def _step_names(root: str) -> dict[str, bool]:
    """{name: whether its save finished} of the step directories under a checkpoints/ directory."""
    if not os.path.isdir(root):
        return {}
    return {name: os.path.isfile(os.path.join(root, name, _COMMIT_MARKER))
            for name in os.listdir(root) if name.isdigit() and os.path.isdir(os.path.join(root, name))}


def complete_steps(root: str) -> list[int]:
    """Steps under a checkpoints/ directory whose save finished (orbax's commit marker is there)."""
    return sorted(int(name) for name, committed in _step_names(root).items() if committed)


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
    steps = [s for s in complete_steps(path) if is_step_dir(os.path.join(path, str(s)))]
    if not steps:
        raise ConfigError(f"{key}: {path} holds no complete cpt_jax checkpoint, expected a checkpoints/ directory "
                          f"with step directories or one step directory")
    return path, steps[-1]


def read_metadata(path: str, key: str = "init_from") -> dict[str, Any]:
    """The metadata of a checkpoint (a step directory, or a checkpoints/ directory's latest)."""
    root, step = resolve(path, key)
    step_dir = os.path.join(root, str(step))
    try:
        meta = _step_metadata(step_dir)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{key}: {step_dir} has unreadable metadata ({e}), expected the checkpoint's "
                          f"metadata JSON") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{key}: {step_dir} has metadata that is not a JSON object, expected cpt_jax metadata")
    return meta


def read_model_config(path: str, key: str = "init_from", dtype: str | None = None
                      ) -> tuple[dict[str, Any], ModelConfig]:
    """(metadata, model config) of a checkpoint, as read_metadata finds it; `dtype` (e.g. "float32")
    replaces the compute dtype. ConfigError, naming `key` and `path`, for metadata without a model."""
    meta = read_metadata(path, key)
    if not isinstance(meta.get("model"), dict):
        raise ConfigError(f"{key} {path}: metadata without a model config, expected a cpt_jax checkpoint")
    c = ModelConfig.from_config(meta["model"])
    return meta, dataclasses.replace(c, dtype=dtype) if dtype else c


def metadata_chain(meta: dict[str, Any], limit: int = 8) -> Iterator[dict[str, Any]]:
    """A checkpoint's metadata, then that of the checkpoint it was initialised from, and so on (a
    continued run keeps what its imported ancestor knew: architecture, tokenizer, source dtype)."""
    for _ in range(limit):
        yield meta
        parent = meta.get("init_from")
        if not parent:
            return
        try:
            meta = read_metadata(parent)
        except ConfigError:
            return


def widest_dtype(dtypes: str) -> str:
    """Of the dtypes weights came in ('bfloat16', or several joined by '+'), the one that holds all
    of them exactly: bfloat16 and float16 together need float32."""
    names = set(dtypes.split("+"))
    return names.pop() if len(names) == 1 and names <= {"bfloat16", "float16", "float32"} else "float32"


def source_dtype(meta: dict[str, Any] | None) -> str:
    """The dtype of the weights a model came from: what an import recorded (`source_dtype`, or its
    source's dtypes, the widest when several), carried along the init_from chain; float32 for a
    model that cpt_jax pretrained itself."""
    for m in metadata_chain(meta) if meta else ():
        if isinstance(m.get("source_dtype"), str):
            return m["source_dtype"]
        source = m.get("source")
        if isinstance(source, dict) and isinstance(source.get("dtype"), str):
            return widest_dtype(source["dtype"])
    return "float32"


def has_optimizer_state(path: str, key: str = "init_from") -> bool:
    """Whether a checkpoint carries optimizer state (an imported model does not)."""
    root, step = resolve(path, key)
    step_dir = os.path.join(root, str(step))
    if os.path.isdir(os.path.join(step_dir, _STATE)):
        return bool(read_metadata(step_dir, key).get("has_opt_state", True))
    return os.path.isdir(os.path.join(step_dir, "opt_state"))


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
    """The requested items (params=..., opt_state=...) of one step, into their abstract targets."""
    mngr = ocp.CheckpointManager(root)
    try:
        if os.path.isdir(os.path.join(root, str(step), _STATE)):
            restore_args = ocp.checkpoint_utils.construct_restore_args(items)
            args = ocp.args.PyTreeRestore(items, restore_args=restore_args, partial_restore=True)
            return dict(mngr.restore(step, args=ocp.args.Composite(**{_STATE: args}))[_STATE])
        args = {k: ocp.args.StandardRestore(v) for k, v in items.items()}  # format 1
        return dict(mngr.restore(step, args=ocp.args.Composite(**args)))
    finally:
        mngr.close()


def restore_from(path: str, **abstract: Any) -> dict[str, Any]:
    """Items (params=..., opt_state=...) of another checkpoint into the given abstract targets."""
    return _restore(*resolve(path), **abstract)


def restore_latest_good(root: str, abstract_state: dict[str, Any], warn) -> tuple[int, dict[str, Any]] | None:
    """(step, state) of the newest step under `root` that restores, or None when there is none.
    A step that fails to restore (a truncated or missing array file) is moved aside to
    `<step>.damaged` with a warning, so that `max_to_keep` never deletes the last good step."""
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


def read_data_state(root: str, step: int) -> tuple[str, dict[str, Any] | None]:
    """(where, the data iterator state this process saved with `step`); None when there is none
    for this number of processes (an older checkpoint, or another topology: the step alone gives
    the position). Read directly, not through a checkpoint manager, whose creation is a barrier of
    all processes."""
    where = os.path.join(root, str(step), _DATA, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    if not os.path.isfile(where):
        return where, None
    expected = "expected the data iterator's state as a JSON object"
    try:
        with open(where, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise ConfigError(f"{where}: unreadable ({first_line(e)}), {expected}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{where}: a JSON {type(state).__name__}, {expected}")
    return where, state


def set_aside_incomplete(root: str, warn) -> None:
    """Move step directories whose save never finished to `<step>.incomplete` (orbax would
    otherwise refuse to save that step again); nothing is deleted."""
    for name in sorted(name for name, committed in _step_names(root).items() if not committed):
        target = os.path.join(root, f"{name}.incomplete")
        os.replace(os.path.join(root, name), target)
        warn(f"warning: ignoring {os.path.join(root, name)}: its save never finished (no {_COMMIT_MARKER}); "
             f"moved to {target}")


def estimated_bytes(abstract_state: Any) -> int:
    """Bytes of the arrays a checkpoint of this state holds (what a save needs on disk)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract_state))


def _array_registry(replica_parallel: bool):
    """Orbax's type handlers, with replica-parallel writing of replicated arrays on or off.
    It splits each replicated array between the processes holding a copy, spreading the write over
    hosts; on one process it only adds a device slice per shard and array to each save (on 8
    devices that was most of a small model's save time)."""
    th = ocp.type_handlers
    return th.create_type_handler_registry(*[
        (ty, th.ArrayHandler(use_replica_parallel=False) if ty is jax.Array and not replica_parallel
         else th.get_type_handler(ty))
        for ty in th.supported_types()
    ])


def _manager(root: str, *, max_to_keep: int | None, async_save: bool, written=None) -> ocp.CheckpointManager:
    """Orbax's manager of the checkpoints/ directory `root`. With `async_save`, the background part
    of each save calls `written()` once the files are written, just before the commit marker."""
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_array_registry(jax.process_count() > 1))
    return ocp.CheckpointManager(
        root,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            async_options=ocp.AsyncOptions(post_finalization_callback=written) if async_save else None,
            enable_background_delete=True,  # removing old steps is not the save's business
            cleanup_tmp_directories=True,  # what a killed save left half-written is never a checkpoint
            create=True,
        ),
        item_handlers={_STATE: handler, _DATA: grain.checkpoint.CheckpointHandler()},
    )


def _save(mngr: ocp.CheckpointManager, step: int, items: dict[str, Any], metadata: dict[str, Any],
          data_state: dict[str, Any] | None = None) -> None:
    """Start orbax's save of `items`, this process's data iterator state and our metadata."""
    meta = plain(dict(metadata, format_version=FORMAT_VERSION, step=int(step), has_opt_state="opt_state" in items))
    # grain's handler writes what `get_state()` of its item gives, JSON bytes, as for grain's own
    # iterators (a resume reads the file back with read_data_state)
    iterator = types.SimpleNamespace(get_state=lambda: json.dumps(data_state, indent=1).encode())
    data = {} if data_state is None else {_DATA: grain.checkpoint.CheckpointSave(iterator)}
    args = ocp.args.Composite(**{_STATE: ocp.args.PyTreeSave(items)}, **data)
    mngr.save(int(step), args=args, custom_metadata=meta, force=True)


def write(root: str, step: int, items: dict[str, Any], metadata: dict[str, Any]) -> None:
    """Save `items` ({"params": ...} and, for a run, "opt_state") and `metadata` as step `step` of
    the checkpoints/ directory `root`, synchronously (an import writes its model this way)."""
    mngr = _manager(root, max_to_keep=None, async_save=False)
    try:
        _save(mngr, step, items, metadata)
    finally:
        mngr.close()


class CheckpointError(RuntimeError):
    """A checkpoint was not written (a full disk, a lost mount, ...); the steps committed before it
    are intact."""


class NonFiniteParameters(CheckpointError):
    """The parameters to save hold a NaN or an infinity: that checkpoint is refused, never written."""


class _HeldOrbaxErrors(logging.Filter):
    """Holds back what orbax prints when a save fails (its ERROR records with tracebacks, and
    asyncio's 'Task exception was never retrieved' for the other writes of orbax's that failed
    alike): the loop reports the failure once, as one line. Held records that no raised error
    accounts for are printed at close, so nothing is lost."""

    _LOGGERS = ("absl", "asyncio")

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.accounted = False
        for name in self._LOGGERS:
            logging.getLogger(name).addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in f"{record.pathname} {record.getMessage()}":
            self.records.append(record)
            return False
        return True

    def release(self) -> None:
        if self.accounted:
            gc.collect()  # asyncio reports a failed task when it is collected: while it is held, not at exit
        for name in self._LOGGERS:
            logging.getLogger(name).removeFilter(self)
        if not self.accounted:
            for record in self.records:
                logging.getLogger(record.name).handle(record)


_all_finite = jax.jit(lambda tree: jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)])))


class Checkpointer:
    """Saves this run's checkpoints with orbax's asynchronous save (atomically, keeping the last
    `max_to_keep`), on one process or several.

    `save` waits for the previous save to commit, checks that the parameters are finite and has
    orbax start the save, which copies every array to host memory before it returns (orbax's array
    handler waits for all device-to-host transfers when no byte limit is set, as here) and writes
    the copy in the background. So the next train step may donate the state's buffers, and the
    write of step N overlaps the steps after it; the loop pays for the wait, the check and the copy.
    With `async_save=False` every save is written before `save` returns.
    """

    def __init__(self, workdir: str, every_steps: int, max_to_keep: int, async_save: bool = True):
        self.root = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.every_steps = every_steps
        self.saves = 0
        # Where a save's time goes. wait: save() waiting for the previous save to commit (the stall
        # asynchronous saving cannot hide); start: the rest of save() (the finiteness check and the
        # host copy, which on a CPU includes the step's own result); write: orbax's save until its
        # files are written (in the background when asynchronous; process 0's figure).
        self.wait_secs = self.start_secs = self.write_secs = 0.0
        self._last_step = 0  # the latest step a save was started for
        self._started_at = 0.0  # when orbax began the latest save
        self._async = async_save
        self._mngr = _manager(self.root, max_to_keep=max_to_keep, async_save=async_save, written=self._files_written)
        self._orbax_errors = _HeldOrbaxErrors()

    def should_save(self, step: int, last_step: int) -> bool:
        return step == last_step or (self.every_steps > 0 and step % self.every_steps == 0)

    def _files_written(self) -> None:  # on orbax's thread when asynchronous, before the commit marker
        self.write_secs += time.perf_counter() - self._started_at

    def save(self, step: int, state: dict[str, Any], metadata: dict[str, Any],
             data_state: dict[str, Any] | None = None) -> None:
        """Start saving `state` (params, opt_state) and this process's JSON-able `data_state` at
        `step`; returns once the arrays are copied to host memory. Raises NonFiniteParameters for
        parameters holding a NaN or an infinity (nothing is written), and CheckpointError for a
        failed write, this one's or the previous one's."""
        items = {"params": state["params"], "opt_state": state["opt_state"]}
        t0 = time.perf_counter()
        self.wait()
        t1 = time.perf_counter()
        self.wait_secs += t1 - t0
        self._last_step = int(step)
        if not bool(_all_finite(items["params"])):
            raise NonFiniteParameters(f"parameters at step {step} are not finite; no checkpoint written")
        self._started_at = time.perf_counter()
        try:
            _save(self._mngr, step, items, metadata, data_state)
        except Exception as e:  # raised to the loop as one clear error, which stops the run
            raise self._failure(e) from e
        self.start_secs += time.perf_counter() - t1
        self.saves += 1
        if not self._async:  # written already (orbax calls `written` back only when asynchronous)
            self._files_written()

    def _failure(self, e: BaseException) -> CheckpointError:
        self._orbax_errors.accounted = True
        text = f"{type(e).__name__}: {e}"
        # tensorstore wraps the OS error in a long message; the OS's own words are what a user acts on
        for os_error in ("No space left on device", "Read-only file system", "Permission denied",
                         "Disk quota exceeded", "Input/output error"):
            if os_error in text:
                text = os_error
                break
        return CheckpointError(f"checkpoint step {self._last_step} was not written ({text.splitlines()[0][:300]})")

    def check(self) -> None:
        """Raise now, without waiting, if the last save's background write has failed: a run whose
        checkpoints cannot be written stops at once rather than at its next save."""
        # Not orbax's check_for_errors(): it misses a failure that orbax's finalize thread has
        # already taken over, which wait_until_finished() raises (at once when nothing is in progress).
        if not self._mngr.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Block until every started save is committed; raises what a write raised."""
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            raise self._failure(e) from e

    def close(self) -> None:
        """Finish pending writes and release the manager. A write's failure is raised once (orbax
        raises a background failure once): by save(), check() or wait(), or else here."""
        try:
            self.wait()
        finally:
            self._mngr.close()
            self._orbax_errors.release()

"""The checkpointer: asynchronous saves that survive the donation of the state they were taken
from, refusal of non-finite parameters, write failures as one line, older checkpoint formats."""

import json
import os
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from train_helpers import SMALL_MODEL

from cpt_jax import checkpoint, train


def _mesh_state(scale=1.0):
    """A small sharded state like a run's: arrays split over 8 devices and replicated scalars."""
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = {"w": jax.device_put(scale * jnp.arange(64 * 4, dtype=jnp.float32).reshape(64, 4), split),
              "b": jax.device_put(scale * jnp.ones(3, jnp.float32), rep)}
    opt_state = {"mu": jax.tree.map(jnp.zeros_like, params), "count": jax.device_put(jnp.int32(7), rep)}
    return {"params": params, "opt_state": opt_state}


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


_bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)


def test_async_save_writes_the_state_of_its_step_although_the_buffers_are_donated_next(tmp_path):
    state = _mesh_state()
    want = jax.tree.map(np.asarray, state)
    ckpt = checkpoint.Checkpointer(str(tmp_path), every_steps=1, max_to_keep=3)
    try:
        ckpt.save(1, state, {"note": "first"})
        state = _bump(state)  # the next "step" reuses the very buffers the save was taken from
        state = _bump(state)
        ckpt.wait()
    finally:
        ckpt.close()
    got = checkpoint.restore_from(ckpt.root, params=_abstract(state["params"]),
                                  opt_state=_abstract(state["opt_state"]))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    meta = checkpoint.read_metadata(ckpt.root)
    assert meta["step"] == 1 and meta["note"] == "first" and meta["format_version"] == checkpoint.FORMAT_VERSION
    assert checkpoint.has_optimizer_state(ckpt.root)


def test_data_iterator_state_reads_back_and_a_damaged_one_is_one_line(tmp_path):
    """The iterator state a save writes (through grain's orbax handler) reads back as saved; a
    missing file means none was saved for this topology; an unreadable or non-object one is a
    ConfigError naming the file."""
    from cpt_jax.config import ConfigError

    saved = {"step": 1, "start_step": 0, "grain": {"next_index": 1}}
    ckpt = checkpoint.Checkpointer(str(tmp_path), every_steps=1, max_to_keep=3)
    try:
        ckpt.save(1, _mesh_state(), {}, saved)
        ckpt.wait()
    finally:
        ckpt.close()
    where, state = checkpoint.read_data_state(ckpt.root, 1)
    assert where == os.path.join(ckpt.root, "1", "data", "process_0-of-1.json") and state == saved
    os.rename(where, where + ".moved")
    assert checkpoint.read_data_state(ckpt.root, 1) == (where, None)
    for text, found in (('{"step": 1', r"unreadable \(Expecting"), ("[1, 2]", "a JSON list"),
                        ("null", "a JSON NoneType"), ("", r"unreadable \(Expecting value"),
                        (b"\xff\xfe", r"unreadable \('utf-8' codec")):
        with open(where, "wb") as f:
            f.write(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ConfigError) as e:
            checkpoint.read_data_state(ckpt.root, 1)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{where}: ") and msg.endswith(
            "expected the data iterator's state as a JSON object"), msg
        assert re.search(found, msg), msg


@pytest.mark.parametrize("async_save", [True, False])
def test_non_finite_parameters_are_never_written(tmp_path, async_save):
    ckpt = checkpoint.Checkpointer(str(tmp_path), every_steps=1, max_to_keep=3, async_save=async_save)
    try:
        ckpt.save(1, _mesh_state(), {})
        ckpt.wait()
        with pytest.raises(checkpoint.NonFiniteParameters, match="parameters at step 2 are not finite"):
            ckpt.save(2, _mesh_state(scale=np.nan), {})
            ckpt.wait()
    finally:
        ckpt.close()
    assert checkpoint.complete_steps(ckpt.root) == [1]
    assert not [d for d in os.listdir(ckpt.root) if d.startswith("2")]


def test_format_1_checkpoints_still_load(tmp_path):
    """Checkpoints written before the single `state` item: items params, opt_state, metadata."""
    state = _mesh_state()
    root = str(tmp_path / "checkpoints")
    mngr = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
    mngr.save(5, args=ocp.args.Composite(params=ocp.args.StandardSave(state["params"]),
                                         opt_state=ocp.args.StandardSave(state["opt_state"]),
                                         metadata=ocp.args.JsonSave({"step": 5, "format_version": 1, "lr_min": 1e-5})))
    mngr.close()
    assert checkpoint.read_metadata(root)["lr_min"] == 1e-5
    assert checkpoint.is_step_dir(os.path.join(root, "5")) and checkpoint.has_optimizer_state(root)
    got = checkpoint.restore_from(root, params=_abstract(state["params"]))["params"]
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(state["params"]["w"]))


def _can_mount(path, size):
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                          capture_output=True).returncode == 0


def test_disk_filling_up_mid_run_stops_with_one_line(tmp_path, capsys, monkeypatch):
    mnt = str(tmp_path / "mnt")
    # Room for the run's files and three checkpoints of this model (about 1.2 MB each), not more.
    mounted = _can_mount(mnt, "4500k")
    if not mounted:  # not allowed to mount here: a writer that fails as a full disk does
        real = checkpoint._manager

        def failing_manager(*args, **kwargs):
            mngr = real(*args, **kwargs)
            save = mngr.save

            def save_until_full(step, *a, **k):
                if step > 3:
                    raise ValueError('RESOURCE_EXHAUSTED: Error writing "x" in OCDBT database: Failed to write '
                                     '1024 bytes to file 15: No space left on device [os_error_code=\'28\']')
                return save(step, *a, **k)

            mngr.save = save_until_full
            return mngr

        monkeypatch.setattr(checkpoint, "_manager", failing_manager)
    try:
        workdir = os.path.join(mnt, "run")
        status = train.main(["train", *SMALL_MODEL, f"--workdir={workdir}", "--config.train.steps=12",
                             "--config.schedule.warmup_steps=1", "--config.checkpoint.every_steps=1",
                             "--config.checkpoint.max_to_keep=100"])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 1
        # The run's progress lines, then one error line: no traceback, no orbax log records.
        assert [line for line in err if not line.startswith(("compiled the train step", "step "))] == err[-1:], err
        assert err[-1].startswith("error: checkpoint step "), err
        assert "No space left on device" in err[-1] and "the last committed checkpoint is step" in err[-1]
        last = int(err[-1].split("the last committed checkpoint is step ")[1].split()[0])
        assert checkpoint.complete_steps(os.path.join(workdir, "checkpoints"))[-1] == last
        meta = checkpoint.read_metadata(os.path.join(workdir, "checkpoints"))
        assert meta["step"] == last
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            assert max(r["step"] for r in map(json.loads, f) if r["kind"] == "train") < 12
    finally:
        if mounted:
            subprocess.run(["umount", mnt], check=True)

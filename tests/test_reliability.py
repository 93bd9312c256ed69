"""Crashes, preemption, damaged checkpoints, elastic resume and non-finite steps."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from train_helpers import SMALL_MODEL

from cpt_jax import checkpoint, model, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 16
SMALL = [
    *SMALL_MODEL,
    "--config.schedule.warmup_steps=2",
    "--config.schedule.peak_lr=1e-2",
    "--config.schedule.min_lr=1e-3",
    "--config.train.log_every_steps=1",
    f"--config.train.steps={STEPS}",
    "--config.checkpoint.every_steps=2",
]


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        recs = [r for r in map(json.loads, f) if r["kind"] == "train"]
    return {r["step"]: r["loss"] for r in recs}, [r["step"] for r in recs]


def final_params(workdir):
    meta = checkpoint.read_metadata(os.path.join(workdir, "checkpoints"))
    c = model.ModelConfig.from_config(meta["model"])
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), model.abstract_params(c))
    return meta["step"], checkpoint.restore_from(os.path.join(workdir, "checkpoints"), params=abstract)["params"]


def assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    assert train.main(["train", *SMALL, f"--workdir={workdir}"]) == 0
    return workdir


@pytest.fixture(scope="module")
def env():
    """The runs' environment: 8 CPU devices and the compilation cache this process shares (conftest.py),
    so a run started here compiles nothing the tests compiled before."""
    e = dict(os.environ)
    e.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    assert e.get("JAX_COMPILATION_CACHE_DIR"), "conftest.py sets the shared compilation cache"
    return e


def start(workdir, env, *extra):
    cmd = [sys.executable, "-m", "cpt_jax.train", *SMALL, f"--workdir={workdir}", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(workdir, step, proc, timeout=240):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()[1][-2000:]}")
        if os.path.exists(path) and step in losses(workdir)[0]:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def test_sigkill_then_restart_matches_the_uninterrupted_run(reference, env, tmp_path):
    """Killed after step 3, restarted, killed again at step 8 or later (past what the first run
    logged), restarted: the run ends as the uninterrupted one did."""
    workdir = str(tmp_path / "run")
    proc = start(workdir, env)
    wait_for_step(workdir, 3, proc)
    proc.send_signal(signal.SIGKILL)  # saves are every 2 steps: this often lands mid-save
    proc.wait()
    second_kill = min(max(8, max(losses(workdir)[1]) + 2), STEPS - 3)  # a step the restarted run trains
    proc = start(workdir, env)
    wait_for_step(workdir, second_kill, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run([sys.executable, "-m", "cpt_jax.train", *SMALL, f"--workdir={workdir}"], cwd=REPO,
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    got, order = losses(workdir)
    want, _ = losses(reference)
    assert order == list(range(STEPS)), "each step has exactly one record"
    assert got == want  # bit for bit
    step_a, params_a = final_params(workdir)
    step_b, params_b = final_params(reference)
    assert step_a == step_b == STEPS
    assert_same_params(params_a, params_b)


def test_sigterm_saves_and_exits_then_resumes(reference, env, tmp_path):
    workdir = str(tmp_path / "run")
    proc = start(workdir, env, "--config.checkpoint.every_steps=100")
    wait_for_step(workdir, 4, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "preempted (SIGTERM)" in err and "run the same command to resume" in err
    saved = checkpoint.complete_steps(os.path.join(workdir, "checkpoints"))
    assert len(saved) == 1 and 5 <= saved[0] < STEPS
    done = subprocess.run([sys.executable, "-m", "cpt_jax.train", *SMALL, f"--workdir={workdir}",
                           "--config.checkpoint.every_steps=100"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(workdir)[0] == losses(reference)[0]


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    assert train.main(["train", *SMALL, f"--workdir={workdir}", "--config.train.stop_at=10"]) == 0
    # Truncate every array file of step 10: it still looks complete (commit marker present).
    for f in glob.glob(os.path.join(workdir, "checkpoints", "10", "state", "**", "d", "*"), recursive=True):
        with open(f, "r+b") as fh:
            fh.truncate(3)
    capsys.readouterr()
    assert train.main(["train", *SMALL, f"--workdir={workdir}"]) == 0
    err = capsys.readouterr().err
    assert "checkpoint step 10 failed to restore" in err and "resumed from" in err and "/8" in err
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "10.damaged"))
    assert losses(workdir)[0] == losses(reference)[0]


def test_incomplete_step_is_ignored_with_a_warning(reference, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    assert train.main(["train", *SMALL, f"--workdir={workdir}", "--config.train.stop_at=6"]) == 0
    os.remove(os.path.join(workdir, "checkpoints", "6", "commit_success.txt"))
    capsys.readouterr()
    assert train.main(["train", *SMALL, f"--workdir={workdir}"]) == 0
    err = capsys.readouterr().err
    assert "its save never finished" in err and "resumed from" in err
    assert losses(workdir)[0] == losses(reference)[0]


def test_elastic_resume_on_4_devices_with_another_mesh(reference, env, tmp_path):
    workdir = str(tmp_path / "run")
    assert train.main(["train", *SMALL, f"--workdir={workdir}", "--config.train.stop_at=8",
                       "--config.mesh.fsdp=8"]) == 0
    env4 = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    done = subprocess.run([sys.executable, "-m", "cpt_jax.train", *SMALL, f"--workdir={workdir}",
                           "--config.mesh.data=2", "--config.mesh.fsdp=2"], cwd=REPO, env=env4,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    got, order = losses(workdir)
    want, _ = losses(reference)
    assert order == list(range(STEPS))
    np.testing.assert_allclose([got[s] for s in range(STEPS)], [want[s] for s in range(STEPS)], rtol=1e-4)


def test_nonfinite_step_is_skipped_and_counted(reference, tmp_path):
    workdir = str(tmp_path / "run")
    assert train.main(["train", *SMALL, f"--workdir={workdir}", "--config.train.inject_nan_steps=(3,)"]) == 0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        recs = {r["step"]: r for r in map(json.loads, f) if r["kind"] == "train"}
    assert recs[3].get("nonfinite") is True and recs[3]["nonfinite_consecutive"] == 1
    assert "nonfinite" not in recs[4]
    assert all(np.isfinite(r["loss"]) for s, r in recs.items() if s != 3)


def test_too_many_nonfinite_steps_stop_the_run(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    status = train.main(["train", *SMALL, f"--workdir={workdir}", "--config.train.inject_nan_steps=(5, 6, 7)",
                         "--config.train.max_nonfinite_steps=3"])
    assert status == 1
    err = capsys.readouterr().err
    assert "3 consecutive steps had a non-finite loss or gradient" in err
    steps = checkpoint.complete_steps(os.path.join(workdir, "checkpoints"))
    assert steps == [4, 6, 8]  # saves every 2 steps, 3 kept; the run stopped after step 7, its third NaN
    _, params = final_params(workdir)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))

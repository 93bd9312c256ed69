"""Multi-process runs on one machine: 2 processes x 4 CPU devices against 1 process x 8 devices.

The processes are real (`launch/local.sh` or subprocesses with CPT_* settings) and meet over
loopback through `jax.distributed` with gloo collectives. The test process itself stays a single
process with the 8 devices conftest.py gives it: the 1 x 8 side runs in it.
"""

import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from train_helpers import SMALL_MODEL

from cpt_jax import checkpoint, distributed, resolve, train
from cpt_jax.config import ConfigError
from cpt_jax.data.tokenization import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(REPO, "launch", "local.sh")
STEPS, HALF = 8, 4
SMALL = [
    *SMALL_MODEL,
    "--config.schedule.warmup_steps=2",
    "--config.schedule.peak_lr=1e-2",
    "--config.schedule.min_lr=1e-3",
    "--config.train.log_every_steps=1",
    f"--config.train.steps={STEPS}",
    f"--config.checkpoint.every_steps={HALF}",
]


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        recs = [r for r in map(json.loads, f) if r["kind"] == "train"]
    return {r["step"]: r["loss"] for r in recs}, [r["step"] for r in recs]


@pytest.fixture(scope="module")
def env():
    """The test environment for the processes: the shared compilation cache (conftest.py), CPU,
    no inherited device count (the launcher sets it) and no inherited CPT_* settings."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("CPT_") and k != "XLA_FLAGS"}
    e.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    assert e.get("JAX_COMPILATION_CACHE_DIR"), "conftest.py sets the shared compilation cache"
    return e


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run in this process: 1 process x 8 devices."""
    assert jax.process_count() == 1 and jax.device_count() == 8
    workdir = str(tmp_path_factory.mktemp("reference"))
    assert train.main(["train", *SMALL, f"--workdir={workdir}"]) == 0
    return losses(workdir)[0]


def local(n, args, env, timeout=300, command=None):
    """`launch/local.sh n -- python -m cpt_jax.train args` (4 devices per process)."""
    cmd = command or [sys.executable, "-m", "cpt_jax.train", *args]
    return subprocess.run(["bash", LOCAL, str(n), "--", *cmd], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def error_lines(stderr):
    return [line for line in stderr.splitlines() if "error:" in line]


# ----------------------------------------------------------------------------- same run, other topology


def test_two_processes_train_like_one_and_checkpoints_move_both_ways(reference, env, tmp_path):
    """One process x 8 devices trains to step 2; two processes x 4 devices continue from its checkpoint
    to step 6 (saving at 4 and 6); one process continues theirs to the end. Every step's loss is the
    uninterrupted run's. (One two-process launch checks both directions.)"""
    first, middle = 2, 6
    workdir = str(tmp_path / "run")
    ckpts = os.path.join(workdir, "checkpoints")
    assert train.main(["train", *SMALL, f"--workdir={workdir}", f"--config.train.stop_at={first}"]) == 0
    t0 = time.perf_counter()
    done = local(2, [*SMALL, f"--workdir={workdir}", f"--config.train.stop_at={middle}"], env)
    took = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr[-3000:]
    # The checkpoint of one process continues on two. Only process 0 logs; every line says which
    # process wrote it.
    assert "[p0] resumed from" in done.stderr
    assert f"[p0] step {first}: loss" in done.stderr and "[p1] step" not in done.stderr
    assert "[p0] compiled the train step" in done.stderr and "[p1] compiled" not in done.stderr
    got, order = losses(workdir)
    assert order == list(range(middle))
    np.testing.assert_allclose([got[s] for s in range(middle)], [reference[s] for s in range(middle)], rtol=1e-4)
    assert checkpoint.complete_steps(ckpts)[-2:] == [HALF, middle]
    # orbax's asynchronous save of two processes carries each one's grain iterator state.
    for step in (HALF, middle):
        for i in range(2):
            state = json.load(open(os.path.join(ckpts, str(step), "data", f"process_{i}-of-2.json")))
            assert state["step"] == step, (step, i, state)
    print(f"2 x 4 processes: {middle - first} steps in {took:.1f}s; max relative loss difference to 1 x 8: "
          f"{max(abs(got[s] / reference[s] - 1) for s in range(first, middle)):.2e}")

    # The checkpoint written by two processes continues in one process with 8 devices.
    assert train.main(["train", *SMALL, f"--workdir={workdir}"]) == 0
    got, order = losses(workdir)
    assert order == list(range(STEPS)), "one record per step"
    np.testing.assert_allclose([got[s] for s in range(STEPS)], [reference[s] for s in range(STEPS)], rtol=1e-4)
    assert checkpoint.complete_steps(ckpts)[-1] == STEPS


# Each process builds its rows of steps 0 and 5 (random access) and of steps K.. (grain's iterator,
# resumed at step K, with the loader settings of the command line), makes global arrays of them, and
# process 0 saves the gathered global batches (and each process's rows) for the test to compare
# with one process's.
K, END = 3, 6
GATHER_BATCHES = f"""
import sys
import jax
import numpy as np
from jax.experimental import multihost_utils
from cpt_jax import distributed, resolve, train

def main():
    argv, out = sys.argv[1:-1], sys.argv[-1]
    launch = {{}}
    cfg, workdir = train.parse_args(["train", *argv], launch)
    distributed.initialize(launch["distributed"])
    run = resolve.for_training(cfg, workdir)
    rows = np.asarray([run.pipeline.rows.start, run.pipeline.rows.stop])
    saved = {{"rows": multihost_utils.process_allgather(rows)}}
    for step in (0, 5):
        for key, value in run.pipeline.global_batch(step).items():
            saved[f"{{step}}/{{key}}"] = multihost_utils.process_allgather(value, tiled=True)
    with run.pipeline.iterate({K}, {END}) as batches:
        for step, batch in batches:
            for key, value in batch.items():
                saved[f"{{step}}/{{key}}"] = multihost_utils.process_allgather(value, tiled=True)
        saved["state_step"] = multihost_utils.process_allgather(np.asarray(batches.get_state()["step"]))
    if jax.process_index() == 0:
        np.savez(out, **saved)

if __name__ == "__main__":  # grain's worker processes re-import this file
    main()
"""

MIXTURE = """
from cpt_jax.presets import preset_config

def get_config():
    c = preset_config("tiny")
    c.model.update(n_layers=2, d_model=64, d_ff=128, vocab_size=1000)
    c.train.update(steps=8, batch_size=8, seq_len=32)
    c.schedule.start_lr = 1e-3
    c.tensorboard = False
    c.data.kind = "mixture"
    c.data.tokenizer = {tokenizer!r}
    c.data.sources.web = {web!r}
    c.data.sources.qa = {qa!r}
    c.data.phases = (dict(weights=dict(web=3, qa=1)), dict(weights=dict(web=1, qa=1), start_at=dict(step=4)))
    return c
"""


def test_each_process_reads_its_rows_of_the_same_global_batches(env, tmp_path):
    """2 processes x 4 devices against 1 x 8, on prepared data across a phase switch: the same global
    batches at random access and from grain's iterator resumed at step K, there with 2 worker
    processes and 4 threads per process (here: no workers, the default threads)."""
    from data_helpers import make_hf_tokenizer, write_synthetic_source

    tok = make_hf_tokenizer(tmp_path / "tok", vocab_size=300)
    fingerprint = load_tokenizer(tok).fingerprint
    eos = load_tokenizer(tok).eos_id
    sources = {name: write_synthetic_source(tmp_path, name, n, 32, eos_id=eos, fingerprint=fingerprint)
               for name, n in (("web", 40), ("qa", 9))}
    config_file = tmp_path / "mix.py"
    config_file.write_text(MIXTURE.format(tokenizer=tok, **sources))
    script = tmp_path / "gather.py"
    script.write_text(GATHER_BATCHES)
    out = str(tmp_path / "batches.npz")
    args = [f"--config={config_file}", f"--workdir={tmp_path / 'never'}"]
    loader = ["--config.data.workers=2", "--config.data.num_threads=4"]
    done = local(2, args, env, command=[sys.executable, str(script), *args, *loader, out])
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.load(out)
    # 8 rows over 2 processes: process 0 reads rows 0..3 of every batch, process 1 rows 4..7.
    np.testing.assert_array_equal(got["rows"], [[0, 4], [4, 8]])
    np.testing.assert_array_equal(got["state_step"], [END, END])
    cfg, workdir = train.parse_args(["train", *args])
    run = resolve.for_training(cfg, workdir)
    assert run.pipeline.mixture.phase_at(3) == 0 and run.pipeline.mixture.phase_at(4) == 1
    for step in (0, 5, *range(K, END)):
        for key, value in run.pipeline.global_batch(step).items():
            np.testing.assert_array_equal(got[f"{step}/{key}"], np.asarray(value), err_msg=f"step {step} {key}")
    assert not os.path.exists(tmp_path / "never")


# ----------------------------------------------------------------------------- settings


def test_settings_come_from_flags_then_environment_then_a_single_process(monkeypatch):
    for var in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(distributed, "detect_cluster", lambda: None)
    assert not distributed.resolve().multi_process
    env = {"CPT_COORDINATOR_ADDRESS": "10.0.0.2:8476", "CPT_NUM_PROCESSES": "4", "CPT_PROCESS_ID": "3"}
    s = distributed.resolve(environ=env, timeout_secs=7)
    assert (s.source, s.coordinator_address, s.num_processes, s.process_id, s.timeout_secs) == (
        "explicit", "10.0.0.2:8476", 4, 3, 7)
    s = distributed.resolve(coordinator_address="host:1234", process_id=1, environ=env)
    assert (s.coordinator_address, s.num_processes, s.process_id) == ("host:1234", 4, 1)
    # One process asked for explicitly: no coordinator, no cluster detection.
    monkeypatch.setattr(distributed, "detect_cluster", lambda: pytest.fail("must not detect"))
    assert not distributed.resolve(num_processes=1).multi_process


def test_cluster_detection_reads_the_environment_only(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                "OMPI_MCA_orte_hnp_uri", "PMIX_SERVER_URI2", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.detect_cluster() is None
    slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[3-4]", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task step is a single process
    assert distributed.detect_cluster() is None
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert distributed.detect_cluster() == "slurm"
    s = distributed.resolve(environ={})
    assert s.source == "cluster:slurm" and s.multi_process and s.coordinator_address is None
    assert not jax.distributed.is_initialized()


def test_first_difference_names_the_key():
    a = {"train": {"steps": 10, "seq_len": 32}, "mesh": {"rules": []}, "--workdir": "/a"}
    assert distributed.first_difference(a, json.loads(json.dumps(a))) is None
    b = json.loads(json.dumps(a))
    b["train"]["steps"] = 12
    assert distributed.first_difference(a, b) == ("train.steps", "10", "12")
    b["--workdir"] = "/b"
    assert distributed.first_difference(a, b)[0] == "--workdir"
    c = {"train": {"steps": 10}, "mesh": {"rules": []}, "--workdir": "/a"}
    assert distributed.first_difference(a, c) == ("train.seq_len", "32", "absent")


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "flags, environ, expected",
    [
        (["--num_processes=2", "--process_id=2"], {}, "--process_id: 2 is out of range, expected 0..1 for 2 processes"),
        ([], {"CPT_NUM_PROCESSES": "2", "CPT_PROCESS_ID": "-1", "CPT_COORDINATOR_ADDRESS": "127.0.0.1:9"},
         "CPT_PROCESS_ID: -1 is out of range, expected 0..1"),
        (["--process_id=1"], {"CPT_NUM_PROCESSES": "2"}, "--coordinator_address: missing"),
        (["--coordinator_address=127.0.0.1:9", "--process_id=0"], {}, "--num_processes: missing"),
        (["--num_processes=2", "--process_id=1", "--coordinator_address=nohost"], {},
         "--coordinator_address: 'nohost', expected host:port"),
        ([], {"CPT_NUM_PROCESSES": "two"}, "CPT_NUM_PROCESSES: 'two', expected an integer"),
        (["--num_processes=2", "--process_id=0", "--coordinator_address=127.0.0.1:9", "--distributed_timeout=0"],
         {}, "--distributed_timeout: 0, expected a positive number of seconds"),
    ],
    ids=["id-out-of-range", "env-id-negative", "no-address", "no-count", "bad-address", "env-not-a-number",
         "zero-timeout"],
)
def test_bad_settings_are_one_line_before_connecting(flags, environ, expected, tmp_path, capsys, monkeypatch):
    for var in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(var, raising=False)
    for k, v in environ.items():
        monkeypatch.setenv(k, v)
    workdir = tmp_path / "run"
    assert train.main(["train", *SMALL, f"--workdir={workdir}", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not workdir.exists() and not jax.distributed.is_initialized()


def test_unreachable_coordinator_fails_within_the_timeout(env, tmp_path):
    port = free_port()  # closed again: nothing listens there
    timeout = 5
    run_env = dict(env, CPT_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", CPT_NUM_PROCESSES="2", CPT_PROCESS_ID="1")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cpt_jax.train", *SMALL, f"--workdir={tmp_path / 'run'}",
                           f"--distributed_timeout={timeout}"], cwd=REPO, env=run_env, capture_output=True, text=True,
                          timeout=120)
    took = time.perf_counter() - t0
    assert done.returncode == 2, done.stderr[-3000:]
    assert error_lines(done.stderr) == [done.stderr.strip()], done.stderr[-3000:]
    assert done.stderr.startswith(f"error: coordinator 127.0.0.1:{port}: process 1 of 2 could not reach it within 5s")
    assert "Traceback" not in done.stderr
    assert timeout <= took < timeout + 60, took  # the wait is bounded (+ starting Python and JAX)
    assert not (tmp_path / "run").exists()


def test_slurm_task_whose_coordinator_never_starts_fails_within_the_timeout(env, tmp_path):
    # Task 1 of a 2-task SLURM step, without task 0: JAX's SLURM detection finds the run, the wait is bounded.
    port = free_port()
    slurm = dict(env, SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2", SLURM_PROCID="1",
                 SLURM_LOCALID="0", JAX_COORDINATOR_PORT=str(port))
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cpt_jax.train", *SMALL, f"--workdir={tmp_path / 'run'}",
                           "--distributed_timeout=3"], cwd=REPO, env=slurm, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith(
        f"error: coordinator localhost:{port}: process 1 of 2 (slurm) could not reach it within 3s"), done.stderr
    assert error_lines(done.stderr) == [done.stderr.strip()] and time.perf_counter() - t0 < 60


def test_processes_with_different_configs_name_the_first_difference(env, tmp_path):
    port = free_port()
    procs = []
    for pid, steps in ((0, 10), (1, 12)):
        run_env = dict(env, CPT_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", CPT_NUM_PROCESSES="2",
                       CPT_PROCESS_ID=str(pid), XLA_FLAGS="--xla_force_host_platform_device_count=4")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "cpt_jax.train", *SMALL, f"--workdir={tmp_path / 'run'}",
             f"--config.train.steps={steps}", "--distributed_timeout=60"],
            cwd=REPO, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 2, err[-3000:]
        assert error_lines(err) == [
            "error: config differs between processes: train.steps is 10 on process 0 and 12 on process 1"
        ], err[-3000:]
        assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_batch_that_does_not_split_over_the_processes(env, tmp_path):
    # The batch is not split over devices (rule batch=), so only the processes' share is wrong.
    done = local(2, [*SMALL, f"--workdir={tmp_path / 'run'}", "--config.train.batch_size=3",
                     '--config.mesh.rules=("batch=",)'], env, timeout=180)
    assert done.returncode == 2, done.stderr[-3000:]
    expected = "error: train.batch_size: 3, expected a multiple of the 2 processes"
    assert any(line.startswith(f"[p0] {expected}") for line in done.stderr.splitlines()), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_check_same_config_is_free_for_one_process(monkeypatch):
    """One process: nothing to compare, so no collective (every cross-process call of JAX fails here)."""
    from jax.experimental import multihost_utils

    called = []
    for name, f in vars(multihost_utils).copy().items():
        if inspect.isfunction(f) and f.__module__ == multihost_utils.__name__ and not name.startswith("_"):
            monkeypatch.setattr(multihost_utils, name, lambda *a, name=name, **k: called.append(name))
    assert distributed.check_same_config({"anything": 1}) is None
    assert distributed.check_same_config({"anything": 2, "nested": {"x": [1]}}) is None
    assert called == []


def test_initialize_does_nothing_for_one_process():
    distributed.initialize(distributed.Settings())
    assert not jax.distributed.is_initialized() and jax.process_count() == 1
    with pytest.raises(ConfigError, match="out of range"):
        distributed.resolve(num_processes=3, process_id=3, coordinator_address="127.0.0.1:1")


# ----------------------------------------------------------------------------- preemption


def test_sigterm_to_one_process_saves_the_same_step_on_all_and_resumes(reference, env, tmp_path):
    """What a preempted slice sees: SIGTERM reaches one host; every process finishes the agreed
    step, they save one checkpoint together, exit with 143, and a restart continues the run."""
    workdir = str(tmp_path / "run")
    port = free_port()
    args = [*SMALL, f"--workdir={workdir}", "--config.train.steps=400", "--config.checkpoint.every_steps=1000"]
    procs = []
    for i in range(2):
        e = dict(env, CPT_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", CPT_NUM_PROCESSES="2", CPT_PROCESS_ID=str(i),
                 XLA_FLAGS="--xla_force_host_platform_device_count=4")
        procs.append(subprocess.Popen([sys.executable, "-m", "cpt_jax.train", *args], cwd=REPO, env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.time() + 240
        while not (os.path.exists(os.path.join(workdir, "metrics.jsonl")) and 3 in losses(workdir)[0]):
            assert time.time() < deadline and all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)  # the other process is never signalled
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill() if p.poll() is None else None
    assert [p.returncode for p in procs] == [143, 143], [o[1][-2000:] for o in outs]
    assert "preempted (SIGTERM)" in outs[0][1]
    saved = checkpoint.complete_steps(os.path.join(workdir, "checkpoints"))
    assert len(saved) == 1 and 4 <= saved[0] < 400, saved
    got, order = losses(workdir)
    assert order == list(range(saved[0])), "one record per finished step, none past the checkpoint"
    # The checkpoint the two processes saved together continues (here in one process).
    assert train.main(["train", *args, f"--config.train.stop_at={saved[0] + 2}"]) == 0
    assert losses(workdir)[1] == list(range(saved[0] + 2))

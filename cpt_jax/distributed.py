"""Multi-process runs through `jax.distributed`: who the processes are, and that they agree.

The settings come from, first match wins: the `--coordinator_address/--num_processes/--process_id`
flags or their CPT_* variables (a flag overrides its variable; `--num_processes=1` forces one
process even inside a cluster); a cluster JAX detects from the environment alone (TPU pod slices,
SLURM, Open MPI, Kubernetes); otherwise one process, which never tries to connect. On CPU the
collectives are gloo's, so several processes on one machine form one run (tests, launch/local.sh).
Every problem is a `ConfigError` naming the setting. One case is JAX's alone: when the coordinator
is up but some process never joins, JAX's client ends the waiting processes itself once
`--distributed_timeout` has passed. Once joined, `check_same_config` makes every process name the
first key where the configs differ; `Preemption` turns SIGTERM into a step where all save and stop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import socket
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

from cpt_jax.config import ConfigError

ENV_COORDINATOR = "CPT_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "CPT_NUM_PROCESSES"
ENV_PROCESS_ID = "CPT_PROCESS_ID"
DEFAULT_TIMEOUT_SECS = 300


@dataclasses.dataclass(frozen=True)
class Settings:
    """How this process joins the run. `source`: "single" (nothing to initialize), "explicit" (flags
    or CPT_* variables) or "cluster:<name>" (JAX's own detection: slurm, ompi, gcetpu, gketpu, k8s)."""

    source: str = "single"
    coordinator_address: str | None = None  # None: JAX takes it from the cluster
    num_processes: int | None = 1  # None: JAX takes it from the cluster
    process_id: int | None = 0
    timeout_secs: int = DEFAULT_TIMEOUT_SECS

    @property
    def multi_process(self) -> bool:
        return self.source != "single"


def define_flags(fv) -> None:
    """The launch flags of the trainer, on an absl FlagValues (see cli.parse)."""
    flags.DEFINE_string("coordinator_address", None,
                        f"host:port of process 0's coordinator (or ${ENV_COORDINATOR}).", flag_values=fv)
    flags.DEFINE_integer("num_processes", None,
                         f"Processes in the run (or ${ENV_NUM_PROCESSES}); 1 disables cluster detection.",
                         flag_values=fv)
    flags.DEFINE_integer("process_id", None, f"This process's index, 0..num_processes-1 (or ${ENV_PROCESS_ID}).",
                         flag_values=fv)
    flags.DEFINE_integer("distributed_timeout", DEFAULT_TIMEOUT_SECS,
                         "Seconds to wait for all processes to reach the coordinator.", flag_values=fv)


def _int_setting(flag_value: int | None, env: Mapping[str, str], var: str, flag: str) -> int | None:
    if flag_value is not None:
        return int(flag_value)
    raw = env.get(var, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{var}: {raw!r}, expected an integer (or pass {flag})") from None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None,
            timeout_secs: int = DEFAULT_TIMEOUT_SECS, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the flags, then the CPT_* variables, then a detected cluster, else one process;
    everything that can be checked without connecting is checked here."""
    env = os.environ if environ is None else environ
    if timeout_secs is None or int(timeout_secs) < 1:
        raise ConfigError(f"--distributed_timeout: {timeout_secs!r}, expected a positive number of seconds")
    timeout_secs = int(timeout_secs)
    address = coordinator_address or env.get(ENV_COORDINATOR, "").strip() or None
    n = _int_setting(num_processes, env, ENV_NUM_PROCESSES, "--num_processes")
    pid = _int_setting(process_id, env, ENV_PROCESS_ID, "--process_id")
    addr_where = "--coordinator_address" if coordinator_address else ENV_COORDINATOR
    n_where = "--num_processes" if num_processes is not None else ENV_NUM_PROCESSES
    pid_where = "--process_id" if process_id is not None else ENV_PROCESS_ID

    if address is None and n is None and pid is None:
        cluster = detect_cluster()
        if cluster is None:
            return Settings(timeout_secs=timeout_secs)
        return Settings(f"cluster:{cluster}", None, None, None, timeout_secs)

    if n is None:
        raise ConfigError(
            f"--num_processes: missing, expected the number of processes in the run (set ${ENV_NUM_PROCESSES} "
            f"or --num_processes) since {addr_where if address else pid_where} is set"
        )
    if n < 1:
        raise ConfigError(f"{n_where}: {n}, expected at least 1 process")
    if pid is None and n > 1:
        raise ConfigError(f"--process_id: missing, expected this process's index in 0..{n - 1} "
                          f"(set ${ENV_PROCESS_ID} or --process_id)")
    if pid is not None and not 0 <= pid < n:
        raise ConfigError(f"{pid_where}: {pid} is out of range, expected 0..{n - 1} for {n} processes")
    if n == 1:
        return Settings(timeout_secs=timeout_secs)  # one process: no coordinator needed, no cluster detection
    if address is None:
        raise ConfigError(
            f"--coordinator_address: missing, expected host:port of process 0 for a run of {n} processes "
            f"(set ${ENV_COORDINATOR} or --coordinator_address)"
        )
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{addr_where}: {address!r}, expected host:port of process 0 (e.g. 10.0.0.2:8476)")
    return Settings("explicit", address, n, pid, timeout_secs)


def settings_from_flags(fv) -> Settings:
    """`resolve` with the values of the flags `define_flags` declared."""
    return resolve(fv.coordinator_address, fv.num_processes, fv.process_id, fv.distributed_timeout)


def detect_cluster() -> str | None:
    """Name of the multi-process cluster JAX would auto-detect here, or None; connects to nothing.
    JAX's cluster environments are asked in its order, without the opt-in ones (mpi4py), as
    `jax.distributed.initialize()` does; a cluster of one process (a one-task sbatch step, a one-host
    TPU VM) counts as none."""
    try:
        from jax._src import clusters
    except ImportError:  # a JAX without the module: no auto-detection
        return None
    for env in clusters.ClusterEnv._cluster_types:
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            if not env.is_env_present():
                continue
        except Exception:  # a detector that cannot run here (no metadata server, no API access)
            continue
        try:
            if env.get_process_count() <= 1:
                return None
        except Exception:  # the count needs a service JAX will reach at initialize: let it try
            pass
        return env.name or env.__name__
    return None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


def initialize(settings: Settings) -> None:
    """Joins the run described by `settings` (nothing for one process) before any JAX computation;
    ConfigError if it cannot.

    JAX's client ends the whole process (a fatal log and a stack trace) when it cannot reach the
    coordinator, so that case is checked first, with a plain TCP connection retried until
    `settings.timeout_secs`: one clear line instead.
    """
    if not settings.multi_process:
        return
    if jax.distributed.is_initialized():
        return  # a second run in the same process (the demo, tests): the processes are already joined
    deadline = time.monotonic() + settings.timeout_secs
    if settings.source in ("cluster:slurm", "cluster:ompi"):
        settings = _from_cluster_environment(settings)  # these two need nothing but environment variables
    if settings.coordinator_address is not None:
        if settings.process_id == 0:
            _check_can_serve(settings.coordinator_address)
        else:
            _wait_for_coordinator(settings, deadline)
    if jax.config.jax_cpu_collectives_implementation != "mpi":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    remaining = max(1, int(deadline - time.monotonic()))
    try:  # what a cluster's settings leave None, JAX's detection fills in
        jax.distributed.initialize(settings.coordinator_address, settings.num_processes, settings.process_id,
                                   initialization_timeout=remaining)
    except Exception as e:  # RuntimeError / ValueError from JAX's checks or its cluster detection
        address = settings.coordinator_address or _attempted_address() or "the detected coordinator"
        raise ConfigError(
            f"coordinator {address}: {_who(settings)} could not join the run ({_one_line(e)}); check that every "
            f"process has the same address and process count"
        ) from None


def _who(settings: Settings) -> str:
    cluster = settings.source.split(":", 1)[1] if settings.source.startswith("cluster:") else None
    if settings.process_id is None:
        return f"a {cluster} cluster process"
    return f"process {settings.process_id} of {settings.num_processes}" + (f" ({cluster})" if cluster else "")


def _from_cluster_environment(settings: Settings) -> Settings:
    """The address, count and id JAX's detector finds for this cluster (from its environment variables)."""
    from jax._src import clusters

    try:
        address, n, pid, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(
            None, None, None, None, settings.source.split(":", 1)[1], settings.timeout_secs)
    except Exception:  # an environment JAX reads differently: let jax.distributed.initialize report it
        return settings
    return dataclasses.replace(settings, coordinator_address=address, num_processes=n, process_id=pid)


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _check_can_serve(address: str) -> None:
    """Process 0 serves the coordinator on the address's port and must be that host."""
    host, port = _host_port(address)
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
    except socket.gaierror:
        pass  # the name does not resolve yet (cluster DNS comes up with the pods): JAX will wait for it
    except OSError as e:
        raise ConfigError(
            f"coordinator {address}: process 0 serves the coordinator but {host} is not an address of this "
            f"machine ({e.strerror}); start process 0 on {host} or give every process this machine's address"
        ) from None
    try:
        with socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True) as s:
            pass
    except (OSError, ValueError):
        try:
            with socket.create_server(("", port)):
                pass
        except OSError as e:
            raise ConfigError(
                f"coordinator {address}: port {port} cannot be opened on this machine ({os.strerror(e.errno or 0)}); "
                f"choose a free port for every process"
            ) from None


def _wait_for_coordinator(settings: Settings, deadline: float) -> None:
    """Retries a TCP connection to the coordinator until it answers or the deadline passes."""
    host, port = _host_port(settings.coordinator_address)
    last = "no answer"
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError as e:  # refused (not started yet), unknown host (DNS not ready), timeout
            last = e.strerror or type(e).__name__
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"coordinator {settings.coordinator_address}: {_who(settings)} could not reach it within "
                f"{settings.timeout_secs}s ({last}); check that process 0 is running, that this address and port "
                f"reach it, and --distributed_timeout"
            )
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def _attempted_address() -> str | None:
    """The address JAX tried (from cluster detection); None if it never got that far."""
    try:
        from jax._src import distributed as jax_distributed

        return jax_distributed.global_state.coordinator_address
    except (ImportError, AttributeError):
        return None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'train.steps': 10, ...}: the leaves of nested dicts under dotted keys (lists are leaves)."""
    if not isinstance(tree, dict) or (not tree and prefix):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for k in sorted(tree, key=str):
        out.update(flatten(tree[k], f"{prefix}{k}."))
    return out


def first_difference(a: dict, b: dict) -> tuple[str, str, str] | None:
    """(key, value in a, value in b) of the first dotted key, in sorted order, whose values differ."""
    fa, fb = flatten(a), flatten(b)
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key, KeyError), fb.get(key, KeyError)
        if va != vb:
            show = lambda v: "absent" if v is KeyError else json.dumps(v)  # noqa: E731
            return key, show(va), show(vb)
    return None


def _digest(data: bytes) -> np.ndarray:
    """[length, 4 words of sha256] as int32: what the processes compare first."""
    words = np.frombuffer(hashlib.sha256(data).digest()[:16], dtype=np.int32)
    return np.concatenate([np.asarray([len(data)], np.int32), words])


def check_same_config(tree: dict) -> None:
    """ConfigError on every process unless all processes hold the same `tree` (the resolved config).

    The processes exchange a hash (one small all-gather); only if the hashes differ do they share
    their JSON, so the message can name the first key that differs.
    """
    if jax.process_count() == 1:
        return
    data = json.dumps(tree, sort_keys=True).encode()
    digests = np.asarray(multihost_utils.process_allgather(_digest(data)))
    differing = [p for p in range(len(digests)) if not np.array_equal(digests[p], digests[0])]
    if not differing:
        return
    other = differing[0]
    padded = np.zeros(int(digests[:, 0].max()), np.uint8)
    padded[: len(data)] = np.frombuffer(data, np.uint8)
    texts = np.asarray(multihost_utils.process_allgather(padded))
    configs = [json.loads(bytes(texts[p][: int(digests[p, 0])]).decode()) for p in (0, other)]
    diff = first_difference(*configs)
    if diff is None:  # equal content, different bytes: cannot happen with sorted keys, but say so
        raise ConfigError(f"config differs between processes 0 and {other} (same keys and values, other bytes)")
    key, v0, v1 = diff
    raise ConfigError(f"config differs between processes: {key} is {v0} on process 0 and {v1} on process {other}")


class Preemption:
    """SIGTERM (what TPU and cloud preemption send) asks the loop to save and stop after a step.

    With several processes, JAX's preemption service (started by `jax.distributed.initialize`)
    takes the signal on whichever host gets it and agrees on a step for all of them through the
    coordination service, off the training path: no collective and no host sync per step.
    """

    def __init__(self):
        self.requested = False
        self._multi = jax.process_count() > 1
        self._previous = None if self._multi else signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def should_stop(self, steps_done: int) -> bool:
        """True once the run should save and stop after `steps_done` steps; every process gets
        True at the same `steps_done`."""
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(steps_done)
        return self.requested

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

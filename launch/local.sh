#!/usr/bin/env bash
# Start one multi-process JAX run on this machine: N processes that meet over loopback.
#
#   launch/local.sh [--devices_per_process K] [--port P] [--dry_run] N -- python -m cpt_jax.train --config ... --workdir ...
#
# Every process gets
#   CPT_COORDINATOR_ADDRESS=127.0.0.1:PORT   process 0 serves the coordinator there (a free port unless --port)
#   CPT_NUM_PROCESSES=N, CPT_PROCESS_ID=i    read by cpt_jax.distributed
#   XLA_FLAGS=... --xla_force_host_platform_device_count=K   K CPU devices per process (default 4; other
#                                            XLA_FLAGS are kept)
# Output lines are prefixed with [p<i>] (stderr stays on stderr). When a process fails, the others are
# stopped (SIGTERM, then SIGKILL after KILL_AFTER seconds, default 30) and the launcher exits with the
# failing process's status; Ctrl-C or SIGTERM to the launcher stops them all. DRY_RUN=1 or --dry_run
# prints the commands instead of running them.
#
# This is for CPU runs and tests (N processes x K fake devices behave like N hosts). On a GPU host run
# one process over all its GPUs; across hosts use launch/slurm.sbatch, launch/k8s_jobset.yaml or
# launch/tpu_pod.sh.
set -u -o pipefail

usage() {
  sed -n '2,3p' "$0" | sed 's/^# \{0,1\}//' >&2
}

fail() {
  echo "error: $*" >&2
  exit 2
}

n=""
devices=4
port=""
dry_run="${DRY_RUN:-0}"
kill_after="${KILL_AFTER:-30}"
while (($# > 0)); do
  case "$1" in
    --devices_per_process) (($# >= 2)) || fail "--devices_per_process: missing value, expected a number"
      devices="$2"; shift 2 ;;
    --devices_per_process=*) devices="${1#*=}"; shift ;;
    --port) (($# >= 2)) || fail "--port: missing value, expected a port number"
      port="$2"; shift 2 ;;
    --port=*) port="${1#*=}"; shift ;;
    --dry_run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    -*) fail "$1: unknown option, expected --devices_per_process K, --port P, --dry_run, N, then -- and the command" ;;
    *) [[ -z "$n" ]] || fail "$1: unexpected argument before --, expected: local.sh N -- COMMAND"
      n="$1"; shift ;;
  esac
done
cmd=("$@")

[[ "$n" =~ ^[0-9]+$ && "$n" -ge 1 ]] || fail "N: '${n}', expected the number of processes (local.sh N -- COMMAND)"
[[ "$devices" =~ ^[0-9]+$ && "$devices" -ge 1 ]] || fail "--devices_per_process: '$devices', expected a positive number"
[[ "$kill_after" =~ ^[0-9]+$ ]] || fail "KILL_AFTER: '$kill_after', expected a number of seconds"
((${#cmd[@]} > 0)) || fail "no command, expected: local.sh N -- python -m cpt_jax.train ..."
if [[ -n "$port" ]]; then
  [[ "$port" =~ ^[0-9]+$ && "$port" -ge 1 && "$port" -le 65535 ]] || fail "--port: '$port', expected 1..65535"
fi

free_port() {
  # The OS picks a free port (bound on all interfaces, as the coordinator binds [::]:PORT) through
  # the command's own Python if it is one, else python3/python; without Python, probe random ports.
  local candidates=("${PYTHON:-}" python3 python) py probe
  case "$(basename -- "${cmd[0]}")" in python*) candidates=("${cmd[0]}" "${candidates[@]}") ;; esac
  for py in "${candidates[@]}"; do
    if [[ -z "$py" ]] || ! command -v "$py" >/dev/null 2>&1; then
      continue
    fi
    "$py" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])' 2>/dev/null && return 0
  done
  for _ in $(seq 100); do
    probe=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$probe") 2>/dev/null; then
      echo "$probe"
      return 0
    fi
  done
  return 1
}

if [[ -z "$port" ]]; then
  port="$(free_port)" || fail "no free loopback port found; pass --port P"
fi
address="127.0.0.1:$port"

# XLA_FLAGS: the caller's flags without a device count, then this run's device count.
xla_flags=()
read -r -a given_flags <<<"${XLA_FLAGS:-}"
for flag in "${given_flags[@]+"${given_flags[@]}"}"; do
  [[ "$flag" == --xla_force_host_platform_device_count=* ]] || xla_flags+=("$flag")
done
xla_flags+=("--xla_force_host_platform_device_count=$devices")
xla="${xla_flags[*]}"

if [[ "$dry_run" != 0 ]]; then
  for ((i = 0; i < n; i++)); do
    printf 'CPT_COORDINATOR_ADDRESS=%q CPT_NUM_PROCESSES=%q CPT_PROCESS_ID=%q XLA_FLAGS=%q' \
      "$address" "$n" "$i" "$xla"
    printf ' %q' "${cmd[@]}"
    printf '\n'
  done
  exit 0
fi

prefix() {
  # Line by line as lines arrive (awk implementations such as mawk hold a pipe's input back). A SIGTERM
  # to the process group is for the command (the trainer saves a checkpoint and exits): the filter
  # keeps passing its output on until it ends.
  trap '' TERM
  local line
  while IFS= read -r line || [[ -n "$line" ]]; do
    printf '%s%s\n' "$1" "$line"
  done
}

# One process: the command with its stdout and stderr prefixed. The shells around it only wait: a
# SIGTERM to the process group is for the command (the trainer saves a checkpoint and exits 143),
# and its exit status is what comes back (pipefail).
run_one() {
  trap ':' TERM
  export CPT_COORDINATOR_ADDRESS="$address" CPT_NUM_PROCESSES="$n" CPT_PROCESS_ID="$1" XLA_FLAGS="$xla"
  {
    trap ':' TERM
    "${cmd[@]}" 2>&1 1>&3 3>&- | prefix "[p$1] " >&2
  } 3>&1 | prefix "[p$1] "
}

# Job control: every process (with its two output filters) runs in its own process group, so stopping
# one stops all it started, and a Ctrl-C at the terminal reaches only this script, which stops them.
set -m
pids=()
for ((i = 0; i < n; i++)); do
  run_one "$i" &
  pids+=("$!")
done
set +m # the process groups exist; no job-status notices from here on
echo "[local.sh] started $n processes x $devices devices, coordinator $address" >&2

running=("${pids[@]}")

stop_all() {
  # SIGTERM the process groups still running, then SIGKILL whatever is left after the grace period.
  local signal="$1" pid waited=0
  for pid in "${running[@]+"${running[@]}"}"; do
    kill "-$signal" -- "-$pid" 2>/dev/null
  done
  while ((waited < kill_after * 10)); do
    local alive=0
    for pid in "${running[@]+"${running[@]}"}"; do
      kill -0 "$pid" 2>/dev/null && alive=1
    done
    ((alive)) || break
    sleep 0.1
    waited=$((waited + 1))
  done
  for pid in "${running[@]+"${running[@]}"}"; do
    kill -KILL -- "-$pid" 2>/dev/null
  done
  for pid in "${running[@]+"${running[@]}"}"; do
    wait "$pid" 2>/dev/null
  done
  running=()
}

# shellcheck disable=SC2329 # called by the traps below
on_signal() {
  echo "[local.sh] $1: stopping all processes" >&2
  stop_all TERM
  exit "$2"
}
trap 'on_signal SIGINT 130' INT
trap 'on_signal SIGTERM 143' TERM

status=0
while ((${#running[@]} > 0)); do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
      continue
    fi
    wait "$pid"
    rc=$?
    if ((rc != 0 && status == 0)); then
      status=$rc
      for ((i = 0; i < n; i++)); do
        [[ "${pids[i]}" == "$pid" ]] && failed=$i
      done
      echo "[local.sh] process ${failed:-?} exited with status $rc; stopping the others" >&2
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  if ((status != 0 && ${#running[@]} > 0)); then
    stop_all TERM
  fi
  ((${#running[@]} > 0)) && sleep 0.2
done
exit "$status"

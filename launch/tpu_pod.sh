#!/usr/bin/env bash
# Run cpt_jax on every worker of a Cloud TPU VM slice (v4, v5e, v5p, v6e pods) from your machine.
#
#   launch/tpu_pod.sh --name TPU_NAME --zone ZONE [--project P] [--dry_run] \
#       [--wheel PATH | --pip SPEC] [--remote_dir DIR] [--copy PATH]... [--no_install] \
#       -- python3 -m cpt_jax.train --config configs/recipe_15b.py --workdir /mnt/shared/run1
#
# Steps (all through `gcloud compute tpus tpu-vm ... --worker=all`, i.e. on every host of the slice):
#   1. package: builds a wheel of this checkout (pip wheel --no-deps) unless --wheel PATH is given,
#      copies it to every worker (tpu-vm scp) and installs it with the TPU extra
#      (pip install 'cpt_jax-*.whl[tpu]'); --pip SPEC installs SPEC instead (e.g.
#      'cpt_jax[tpu] @ git+https://...'); --no_install skips this step.
#   2. copies configs/ (and every --copy PATH) into --remote_dir (default cpt_jax_run, in the home directory) on every worker.
#   3. starts the training command in --remote_dir on all workers at once. JAX finds the slice by
#      itself (jax.distributed.initialize() reads the TPU metadata): no CPT_* settings are needed.
# The workdir must be one directory every worker sees (a Filestore/NFS mount or a gcsfuse bucket):
# orbax writes each checkpoint from all hosts into the same step directory.
# --dry_run (or DRY_RUN=1) prints the commands instead of running them.
set -euo pipefail

fail() {
  echo "error: $*" >&2
  exit 2
}

here="$(cd "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname -- "$here")"
name=""
zone=""
project=""
wheel=""
pip_spec=""
remote_dir="cpt_jax_run"
install=1
dry_run="${DRY_RUN:-0}"
copies=()
while (($# > 0)); do
  case "$1" in
    --name | --zone | --project | --wheel | --pip | --remote_dir | --copy)
      (($# >= 2)) || fail "$1: missing value"
      case "$1" in
        --name) name="$2" ;;
        --zone) zone="$2" ;;
        --project) project="$2" ;;
        --wheel) wheel="$2" ;;
        --pip) pip_spec="$2" ;;
        --remote_dir) remote_dir="$2" ;;
        --copy) copies+=("$2") ;;
      esac
      shift 2 ;;
    --name=* | --zone=* | --project=* | --wheel=* | --pip=* | --remote_dir=* | --copy=*)
      key="${1%%=*}"
      set -- "$key" "${1#*=}" "${@:2}"
      continue ;;
    --dry_run) dry_run=1; shift ;;
    --no_install) install=0; shift ;;
    -h | --help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) fail "$1: unknown argument, expected --name, --zone, [--project], [--dry_run], options, then -- COMMAND" ;;
  esac
done
cmd=("$@")
[[ -n "$name" ]] || fail "--name: missing, expected the TPU VM name (gcloud compute tpus tpu-vm list)"
[[ -n "$zone" ]] || fail "--zone: missing, expected the TPU's zone (e.g. us-east5-a)"
((${#cmd[@]} > 0)) || fail "no training command after --, expected e.g. -- python3 -m cpt_jax.train --config ..."
[[ -z "$wheel" || -z "$pip_spec" ]] || fail "--wheel and --pip: both given, expected one way to install"
if [[ -n "$wheel" && "$dry_run" == 0 && ! -f "$wheel" ]]; then
  fail "--wheel: $wheel does not exist"
fi

gcloud_args=(--zone "$zone" --worker=all)
[[ -z "$project" ]] || gcloud_args+=(--project "$project")

# One word for a shell: as is when plain, else in single quotes.
word() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Print the command (dry run) or run it.
run() {
  if [[ "$dry_run" != 0 ]]; then
    local sep=""
    for arg in "$@"; do
      printf '%s%s' "$sep" "$(word "$arg")"
      sep=" "
    done
    printf '\n'
  else
    "$@"
  fi
}

# The remote side runs a shell: quote every word of the command for it.
quoted() {
  local sep=""
  for arg in "$@"; do
    printf '%s%s' "$sep" "$(word "$arg")"
    sep=" "
  done
}

# Relative paths are relative to the worker's home directory, for ssh and scp alike.
remote_dir="${remote_dir#\~/}"
[[ -n "$remote_dir" ]] || fail "--remote_dir: empty, expected a directory on the workers"
rdir="$(word "$remote_dir")"

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_args[@]}" --command "$1"
}

scp_all() {
  # scp_all DEST SOURCE...: copy local SOURCEs into DEST (a directory) on every worker.
  local dest="$1"
  shift
  run gcloud compute tpus tpu-vm scp --recurse "$@" "$name:$dest" "${gcloud_args[@]}"
}

ssh_all "mkdir -p $rdir"

if ((install)); then
  if [[ -n "$pip_spec" ]]; then
    ssh_all "python3 -m pip install --upgrade $(quoted "$pip_spec")"
  else
    if [[ -z "$wheel" ]]; then
      version="$(sed -n 's/.*version="\([^"]*\)".*/\1/p' "$repo/setup.py" | head -n 1)"
      dist="$repo/dist"
      run python3 -m pip wheel --no-deps --no-build-isolation --wheel-dir "$dist" "$repo"
      wheel="$dist/cpt_jax-${version}-py3-none-any.whl"
      if [[ "$dry_run" == 0 && ! -f "$wheel" ]]; then
        fail "the wheel build did not produce $wheel"
      fi
    fi
    scp_all "$remote_dir/" "$wheel"
    ssh_all "python3 -m pip install --upgrade $rdir/$(quoted "$(basename -- "$wheel")")'[tpu]'"
  fi
fi

scp_all "$remote_dir/" "$repo/configs" "${copies[@]+"${copies[@]}"}"

ssh_all "cd $rdir && $(quoted "${cmd[@]}")"

#!/usr/bin/env bash
# Installs MaxText (the PyPI package `maxtext`) into a virtualenv of its own, never the project's:
#
#   bash benchmarks/peers/install_maxtext.sh [VENV_DIR]      # default .peers/maxtext (git-ignored)
#
# MaxText needs Python >= 3.12 (MAXTEXT_PYTHON, else python3.12 / python3.13 on PATH or in pyenv).
# The package itself declares no dependencies; its wheel ships the CPU requirements file
# (dependencies/requirements/generated_requirements/decoupled-requirements.txt), which is installed
# next, under the project's constraints.txt, so that both sides of the peer benchmark run the same
# jax, jaxlib, flax and optax (the same XLA). A stamp records a finished install; a second call
# with the same version does nothing. It downloads about 2 GB (tensorflow among them) the first time.
# The default is maxtext 0.2.4, the newest release whose requirements admit the jax 0.10.2 and
# flax 0.12.8 of constraints.txt (0.2.5 asks for jax >= 0.11.1): a peer on another XLA would
# measure the compiler, not the trainer.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
venv=${1:-${MAXTEXT_VENV:-$root/.peers/maxtext}}
version=${MAXTEXT_VERSION:-0.2.4}
stamp=$venv/.installed-maxtext-$version
[[ -f $stamp ]] && exit 0

find_python() {
  local candidate
  for candidate in "${MAXTEXT_PYTHON:-}" python3.12 python3.13 "$HOME"/.pyenv/versions/3.12*/bin/python \
                   "$HOME"/.pyenv/versions/3.13*/bin/python; do
    [[ -n $candidate ]] || continue
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "install_maxtext.sh: MaxText needs Python >= 3.12 and none was found; set MAXTEXT_PYTHON" >&2
  return 1
}

python=$(find_python)
[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" --upgrade pip setuptools wheel
"${pip[@]}" "maxtext==$version"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
requirements=$site/dependencies/requirements/generated_requirements/decoupled-requirements.txt
[[ -f $requirements ]] || { echo "install_maxtext.sh: $requirements is missing from maxtext $version" >&2; exit 1; }
"${pip[@]}" -c "$root/constraints.txt" -r "$requirements"
touch "$stamp"

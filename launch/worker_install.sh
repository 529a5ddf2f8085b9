#!/usr/bin/env bash
# Installs codi_jax's environment on this machine (run on every TPU worker by install.sh).
# Creates the venv (relative paths are under $HOME) with a Python >= 3.11, installing
# python3.11 from apt when the image has only an older one (TPU VM images ship Ubuntu 22.04's
# 3.10), then pip installs requirements.txt (pinned by constraints.txt) together with jax[tpu] of the pinned version, in one
# resolver run so the TPU wheel and the requirements agree.
#
#   bash launch/worker_install.sh --venv=codi_jax_venv --jax-version=0.10.2 [--dry-run]
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require VENV JAX_VERSION
cd "$REPO_ROOT"

venv=$OPT_VENV
[[ $venv == /* ]] || venv=$HOME/$venv

if [[ ! -x $venv/bin/python ]]; then
  if ! find_python; then
    [[ -z $OPT_PYTHON ]] || die "--python=$OPT_PYTHON is missing or older than 3.11"
    command -v apt-get >/dev/null 2>&1 || die "no Python >= 3.11 found; install one and pass --python"
    run sudo apt-get update -q
    run sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3.11 python3.11-venv
    PY=python3.11
  fi
  run "$PY" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)
run "${pip[@]}" install -q --upgrade pip
# shellcheck disable=SC2086  # PIP_EXTRA is a space separated list on purpose
run "${pip[@]}" install -q -c constraints.txt -r requirements.txt "jax[tpu]==$OPT_JAX_VERSION" $OPT_PIP_EXTRA
run "$venv/bin/python" -c 'import jax, codi_jax; print("codi_jax ready: jax", jax.__version__)'

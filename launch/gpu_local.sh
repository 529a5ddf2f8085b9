#!/usr/bin/env bash
# Trains on this machine's GPUs: one process sees every GPU (CUDA_VISIBLE_DEVICES is respected),
# so no multi-host setup is involved. Unless --no-install: makes the venv --venv (under $HOME
# unless absolute; --venv= installs into --python's own environment instead) and pip installs
# requirements.txt together with jax[cuda12] (--jax-extra) of the pinned version. Then checks that
# jax sees GPUs and runs `python -m codi_jax.main --config=CONFIG --workdir=WORKDIR [-- more flags]`
# in the foreground.
#
#   bash launch/gpu_local.sh --config=configs/depth.py --workdir=runs/depth
#   bash launch/gpu_local.sh --no-install --venv= --config=configs/depth.py:tiny --workdir=/tmp/tiny -- --config.seed=1
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require CONFIG WORKDIR
case $OPT_JAX_EXTRA in cuda12 | cuda13) ;; *) die "--jax-extra must be cuda12 or cuda13, not '$OPT_JAX_EXTRA'" ;; esac
cd "$REPO_ROOT"

if [[ -n $OPT_VENV ]]; then
  venv=$OPT_VENV
  [[ $venv == /* ]] || venv=$HOME/$venv
  if [[ $OPT_INSTALL == 1 && ! -x $venv/bin/python ]]; then
    find_python || die "no Python >= 3.11 found; install one and pass --python"
    run "$PY" -m venv "$venv"
  fi
  PY=$venv/bin/python
  dry || [[ -x $PY ]] || die "no venv at $venv; drop --no-install or pass --venv="
else
  find_python || die "no Python >= 3.11 found (--python=${OPT_PYTHON:-python3.12/python3.11/python3})"
fi

if [[ $OPT_INSTALL == 1 ]]; then
  resolve_jax_version
  # shellcheck disable=SC2086  # PIP_EXTRA is a space separated list on purpose
  run "$PY" -m pip install -q -c constraints.txt -r requirements.txt "jax[$OPT_JAX_EXTRA]==$OPT_JAX_VERSION" $OPT_PIP_EXTRA
fi

if ! dry; then
  command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: this needs an NVIDIA driver (for TPUs see launch/README.md)"
fi
run nvidia-smi -L
# A CPU-only jaxlib would silently train on the CPU; refuse instead.
run "$PY" -c 'import jax, sys; d = jax.devices(); print("jax devices:", d); sys.exit(d[0].platform != "gpu")' ||
  die "jax sees no GPU: install jax[$OPT_JAX_EXTRA] (drop --no-install) and check the CUDA driver"

main_command
run "${MAIN_CMD[@]}"

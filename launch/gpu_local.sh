#!/usr/bin/env bash
# Trains on this machine's GPUs: one process sees every GPU (CUDA_VISIBLE_DEVICES is respected),
# so no multi-host setup is involved. First checks the config (python -m codi_jax.main --check,
# with the venv's Python, else --local-python; on a machine with neither installed yet, right
# after the install). Unless --no-install: makes the venv --venv (under $HOME unless absolute;
# --venv= installs into --python's own environment instead) and pip installs requirements.txt
# together with jax[cuda12] (--jax-extra) of the pinned version. Then checks that jax sees GPUs
# and runs `python -m codi_jax.main --config=CONFIG --workdir=WORKDIR [-- more flags]` in the
# foreground.
#
# An SD-scale config (not :tiny, no :batch=) gets the single-GPU recipe for an 80 GB card, planned
# from the compiled memory of the default train step (benchmarks/aot_gpu.py, results/aot_gpu.md:
# the TPU compiler's plan for one 95 GiB chip, not the GPU compiler's; --no-gpu-recipe leaves it
# out): batch 64, no gradient accumulation, remat, bfloat16 compute with fp32 params / AdamW / EMA
# (57.6 GiB planned), and XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (JAX takes 75 % of the card by
# default). Flags after -- win over it. The line 'train step compiled: {...}' that the trainer
# logs before its first step is the GPU compiler's own memory_analysis: the check on the card.
#
#   bash launch/gpu_local.sh --config=configs/depth.py --workdir=runs/depth -- \
#       --config.teacher=/data/stable-diffusion-v1-5 --config.data.dataset=folder --config.data.data_dir=/data/images
#   bash launch/gpu_local.sh --no-install --venv= --config=configs/depth.py:tiny --workdir=/tmp/tiny -- --config.seed=1
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# The single-GPU recipe: benchmarks/results/aot_gpu.json's "recipe" (tests/test_launch.py keeps the two equal).
GPU_RECIPE_ARGS=(--config.batch_size=64 --config.optimizer.grad_accum_steps=1 --config.remat=True --config.dtype=bfloat16)
GPU_RECIPE_ENV="XLA_PYTHON_CLIENT_MEM_FRACTION=0.95"

parse_args "$@"
require CONFIG WORKDIR
case $OPT_JAX_EXTRA in cuda12 | cuda13) ;; *) die "--jax-extra must be cuda12 or cuda13, not '$OPT_JAX_EXTRA'" ;; esac
cd "$REPO_ROOT"

variants=""
[[ $OPT_CONFIG == *:* ]] && variants=,${OPT_CONFIG#*:},
if [[ $OPT_GPU_RECIPE == 0 ]]; then
  :
elif [[ $variants == *,tiny,* || $variants == *,batch=* ]]; then
  log "no single-GPU recipe: the config is :tiny or sets its own batch"
else
  EXTRA_ARGS=("${GPU_RECIPE_ARGS[@]}" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
  OPT_TRAIN_ENV="$GPU_RECIPE_ENV${OPT_TRAIN_ENV:+;$OPT_TRAIN_ENV}"
  log "single-GPU recipe (80 GB, SD1.5 scale): ${GPU_RECIPE_ARGS[*]} $GPU_RECIPE_ENV"
fi

venv=""
if [[ -n $OPT_VENV ]]; then
  venv=$OPT_VENV
  [[ $venv == /* ]] || venv=$HOME/$venv
fi

# The config before anything is installed or started, with whichever Python here has the requirements.
checked=0
if [[ -n $venv && -x $venv/bin/python ]]; then
  checker=$venv/bin/python
elif [[ -z $venv ]] && find_python; then
  checker=$PY
else
  checker=$OPT_LOCAL_PYTHON
fi
status=0
check_config "$checker" "$REPO_ROOT" soft || status=$?
if ((status == 0)); then
  checked=1
elif [[ $OPT_INSTALL == 1 ]]; then
  log "'$checker' lacks codi_jax's requirements: the config is checked right after the install"
else
  die "cannot check the config here: '$checker' lacks codi_jax's requirements (drop --no-install, or --local-python=PYTHON), or skip the check with --no-check"
fi

if [[ -n $venv ]]; then
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
if ((!checked)); then
  if dry && [[ ! -x $PY ]]; then
    log "dry-run: the config would be checked with $PY once it is installed"
  else
    check_config "$PY" "$REPO_ROOT"
  fi
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

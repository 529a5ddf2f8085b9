#!/usr/bin/env bash
# Starts `python -m codi_jax.main --config=CONFIG --workdir=WORKDIR [-- more flags]` on all workers
# at once, detached so it survives the ssh session. A config outside the repository is copied to
# the workers first. Multi-host slices need a gs:// workdir. The trainer resumes from the latest
# checkpoint in WORKDIR by itself, so starting again after a crash continues the run. The config
# (with the flags for main) is checked on this machine first: python -m codi_jax.main --check,
# which needs requirements.txt here (--local-python=PYTHON); --no-check skips it.
#
#   bash launch/start.sh --env-file=launch/example.env
#   bash launch/start.sh ... --config=configs/depth.py --workdir=gs://BUCKET/depth -- --config.total_steps=20000
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
tpu_settings
tpu_accelerator_info
tpu_start
log "started; follow it with: bash launch/logs.sh --name=$OPT_NAME --zone=$OPT_ZONE --project=$OPT_PROJECT"

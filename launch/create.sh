#!/usr/bin/env bash
# Creates a TPU queued resource (--mode=qr, default) or TPU VM (--mode=vm) and waits until it is
# ACTIVE (qr) / READY (vm). The runtime version follows the accelerator family unless given.
# With a --config (e.g. from the env file) the config is checked on this machine first
# (python -m codi_jax.main --check; --no-check skips it), so a run that would be refused
# creates nothing.
#
#   bash launch/create.sh --env-file=launch/example.env
#   bash launch/create.sh --project=P --zone=us-central2-b --name=codi-v4 --accelerator=v4-32 --spot
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
tpu_settings
tpu_accelerator_info
check_capacity_flags
if [[ -n $OPT_CONFIG ]]; then check_config "$OPT_LOCAL_PYTHON" "$(local_config_dir)"; fi
log "creating $OPT_NAME: $OPT_ACCELERATOR ($TPU_HOSTS host(s)), runtime $OPT_RUNTIME_VERSION, mode $OPT_MODE"
tpu_create
if [[ $OPT_WAIT == 1 ]]; then tpu_wait_up; fi

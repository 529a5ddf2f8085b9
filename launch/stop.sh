#!/usr/bin/env bash
# Stops the trainer on every worker: SIGTERM to its process group (codi_jax's trainer then
# checkpoints at the next step and exits), SIGKILL after --stop-timeout seconds. The TPU stays.
#
#   bash launch/stop.sh --env-file=launch/example.env
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
tpu_settings
check_remote_path --remote-dir "$OPT_REMOTE_DIR"
check_remote_path --log-dir "$OPT_LOG_DIR"
tpu_stop

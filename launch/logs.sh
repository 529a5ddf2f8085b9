#!/usr/bin/env bash
# Streams the trainer log of one worker (default worker 0, the one that writes summaries).
# --no-follow prints the last --tail-lines lines and returns.
#
#   bash launch/logs.sh --env-file=launch/example.env [--worker=3] [--no-follow]
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
tpu_settings
check_remote_path --log-dir "$OPT_LOG_DIR"
[[ $OPT_WORKER =~ ^[0-9]+$ ]] || die "--worker must be a worker index, not '$OPT_WORKER'"
log_file=$(quote "$OPT_LOG_DIR/train.log")
if [[ $OPT_FOLLOW == 1 ]]; then
  tpu_ssh "$OPT_WORKER" "tail -n $OPT_TAIL_LINES -F $log_file"
else
  tpu_ssh "$OPT_WORKER" "tail -n $OPT_TAIL_LINES $log_file"
fi

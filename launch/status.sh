#!/usr/bin/env bash
# Prints the TPU's state and the trainer's status on worker 0 (running | exit N | dead | none).
#
#   bash launch/status.sh --env-file=launch/example.env
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
tpu_settings
tpu_state
echo "tpu: $STATE"
if [[ $STATE == "$(tpu_up_state)" ]]; then
  tpu_job_status
  echo "job: $JOB"
fi

#!/usr/bin/env bash
# Prints the TPU's state and the trainer's status over all workers
# (running | exit N | terminated N | dead | none).
#
#   bash launch/status.sh --env-file=launch/example.env
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
tpu_settings
# With --accelerator the job status also checks that every host answered.
if [[ -n $OPT_ACCELERATOR ]]; then tpu_accelerator_info; fi
tpu_state
echo "tpu: $STATE"
if [[ $STATE == "$(tpu_up_state)" ]]; then
  tpu_job_status
  echo "job: $JOB"
fi

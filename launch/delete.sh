#!/usr/bin/env bash
# Deletes the queued resource together with its TPU (--mode=qr) or the TPU VM (--mode=vm) and
# waits until it is gone. The GCS workdir is untouched: a later run with it resumes.
#
#   bash launch/delete.sh --env-file=launch/example.env
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
tpu_settings
tpu_delete
tpu_wait_gone
log "$OPT_NAME deleted"

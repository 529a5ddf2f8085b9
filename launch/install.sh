#!/usr/bin/env bash
# Copies the project to every worker (--worker=all) and installs it there: the working tree of
# --repo (default: this checkout, uncommitted edits to tracked files included) as a git archive,
# or a `git clone` of --repo=URL [--git-ref=REF]; then launch/worker_install.sh builds the venv
# with requirements.txt and jax[tpu] of the pinned version. Safe to re-run (the venv is kept).
#
#   bash launch/install.sh --env-file=launch/example.env
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
tpu_settings
tpu_install

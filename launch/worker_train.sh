#!/usr/bin/env bash
# Runs codi_jax.main on this machine (on every TPU worker, via start.sh and supervise.sh).
#
#   bash launch/worker_train.sh start --config=C --workdir=W [-- main flags]   detached (setsid/nohup),
#        survives the ssh session; output appended to LOG_DIR/train.log
#   bash launch/worker_train.sh foreground --config=C --workdir=W [-- ...]     in this shell
#   bash launch/worker_train.sh status     prints one line: running | exit N | terminated N | dead | none
#   bash launch/worker_train.sh stop       SIGTERM to the trainer's process group, SIGKILL after
#        --stop-timeout seconds
# LOG_DIR and VENV are relative to $HOME unless absolute. LOG_DIR/status holds the state, so
# the supervisor can tell a finished run (exit 0) from a crashed one, and from one that ended
# after a SIGTERM (terminated N: preemption or stop; the trainer may exit 0 after its checkpoint).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
action=${1:-}
case $action in
  start | foreground | status | stop) shift ;;
  -h | --help) parse_args --help ;;
  *) die "first argument must be start, foreground, status or stop (got '$action')" ;;
esac
parse_args "$@"

in_home() { if [[ $1 == /* ]]; then printf '%s' "$1"; else printf '%s/%s' "$HOME" "$1"; fi; }
log_dir=$(in_home "$OPT_LOG_DIR")
status_file=$log_dir/status
pid_file=$log_dir/pid

alive() { [[ -f $pid_file ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; }

job_status() {
  if [[ ! -f $status_file ]]; then
    echo none
  elif [[ $(cat "$status_file") == running ]]; then
    if alive; then echo running; else echo dead; fi
  else
    cat "$status_file"
  fi
}

case $action in
  status)
    job_status
    ;;
  stop)
    if ! alive; then
      log "no trainer running"
      exit 0
    fi
    # setsid made the trainer a process-group leader: the group id is its pid.
    pgid=$(cat "$pid_file")
    run kill -TERM -- "-$pgid"
    dry && exit 0
    for ((i = 0; i < OPT_STOP_TIMEOUT; i++)); do
      alive || break
      sleep 1
    done
    if alive; then
      log "trainer still running after ${OPT_STOP_TIMEOUT}s: SIGKILL"
      kill -KILL -- "-$pgid" 2>/dev/null || true
      echo "terminated 137" >"$status_file"
    elif [[ $(job_status) == dead ]]; then
      # The signal came before the wrapper had set its trap (a stop right after the start).
      echo "terminated 143" >"$status_file"
    fi
    log "trainer stopped: $(job_status)"
    ;;
  start)
    require CONFIG WORKDIR
    if dry; then
      run setsid nohup bash "$LAUNCH_DIR/worker_train.sh" foreground "$@"
      exit 0
    fi
    [[ $(job_status) != running ]] || die "a trainer is already running (pid $(cat "$pid_file")); stop it first: bash launch/worker_train.sh stop"
    mkdir -p "$log_dir"
    # Written before the detach so that a status query right after start never reads the
    # previous run's result.
    echo running >"$status_file"
    printf '=== %s start %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(quote_args "$@")" >>"$log_dir/train.log"
    setsid nohup bash "$LAUNCH_DIR/worker_train.sh" foreground "$@" >>"$log_dir/train.log" 2>&1 </dev/null &
    echo $! >"$pid_file"
    log "trainer started (pid $!), log: $log_dir/train.log"
    ;;
  foreground)
    # A trap (not an ignore, which the trainer would inherit) notes SIGTERM; bash runs it only
    # once the trainer, which got the same signal and checkpoints on it, has exited.
    terminated=0
    trap 'terminated=1' TERM
    require CONFIG WORKDIR
    PY=$(in_home "$OPT_VENV")/bin/python
    main_command
    if dry; then
      run "${MAIN_CMD[@]}"
      exit 0
    fi
    [[ -x $PY ]] || die "no venv at $(in_home "$OPT_VENV"); run launch/worker_install.sh first"
    cd "$REPO_ROOT"
    mkdir -p "$log_dir"
    echo running >"$status_file"
    rc=0
    run "${MAIN_CMD[@]}" || rc=$?
    if ((terminated)); then echo "terminated $rc" >"$status_file"; else echo "exit $rc" >"$status_file"; fi
    exit "$rc"
    ;;
esac

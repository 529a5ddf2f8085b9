#!/usr/bin/env bash
# Keeps a training run alive on preemptible/spot TPUs until it finishes.
# Every --poll-seconds it reads the TPU's state and, once the job runs, the trainer's status on
# every worker:
#   missing                      -> create it (create.sh)
#   ACTIVE/READY, no job yet     -> install.sh, then start.sh (a job already running on a TPU
#                                   found at start-up is adopted, not restarted)
#   SUSPENDED/FAILED/PREEMPTED.. -> delete.sh, back off, create.sh again; the next ACTIVE
#                                   re-installs and restarts the same command with the same
#                                   gs:// workdir, where codi_jax.main resumes from the latest
#                                   checkpoint: only the steps since that checkpoint are redone
#   trainer failed anywhere      -> stop it on all workers, back off, re-install, restart on the
#   (exit N, SIGTERM, died)         same TPU; exit 2 (config error), 65 (no readable data) or 78 (the
#                                   workdir or a checkpoint refused: another mode, all damaged, ...): stop, give up
#   exit 78 while another job    -> the trainer refused to write over a live job in the workdir (a hung
#   holds the workdir's lease       trainer a restart did not reach, a second supervisor): wait, reading
#                                   <workdir>/lease.json every poll, until that job's lease is gone or
#                                   stale (its heartbeat older than its timeout), then start again; the
#                                   wait counts as no recovery
#   trainer exited 0 everywhere  -> one more poll to make sure the TPU is not going away (a
#                                   preempted trainer checkpoints and may exit 0 too), then delete
#                                   the TPU (unless --keep) and exit 0
# Recoveries are bounded (--max-retries in a row, back-off doubling from --backoff-seconds up to
# --backoff-max); a job that stays up --healthy-seconds resets the count. The steps run as the
# same scripts a user runs by hand, as child processes, so a failing step is retried, not fatal.
#
#   bash launch/supervise.sh --env-file=launch/example.env
#   bash launch/supervise.sh --env-file=launch/example.env --dry-run --simulate-states=ACTIVE,SUSPENDED,ACTIVE
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"

# Flags for the child steps: ours minus what follows `--` (that goes to main via start.sh).
STEP_FLAGS=()
for arg in "$@"; do
  [[ $arg == -- ]] && break
  STEP_FLAGS+=("$arg")
done

# Everything that can be checked is checked before anything is created.
tpu_settings
tpu_accelerator_info
check_capacity_flags
require CONFIG WORKDIR
[[ $OPT_WORKDIR == gs://* ]] ||
  die "--workdir='$OPT_WORKDIR' is not a gs:// path: after a preemption the run resumes on a new TPU from its workdir, so it must live in GCS"
check_tpu_workdir
train_env_entries
resolve_config
resolve_jax_version
check_remote_path --remote-dir "$OPT_REMOTE_DIR"
check_remote_path --venv "$OPT_VENV"
check_remote_path --log-dir "$OPT_LOG_DIR"

step() {
  local script=$1
  shift
  bash "$LAUNCH_DIR/$script" ${STEP_FLAGS[@]+"${STEP_FLAGS[@]}"} "$@"
}

failures=0  # recoveries in a row
lease_wait=0  # the trainer refused a workdir that another job's live lease holds: wait it out before starting
started=0   # a job was started (or adopted) on the current TPU
seen=0      # the TPU was seen or made by this supervisor (so no job of ours can be on it)
job_start=0
UP=$(tpu_up_state)

# Counts a recovery and gives up past --max-retries; sets BACKOFF, the pause before the retry.
failure() {
  failures=$((failures + 1))
  if ((failures > OPT_MAX_RETRIES)); then
    die "giving up after $OPT_MAX_RETRIES recoveries in a row (last: $1); $OPT_WORKDIR holds the last checkpoint, rerun supervise.sh to continue"
  fi
  local delay=$OPT_BACKOFF_SECONDS i
  for ((i = 1; i < failures && delay < OPT_BACKOFF_MAX; i++)); do delay=$((delay * 2)); done
  ((delay <= OPT_BACKOFF_MAX)) || delay=$OPT_BACKOFF_MAX
  BACKOFF=$delay
  log "recovery $failures/$OPT_MAX_RETRIES: $1; back-off ${delay}s"
}

# A field of <workdir>/lease.json (codi_jax/lease.py writes one key per line): a string, or a number's integer part.
lease_field() {
  printf '%s\n' "$2" | sed -n -e "s/^ *\"$1\": *\"\([^\"]*\)\".*/\1/p" -e "s/^ *\"$1\": *\([0-9]*\).*/\1/p" | head -n 1
}

# Succeeds while a live job holds the workdir's lease (its heartbeat no older than the holder's own timeout, the rule
# the trainer applies) and sets LEASE_HOLDER to a description; fails when there is none, it does not read, or it is
# stale (a starting trainer takes a stale lease over by itself). Hosts' clocks must roughly agree, as for the trainer.
lease_live() {
  local text heartbeat timeout age
  LEASE_HOLDER=""
  dry && return 1
  text=$(gcloud storage cat "$OPT_WORKDIR/lease.json" 2>/dev/null) || return 1
  heartbeat=$(lease_field heartbeat "$text")
  timeout=$(lease_field stale_after_s "$text")
  [[ $heartbeat =~ ^[0-9]+$ && $timeout =~ ^[0-9]+$ ]] || return 1
  age=$(($(date +%s) - heartbeat))
  ((age >= 0)) || age=0
  ((age <= timeout)) || return 1
  LEASE_HOLDER="host $(lease_field host "$text"), pid $(lease_field pid "$text"), heartbeat ${age}s ago, stale after ${timeout}s"
}

deploy() {
  if step install.sh && step start.sh -- ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}; then
    started=1
    job_start=$SECONDS
    log "job running on $OPT_NAME; workdir $OPT_WORKDIR"
  else
    failure "install/start on $OPT_NAME failed"
    pause "$BACKOFF"
  fi
}

# Deletes first so the broken slice stops costing quota, then backs off, then asks again.
recreate() {
  started=0
  seen=1
  if ! step delete.sh; then
    log "delete failed; trying again on the next poll"
    return 0
  fi
  pause "$BACKOFF"
  if ! step create.sh --no-wait; then log "create failed; trying again on the next poll"; fi
}

log "supervising $OPT_NAME ($OPT_ACCELERATOR, $OPT_MODE) for: codi_jax.main --config=$OPT_CONFIG --workdir=$OPT_WORKDIR"
while true; do
  tpu_state
  case $STATE in
    "$UP")
      if ((started == 0)); then
        if ((seen == 0)); then
          seen=1
          tpu_job_status adopt
          if [[ $JOB == running ]]; then
            log "$OPT_NAME already runs a job: adopting it"
            started=1
            job_start=$SECONDS
            pause "$OPT_POLL_SECONDS"
            continue
          fi
        fi
        if ((lease_wait)); then
          if lease_live; then
            pause "$OPT_POLL_SECONDS"
            continue
          fi
          log "the lease on $OPT_WORKDIR is gone or stale: starting the trainer again"
          lease_wait=0
        fi
        deploy
      else
        tpu_job_status
        case $JOB in
          running)
            if ((failures > 0 && SECONDS - job_start >= OPT_HEALTHY_SECONDS)); then
              log "job healthy for ${OPT_HEALTHY_SECONDS}s: retry count reset"
              failures=0
            fi
            ;;
          "exit 0")
            pause "$OPT_POLL_SECONDS"
            tpu_state
            if [[ $STATE != "$UP" ]]; then
              log "$OPT_NAME is $STATE right after the job ended: not done, looking again"
              continue
            fi
            log "job finished"
            if [[ $OPT_KEEP == 0 ]]; then
              step delete.sh || die "the job finished but deleting $OPT_NAME failed: delete it by hand"
            fi
            exit 0
            ;;
          unknown) log "not every worker answered; polling again" ;;
          "exit 78")
            if lease_live; then
              # Not this run's fault: another job writes there, and a start before it ends would be refused again.
              step stop.sh || log "stop failed; the restart will find out"
              log "$OPT_WORKDIR is in use by another job ($LEASE_HOLDER): the trainer refused to write over it; waiting until that job ends or its lease goes stale"
              lease_wait=1
              started=0
            else
              step stop.sh || log "stop failed"
              die "trainer: $JOB: a refused workdir or checkpoint (78: another mode, all damaged, ...), which a restart cannot fix; see train.log under $OPT_LOG_DIR on the workers; $OPT_NAME is left up for that (launch/delete.sh removes it)"
            fi
            ;;
          "exit 2" | "exit 65")
            # A usage error (2) or a data source with nothing readable (65): every restart would end the same way.
            step stop.sh || log "stop failed"
            die "trainer: $JOB: a config error (2) or unreadable data (65), which a restart cannot fix; see train.log under $OPT_LOG_DIR on the workers; $OPT_NAME is left up for that (launch/delete.sh removes it)"
            ;;
          *)
            failure "trainer: $JOB"
            # All hosts restart together, so trainers still alive elsewhere are stopped first.
            step stop.sh || log "stop failed; the restart will find out"
            pause "$BACKOFF"
            started=0
            ;;
        esac
      fi
      ;;
    NOT_FOUND)
      if ((started == 1)); then
        failure "$OPT_NAME disappeared"
        pause "$BACKOFF"
      fi
      started=0
      seen=1
      step create.sh --no-wait || log "create failed; trying again on the next poll"
      ;;
    SUSPENDING | SUSPENDED | FAILED | PREEMPTED | TERMINATED | STOPPING | STOPPED)
      failure "$OPT_NAME is $STATE"
      recreate
      ;;
    UNKNOWN) log "could not read the state of $OPT_NAME; polling again" ;;
    *) log "$OPT_NAME is $STATE; waiting" ;;
  esac
  pause "$OPT_POLL_SECONDS"
done

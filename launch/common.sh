# shellcheck shell=bash
# Shared library of launch/*.sh, sourced and never run: settings from flags and env files,
# the dry-run wrapper, accelerator facts, and the gcloud steps that the single-purpose
# scripts and the preemption supervisor share (so the supervisor runs exactly what a user
# would run by hand).
#
# Settings: every KEY below can be given as --key=value / --key value on the command line or
# as KEY=value in an env file (--env-file=FILE, or CODI_ENV_FILE in the environment).
# Precedence: defaults < env file < flags. Other environment variables are NOT read, so a
# stray ZONE or NAME in a user's shell cannot steer a launch. Booleans: --spot, --spot=false,
# --no-spot; in env files 1/0/true/false/yes/no. Arguments after `--` go to codi_jax.main.
#
# Kept to bash 3.2 syntax (no associative arrays, no mapfile) so it runs from a stock macOS shell.

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd)
SCRIPT_NAME=$(basename "$0")
# Dry-run lines start with this, so tests (and people) can grep and shlex-split them.
DRYRUN_PREFIX='DRYRUN: '

# KEY|kind|default|help. kind: str, bool, int. Order is the order of --help.
SETTINGS="PROJECT|str||GCP project of the TPU
ZONE|str||GCP zone of the TPU (e.g. us-central2-b for v4)
NAME|str||queued-resource id and TPU node id
ACCELERATOR|str||v4-8..v4-4096, v5litepod-1..256, v5p-8.., v6e-1..256
RUNTIME_VERSION|str||TPU software version (default: the one for the accelerator family)
MODE|str|qr|qr (queued resource, recommended) or vm (plain TPU VM)
SPOT|bool|0|spot capacity (preemptible at any time, much cheaper)
PREEMPTIBLE|bool|0|legacy preemptible TPU VM (--mode=vm only)
RESERVED|bool|0|use reserved capacity (--mode=qr only)
NETWORK|str||VPC network
SUBNETWORK|str||VPC subnetwork
REPO|str|$REPO_ROOT|local git checkout (its working tree is copied) or a git URL (cloned on each worker)
GIT_REF|str||branch, tag or commit to check out when REPO is a URL
REMOTE_DIR|str|codi_jax|project directory on each worker, relative to the home directory
VENV|str|codi_jax_venv|Python venv, relative to $HOME unless absolute (gpu_local.sh: empty = no venv)
PYTHON|str||Python >= 3.11 used to create the venv (default: python3.12, python3.11 or python3)
JAX_VERSION|str||jax version for jax[tpu]/jax[cuda12] (default: the pin in REPO/constraints.txt)
JAX_EXTRA|str|cuda12|GPU only: jax extra to install (cuda12, cuda13)
PIP_EXTRA|str||extra pip requirements, space separated
CONFIG|str||config file, optionally with :variant (configs/depth.py or configs/depth.py:tiny)
WORKDIR|str||training workdir; gs://... for TPU (must outlive the VMs)
MAIN_ARGS|str||flags for codi_jax.main, space separated (e.g. --config.teacher=/data/sd15); those after -- follow them
CHECK|bool|1|check the config on this machine first (python -m codi_jax.main --check), before anything is created or started
LOCAL_PYTHON|str|python3|Python of this machine with requirements.txt installed, for the config check
TRAIN_ENV|str||extra environment for the trainer: KEY=VALUE entries separated by ';' (values may hold spaces)
LOG_DIR|str|codi_jax_run|directory for train.log/status/pid on each worker, relative to home
WORKER|str|0|worker whose log is streamed
FOLLOW|bool|1|keep following the log (tail -F)
TAIL_LINES|int|200|log lines shown first
WAIT|bool|1|wait until the TPU is ACTIVE/READY after create
WAIT_TIMEOUT|int|0|seconds to wait for ACTIVE (0 = no limit; queued resources can queue for hours)
POLL_SECONDS|int|60|seconds between state polls
MAX_RETRIES|int|10|supervisor: consecutive recoveries before giving up
BACKOFF_SECONDS|int|60|supervisor: first back-off before re-creating; doubles each retry
BACKOFF_MAX|int|1800|supervisor: back-off cap
HEALTHY_SECONDS|int|3600|supervisor: a job running this long resets the retry count
KEEP|bool|0|supervisor: keep the TPU after the job finished
STOP_TIMEOUT|int|120|seconds a stopped trainer gets to checkpoint before SIGKILL
SIMULATE_STATES|str||dry-run: comma separated TPU states the polls see, e.g. ACTIVE,SUSPENDED,ACTIVE
INSTALL|bool|1|GPU: pip install before running
GPU_RECIPE|bool|1|gpu_local.sh: pass the single-GPU recipe (80 GB, SD1.5 scale) unless the config is :tiny
GPUS_PER_NODE|int|8|SLURM: GPUs per node when SLURM does not say
DRY_RUN|bool|0|print the commands (prefixed 'DRYRUN: ') instead of running them"

EXTRA_ARGS=()

log() { printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2; }
die() {
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 1
}

# --flag-name <-> KEY
flag_of() { printf -- '--%s' "$(printf '%s' "$1" | tr 'A-Z_' 'a-z-')"; }
key_of() { printf '%s' "$1" | tr 'a-z-' 'A-Z_'; }

setting_kind() {
  local key kind _rest
  while IFS='|' read -r key kind _rest; do
    if [[ $key == "$1" ]]; then
      printf '%s' "$kind"
      return 0
    fi
  done <<<"$SETTINGS"
  return 1
}

# set_setting KEY VALUE WHERE: type-checks and stores OPT_KEY; WHERE names the source in errors.
set_setting() {
  local key=$1 value=$2 where=$3 kind
  kind=$(setting_kind "$key") || die "$where: unknown setting $key (see $SCRIPT_NAME --help)"
  case $kind in
    bool)
      case $value in
        1 | true | True | TRUE | yes | on) value=1 ;;
        0 | false | False | FALSE | no | off) value=0 ;;
        *) die "$where: $(flag_of "$key") takes true/false, not '$value'" ;;
      esac
      ;;
    int)
      [[ $value =~ ^[0-9]+$ ]] || die "$where: $(flag_of "$key") takes a whole number, not '$value'"
      ;;
  esac
  printf -v "OPT_$key" '%s' "$value"
}

load_env_file() {
  local file=$1 line key value n=0
  [[ -f $file ]] || die "env file not found: $file"
  while IFS= read -r line || [[ -n $line ]]; do
    n=$((n + 1))
    line=${line#"${line%%[![:space:]]*}"}
    [[ -z $line || $line == \#* ]] && continue
    line=${line#export }
    [[ $line == *=* ]] || die "$file:$n: expected KEY=VALUE, got '$line'"
    key=${line%%=*}
    value=${line#*=}
    # One pair of surrounding quotes is dropped; nothing is expanded (the file is data, not code).
    if [[ ${#value} -ge 2 && ( ($value == \"*\") || ($value == \'*\') ) ]]; then
      value=${value:1:${#value}-2}
    fi
    set_setting "$key" "$value" "$file:$n"
  done <"$file"
}

usage() {
  # The header comment of the calling script, then the settings table.
  sed -n '2,/^[^#]/{/^#/!q;s/^# \{0,1\}//;p;}' "$0"
  printf '\nSettings (--flag / KEY in an env file):\n'
  local key kind default help
  while IFS='|' read -r key kind default help; do
    printf '  %-22s %s%s\n' "$(flag_of "$key")" "$help" "${default:+ [default: $default]}"
  done <<<"$SETTINGS"
}

parse_args() {
  local key kind default _help arg value env_file=${CODI_ENV_FILE:-}
  while IFS='|' read -r key kind default _help; do
    printf -v "OPT_$key" '%s' "$default"
  done <<<"$SETTINGS"
  # The env file is applied first so that flags given anywhere on the line win over it.
  local i=1
  while [[ $i -le $# ]]; do
    arg=${!i}
    case $arg in
      --) break ;;
      --env-file=*) env_file=${arg#--env-file=} ;;
      --env-file)
        i=$((i + 1))
        [[ $i -le $# ]] || die "--env-file needs a file"
        env_file=${!i}
        ;;
    esac
    i=$((i + 1))
  done
  if [[ -n $env_file ]]; then load_env_file "$env_file"; fi

  while [[ $# -gt 0 ]]; do
    arg=$1
    shift
    case $arg in
      --)
        EXTRA_ARGS=("$@")
        break
        ;;
      -h | --help)
        usage
        exit 0
        ;;
      --env-file=*) ;;
      --env-file) shift ;;
      --no-*)
        key=$(key_of "${arg#--no-}")
        [[ $(setting_kind "$key" 2>/dev/null) == bool ]] || die "unknown flag $arg"
        set_setting "$key" 0 "$arg"
        ;;
      --*=*)
        key=$(key_of "${arg%%=*}")
        key=${key#__}
        setting_kind "$key" >/dev/null || die "unknown flag ${arg%%=*} (see $SCRIPT_NAME --help)"
        set_setting "$key" "${arg#*=}" "${arg%%=*}"
        ;;
      --*)
        key=$(key_of "${arg#--}")
        kind=$(setting_kind "$key") || die "unknown flag $arg (see $SCRIPT_NAME --help)"
        if [[ $kind == bool ]]; then
          set_setting "$key" 1 "$arg"
        else
          [[ $# -gt 0 ]] || die "$arg needs a value"
          value=$1
          shift
          set_setting "$key" "$value" "$arg"
        fi
        ;;
      *) die "unexpected argument '$arg' (settings are --key=value; arguments for codi_jax.main go after --)" ;;
    esac
  done
  # MAIN_ARGS (an env file's way to pass main's flags) come first, so flags after -- win over them; not twice when a
  # parent script (the supervisor) already passes them after --.
  if [[ -n $OPT_MAIN_ARGS ]]; then
    local -a main_args
    read -r -a main_args <<<"$OPT_MAIN_ARGS"
    if [[ ${EXTRA_ARGS[*]+"${EXTRA_ARGS[*]:0:${#main_args[@]}}"} != "${main_args[*]}" ]]; then
      EXTRA_ARGS=("${main_args[@]}" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
    fi
  fi
}

require() {
  local key var
  for key in "$@"; do
    var="OPT_$key"
    [[ -n ${!var} ]] || die "missing $(flag_of "$key") (or $key= in the env file)"
  done
}

dry() { [[ $OPT_DRY_RUN == 1 ]]; }

# Single-quote a word the way Python's shlex.quote does, so dry-run lines split back exactly.
quote() {
  local s=$1 q="'\"'\"'"
  if [[ -z $s ]]; then
    printf "''"
  elif [[ $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/$q}"
  fi
}

quote_args() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(quote "$a")"; done
  printf '%s' "$out"
}

# Runs a command, or in dry-run prints it as one shell-quoted line on stdout.
run() {
  if dry; then
    printf '%s%s\n' "$DRYRUN_PREFIX" "$(quote_args "$@")"
    return 0
  fi
  printf '+ %s\n' "$(quote_args "$@")" >&2
  "$@"
}

# Sleeps for real, but only shows the sleep in dry-run (back-off schedules stay visible in tests).
pause() {
  if dry; then run sleep "$1"; else sleep "$1"; fi
}

# --- TPU facts ---------------------------------------------------------------------------

# Validates OPT_ACCELERATOR; sets TPU_FAMILY, TPU_HOSTS and TPU_DEFAULT_RUNTIME.
# v4/v5p names count TensorCores (2 per chip, 4 chips per host); v5e/v6e names count chips,
# with 1, 4 and 8 on one host and 4 chips per host above that.
tpu_accelerator_info() {
  local acc=$OPT_ACCELERATOR n
  local hint="use v4-N or v5p-N (N a multiple of 8), or v5litepod-N / v6e-N (N in 1 4 8 16 32 64 128 256)"
  [[ -n $acc ]] || die "missing --accelerator (or ACCELERATOR= in the env file): $hint"
  n=${acc##*-}
  [[ $acc == *-* && $n =~ ^[0-9]+$ ]] || die "unknown accelerator '$acc': $hint"
  n=$((10#$n))
  case ${acc%-*} in
    v4 | v5p)
      TPU_FAMILY=${acc%-*}
      local max=4096
      [[ $TPU_FAMILY == v5p ]] && max=12288
      ((n >= 8 && n % 8 == 0 && n <= max)) || die "unknown accelerator '$acc': $hint"
      TPU_HOSTS=$((n / 8))
      if [[ $TPU_FAMILY == v4 ]]; then TPU_DEFAULT_RUNTIME=tpu-ubuntu2204-base; else TPU_DEFAULT_RUNTIME=v2-alpha-tpuv5; fi
      ;;
    v5litepod | v6e)
      case $n in 1 | 4 | 8 | 16 | 32 | 64 | 128 | 256) ;; *) die "unknown accelerator '$acc': $hint" ;; esac
      if ((n <= 8)); then TPU_HOSTS=1; else TPU_HOSTS=$((n / 4)); fi
      if [[ ${acc%-*} == v5litepod ]]; then
        TPU_FAMILY=v5e
        TPU_DEFAULT_RUNTIME=v2-alpha-tpuv5-lite
      else
        TPU_FAMILY=v6e
        TPU_DEFAULT_RUNTIME=v2-alpha-tpuv6e
      fi
      ;;
    *) die "unknown accelerator '$acc': $hint" ;;
  esac
  : "${OPT_RUNTIME_VERSION:=$TPU_DEFAULT_RUNTIME}"
}

# Checks the settings every TPU command needs and builds GSCOPE (zone and project flags).
tpu_settings() {
  require PROJECT ZONE NAME
  [[ $OPT_NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    die "--name='$OPT_NAME' is not a valid TPU name (lowercase letters, digits and '-', starting with a letter)"
  case $OPT_MODE in qr | vm) ;; *) die "--mode must be qr or vm, not '$OPT_MODE'" ;; esac
  GSCOPE=("--zone=$OPT_ZONE" "--project=$OPT_PROJECT")
}

# Remote paths are relative to the worker's home (where ssh starts); refuse ones that could
# make the `rm -rf` of a re-install hit something else.
check_remote_path() {
  local flag=$1 path=$2
  [[ $path =~ ^[A-Za-z0-9_][A-Za-z0-9_./-]*$ && $path != *..* ]] ||
    die "$flag='$path' must be a plain path below the home directory (letters, digits, _ . / -; no ..)"
}

# Multi-host slices need a workdir every host sees and that outlives the VMs: GCS.
check_tpu_workdir() {
  require WORKDIR
  if [[ $OPT_WORKDIR != gs://* ]]; then
    if ((TPU_HOSTS > 1)); then
      die "--workdir='$OPT_WORKDIR' is not a gs:// path, but $OPT_ACCELERATOR has $TPU_HOSTS hosts: all hosts write one checkpoint, so use gs://BUCKET/PATH"
    fi
    log "warning: --workdir='$OPT_WORKDIR' lives on the TPU VM's disk and is lost when the TPU is deleted or preempted"
  fi
}

# --- gcloud steps (shared by the scripts and the supervisor) ------------------------------

check_capacity_flags() {
  if [[ $OPT_MODE == qr ]]; then
    [[ $OPT_PREEMPTIBLE == 0 ]] || die "--preemptible is for --mode=vm; queued resources use --spot"
  else
    [[ $OPT_RESERVED == 0 ]] || die "--reserved is for --mode=qr"
  fi
  if [[ $OPT_SPOT == 1 && $OPT_PREEMPTIBLE == 1 ]]; then die "choose one of --spot and --preemptible"; fi
}

tpu_create() {
  local cmd
  check_capacity_flags
  if [[ $OPT_MODE == qr ]]; then
    cmd=(gcloud compute tpus queued-resources create "$OPT_NAME" "--node-id=$OPT_NAME" "${GSCOPE[@]}"
      "--accelerator-type=$OPT_ACCELERATOR" "--runtime-version=$OPT_RUNTIME_VERSION")
    [[ $OPT_RESERVED == 1 ]] && cmd+=(--reserved)
  else
    cmd=(gcloud compute tpus tpu-vm create "$OPT_NAME" "${GSCOPE[@]}"
      "--accelerator-type=$OPT_ACCELERATOR" "--version=$OPT_RUNTIME_VERSION")
    [[ $OPT_PREEMPTIBLE == 1 ]] && cmd+=(--preemptible)
  fi
  [[ $OPT_SPOT == 1 ]] && cmd+=(--spot)
  [[ -n $OPT_NETWORK ]] && cmd+=("--network=$OPT_NETWORK")
  [[ -n $OPT_SUBNETWORK ]] && cmd+=("--subnetwork=$OPT_SUBNETWORK")
  run "${cmd[@]}"
}

tpu_delete() {
  if [[ $OPT_MODE == qr ]]; then
    # --force also deletes the TPU node that the queued resource holds.
    run gcloud compute tpus queued-resources delete "$OPT_NAME" "${GSCOPE[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$OPT_NAME" "${GSCOPE[@]}" --quiet
  fi
}

# Dry-run state simulation: each poll takes the next entry of --simulate-states; once they run
# out the TPU is up and the job has finished (so a simulated supervisor run always ends).
SIM_INDEX=0
sim_states_left() {
  local IFS=,
  local -a states
  read -r -a states <<<"$OPT_SIMULATE_STATES"
  ((SIM_INDEX < ${#states[@]}))
}
sim_next_state() {
  local IFS=,
  local -a states
  read -r -a states <<<"$OPT_SIMULATE_STATES"
  if ((SIM_INDEX < ${#states[@]})); then
    STATE=${states[$SIM_INDEX]}
    SIM_INDEX=$((SIM_INDEX + 1))
  else
    STATE=$(tpu_up_state)
  fi
}

tpu_up_state() { if [[ $OPT_MODE == qr ]]; then echo ACTIVE; else echo READY; fi; }

# Sets STATE: the queued resource's state.state (qr) or the node's state (vm), NOT_FOUND when
# it does not exist, UNKNOWN when gcloud failed otherwise (network, auth: retried, never acted on).
# `tpu_state gone` is the post-delete check; in dry-run it does not consume a simulated state.
tpu_state() {
  local cmd
  if [[ $OPT_MODE == qr ]]; then
    cmd=(gcloud compute tpus queued-resources describe "$OPT_NAME" "${GSCOPE[@]}" '--format=value(state.state)')
  else
    cmd=(gcloud compute tpus tpu-vm describe "$OPT_NAME" "${GSCOPE[@]}" '--format=value(state)')
  fi
  if dry; then
    run "${cmd[@]}"
    if [[ ${1:-} == gone ]]; then STATE=NOT_FOUND; else sim_next_state; fi
    return 0
  fi
  local out errfile
  errfile=$(mktemp)
  if out=$("${cmd[@]}" 2>"$errfile"); then
    STATE=$(printf '%s' "$out" | tr -d '[:space:]')
    [[ -n $STATE ]] || STATE=UNKNOWN
  elif grep -qiE 'NOT_FOUND|not found' "$errfile"; then
    STATE=NOT_FOUND
  else
    STATE=UNKNOWN
    log "describe failed: $(tr '\n' ' ' <"$errfile")"
  fi
  rm -f "$errfile"
}

# Polls until the TPU is usable; fails on FAILED/SUSPENDED/PREEMPTED and after WAIT_TIMEOUT.
tpu_wait_up() {
  local up start=$SECONDS
  up=$(tpu_up_state)
  while true; do
    tpu_state
    case $STATE in
      "$up") log "$OPT_NAME is $STATE"; return 0 ;;
      FAILED | SUSPENDING | SUSPENDED | PREEMPTED | TERMINATED | NOT_FOUND)
        die "$OPT_NAME is $STATE while waiting for $up" ;;
    esac
    if ((OPT_WAIT_TIMEOUT > 0 && SECONDS - start >= OPT_WAIT_TIMEOUT)); then
      die "$OPT_NAME still $STATE after ${OPT_WAIT_TIMEOUT}s"
    fi
    log "$OPT_NAME is $STATE; polling again in ${OPT_POLL_SECONDS}s"
    pause "$OPT_POLL_SECONDS"
  done
}

tpu_wait_gone() {
  while true; do
    tpu_state gone
    [[ $STATE == NOT_FOUND ]] && return 0
    log "$OPT_NAME is $STATE; waiting for the deletion"
    pause "$OPT_POLL_SECONDS"
  done
}

tpu_ssh() {
  local worker=$1 command=$2
  run gcloud compute tpus tpu-vm ssh "$OPT_NAME" "${GSCOPE[@]}" "--worker=$worker" "--command=$command"
}

tpu_scp() {
  local src=$1 dest=$2
  run gcloud compute tpus tpu-vm scp "$src" "$OPT_NAME:$dest" "${GSCOPE[@]}" --worker=all
}

is_git_url() { [[ $1 =~ ^(https?|ssh|git)://|^[A-Za-z0-9._-]+@[A-Za-z0-9._-]+: ]]; }

# The jax pin of the repository: `jax==V` in constraints.txt (the tested set, which the workers install with), else
# `jax==V` or `jax>=V` in requirements.txt.
resolve_jax_version() {
  [[ -n $OPT_JAX_VERSION ]] && return 0
  local root=$REPO_ROOT req
  if ! is_git_url "$OPT_REPO" && [[ -f $OPT_REPO/requirements.txt || -f $OPT_REPO/constraints.txt ]]; then root=$OPT_REPO; fi
  req=$root/requirements.txt
  [[ -f $root/constraints.txt ]] && req=$root/constraints.txt
  OPT_JAX_VERSION=$(sed -nE 's/^jax(\[[^]]*\])? *(==|>=|~=) *([0-9][0-9A-Za-z.]*).*/\3/p' "$req" 2>/dev/null | head -n 1)
  [[ -n $OPT_JAX_VERSION ]] || die "no jax pin found in $req; pass --jax-version"
}

# Copies the project to every worker and installs it there (launch/worker_install.sh).
tpu_install() {
  check_remote_path --remote-dir "$OPT_REMOTE_DIR"
  check_remote_path --venv "$OPT_VENV"
  resolve_jax_version
  local dir=$OPT_REMOTE_DIR fetch
  if is_git_url "$OPT_REPO"; then
    fetch="rm -rf $(quote "$dir.new") && git clone --quiet $(quote "$OPT_REPO") $(quote "$dir.new")"
    [[ -n $OPT_GIT_REF ]] && fetch+=" && git -C $(quote "$dir.new") checkout --quiet $(quote "$OPT_GIT_REF")"
  else
    git -C "$OPT_REPO" rev-parse --git-dir >/dev/null 2>&1 ||
      die "--repo='$OPT_REPO' is neither a git checkout nor a git URL"
    # `git stash create` snapshots tracked files with uncommitted edits without touching the
    # stash or the work tree; dry-run does not write even that, so it shows HEAD.
    local ref=HEAD archive=${TMPDIR:-/tmp}/codi_jax-$OPT_NAME.tar.gz
    if ! dry; then
      ref=$(git -C "$OPT_REPO" stash create)
      ref=${ref:-HEAD}
      if [[ -n $(git -C "$OPT_REPO" ls-files --others --exclude-standard) ]]; then
        log "warning: untracked files in $OPT_REPO are not copied (git add them, or pass an outside --config)"
      fi
    fi
    run git -C "$OPT_REPO" archive --format=tar.gz "--output=$archive" "$ref"
    tpu_scp "$archive" codi_jax_src.tar.gz
    dry || rm -f "$archive"
    fetch="rm -rf $(quote "$dir.new") && mkdir -p $(quote "$dir.new") && tar -xzf codi_jax_src.tar.gz -C $(quote "$dir.new") && rm -f codi_jax_src.tar.gz"
  fi
  local install
  install=$(quote_args bash launch/worker_install.sh "--venv=$OPT_VENV" "--jax-version=$OPT_JAX_VERSION" \
    ${OPT_PYTHON:+"--python=$OPT_PYTHON"} ${OPT_PIP_EXTRA:+"--pip-extra=$OPT_PIP_EXTRA"})
  tpu_ssh all "$fetch && rm -rf $(quote "$dir") && mv $(quote "$dir.new") $(quote "$dir") && cd $(quote "$dir") && $install"
}

# The folder the config path is relative to on this machine: the local checkout that travels (REPO), or this one when
# REPO is a git URL.
local_config_dir() {
  if ! is_git_url "$OPT_REPO" && [[ -d $OPT_REPO ]]; then (cd "$OPT_REPO" && pwd); else printf '%s' "$REPO_ROOT"; fi
}

# The config as the workers see it. A config file inside REPO travels with the code; one from
# elsewhere is copied next to it (as _launch_config_<name>) on every worker.
resolve_config() {
  require CONFIG
  local file=${OPT_CONFIG%%:*} variant="" abs repo_abs
  [[ $OPT_CONFIG == *:* ]] && variant=:${OPT_CONFIG#*:}
  CONFIG_UPLOAD=""
  REMOTE_CONFIG=$OPT_CONFIG
  if is_git_url "$OPT_REPO"; then
    if [[ -f $file && $file == /* ]]; then
      CONFIG_UPLOAD=$file
      REMOTE_CONFIG=_launch_config_$(basename "$file")$variant
    fi
    return 0
  fi
  repo_abs=$(cd "$OPT_REPO" 2>/dev/null && pwd) || die "--repo='$OPT_REPO' does not exist"
  if [[ -f $repo_abs/$file && $file != /* ]]; then
    return 0
  fi
  [[ -f $file ]] || die "config file not found: '$file' (neither in $repo_abs nor as a path)"
  abs=$(cd "$(dirname "$file")" && pwd)/$(basename "$file")
  if [[ $abs == "$repo_abs"/* ]]; then
    REMOTE_CONFIG=${abs#"$repo_abs"/}$variant
  else
    CONFIG_UPLOAD=$abs
    REMOTE_CONFIG=_launch_config_$(basename "$file")$variant
  fi
}

# Starts codi_jax.main on every worker at once, detached (launch/worker_train.sh start).
tpu_start() {
  check_remote_path --remote-dir "$OPT_REMOTE_DIR"
  check_remote_path --venv "$OPT_VENV"
  check_remote_path --log-dir "$OPT_LOG_DIR"
  check_tpu_workdir
  train_env_entries
  resolve_config
  check_config "$OPT_LOCAL_PYTHON" "$(local_config_dir)"
  if [[ -n $CONFIG_UPLOAD ]]; then
    tpu_scp "$CONFIG_UPLOAD" "$OPT_REMOTE_DIR/${REMOTE_CONFIG%%:*}"
  fi
  # CODI_TPU_HOSTS tells codi_jax.main the slice size: gcloud-made TPU VMs keep the worker list
  # in the metadata server, not in the environment.
  local start train_env="CODI_TPU_HOSTS=$TPU_HOSTS${OPT_TRAIN_ENV:+;$OPT_TRAIN_ENV}"
  start=$(quote_args bash launch/worker_train.sh start "--venv=$OPT_VENV" "--log-dir=$OPT_LOG_DIR" \
    "--config=$REMOTE_CONFIG" "--workdir=$OPT_WORKDIR" "--train-env=$train_env" \
    -- ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
  tpu_ssh all "cd $(quote "$OPT_REMOTE_DIR") && $start"
}

# Sets JOB from every worker's status (running, exit N, terminated N, dead, none): the first
# failure if any worker failed, else running if any runs, else none if any has no job, else
# `exit 0` when all finished; `unknown` when ssh failed or not every host answered. Asking all
# workers matters: a host that got SIGTERM ends `terminated 0` while the others end `exit 0`.
# Dry-run: `none` for the adoption check, then `running` while simulated states remain.
# shellcheck disable=SC2034  # JOB is the result, read by the callers
tpu_job_status() {
  local status_cmd out line n=0 failed="" running=0 none=0
  status_cmd="cd $(quote "$OPT_REMOTE_DIR") && $(quote_args bash launch/worker_train.sh status "--log-dir=$OPT_LOG_DIR")"
  if dry; then
    tpu_ssh all "$status_cmd"
    if [[ ${1:-} == adopt ]]; then
      JOB=none
    elif sim_states_left; then
      JOB=running
    else
      JOB="exit 0"
    fi
    return 0
  fi
  JOB=unknown
  out=$(gcloud compute tpus tpu-vm ssh "$OPT_NAME" "${GSCOPE[@]}" --worker=all "--command=$status_cmd" 2>/dev/null) ||
    return 0
  while IFS= read -r line; do
    line=$(printf '%s' "$line" | tr -d '\r')
    [[ $line =~ ^(running|dead|none|exit\ [0-9]+|terminated\ [0-9]+)$ ]] || continue
    n=$((n + 1))
    case $line in
      running) running=1 ;;
      none) none=1 ;;
      "exit 0") ;;
      *) [[ -n $failed ]] || failed=$line ;;
    esac
  done <<<"$out"
  ((n > 0)) || return 0
  if [[ -n $failed ]]; then
    JOB=$failed
  elif ((n < ${TPU_HOSTS:-1})); then
    return 0
  elif ((running)); then
    JOB=running
  elif ((none)); then
    JOB=none
  else
    JOB="exit 0"
  fi
}

# Stops the trainer on every worker (SIGTERM, so it can checkpoint; SIGKILL after --stop-timeout).
tpu_stop() {
  tpu_ssh all "cd $(quote "$OPT_REMOTE_DIR") && $(quote_args bash launch/worker_train.sh stop "--log-dir=$OPT_LOG_DIR" "--stop-timeout=$OPT_STOP_TIMEOUT")"
}

# --- the config, checked on this machine first ---------------------------------------------

# check_config PYTHON DIR [soft]: `PYTHON -m codi_jax.main --check` in DIR with the launch's config, workdir and main
# flags, so that a config a run would refuse (no teacher, no dataset, a misspelt field, a bad value) stops the launch
# in one line here, before a TPU is created, software installed or a job started. It runs for real in dry-run too (it
# only reads). Paths inside the config are not opened: they are the workers'. Returns 0 when the config is fine or the
# check is off (--no-check); dies with main's line when it is not. Without the requirements in PYTHON it dies with how
# to install them, or with `soft` returns 3 (gpu_local.sh then checks after its install).
check_config() {
  local py=$1 dir=$2 mode=${3:-} out status=0 line
  if [[ $OPT_CHECK != 1 ]]; then
    log "config not checked here (--no-check)"
    return 0
  fi
  require CONFIG
  local file=${OPT_CONFIG%%:*} config=$OPT_CONFIG
  if [[ $file != /* && ! -f $dir/$file ]]; then
    if [[ ! -f $file ]]; then
      log "warning: $file is not in $dir, so the config is checked on the workers only (when the run starts)"
      return 0
    fi
    config=$(cd "$(dirname "$file")" && pwd)/$(basename "$file")${OPT_CONFIG:${#file}}  # a file outside the repo
  fi
  out=$(cd "$dir" && TF_CPP_MIN_LOG_LEVEL=3 JAX_PLATFORMS=cpu "$py" -m codi_jax.main --check "--config=$config" \
    "--workdir=${OPT_WORKDIR:-not-given}" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} 2>&1) || status=$?
  if ((status == 0)); then
    log "${out##*$'\n'}"
    return 0
  fi
  if [[ $status == 127 || $out == *"No module named"* || $out == *"ModuleNotFoundError"* ]]; then
    [[ $mode == soft ]] && return 3
    die "cannot check the config here: '$py' lacks codi_jax's requirements (pip install -r requirements.txt, or --local-python=PYTHON), or skip the check with --no-check"
  fi
  # main's one line ("error: config.teacher: ..."), as this script's error.
  line=$(printf '%s\n' "$out" | grep '^error: ' | tail -n 1)
  [[ -n $line ]] || die "config check failed (python -m codi_jax.main --check, status $status): $out"
  die "${line#error: }"
}

# --- Python environment (TPU workers and GPU hosts) ---------------------------------------

# Sets PY to an interpreter >= 3.11 (jax's floor), from --python or the usual names.
find_python() {
  local cand
  for cand in ${OPT_PYTHON:-python3.12 python3.11 python3}; do
    if command -v "$cand" >/dev/null 2>&1 &&
      "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      PY=$cand
      return 0
    fi
  done
  return 1
}

# Splits and checks --train-env into TRAIN_ENV_ENTRIES.
train_env_entries() {
  local kv entries
  TRAIN_ENV_ENTRIES=()
  IFS=';' read -r -a entries <<<"$OPT_TRAIN_ENV"
  for kv in ${entries[@]+"${entries[@]}"}; do
    kv=${kv#"${kv%%[![:space:]]*}"}
    [[ -z $kv ]] && continue
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--train-env entry '$kv' is not KEY=VALUE"
    TRAIN_ENV_ENTRIES+=("$kv")
  done
}

# The trainer command line; PY must point at the environment's python.
main_command() {
  train_env_entries
  MAIN_CMD=(env PYTHONUNBUFFERED=1 ${TRAIN_ENV_ENTRIES[@]+"${TRAIN_ENV_ENTRIES[@]}"})
  MAIN_CMD+=("$PY" -m codi_jax.main "--config=$OPT_CONFIG" "--workdir=$OPT_WORKDIR" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
}

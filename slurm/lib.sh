# shellcheck shell=bash
# Shared by the slurm/*.sbatch scripts (sourced, after they have found REPO). Not a job script itself.
#
# tf_setup_env       SETUP, PYTHON, PYTHONPATH, threads, unbuffered output; fails loudly when PYTHON is missing
# tf_submit_self     outside a job: submit the calling script with the settings variables, then exit
# tf_run CMD...      run the training step, forward signals to it, and requeue the job after a checkpoint-and-stop

tf_log() { echo "[slurm $(date +%H:%M:%S)] $*"; }
tf_die() { echo "[slurm] error: $1" >&2; exit "${2:-1}"; }

tf_setup_env() {
  if [ -n "${SETUP:-}" ]; then  # site commands, e.g. SETUP="module load cuda/12.4 nccl"
    tf_log "setup: $SETUP"
    eval "$SETUP" || tf_die "SETUP failed: $SETUP"
  fi
  PYTHON=${PYTHON:-$REPO/.venv/bin/python}
  [ -x "$PYTHON" ] || tf_die "PYTHON=$PYTHON is not an executable; set PYTHON=/path/to/python (a venv with requirements.txt)"
  export PYTHON
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # tokenformer_mp importable from any working directory
  export PYTHONUNBUFFERED=1                               # progress reaches the log as it happens
  export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}         # the progress bar redraws at most every 30 s in a log
  if [ -z "${OMP_NUM_THREADS:-}" ]; then                  # CPU threads per task: the task's share of the node
    local per_node=${SLURM_NTASKS_PER_NODE:-1}
    per_node=${per_node%%(*}; per_node=${per_node%%,*}
    local cpus=${SLURM_CPUS_PER_TASK:-$(( ${SLURM_CPUS_ON_NODE:-1} / (per_node > 0 ? per_node : 1) ))}
    export OMP_NUM_THREADS=$(( cpus > 0 ? cpus : 1 ))
  fi
  # Since Slurm 22.05 srun no longer inherits --cpus-per-task from the job: pass it on explicitly.
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ] && [ -z "${SRUN_CPUS_PER_TASK:-}" ]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
  fi
}

tf_print_nccl() {  # NCCL/network variables are never set here; show the ones the user exported
  local v
  v=$(env | grep -E '^(NCCL_|GLOO_SOCKET_IFNAME|TP_SOCKET_IFNAME|UCX_|FI_)' | sort | tr '\n' ' ')
  tf_log "network settings from the environment: ${v:-none (library defaults)}"
}

# Outside a job: build the sbatch command from the settings variables and submit the calling script ($1) with
# the remaining arguments. Defaults: what sbatch and the cluster give when an option is left out.
tf_submit_self() {
  local script=$1; shift
  local -a opts=()
  [ -n "${JOB_NAME:-}" ] && opts+=(--job-name="$JOB_NAME")
  [ -n "${NODES:-}" ] && opts+=(--nodes="$NODES")
  [ -n "${TASKS_PER_NODE:-}" ] && opts+=(--ntasks-per-node="$TASKS_PER_NODE")
  [ -n "${CPUS_PER_TASK:-}" ] && opts+=(--cpus-per-task="$CPUS_PER_TASK")
  [ -n "${GPUS_PER_NODE:-}" ] && [ "$GPUS_PER_NODE" != 0 ] && opts+=(--gpus-per-node="$GPUS_PER_NODE")
  [ -n "${MEM:-}" ] && opts+=(--mem="$MEM")
  [ -n "${ACCOUNT:-}" ] && opts+=(--account="$ACCOUNT")
  [ -n "${PARTITION:-}" ] && opts+=(--partition="$PARTITION")
  [ -n "${TIME:-}" ] && opts+=(--time="$TIME")
  # shellcheck disable=SC2206  # SBATCH_EXTRA is a list of options, split on spaces on purpose
  [ -n "${SBATCH_EXTRA:-}" ] && opts+=($SBATCH_EXTRA)
  mkdir -p logs  # the scripts' default --output is logs/%x-%j.out, and Slurm does not create directories
  echo "+ sbatch ${opts[*]} $script $*" >&2
  exec sbatch "${opts[@]}" "$script" "$@"
}

TF_GOT_SIGNAL=""
TF_STEP_PID=""
_tf_on_usr1() {
  TF_GOT_SIGNAL=USR1
  tf_log "batch shell got SIGUSR1: forwarding it to the training step (checkpoint, then stop)"
  [ -n "$TF_STEP_PID" ] && kill -USR1 "$TF_STEP_PID" 2>/dev/null
}
_tf_on_term() {
  TF_GOT_SIGNAL=TERM
  tf_log "batch shell got SIGTERM (scancel, time limit or preemption): Slurm signals the ranks too; no requeue from here"
}

# Run the step in the background (a trap only runs between commands, so a foreground srun would delay it until
# training ended), wait for it through any signals, and act on its exit code:
#   0 done; 124 the ranks saved a checkpoint on a signal and stopped: requeue this job, which resumes from
#   checkpoints/latest with the same command; anything else: fail the job with that code (2 config error,
#   3 divergence; the trainer's "error: ..." line is in the log just above).
# Exit 4: the hang watchdog ended a step that did not finish ('error: hang ...' above names the ranks, RUN/hang/
# holds every rank's stacks). A bad node or a transient fault: requeue, at most HANG_REQUEUES times for this job
# (default 1; 0 never), counted in TF_STATE_DIR (default the submit directory) across its requeues; then fail with 4.
tf_after_hang() {
  local count_file="${TF_STATE_DIR:-${SLURM_SUBMIT_DIR:-.}}/.tokenformer_hang_requeues.${SLURM_JOB_ID:-0}"
  local done_before
  done_before=$(cat "$count_file" 2>/dev/null || echo 0)
  if [ "$done_before" -ge "${HANG_REQUEUES:-1}" ]; then
    tf_log "training step hung (exit 4, see 'error: hang' above); not requeued: $done_before requeue(s) after a" \
           "hang already (HANG_REQUEUES=${HANG_REQUEUES:-1})"
    exit 4
  fi
  echo $((done_before + 1)) > "$count_file"
  tf_log "training step hung (exit 4, see 'error: hang' above); requeueing job ${SLURM_JOB_ID:-?} (hang requeue" \
         "$((done_before + 1)) of HANG_REQUEUES=${HANG_REQUEUES:-1}): it resumes from checkpoints/latest"
  scontrol requeue "${SLURM_JOB_ID:-}" || tf_log "scontrol requeue failed: submit the same command again to resume"
  exit 4
}

tf_run() {
  trap _tf_on_usr1 USR1
  trap _tf_on_term TERM
  tf_log "launch: $*"
  "$@" &
  TF_STEP_PID=$!
  while kill -0 "$TF_STEP_PID" 2>/dev/null; do wait "$TF_STEP_PID"; done
  wait "$TF_STEP_PID"; local rc=$?  # bash keeps the status of a reaped background job
  TF_STEP_PID=""
  if { [ "$rc" = 143 ] || [ "$rc" = 137 ]; } && [ -n "$TF_GOT_SIGNAL" ]; then
    # After a forwarded signal the ranks leave with 124 one by one, each once the checkpoint is complete on all;
    # srun --kill-on-bad-exit takes the first 124 as a failure and terminates the ranks still exiting. Resuming
    # takes the newest complete checkpoint whatever happened, so this is the signal's stop.
    tf_log "training step ended (exit $rc) after the $TF_GOT_SIGNAL: ranks still exiting were terminated by srun"
    rc=124
  fi
  case $rc in
    0) tf_log "training step finished (exit 0)"; return 0 ;;
    124) ;;
    2) tf_log "training step failed: exit 2, a config error (see 'error:' above)"; exit 2 ;;
    3) tf_log "training step failed: exit 3, the loss diverged (see 'error:' above)"; exit 3 ;;
    4) tf_after_hang ;;
    *) tf_log "training step failed: exit $rc"; exit "$rc" ;;
  esac
  local restarts=${SLURM_RESTART_COUNT:-0}
  if [ "$TF_GOT_SIGNAL" = TERM ]; then
    tf_log "checkpoint saved after SIGTERM; not requeued here (a preempted job is requeued by Slurm itself;" \
           "otherwise submit the same command again: it resumes from checkpoints/latest)"
    exit 124
  fi
  if [ "$restarts" -ge "${MAX_REQUEUES:-20}" ]; then
    tf_log "checkpoint saved; not requeued: restart $restarts reached MAX_REQUEUES=${MAX_REQUEUES:-20}"
    exit 124
  fi
  tf_log "checkpoint saved on a signal; requeueing job $SLURM_JOB_ID (restart $((restarts + 1))): it resumes from checkpoints/latest"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    tf_log "scontrol requeue failed (submitted with --no-requeue?): submit the same command again to resume"
  fi
  exit 124
}

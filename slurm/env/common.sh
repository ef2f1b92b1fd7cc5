# Sourced by slurm/*.sh inside the batch shell: settings every cluster shares, the rendezvous address and
# helpers. The per-cluster profile (slurm/env/${FACESCALE_CLUSTER:-default}.sh) is sourced after this file
# and may override anything here.

export PYTHONUNBUFFERED=1          # log lines reach the job's output file as they are written
export PYTHONFAULTHANDLER=1        # Python stacks on SIGSEGV/SIGABRT (e.g. a NCCL abort)
FACESCALE_OMP_GIVEN=${OMP_NUM_THREADS:-}  # set by the user: kept as given by every launch script
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

# NCCL error handling: tear down on a failed or timed-out collective (3 = PyTorch's default; the new
# TORCH_NCCL_* names only) and dump the flight recorder of every rank into the run directory on timeout.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}
export TORCH_FR_BUFFER_SIZE=${TORCH_FR_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# srun in Slurm >= 22.05 no longer inherits --cpus-per-task from the allocation.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi

# Rendezvous: the first host of the job; a port derived from the job id and the requeue count, as
# launcher/ports.py's job_port (below Linux's ephemeral ports; concurrent jobs on shared nodes and a requeued
# job, same id, get different ports unless their ids collide modulo the 12000-port span).
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
MASTER_PORT=${MASTER_PORT:-$((20000 + (SLURM_JOB_ID + 7919 * ${SLURM_RESTART_COUNT:-0}) % 12000))}
export MASTER_ADDR MASTER_PORT

# The interpreter: $PYTHON, else the repository's .venv (made by `make venv`), else python3 on PATH.
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=$PWD/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON

facescale_banner() {
  # One block at the top of every (re)start: what ran where, for post-mortems.
  echo "=== facescale job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} $(date -Is)"
  echo "    nodes ${SLURM_JOB_NODELIST} (${SLURM_JOB_NUM_NODES} x ${SLURM_NTASKS_PER_NODE:-?} tasks)" \
       "gpus/node ${SLURM_GPUS_ON_NODE:-0} master ${MASTER_ADDR}:${MASTER_PORT}"
  echo "    repo $(git rev-parse --short HEAD 2>/dev/null || echo '?') config ${CONFIG} run_dir ${RUN_DIR}"
  echo "    python ${PYTHON} cluster profile ${FACESCALE_CLUSTER:-default}"
}

facescale_torchrun_grace() {
  # Prints torchrun's --shutdown-timeout option (how long its agent lets the ranks finish a checkpoint after
  # SIGTERM before SIGKILL; FACESCALE_SHUTDOWN_TIMEOUT, default 300 s; Slurm itself kills the step KillWait
  # seconds after its SIGTERM, 30 by default, whichever comes first), or nothing with a warning where this
  # torch's torchrun has no such option (torch 2.11's: its agent waits 30 s).
  local grace=${FACESCALE_SHUTDOWN_TIMEOUT:-300} usage
  usage=$("$PYTHON" -m torch.distributed.run --help 2>&1 || true)
  if [[ "$usage" == *--shutdown-timeout* ]]; then
    echo "--shutdown-timeout=$grace"
  else
    echo "=== warning: $PYTHON's torchrun has no --shutdown-timeout: after SIGTERM (time limit, scancel) the" \
         "ranks get its fixed 30 s to save, not ${grace} s; preemption by --signal=USR2 is not affected" >&2
  fi
}

facescale_wait_step() {
  # $1 = pid of the backgrounded `srun` step. With --signal=B:SIG the batch shell gets the signal: pass it on
  # to the training tasks. SIGTERM (time limit, scancel, preemption) reaches the tasks from Slurm itself; they
  # save and exit with 143 (no requeue: a cancelled job stays cancelled; Slurm requeues a preempted one itself
  # where its PreemptMode says so) within Slurm's KillWait (30 s by default; GraceTime for preemption), after
  # which it kills them; the shell stays alive to report. Ends with facescale_requeue_or_exit on the step's
  # exit code.
  local pid=$1 rc=0
  trapped=0
  trap 'trapped=1; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
  trap 'trapped=1; scancel --signal=USR2 "$SLURM_JOB_ID"' USR2
  trap 'trapped=1; echo "=== batch shell got SIGTERM; waiting for the training step"' TERM
  while :; do
    trapped=0
    rc=0
    wait "$pid" || rc=$?
    [[ "$trapped" -eq 1 ]] || break
  done
  facescale_requeue_or_exit "$rc"
}

facescale_requeue_or_exit() {
  # $1 = exit code of the training step. Code 3 (launcher/preemption.py) or the requeue marker means
  # "checkpoint saved, please restart me": requeue the same job id (same run directory -> resume).
  local rc=$1 marker=${FACESCALE_REQUEUE_MARKER:-}
  local wanted=0
  if [[ "$rc" -eq 3 ]]; then wanted=1; fi
  if [[ "$rc" -ne 0 && -n "$marker" && -f "$marker" ]]; then wanted=1; fi
  if [[ -n "$marker" ]]; then rm -f "$marker"; fi
  if [[ "$wanted" -eq 1 ]]; then
    if [[ "${SLURM_RESTART_COUNT:-0}" -ge "${MAX_REQUEUES:-20}" ]]; then
      echo "=== preempted again but already requeued ${SLURM_RESTART_COUNT} times (MAX_REQUEUES); giving up"
      exit 3
    fi
    echo "=== training saved a checkpoint for preemption (rc=$rc): requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "=== training ended with exit code $rc at $(date -Is)"
  if [[ "$rc" -ne 0 ]]; then  # a new job gets a new default run directory: say how to go on with this one
    echo "=== to resume this run after fixing the cause: RUN_DIR=$RUN_DIR CONFIG=$CONFIG sbatch <the same script>"
  fi
  exit "$rc"
}

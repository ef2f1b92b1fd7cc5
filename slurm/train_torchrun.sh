#!/bin/bash
# The torchrun-per-node pattern: one srun task per node starts `torchrun`, which starts one rank per GPU
# (c10d rendezvous at the first node). Same config, run directory, preemption and requeue contract as
# slurm/train_42m.sh; use this one where a per-node agent is wanted (e.g. containers without PMI).
#
#   sbatch slurm/train_torchrun.sh
#   SBATCH_GPUS_PER_NODE=0 NPROC_PER_NODE=2 CONFIG=configs/synthetic.yaml sbatch --nodes=2 \
#       --cpus-per-task=2 slurm/train_torchrun.sh --set schedule.steps=100
#
# Signals: Slurm's --signal (without B:) reaches every process of the step, torchrun's agent included. The
# agent has no SIGUSR1/SIGUSR2 handler and would die, killing its ranks before they save; the wrapper below
# makes the agent ignore both (the ranks install their own handlers). torchrun turns a rank's exit code 3
# into its own exit code 1, so rank 0 also writes $RUN_DIR/REQUEUE (FACESCALE_REQUEUE_MARKER) when the ranks
# agree to stop, and the batch shell requeues on that marker.
#
#SBATCH --job-name=facescale-wf42m-r100-torchrun
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR2@300
#SBATCH --requeue

set -euo pipefail
cd "${FACESCALE_ROOT:-${SLURM_SUBMIT_DIR:-.}}"
source slurm/env/job.sh
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
[[ "$NPROC_PER_NODE" -gt 0 ]] || NPROC_PER_NODE=1
# the node's task holds every rank of the node: its CPUs shared among them (torchrun keeps a value it finds)
if [[ -z "$FACESCALE_OMP_GIVEN" ]]; then
  OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-$NPROC_PER_NODE} / NPROC_PER_NODE ))
  export OMP_NUM_THREADS=$(( OMP_NUM_THREADS > 0 ? OMP_NUM_THREADS : 1 ))
fi
facescale_banner
GRACE=$(facescale_torchrun_grace)  # --shutdown-timeout where this torch has it (slurm/env/common.sh)

srun --kill-on-bad-exit=1 --wait=60 --ntasks-per-node=1 \
  bash -c 'trap "" USR1 USR2; exec "$@"' facescale-agent \
  "$PYTHON" -m torch.distributed.run \
    --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$NPROC_PER_NODE" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" \
    --max_restarts=0 $GRACE \
    -m facescale train --config "$CONFIG" \
    --set "logging.run_dir=$RUN_DIR" --set checkpoint.resume=auto "$@" &
facescale_wait_step $!

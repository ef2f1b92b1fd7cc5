#!/bin/bash
# WebFace42M (2,059,906 identities, ~42M images), iresnet r100 + Partial FC, bf16, on N nodes x 8 GPUs:
# one srun task per GPU, rank layout from SLURM_* (launcher/env.py), preemption -> checkpoint -> requeue.
#
#   sbatch slurm/train_42m.sh                                 # 8 nodes x 8 GPUs (the defaults below)
#   sbatch --nodes=64 slurm/train_42m.sh --set schedule.global_batch_size=8192
#   CONFIG=configs/webface42m_vit_l.yaml FACESCALE_CLUSTER=example-ib-h100 sbatch slurm/train_42m.sh
#   # CPU-only Slurm (gloo), e.g. the synthetic config on 2 nodes x 2 ranks:
#   SBATCH_GPUS_PER_NODE=0 CONFIG=configs/synthetic.yaml sbatch --nodes=2 --ntasks-per-node=2 \
#       --cpus-per-task=1 slurm/train_42m.sh --set schedule.steps=100
#
# Arguments are passed to `facescale train` (`--set section.key=value`, after the script's own --set, so
# they win). Environment: CONFIG, RUN_DIR (default runs/<job name>-<job id>: a requeued job keeps its id,
# so it resumes from <run_dir>/checkpoints/latest), FACESCALE_CLUSTER (profile in slurm/env/), PYTHON,
# MAX_REQUEUES. A CPU cluster rejects --gpus-per-node=8 at submission; SBATCH_GPUS_PER_NODE=0 (or
# --gpus-per-node=0) overrides it, and nothing below assumes GPUs.
#
#SBATCH --job-name=facescale-wf42m-r100
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR2@300
#SBATCH --requeue

set -euo pipefail
cd "${FACESCALE_ROOT:-${SLURM_SUBMIT_DIR:-.}}"
source slurm/env/job.sh
facescale_banner

gpus=${SLURM_GPUS_ON_NODE:-0}
if [[ "$gpus" -gt 0 && "$gpus" != "${SLURM_NTASKS_PER_NODE:-$gpus}" ]]; then
  echo "=== warning: ${SLURM_NTASKS_PER_NODE} tasks per node but ${gpus} GPUs per node; use one task per GPU"
fi

srun --kill-on-bad-exit=1 --wait=60 \
  "$PYTHON" -u -m facescale train --config "$CONFIG" \
  --set "logging.run_dir=$RUN_DIR" --set checkpoint.resume=auto "$@" &
facescale_wait_step $!

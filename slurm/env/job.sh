# Sourced by both batch scripts right after `cd` into the checkout: the config, the run directory (and its
# requeue marker and NCCL flight-recorder dumps), the shared functions and the cluster profile.
CONFIG=${CONFIG:-configs/webface42m_r100.yaml}
RUN_DIR=${RUN_DIR:-${RUN_ROOT:-runs}/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
export FACESCALE_REQUEUE_MARKER=$RUN_DIR/REQUEUE
source slurm/env/common.sh
source "slurm/env/${FACESCALE_CLUSTER:-default}.sh"
mkdir -p "$RUN_DIR/comm_traces"
export TORCH_FR_DUMP_TEMP_FILE=${TORCH_FR_DUMP_TEMP_FILE:-$RUN_DIR/comm_traces/rank_}

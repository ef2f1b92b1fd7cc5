# Example cluster profile: 8x H100 nodes with 8 InfiniBand NDR HCAs and an Ethernet management network.
# Adapt the interface and HCA names to `ip -br link` / `ibv_devinfo -l` on your nodes, then submit with
# FACESCALE_CLUSTER=example-ib-h100 sbatch slurm/train_42m.sh
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-eth0}   # bootstrap traffic only; never docker0/virbr0
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-eth0}
export NCCL_IB_HCA=${NCCL_IB_HCA:-mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_IB_RETRY_CNT=${NCCL_IB_RETRY_CNT:-10}
# RoCE instead of InfiniBand: also set the GID index of the RoCEv2 address, e.g. NCCL_IB_GID_INDEX=3.
# To debug a hang or a slow start: NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET

# Cluster profile "local": the single-machine Slurm of ../shared/slurm (simulated nodes share loopback).
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo}

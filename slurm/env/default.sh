# Cluster profile "default": no fabric-specific settings; NCCL and gloo choose interfaces by themselves.
# Copy slurm/env/example-ib-h100.sh to slurm/env/<your-cluster>.sh and submit with
# FACESCALE_CLUSTER=<your-cluster> sbatch slurm/train_42m.sh to tune a real cluster.
:

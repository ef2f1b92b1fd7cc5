#!/bin/bash
# Write a DeepSpeed hostfile (`host slots=N` lines) for the current Slurm allocation, for
# `deepspeed --hostfile hostfile ...`; slots = GPUs per node, else tasks per node (launcher/hostfile.py).
#   slurm/make_hostfile.sh [hostfile] [--slots N] [--nodelist 'gpu[01-08]']
set -euo pipefail
out=$(realpath -m "${1:-hostfile}")
shift || true
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m launcher.hostfile --out "$out" "$@"

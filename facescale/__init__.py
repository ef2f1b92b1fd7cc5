"""facescale: a model-parallel face recognition trainer (Partial FC and F2C heads, DeepSpeed backbones)."""

import os

# Set before torch loads its OpenMP runtime (this package is imported first by every facescale entry point):
# idle OpenMP workers then sleep instead of spinning for milliseconds after each parallel region. The head's
# CPU kernels run their own threads (heads/native.py), which spinning workers time-slice: in the head step at
# C=100k, B=128, 2 threads, the update kernel took 10-11 ms with spinning workers and 5 ms without
# (benchmarks/results/head_cpu.md runs this way). A value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

#!/usr/bin/env bash
# Wheels for `make gpu-check` on a GPU machine without network that has torch (CUDA), numpy, Pillow, PyYAML
# and pytest but not facescale's other packages: run here (with network, after `make venv`), copy .whl/ along.
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]      # default 3.12; writes .whl/ (git-ignored)
# The versions are requirements/constraints.txt's. DeepSpeed is an sdist: built here into a pure-Python wheel
# (no ops compiled). DALI is left out (its wheel is ~0.5 GB; the DALI tests skip without it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${1:-3.12}
PIP=(.venv/bin/python -m pip)
CONSTRAINTS=requirements/constraints.txt
# each package the GPU machine may lack, and what it needs that such a machine may lack too (--no-deps below)
BINARY=(webdataset braceexpand simplejpeg pydantic pydantic_core annotated-types typing-inspection hjson)
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux1_x86_64 any; do
  PLATFORMS+=(--platform "$tag")
done
rm -rf .whl && mkdir -p .whl
"${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${PLATFORMS[@]}" -c "$CONSTRAINTS" -d .whl "${BINARY[@]}"
DS_BUILD_OPS=0 "${PIP[@]}" wheel -q --no-deps --no-build-isolation -c "$CONSTRAINTS" -w .whl deepspeed
ls -1 .whl
echo "[gpu-wheels] $(du -sh .whl | cut -f1) in .whl/ for CPython $PY_VERSION; on the GPU machine:" \
  "bash benchmarks/gpu_check_here.sh RESULTS_DIR"

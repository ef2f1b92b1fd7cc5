#!/usr/bin/env bash
# `make gpu-check` on a GPU machine that has torch but not facescale's other packages, in one command:
# installs the wheels in .whl/ (benchmarks/gpu_wheels.sh; GPU_WHEELS=DIR for another folder) into a scratch
# folder, runs the check there and copies its result files (8, no data or checkpoints) into RESULTS_DIR.
#   bash benchmarks/gpu_check_here.sh RESULTS_DIR [gpu_check.py options...]
set -uo pipefail
RESULTS=$(realpath -m "${1:?usage: bash benchmarks/gpu_check_here.sh RESULTS_DIR [gpu_check.py options...]}")
shift
cd "$(dirname "$0")/.."
PYTHON=${GPU_PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/facescale_gpu_check.XXXXXX")
mkdir -p "$RESULTS"
WHEELS=${GPU_WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$WHEELS"/*.whl || { echo "[gpu-check] installing $WHEELS/ failed" >&2; exit 3; }
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -4
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" benchmarks/gpu_check.py --out "$WORK/out" "$@" 2>&1 \
  | tee "$RESULTS/gpu_check.log"
code=${PIPESTATUS[0]}
for name in summary.md gpu_check.json pytest.log head.md head.log train.log train/result.json; do
  [ -f "$WORK/out/$name" ] && cp "$WORK/out/$name" "$RESULTS/$(basename "$name")"
done
echo "[gpu-check] exit $code; results in $RESULTS (everything, data and run included: $WORK)"
exit "$code"

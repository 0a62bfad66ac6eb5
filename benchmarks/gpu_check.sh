#!/usr/bin/env bash
# The GPU check, one prepared script (about 6 minutes at most on one H100/H200):
#   versions, `pytest -m gpu tests/test_gpu.py`, benchmarks/gpu_peer.py, and (optional)
#   benchmarks/gpu_geometry.py. STEPS chooses: STEPS="pytest peer geometry" bash benchmarks/gpu_check.sh
# Run from the repository root (not pip-installed: PYTHONPATH=$PWD). Logs and JSON go to $OUT
# (default ./gpu-results). Each step has its own timeout so that one hang cannot eat the budget.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
STEPS="${STEPS:-pytest peer}"
start=$SECONDS
has() { [[ " $STEPS " == *" $1 "* ]]; }

{
  date -u
  nvidia-smi -L
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" - <<'PY'
import sys, importlib
print("python", sys.version.split()[0])
for name in ("numpy", "scipy", "cupy", "numba", "numba.cuda", "torch", "hypothesis", "pytest"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as error:
        print(name, "unavailable:", type(error).__name__, error)
try:
    import importlib.metadata as md
    print("numba-cuda", md.version("numba-cuda"))
except Exception as error:
    print("numba-cuda version unknown:", error)
import cupy
print("cupy devices", cupy.cuda.runtime.getDeviceCount(), "CUDA runtime", cupy.cuda.runtime.runtimeGetVersion())
PY
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

if has pytest; then
  echo "== pytest -m gpu (timeout 170 s)"
  timeout -k 10 170 "$PY" -m pytest -m gpu tests/test_gpu.py -x -q -ra -p no:cacheprovider \
    --junitxml="$OUT/pytest.xml" > "$OUT/pytest.log" 2>&1
  echo "pytest exit status $? after $((SECONDS - start)) s" | tee -a "$OUT/pytest.log"
  tail -n 40 "$OUT/pytest.log"
fi

if has peer; then
  left=$((330 - (SECONDS - start)))
  [ "$left" -gt 140 ] || left=140
  echo "== benchmarks/gpu_peer.py (timeout $left s)"
  timeout -k 10 "$left" "$PY" benchmarks/gpu_peer.py --json "$OUT/gpu_peer.json" > "$OUT/gpu_peer.log" 2>&1
  echo "gpu_peer exit status $? after $((SECONDS - start)) s" | tee -a "$OUT/gpu_peer.log"
  grep -v "^  File\|^    " "$OUT/gpu_peer.log" | tail -n 60
fi

if has geometry; then
  echo "== benchmarks/gpu_geometry.py (timeout 150 s)"
  timeout -k 10 150 "$PY" benchmarks/gpu_geometry.py --json "$OUT/gpu_geometry.json" > "$OUT/gpu_geometry.log" 2>&1
  echo "gpu_geometry exit status $? after $((SECONDS - start)) s" | tee -a "$OUT/gpu_geometry.log"
  grep -v "^  File\|^    " "$OUT/gpu_geometry.log" | tail -n 40
fi

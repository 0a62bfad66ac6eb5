#!/usr/bin/env bash
# The GPU check, one prepared script (at most ~9 minutes on one H100/H200; fits one device call):
#   versions, the package installed (no downloads: the device reaches no registry, so only
#   --no-deps), `pytest -m gpu` (both older GPU paths and the tensor-core path),
#   benchmarks/tensor_core_check.py (the tensor-core path against the reference on the device,
#   N = 16K and 64K), benchmarks/gpu_peer.py (times and TFLOP/s, all paths), and (optional)
#   benchmarks/gpu_geometry.py. STEPS chooses, e.g. STEPS="pytest tensorcore" bash benchmarks/gpu_check.sh
# The tensor-core kernels (backend="cupy-tensor-core") have NOT yet run on a GPU: this script is
# their first device check (issue 23).
# Run from the repository root (not pip-installed: PYTHONPATH=$PWD). Logs and JSON go to $OUT
# (default ./gpu-results): 8 files with the default STEPS, the most a device call brings back.
# Each step has its own timeout so that one hang cannot eat the budget.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
STEPS="${STEPS:-install pytest tensorcore peer}"
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

if has install; then
  echo "== pip install --no-deps -e . (the [gpu,test] dependencies must already be there: no registry)"
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
    || echo "install failed (see install.log); running from PYTHONPATH=$PWD" | tee -a "$OUT/install.log"
  "$PY" -m pip check >> "$OUT/install.log" 2>&1 || true
fi

if has pytest; then
  echo "== pytest -m gpu (timeout 240 s)"
  timeout -k 10 240 "$PY" -m pytest -m gpu tests/test_gpu.py tests/test_tensor_core_gpu.py \
    -q -ra -p no:cacheprovider --junitxml="$OUT/pytest.xml" > "$OUT/pytest.log" 2>&1
  echo "pytest exit status $? after $((SECONDS - start)) s" | tee -a "$OUT/pytest.log"
  tail -n 40 "$OUT/pytest.log"
fi

if has tensorcore; then
  echo "== benchmarks/tensor_core_check.py (timeout 150 s)"
  timeout -k 10 150 "$PY" benchmarks/tensor_core_check.py --json "$OUT/tensor_core_check.json" > "$OUT/tensor_core_check.log" 2>&1
  echo "tensor_core_check exit status $? after $((SECONDS - start)) s" | tee -a "$OUT/tensor_core_check.log"
  grep -v "^  File\|^    " "$OUT/tensor_core_check.log" | tail -n 30
fi

if has peer; then
  left=$((540 - (SECONDS - start)))
  [ "$left" -gt 140 ] || left=140
  echo "== benchmarks/gpu_peer.py (timeout $left s)"
  # half precision first: the tensor-core rows are what issue 23 measures; rows are saved as they come
  timeout -k 10 "$left" "$PY" benchmarks/gpu_peer.py --dtype float16 bfloat16 float32 --json "$OUT/gpu_peer.json" > "$OUT/gpu_peer.log" 2>&1
  echo "gpu_peer exit status $? after $((SECONDS - start)) s" | tee -a "$OUT/gpu_peer.log"
  grep -v "^  File\|^    " "$OUT/gpu_peer.log" | tail -n 60
fi

if has geometry; then
  echo "== benchmarks/gpu_geometry.py (timeout 150 s)"
  timeout -k 10 150 "$PY" benchmarks/gpu_geometry.py --json "$OUT/gpu_geometry.json" > "$OUT/gpu_geometry.log" 2>&1
  echo "gpu_geometry exit status $? after $((SECONDS - start)) s" | tee -a "$OUT/gpu_geometry.log"
  grep -v "^  File\|^    " "$OUT/gpu_geometry.log" | tail -n 40
fi

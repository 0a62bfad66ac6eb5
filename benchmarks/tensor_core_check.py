"""The tensor-core path on a GPU at N = 16K and 64K against the reference on the same device.

For the paper configuration (B = 1, H = 8, w = 2048..16384, r = 1, 2, 4, 8), float16 and
bfloat16, D = Dv = 64 and 128, causal and not: ``backend="cupy-tensor-core"`` against
``backend="cupy"`` (the reference itself on CuPy, float32 work on the same half-precision
values), forward and backward, as relative errors ||got - ref|| / ||ref|| per result, and
whether every element is finite where the reference's is. float32 inputs are not taken by
this path (an InputTypeError, recorded as such). Prints a table and writes JSON.

    PYTHONPATH=$PWD python benchmarks/tensor_core_check.py [--n 16384 65536] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

import cupy
import ml_dtypes

from longnet_ref import dilated_attention, dilated_attention_backward

PAPER = ([2048, 4096, 8192, 16384], [1, 2, 4, 8])
HEADS = 8
DTYPES = {"float16": cupy.float16, "bfloat16": ml_dtypes.bfloat16, "float32": cupy.float32}


def relative_error(got, want):
    got, want = (cupy.asarray(x).astype(cupy.float64) for x in (got, want))
    finite = cupy.isfinite(want)
    mismatched = int((cupy.isfinite(got) != finite).sum())
    difference = cupy.where(finite, got - want, 0)
    norm = float(cupy.linalg.norm(cupy.where(finite, want, 0)))
    return float(cupy.linalg.norm(difference)) / max(norm, 1e-300), mismatched


def check(n, dtype, dim, causal):
    rng = cupy.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, n, HEADS, dim), dtype=cupy.float32).astype(DTYPES[dtype]) for _ in range(4))
    results = {}
    for backend in ("cupy-tensor-core", "cupy"):
        out, lse = dilated_attention(q, k, v, *PAPER, causal=causal, return_lse=True, backend=backend)
        grads = dilated_attention_backward(dout, q, k, v, out, lse, *PAPER, causal=causal, backend=backend)
        results[backend] = (out, lse, *grads)
        cupy.get_default_memory_pool().free_all_blocks()
    row = {"n": n, "dtype": dtype, "dim": dim, "causal": causal}
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), results["cupy-tensor-core"], results["cupy"]):
        row[name], row[name + "_finite_mismatches"] = relative_error(got, want)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'N':>6} {'dtype':9} {'D':>4} {'causal':6} {'out':>9} {'lse':>9} {'dq':>9} {'dk':>9} {'dv':>9}  non-finite mismatches")
    for n in args.n:
        for dtype in DTYPES:
            for dim in (64, 128):
                for causal in (False, True):
                    try:
                        row = check(n, dtype, dim, causal)
                    except Exception as error:  # noqa: BLE001 - recorded in the table and the JSON
                        traceback.print_exc(file=sys.stderr)
                        row = {"n": n, "dtype": dtype, "dim": dim, "causal": causal, "error": f"{type(error).__name__}: {error}"[:300]}
                    rows.append(row)
                    if "error" in row:
                        print(f"{n:>6} {dtype:9} {dim:>4} {causal!s:6} [{row['error']}]", flush=True)
                    else:
                        errors = " ".join(f"{row[name]:9.2e}" for name in ("out", "lse", "dq", "dk", "dv"))
                        mismatches = sum(row[f"{name}_finite_mismatches"] for name in ("out", "lse", "dq", "dk", "dv"))
                        print(f"{n:>6} {dtype:9} {dim:>4} {causal!s:6} {errors}  {mismatches}", flush=True)
                    if args.json:
                        with open(args.json, "w") as f:
                            json.dump({"gpu": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

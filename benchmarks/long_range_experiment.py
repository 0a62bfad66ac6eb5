"""The model learning at a length where dense attention is out of reach (issue 19, section 5): prepared, not yet run.

    python benchmarks/long_range_experiment.py --runs benchmarks/results/long-range        # ~1 h of a 2-core CPU
    python benchmarks/long_range_experiment.py --smoke --runs /tmp/long-range-smoke        # minutes: N = 2048, 4 steps

Smoke run only so far (2026-12-02, loaded 2-core CPU, with the numba kernels' compile): both runs
train, the summary is written; nothing about learning can be read from 4 steps.

Passkey retrieval at N = 16384: the key in the first N/4, the query at the end, more than 12K
tokens back. The configuration follows the reach analysis of ``docs/model.md``:

- branches w = (1024, 4096, 16384), r = (1, 4, 16): the last segment covers the whole sequence;
- H = 16 = max r heads, so every residue mod 16 has a head in the last branch;
- the key written 16 = max r times in a row (``--passkey-span 16``): some copy sits on the
  query's residue, a **one-hop** route (one dilated layer reaches it), like dense attention's.

Runs (each a ``longnet-ref train`` command, printed so it can be rerun alone):

- ``dilated``: the configuration above;
- ``window``: a blocked window of the same scored pairs per token (``nn.window_for``): it cannot
  reach the key (two layers see 2W tokens back), the control;
- ``dense`` step time: measured at N = 1024, 2048, 4096 and extrapolated to 16384 with a fitted
  quadratic (training dense at 16K is what this experiment shows to be out of reach).

Accuracy does not depend on the machine's load; step times do.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from longnet_ref.cli import main as longnet_ref  # noqa: E402

N, SEGMENTS, DILATIONS, HEADS = 16384, "1024,4096,16384", "1,4,16", 16
MODEL = ["--d-model", "64", "--layers", "2", "--heads", str(HEADS), "--backend", "numba", "--batch", "4"]


def runs(n: int, segments: str, steps: int) -> dict[str, list[str]]:
    common = [
        "train",
        "--n",
        str(n),
        "--passkey-span",
        "16",
        "--segment-lengths",
        segments,
        "--dilation-rates",
        DILATIONS,
        *MODEL,
        "--steps",
        str(steps),
        "--eval-every",
        str(max(1, steps // 10)),
    ]
    return {"dilated": [*common, "--attention", "dilated"], "window": [*common, "--attention", "window"]}


def dense_step_seconds(ns, repeats=2) -> dict[int, float]:
    """Seconds of one dense training step (batch 4) at each N, median of ``repeats``."""
    from longnet_ref import model as lm

    times = {}
    for n in ns:
        config = lm.LongNetConfig(vocab_size=32, d_model=64, n_layers=2, n_heads=HEADS, attention="dense", backend="numba", dtype="float32")
        params = lm.init_params(config)
        tokens = np.random.default_rng(0).integers(0, 32, (4, n))
        samples = []
        for _ in range(repeats + 1):  # the first call compiles / warms up
            start = time.perf_counter()
            lm.loss_and_grads(config, params, tokens, tokens)
            samples.append(time.perf_counter() - start)
        times[n] = float(np.median(samples[1:]))
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", required=True, help="folder of the runs' log.json")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--smoke", action="store_true", help="N = 2048, 4 steps: check that everything runs")
    args = p.parse_args(argv)
    n, segments, steps = (2048, "256,1024,2048", 4) if args.smoke else (N, SEGMENTS, args.steps)
    root = Path(args.runs)
    for name, command in runs(n, segments, steps).items():
        shutil.rmtree(root / name, ignore_errors=True)  # a fresh run each time
        command = [*command, "--out", str(root / name)]
        print("longnet-ref " + " ".join(command), flush=True)
        code = longnet_ref(command)
        if code:
            return code
    measured = dense_step_seconds([256, 384, 512] if args.smoke else [1024, 2048, 4096])  # three points: a quadratic
    ns = np.array(sorted(measured), float)
    fit = np.polyfit(ns, [measured[int(x)] for x in ns], 2)  # a + b N + c N^2: the N^2 term dominates at large N
    summary = {"n": n, "dense_measured_seconds": measured, "dense_quadratic": fit.tolist(), "dense_extrapolated_seconds": float(np.polyval(fit, n))}
    for name in ("dilated", "window"):
        log = json.loads((root / name / "log.json").read_text())
        evals = [r for r in log["records"] if "eval_accuracy" in r]
        summary[name] = {
            "final_eval_accuracy": evals[-1]["eval_accuracy"] if evals else None,
            "median_step_seconds": float(np.median([r["seconds"] for r in log["records"]])),
        }
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

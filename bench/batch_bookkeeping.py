"""Measure the bookkeeping of batch inference against the number of cases.

Reading the scans and the network are replaced by stubs (an 8^3 volume, an empty label map), so what
is timed is what the batch does around them: discovery, the clean-up of earlier outputs, the atomic
writes of each case's outputs and the rewrite of ``inference_summary.json`` after every case. The
cases are empty files under BraTS 2018 names in a temporary folder (discovery reads names only).
Prints one JSON line per case count: total seconds, milliseconds per case, and the share spent
rewriting the summary.

Usage (from the repository root)::

    python bench/batch_bookkeeping.py --cases 200 1000 2000
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import app.inference.batch as batch  # noqa: E402
import app.inference.pipeline as pipeline  # noqa: E402
from app.inference.io import CaseInputs, Volume  # noqa: E402

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _read_case(paths, resample_to=None, channels=None):
    volumes = {s: Volume(s, str(p), np.ones((8, 8, 8), np.float32), AFFINE.copy(), None) for s, p in paths.items()}
    return CaseInputs(volumes, next(iter(volumes)))


class _Segmenter:
    settings = {"stub": True}

    def predict(self, case_inputs, convention, probabilities=False):
        labels = np.zeros((8, 8, 8), np.uint8)
        probs = np.zeros((8, 8, 8, 3), np.float32) if probabilities else None
        return pipeline.Prediction(labels, probs, {"network_s": 0.0}, {"work_shape": [8] * 3, "ras_shape": [8] * 3})


def measure(n: int, root: Path) -> dict:
    cases = root / f"in_{n}"
    for i in range(n):
        for seq in ("flair", "t1", "t1ce", "t2"):
            path = cases / f"case_{i:05d}" / f"case_{i:05d}_{seq}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    summary_s = [0.0]
    write = batch._Summary.write

    def timed_write(self, *args, **kwargs):
        start = time.perf_counter()
        write(self, *args, **kwargs)
        summary_s[0] += time.perf_counter() - start

    batch._Summary.write = timed_write
    try:
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            batch.run_batch(_Segmenter(), cases, root / f"out_{n}", probabilities=True)
        total = time.perf_counter() - start
    finally:
        batch._Summary.write = write
    return {"cases": n, "total_s": round(total, 2), "ms_per_case": round(1000 * total / n, 2),
            "summary_s": round(summary_s[0], 2),
            "summary_mb": round(os.path.getsize(root / f"out_{n}" / batch.SUMMARY_NAME) / 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, nargs="+", default=[200, 1000])
    args = parser.parse_args()
    pipeline.read_case = _read_case
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.cases:
            print(json.dumps(measure(n, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()

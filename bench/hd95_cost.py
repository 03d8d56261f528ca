"""Time the HD95 of one labelled case as the evaluation computes it with ``--hd95 true``.

The prediction of each of the 15 subsets is the case's own WT/TC/ET rolled by ``--shift`` voxels along every
axis, give or take one voxel per axis, a different roll per subset (near misses of the size a trained model
makes, so the surfaces searched are those of real tumours and no two subsets repeat a mask), scored against
the unshifted regions on the case's grid with :class:`app.metrics.HD95Scorer` and ``--workers`` threads, as
the evaluator does: 15 subsets x 3 regions = 45 HD95 per case. Prints one JSON line: the grid, the HD95 of
the first subset (mm), the distinct surface searches and the median seconds for the 45 over ``--repeats``.

Usage (from the repository root)::

    python bench/hd95_cost.py --case ../shared/data/brats18_dev/Brats18_CBICA_ATB_1 --workers 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from app.metrics.hausdorff import HD95Scorer, affine_spacing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", required=True, help="a BraTS 2018-named case folder (<case>_seg.nii.gz)")
    parser.add_argument("--shift", type=int, default=2, help="voxels the predictions are rolled by along each axis")
    parser.add_argument("--subsets", type=int, default=15, help="HD95 of the 3 regions this many times (<= 27)")
    parser.add_argument("--workers", type=int, default=1, help="threads searching distances (hd95_workers)")
    parser.add_argument("--repeats", type=int, default=3, help="times the case is scored; the median is printed")
    args = parser.parse_args()
    seg_file = next(Path(args.case).glob("*_seg.nii*"))
    img = nib.load(seg_file)
    seg = np.asarray(img.dataobj)
    target = torch.from_numpy(np.stack([seg > 0, (seg == 1) | (seg == 4), seg == 4]))[None]
    # (0, 0, 0) first: the first subset is rolled by --shift exactly
    jitter = sorted(itertools.product((-1, 0, 1), repeat=3), key=lambda d: sum(map(abs, d)))[: args.subsets]
    preds = [torch.roll(target, shifts=tuple(args.shift + d for d in ds), dims=(2, 3, 4)) for ds in jitter]
    spacing = affine_spacing(img.affine)[None]
    warm = HD95Scorer(target, spacing)  # the first search imports scipy: not part of a case's cost
    warm.add(preds[0])
    warm.compute()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        scorer = HD95Scorer(target, spacing, workers=args.workers)
        for pred in preds:
            scorer.add(pred)
        values = scorer.compute()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    print(json.dumps({"case": seg_file.name, "shape": list(seg.shape), "spacing_mm": spacing[0].tolist(),
                      "hd95_mm": [round(v, 3) for v in values[0][0].tolist()], "n_hd95": 3 * len(preds),
                      "searches": scorer.searches, "workers": args.workers,
                      "seconds": round(seconds, 2), "ms_each": round(1000 * seconds / (3 * len(preds)), 1),
                      "all_seconds": [round(t, 2) for t in times]}))


if __name__ == "__main__":
    main()

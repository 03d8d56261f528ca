"""Time the HD95 of one labelled case as the evaluation computes it with ``--hd95 true``.

The prediction is the case's own WT/TC/ET shifted by ``--shift`` voxels along every axis (a near miss of
the size a trained model makes, so the surfaces searched are those of real tumours), scored against the
unshifted regions on the case's grid: 15 subsets x 3 regions = 45 HD95 per case, as the evaluation does.
Prints one JSON line: the grid, the HD95 values (mm) and the seconds for the 45.

Usage (from the repository root)::

    python bench/hd95_cost.py --case ../shared/data/brats18_dev/Brats18_CBICA_ATB_1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from app.metrics.hausdorff import affine_spacing, hd95


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", required=True, help="a BraTS 2018-named case folder (<case>_seg.nii.gz)")
    parser.add_argument("--shift", type=int, default=2, help="voxels the prediction is shifted by along each axis")
    parser.add_argument("--subsets", type=int, default=15, help="HD95 of the 3 regions this many times")
    args = parser.parse_args()
    seg_file = next(Path(args.case).glob("*_seg.nii*"))
    img = nib.load(seg_file)
    seg = np.asarray(img.dataobj)
    target = torch.from_numpy(np.stack([seg > 0, (seg == 1) | (seg == 4), seg == 4]))[None]
    pred = torch.roll(target, shifts=(args.shift,) * 3, dims=(2, 3, 4))
    spacing = affine_spacing(img.affine)[None]
    hd95(pred, target, spacing)  # the first call imports scipy: not part of a case's cost
    start = time.perf_counter()
    for _ in range(args.subsets):
        values = hd95(pred, target, spacing)
    seconds = time.perf_counter() - start
    print(json.dumps({"case": seg_file.name, "shape": list(seg.shape), "spacing_mm": spacing[0].tolist(),
                      "hd95_mm": [round(v, 3) for v in values[0].tolist()], "n_hd95": 3 * args.subsets,
                      "seconds": round(seconds, 2), "ms_each": round(1000 * seconds / (3 * args.subsets), 1)}))


if __name__ == "__main__":
    main()

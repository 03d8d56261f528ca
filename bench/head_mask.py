"""Dice of clinical inference with and without the head mask, on a training run's validation cases.

    python bench/head_mask.py --run O [--subsets flair t1 flair+t1+t1ce+t2] [--out_dir DIR]

``O`` is a training output folder (``O/datalist.json``, ``O/models/model.pt``). Each validation case
is segmented through :func:`app.inference.segment_case` once with ``head_mask`` off and once on, and
scored against its label with the BraTS rule (both empty: 1). Prints the mean WT/TC/ET Dice per subset.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.data.labels import labels_to_regions  # noqa: E402
from app.inference.pipeline import load_segmenter, segment_case  # noqa: E402

REGIONS = ("WT", "TC", "ET")


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="training output folder")
    p.add_argument("--subsets", nargs="+", default=["flair", "t1", "flair+t1+t1ce+t2"])
    p.add_argument("--bundle", default="bundles/brats_gmd")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out_dir", help="keep the label maps here (default: a temporary folder)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    cases = json.loads((run / "datalist.json").read_text())["validation"]
    four_d = [r["case"] for r in cases if r.get("image4d")]
    if four_d:
        raise SystemExit(f"{four_d[0]} and {len(four_d) - 1} other case(s) are 4D (MSD) images; this benchmark reads "
                         "one file per sequence: convert them to nnU-Net layout (one file per channel) first.")
    scores: dict[tuple[bool, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.out_dir or tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for head_mask in (False, True):
            segmenter = load_segmenter(run / "models" / "model.pt", bundle=args.bundle, device="cpu",
                                       head_mask=head_mask)
            for record in cases:
                truth = labels_to_regions(np.asarray(nib.load(record["label"]).dataobj), record["label_map"]) > 0
                for subset in args.subsets:
                    if not all(s in record["images"] for s in subset.split("+")):
                        continue  # as in evaluation: a case counts for the subsets it has
                    out = out_dir / f"{record['case']}_{subset}_{'mask' if head_mask else 'raw'}.nii.gz"
                    segment_case(segmenter, {s: record["images"][s] for s in subset.split("+")}, out)
                    pred = labels_to_regions(np.asarray(nib.load(out).dataobj), "brats2018") > 0
                    for c, region in enumerate(REGIONS):
                        scores.setdefault((head_mask, subset, region), []).append(dice(pred[c], truth[c]))
    print(f"{len(cases)} validation cases of {run}; mean Dice without -> with the head mask")
    for subset in args.subsets:
        if (False, subset, REGIONS[0]) not in scores:
            print(f"{subset}: no case has these sequences")
            continue
        cells = [f"{r} {np.mean(scores[(False, subset, r)]):.4f} -> {np.mean(scores[(True, subset, r)]):.4f}"
                 for r in REGIONS]
        print(f"{subset} ({len(scores[(False, subset, REGIONS[0])])} cases): " + ", ".join(cells))


if __name__ == "__main__":
    main()

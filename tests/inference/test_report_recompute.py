"""The 15-subset report can be recomputed from inference outputs, as docs/inference.md
("Recomputing the 15-subset report") tells a user to: the same case segmented from exactly a subset's
sequences with the evaluation's windows, no head mask and native spacing gives probability maps whose
thresholded Dice, computed here with plain numpy over the whole volume, is the report's ``per_case`` row,
also for a reference label with tumour outside the head (which the evaluation's foreground crop used to
drop from the Dice); the label map nests the regions, so its WT holds every voxel of the thresholded WT,
TC and ET channels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from app.inference.io import read_case
from app.inference.pipeline import load_segmenter
from tests.bundles.helpers import BRATS, EVALUATE, TRAIN, run_bundle
from tests.inference.conftest import FEATURES, load

PATCH = 16


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """BraTS hard Dice: both masks empty = 1, exactly one empty = 0."""
    total = int(pred.sum()) + int(ref.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & ref).sum()) / total


@pytest.mark.parametrize("case", ["Phantom_000", "Outside"])
@pytest.mark.parametrize("subset", ["flair+t2", "t1ce", "flair+t1+t1ce+t2"])
def test_report_rows_are_the_dice_of_the_probabilities_infer_writes(random_ckpt, case, subset, report):
    root, report = report
    rows = {row["subset"]: row for row in report["per_case"] if row["case"] == case}
    segmenter = load_segmenter(random_ckpt, BRATS, patch_size=[PATCH] * 3, overlap=0.5, device="cpu",
                               spacing="native", head_mask=False)
    files = {s: root / case / f"{case}_{s}.nii.gz" for s in (*subset.split("+"), "seg")}
    pred = segmenter.predict(read_case({s: files[s] for s in subset.split("+")}), probabilities=True)
    seg = np.asarray(load(files["seg"]).dataobj)
    reference = {"WT": np.isin(seg, [1, 2, 4]), "TC": np.isin(seg, [1, 4]), "ET": seg == 4}
    channels = {region: pred.probabilities[..., i] > 0.5 for i, region in enumerate(("WT", "TC", "ET"))}
    for region, ref in reference.items():
        assert _dice(channels[region], ref) == pytest.approx(rows[subset][region], abs=1e-12), region
    # the label map is the regions nested ET > TC > WT: its WT is the union of the three channels
    np.testing.assert_array_equal(pred.labels > 0, channels["WT"] | channels["TC"] | channels["ET"])
    np.testing.assert_array_equal(pred.labels == 4, channels["ET"])


@pytest.fixture(scope="module")
def report(phantom_root: Path, random_ckpt: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The cases' folder and the evaluation bundle's report of phantom case 0 and of ``Outside``: its scans
    with a label that also marks oedema in a corner of the volume, where every sequence is 0."""
    root = tmp_path_factory.mktemp("cases")
    (root / "Phantom_000").symlink_to(phantom_root / "Phantom_000", target_is_directory=True)
    (root / "Outside").mkdir()
    for seq in ("flair", "t1", "t1ce", "t2"):
        scan = root / "Outside" / f"Outside_{seq}.nii.gz"
        shutil.copy(phantom_root / "Phantom_000" / f"Phantom_000_{seq}.nii.gz", scan)
        assert not np.asarray(nib.load(scan).dataobj)[:3, :3, :3].any()
    seg = nib.load(phantom_root / "Phantom_000" / "Phantom_000_seg.nii.gz")
    labels = np.asarray(seg.dataobj).copy()
    labels[:3, :3, :3] = 2
    nib.save(nib.Nifti1Image(labels, seg.affine, seg.header), root / "Outside" / "Outside_seg.nii.gz")
    out = tmp_path_factory.mktemp("report")
    run_bundle([TRAIN, EVALUATE], "--dataset_dir", str(root), "--ckpt_path", random_ckpt, "--output_dir", str(out),
               "--patch_size", f"[{PATCH},{PATCH},{PATCH}]", "--features", json.dumps(FEATURES), "--num_workers", "0")
    return root, json.loads((out / "subset_dice.json").read_text())

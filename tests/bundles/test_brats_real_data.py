"""Real BraTS 2018 cases: discovery, loading, one training iteration on a crop, and evaluation.

Uses ``../shared/data/brats18_dev`` (full resolution); skipped with a reason when it is absent.
"""

from __future__ import annotations

import json
import os

import pytest

from app.data import discover_cases, load_case
from tests.bundles.helpers import BRATS_DEV, EVALUATE, TRAIN, run_bundle

REAL = BRATS_DEV
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"real BraTS data not found at {REAL}")


@pytest.fixture(scope="module")
def two_cases(tmp_path_factory):
    """A folder with links to two real cases, so the run stays small."""
    root = tmp_path_factory.mktemp("brats_real")
    for case in sorted(p for p in REAL.iterdir() if p.is_dir())[:2]:
        os.symlink(case, root / case.name)
    return root


def test_discovery_and_loading():
    cases = discover_cases(REAL, require_label=True)
    assert len(cases) >= 2
    assert all(c["modalities"] == ["flair", "t1", "t1ce", "t2"] and c["layout"] == "brats2018" for c in cases)
    sample = load_case(cases[0])
    assert tuple(sample["image"].shape) == (4, 240, 240, 155)
    assert tuple(sample["label"].shape) == (3, 240, 240, 155)
    assert float(sample["label"][0].sum()) > 0


def test_one_training_iteration_then_evaluation(two_cases, tmp_path):
    train_out, eval_out = tmp_path / "train", tmp_path / "eval"
    small = ["--features", "[4,8,16,32]", "--num_workers", "0", "--cache_rate", "0"]
    run_bundle([TRAIN], "--dataset_dir", str(two_cases), "--output_dir", str(train_out), "--max_epochs", "1",
               "--epoch_length", "1", "--batch_size", "1", "--num_samples", "1", "--val_interval", "5",
               "--patch_size", "[64,64,64]", "--strategy", "gmd_approx", "--sw_overlap", "0", *small)
    ckpt = train_out / "models" / "model_final.pt"
    assert ckpt.is_file()
    # scoring only the run's held-out case keeps the full-resolution pass to one case
    datalist = train_out / "datalist.json"
    held_out = [c["case"] for c in json.loads(datalist.read_text())["validation"]]
    assert len(held_out) == 1
    run_bundle([TRAIN, EVALUATE], "--dataset_dir", str(two_cases), "--ckpt_path", str(ckpt),
               "--eval_datalist", str(datalist), "--output_dir", str(eval_out), "--patch_size", "[128,128,128]",
               "--sw_overlap", "0", *small)  # no overlap: the fewest full-resolution windows
    report = json.loads((eval_out / "subset_dice.json").read_text())
    assert len(report["subsets"]) == 15
    assert all(row["n_cases"] == 1 for row in report["subsets"].values())
    assert {row["case"] for row in report["per_case"]} == set(held_out)
    # one case: each subset's row is that case's Dice, its mean the mean of WT/TC/ET, and the overall
    # mean the unweighted mean over the 15 subsets
    rows = {row["subset"]: row for row in report["per_case"]}
    for name, row in report["subsets"].items():
        assert 0.0 <= row["WT"] <= 1.0 and 0.0 <= row["TC"] <= 1.0 and 0.0 <= row["ET"] <= 1.0
        assert [row[r] for r in ("WT", "TC", "ET")] == pytest.approx([rows[name][r] for r in ("WT", "TC", "ET")])
        assert row["mean"] == pytest.approx((row["WT"] + row["TC"] + row["ET"]) / 3)
    overall = sum(row["mean"] for row in report["subsets"].values()) / 15
    assert report["mean_over_subsets"]["mean"] == pytest.approx(overall)
    assert report["checkpoint"]["path"] == str(ckpt)

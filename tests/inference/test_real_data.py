"""Real BraTS 2018 case, FLAIR and T2 only, with a tiny trained checkpoint: the output lies exactly on
the input grid. Skipped when ``../shared/data/brats18_dev`` (or ``BRATS_DEV_DIR``) is absent.

One full-resolution (240x240x155) inference on CPU with features [8, 16, 32, 64] and the default
window (the whole foreground crop).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.data.discovery import discover_cases
from tests.inference.conftest import DEV, assert_same_grid, load


def test_real_case_flair_t2_on_input_grid(trained_ckpt, infer, tmp_path):
    if not DEV.is_dir():
        pytest.skip(f"real BraTS data not found at {DEV}: place the shared data beside the repository "
                    "(../shared/data/brats18_dev) or set BRATS_DEV_DIR")
    rec = discover_cases(DEV)[0]
    flair, t2 = rec["images"]["flair"], rec["images"]["t2"]
    out, summary = tmp_path / "seg.nii.gz", tmp_path / "seg.json"
    rc, stdout, err = infer("--bundle", "bundles/brats_gmd", "--ckpt", trained_ckpt, "--flair", flair, "--t2", t2,
                            "--out", out, "--summary", summary, "--device", "cpu")
    assert rc == 0, err
    assert_same_grid(out, flair)
    img = load(out)
    assert img.shape == load(flair).shape == (240, 240, 155)
    assert img.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(img.dataobj)).tolist()) <= {0, 1, 2, 4}
    s = json.loads(summary.read_text())
    assert s["sequences_used"] == ["flair", "t2"] and s["sequences_missing"] == ["t1", "t1ce"]
    assert s["voxel_volume_ml"] == pytest.approx(0.001)
    assert s["inference"]["single_window"] is True
    # the summary's volumes are the label map's voxels (1 mm^3 each), counted here independently
    labels = np.asarray(img.dataobj)
    ncr, ed, et = (int((labels == v).sum()) for v in (1, 2, 4))
    expected = {"WT": ncr + ed + et, "TC": ncr + et, "ET": et, "NCR": ncr, "ED": ed}
    assert s["volumes_ml"] == pytest.approx({k: n / 1000 for k, n in expected.items()}, abs=1e-4)

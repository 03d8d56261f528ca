"""Discovery and loading on the real BraTS 2018 development cases (skipped when the data is absent).

The data lives in ``../shared/data`` beside the repository checkout; ``BRATS_DEV_DIR`` overrides the
location of ``brats18_dev``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.data.discovery import discover_cases
from app.data.transforms import LoadCased
from tests.bundles.helpers import BRATS_DEV, SHARED_DATA

DEV = BRATS_DEV
DEV_2MM = SHARED_DATA / "brats18_dev_2mm"


def need(folder: Path) -> Path:
    if not folder.is_dir():
        pytest.skip(f"real BraTS data not found at {folder.resolve()}: place the shared data beside the repository "
                    "(../shared/data), or set SHARED_DATA_DIR (or BRATS_DEV_DIR for brats18_dev)")
    return folder


def test_discover_dev_cases():
    cases = discover_cases(need(DEV), require_label=True)
    assert len(cases) == 6
    for c in cases:
        assert c["layout"] == "brats2018" and c["modalities"] == ["flair", "t1", "t1ce", "t2"]
        assert c["label"] and c["label"].endswith(f"{c['case']}_seg.nii.gz")


def test_load_one_dev_case():
    case = discover_cases(need(DEV), require_label=True)[0]
    out = LoadCased()(case)
    image, label = out["image"], out["label"]
    assert image.shape == (4, 240, 240, 155) and image.dtype == torch.float32
    assert label.shape == (3, 240, 240, 155)
    assert out["modality_mask"].all()
    wt, tc, et = label.bool()
    assert wt.any() and tc.any()
    assert not (tc & ~wt).any() and not (et & ~tc).any()  # ET inside TC inside WT
    assert all(float(image[c].max()) > 0 for c in range(4))
    assert image.pixdim.tolist() == [1.0, 1.0, 1.0]


def test_discover_2mm_cases():
    cases = discover_cases(need(DEV_2MM), require_label=True)
    assert len(cases) == 22 and all(len(c["modalities"]) == 4 for c in cases)

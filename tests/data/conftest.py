"""Fixtures for the data-layer tests: tiny NIfTI writers for every supported case layout."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
import pytest

SHAPE = (16, 16, 12)
BRATS2023_NAMES = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w", "seg": "seg"}


def _write(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return str(path)


def _label(shape: Sequence[int], values: Sequence[int]) -> np.ndarray:
    """Nested boxes: outer values[0] (edema), middle values[1] (enhancing), inner values[2] (necrosis)."""
    lab = np.zeros(shape, dtype=np.uint8)
    c = [s // 2 for s in shape]
    lab[c[0] - 5:c[0] + 5, c[1] - 5:c[1] + 5, c[2] - 4:c[2] + 4] = values[0]
    lab[c[0] - 3:c[0] + 3, c[1] - 3:c[1] + 3, c[2] - 2:c[2] + 2] = values[1]
    lab[c[0] - 1:c[0] + 1, c[1] - 1:c[1] + 1, c[2] - 1:c[2] + 1] = values[2]
    return lab


@pytest.fixture
def write_nii() -> Callable[..., str]:
    """``write_nii(path, data, affine=None) -> str``: save a NIfTI file (folders created)."""
    return _write


@pytest.fixture
def make_case() -> Callable[..., Path]:
    """``make_case(root, case, seqs=all, label=True, layout="brats2018", shape=SHAPE, label_values=None)``.

    Writes a BraTS-named case folder with random int16 images (channel ``c`` offset by ``100 * c`` so
    tests can tell channels apart) and a nested label; returns the case folder.
    """

    def make(
        root: Path,
        case: str,
        seqs: Sequence[str] = ("flair", "t1", "t1ce", "t2"),
        label: bool = True,
        layout: str = "brats2018",
        shape: Sequence[int] = SHAPE,
        label_values: Sequence[int] | None = None,
    ) -> Path:
        folder = Path(root) / case
        rng = np.random.default_rng(zlib.crc32(case.encode()))
        order = ("flair", "t1", "t1ce", "t2")
        for seq in seqs:
            data = (rng.integers(0, 50, size=shape) + 100 * (order.index(seq) + 1)).astype(np.int16)
            name = f"{case}_{seq}" if layout == "brats2018" else f"{case}-{BRATS2023_NAMES[seq]}"
            _write(folder / f"{name}.nii.gz", data)
        if label:
            values = label_values or ((2, 4, 1) if layout == "brats2018" else (2, 3, 1))
            name = f"{case}_seg" if layout == "brats2018" else f"{case}-seg"
            _write(folder / f"{name}.nii.gz", _label(shape, values))
        return folder

    return make


@pytest.fixture
def nested_label() -> Callable[..., np.ndarray]:
    """``nested_label(shape, values)``: the label volume :func:`make_case` writes."""
    return _label

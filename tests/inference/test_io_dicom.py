"""Reading a DICOM series folder for inference (``app.inference.io``): the voxel values and the world
geometry must be those of the series as a PACS exports it."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

from app.data.errors import CaseError
from app.inference.io import read_volume
from tests.inference.conftest import needs_simpleitk

pytestmark = needs_simpleitk


def _volume(shape=(12, 10, 8), seed=0) -> np.ndarray:
    """A [z, y, x] volume of head-like values (no constant slice)."""
    return np.random.default_rng(seed).uniform(50, 1000, size=shape).astype(np.float32)


def _write_series(folder: Path, data: np.ndarray, spacing=(1.5, 1.2, 3.0), origin=(-10.0, 20.0, 5.0),
                  direction: Sequence[float] = (1, 0, 0, 0, 1, 0, 0, 0, 1), slopes: Sequence[float] | None = None,
                  in_plane_drift: float = 0.0) -> None:
    """Write ``data`` ([z, y, x]) as one DICOM file per slice, as a PACS exports an MR series.

    Args:
        slopes: per-slice rescale slope (the stored integers times the slope are the values).
        in_plane_drift: mm by which each slice's position moves along the column direction from the
            previous one (a gantry-tilted acquisition: the slice stack is sheared).
    """
    import SimpleITK as sitk

    folder.mkdir()
    rows, cols = np.asarray(direction, dtype=float).reshape(3, 3)[:, 0], np.asarray(direction, dtype=float).reshape(3, 3)[:, 1]
    normal = np.asarray(direction, dtype=float).reshape(3, 3)[:, 2]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k, plane in enumerate(data):
        slope = 1.0 if slopes is None else slopes[k]
        img = sitk.GetImageFromArray(plane.astype(np.float32)[None])  # float: GDCM stores it with the rescale tags
        position = np.asarray(origin) + k * spacing[2] * normal + k * in_plane_drift * cols
        for tag, value in {"0020|000d": "1.2.826.0.1.3680043.2.1125.7", "0020|000e": "1.2.826.0.1.3680043.2.1125.7.1",
                           "0008|0060": "MR", "0020|0013": str(k + 1),
                           "0020|0037": "\\".join(f"{v:.10f}" for v in (*rows, *cols)),
                           "0020|0032": "\\".join(f"{v:.10f}" for v in position),
                           "0028|0030": f"{spacing[1]}\\{spacing[0]}", "0018|0050": str(spacing[2]),
                           "0028|1053": repr(slope), "0028|1052": "0",
                           "0028|0100": "16", "0028|0101": "16", "0028|0102": "15", "0028|0103": "1"}.items():
            img.SetMetaData(tag, value)
        img.SetSpacing((spacing[0], spacing[1], spacing[2]))
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(img)


def test_per_slice_rescale_slopes_keep_their_fractional_values(tmp_path):
    """A series whose first slice is not rescaled but later ones are (slope 0.01): the later slices
    were read into the first slice's int16 buffer, so 4.27 became 4 and the volume lost its contrast."""
    data = _volume()
    slopes = [1.0] * 6 + [0.01] * 6
    scaled = data.copy()
    scaled[6:] = np.round(data[6:]) * 0.01  # values 0.5 .. 10: the stored integers times 0.01
    scaled[:6] = np.round(data[:6])
    _write_series(tmp_path / "flair", scaled, slopes=slopes)
    volume = read_volume(tmp_path / "flair", "flair")
    np.testing.assert_allclose(volume.data, scaled.transpose(), atol=1e-3)

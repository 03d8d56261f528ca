"""Reading a case for inference (``app.inference.io``): an all-zero channel of a 4D (MSD) file is a
missing sequence; an all-zero 3D file and a constant channel are still errors."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from app.data.errors import CaseError
from app.inference.io import EmptyChannelError, read_case, read_volume
from tests.inference.conftest import load

CHANNELS = {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3}


def _four_d(phantom_root: Path, path: Path, fill: dict[str, float] | None = None) -> str:
    """Phantom case 0 as one 4D MSD file; ``fill`` sets whole channels to a value."""
    ref = load(phantom_root / "Phantom_000" / "Phantom_000_flair.nii.gz")
    data = np.stack([np.asarray(load(phantom_root / "Phantom_000" / f"Phantom_000_{s}.nii.gz").dataobj,
                                dtype=np.float32) for s in CHANNELS], axis=-1)
    for seq, value in (fill or {}).items():
        data[..., CHANNELS[seq]] = value
    nib.save(nib.Nifti1Image(data, ref.affine), str(path))
    return str(path)


def test_all_zero_channel_of_a_4d_file_is_a_missing_sequence(phantom_root, tmp_path):
    path = _four_d(phantom_root, tmp_path / "BRATS_001.nii.gz", {"flair": 0.0, "t1ce": 0.0})
    case = read_case({s: path for s in CHANNELS}, channels=CHANNELS)
    assert case.sequences == ["t1", "t2"] and case.empty_channels == ["flair", "t1ce"]
    assert case.modality_mask.tolist() == [False, True, False, True]
    assert case.reference == "t1"  # the first sequence read, as for a case without FLAIR


def test_resample_to_an_all_zero_channel_uses_another_channel_of_the_file(phantom_root, tmp_path):
    path = _four_d(phantom_root, tmp_path / "BRATS_001.nii.gz", {"t1ce": 0.0})
    case = read_case({s: path for s in CHANNELS}, resample_to="t1ce", channels=CHANNELS)
    assert case.reference == "flair" and case.empty_channels == ["t1ce"] and case.resampled == []


def test_every_channel_zero_or_a_constant_channel_is_an_error(phantom_root, tmp_path):
    path = _four_d(phantom_root, tmp_path / "zero.nii.gz", {s: 0.0 for s in CHANNELS})
    with pytest.raises(CaseError, match=r"zero\.nii\.gz: every channel is 0"):
        read_case({s: path for s in CHANNELS}, channels=CHANNELS)
    path = _four_d(phantom_root, tmp_path / "const.nii.gz", {"t2": 7.0})
    with pytest.raises(CaseError, match=r"const\.nii\.gz \(channel 3, t2\) is constant \(every voxel is 7\)"):
        read_case({s: path for s in CHANNELS}, channels=CHANNELS)


def test_all_zero_3d_file_is_still_an_error(phantom_root, tmp_path):
    ref = load(phantom_root / "Phantom_000" / "Phantom_000_t1.nii.gz")
    empty = tmp_path / "empty_t1.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(ref.shape, np.int16), ref.affine), str(empty))
    with pytest.raises(CaseError, match=r"empty_t1\.nii\.gz \(t1\) is constant \(every voxel is 0\).*remove it so the") as err:
        read_case({"flair": str(phantom_root / "Phantom_000" / "Phantom_000_flair.nii.gz"), "t1": str(empty)})
    assert not isinstance(err.value, EmptyChannelError)


def test_read_volume_reports_the_empty_channel(phantom_root, tmp_path):
    path = _four_d(phantom_root, tmp_path / "BRATS_001.nii.gz", {"t1": 0.0})
    with pytest.raises(EmptyChannelError, match=r"channel 1, t1\) is all zero"):
        read_volume(path, "t1", channel=1)


def test_one_file_given_for_two_sequences_is_refused(phantom_root, tmp_path):
    flair = phantom_root / "Phantom_000" / "Phantom_000_flair.nii.gz"
    with pytest.raises(CaseError, match=r"Phantom_000_flair\.nii\.gz is given as both flair and t2: each sequence"):
        read_case({"flair": str(flair), "t2": str(flair)})
    link = tmp_path / "t2.nii.gz"
    link.symlink_to(flair)
    with pytest.raises(CaseError, match="is given as both flair and t2"):
        read_case({"flair": str(flair), "t2": str(link)})
    # the sequences of one 4D file share it by design
    four_d = _four_d(phantom_root, tmp_path / "c.nii.gz")
    assert set(read_case({s: four_d for s in CHANNELS}, channels=CHANNELS).volumes) == set(CHANNELS)


def test_a_sequence_stored_in_another_voxel_order_needs_no_resampling(phantom_root, tmp_path):
    """The same grid stored with its axes permuted and flipped (another converter) is reordered
    exactly, without --resample-to; a grid that truly differs still needs it."""
    case_dir = phantom_root / "Phantom_000"
    flair = str(case_dir / "Phantom_000_flair.nii.gz")
    t2 = load(case_dir / "Phantom_000_t2.nii.gz")
    other = t2.as_reoriented(np.array([[2, -1], [1, -1], [0, 1]]))
    assert not np.allclose(other.affine, t2.affine)
    nib.save(other, str(tmp_path / "t2_lps.nii.gz"))
    case = read_case({"flair": flair, "t2": str(tmp_path / "t2_lps.nii.gz")})
    assert case.resampled == []
    np.testing.assert_array_equal(case.volumes["t2"].data, np.asarray(t2.dataobj, dtype=np.float32))
    np.testing.assert_allclose(case.volumes["t2"].affine, t2.affine)
    moved = other.affine.copy()
    moved[0, 3] += 0.5
    nib.save(nib.Nifti1Image(np.asarray(other.dataobj), moved), str(tmp_path / "t2_moved.nii.gz"))
    with pytest.raises(CaseError, match="different grids"):
        read_case({"flair": flair, "t2": str(tmp_path / "t2_moved.nii.gz")})

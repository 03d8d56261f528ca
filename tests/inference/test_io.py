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


def _ramp(shape=(3, 4, 5)) -> np.ndarray:
    """100 * x + 10 * y + z + 1: every voxel different, and each axis tells itself apart."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return (100.0 * i + 10.0 * j + k + 1.0).astype(np.float32)


def test_resampling_by_whole_voxels_is_an_exact_copy_with_zeros_outside():
    from app.inference.io import resample_to_grid

    data, src = _ramp(), np.diag([2.0, 2.0, 2.0, 1.0])
    dst = src.copy()
    dst[0, 3] = 2.0 * (1 + 1e-5)  # one voxel along x, plus float noise an exporter leaves
    out = resample_to_grid(data, src, dst, data.shape)
    expected = np.zeros_like(data)
    expected[:2] = data[1:]  # target x = 2 lies beyond the source: 0, with no bleed of the noise
    np.testing.assert_array_equal(out, expected)


def test_resampling_by_half_a_voxel_interpolates_along_the_right_axis():
    from app.inference.io import resample_to_grid

    data, src = _ramp(), np.eye(4)
    dst = src.copy()
    dst[2, 3] = 0.5  # half a voxel along z only
    out = resample_to_grid(data, src, dst, data.shape)
    # trilinear between z = k and k + 1: the ramp's value plus 0.5 (z steps by 1)
    np.testing.assert_allclose(out[:, :, :4], data[:, :, :4] + 0.5, rtol=0, atol=1e-4)
    # the last target slice is halfway to outside the source, which counts as 0
    np.testing.assert_allclose(out[:, :, 4], 0.5 * data[:, :, 4], rtol=0, atol=1e-4)


def test_resample_to_names_the_grid_and_refuses_scans_that_do_not_overlap(tmp_path):
    flair = np.zeros((6, 6, 6), dtype=np.float32)
    flair[1:5, 1:5, 1:5] = _ramp((4, 4, 4))
    nib.save(nib.Nifti1Image(flair, np.eye(4)), str(tmp_path / "flair.nii.gz"))
    t2_affine = np.diag([2.0, 2.0, 2.0, 1.0])  # another grid: 2 mm voxels
    nib.save(nib.Nifti1Image(np.pad(_ramp((2, 2, 2)), 1), t2_affine), str(tmp_path / "t2.nii.gz"))
    paths = {"flair": str(tmp_path / "flair.nii.gz"), "t2": str(tmp_path / "t2.nii.gz")}
    case = read_case(paths, resample_to="t2")
    assert case.reference == "t2" and case.resampled == ["flair"]
    assert case.volumes["flair"].data.shape == (4, 4, 4)
    np.testing.assert_allclose(case.volumes["flair"].affine, t2_affine)
    far = t2_affine.copy()
    far[:3, 3] = 500.0  # a scan of another session, half a metre away
    nib.save(nib.Nifti1Image(np.pad(_ramp((2, 2, 2)), 1), far), str(tmp_path / "t2.nii.gz"))
    with pytest.raises(CaseError, match=r"flair\.nii\.gz \(flair\) does not overlap .*t2\.nii\.gz \(t2\) in space"):
        read_case(paths, resample_to="t2")


def _without_orientation(src: Path, dst: Path) -> str:
    """``src`` with qform_code and sform_code 0, as a tool that drops the orientation writes it."""
    img = load(src)
    out = nib.Nifti1Image(np.asarray(img.dataobj), None, img.header.copy())
    out.header.set_qform(None, code=0)
    out.header.set_sform(None, code=0)
    nib.save(out, str(dst))
    return str(dst)


def test_a_scan_without_orientation_is_never_resampled_by_a_guessed_position(phantom_root, tmp_path):
    """A T2 whose header lost its orientation got nibabel's guessed affine (centred, x flipped): its grid then
    differed from FLAIR's, the error suggested --resample-to, and that moved the T2 by the guess and wrote a
    result from it."""
    case = phantom_root / "Phantom_000"
    flair, t2 = str(case / "Phantom_000_flair.nii.gz"), _without_orientation(case / "Phantom_000_t2.nii.gz",
                                                                            tmp_path / "t2.nii.gz")
    for resample_to in (None, "flair", "t2"):
        with pytest.raises(CaseError, match=r"t2\.nii\.gz \(t2\) has no orientation in its header \(qform_code and "
                                            r"sform_code are 0\).*fslcpgeom .*flair\.nii\.gz .*t2\.nii\.gz"):
            read_case({"flair": flair, "t2": t2}, resample_to=resample_to)
    # alone, or with sequences stored on its own grid the same way, it is segmented where it is
    flair = _without_orientation(case / "Phantom_000_flair.nii.gz", tmp_path / "flair.nii.gz")
    read_case({"t2": t2})
    read_case({"flair": flair, "t2": t2})


def test_sequences_placed_in_different_spaces_are_not_resampled_onto_each_other(phantom_root, tmp_path):
    """A FLAIR registered to MNI 152 (sform code 4) beside a T2 in scanner coordinates: resampling by world
    coordinates of two spaces put the T2 anywhere and wrote the result. Scanner and aligned coordinates (codes 1
    and 2: ITK writes one, nibabel the other for the same space) still resample."""
    case = phantom_root / "Phantom_000"
    flair, t2 = str(case / "Phantom_000_flair.nii.gz"), load(case / "Phantom_000_t2.nii.gz")
    shifted = t2.affine.copy()
    shifted[:3, 3] += 0.5  # co-registered, on a grid half a voxel away
    # the space is the one of the matrix nibabel reads, the sform's when set: a registration to MNI 152 that
    # rewrote the sform only (the qform still in scanner coordinates) is in MNI 152
    for code, qform_code, space in ((4, 4, "MNI 152"), (3, 3, "Talairach"), (4, 1, "MNI 152"), (1, 1, None)):
        image = nib.Nifti1Image(np.asarray(t2.dataobj), shifted)
        image.set_sform(shifted, code=code)
        image.set_qform(shifted, code=qform_code)
        nib.save(image, str(tmp_path / f"t2_{code}_{qform_code}.nii.gz"))
        paths = {"flair": flair, "t2": str(tmp_path / f"t2_{code}_{qform_code}.nii.gz")}
        if space is None:
            assert read_case(paths, resample_to="flair").resampled == ["t2"]
            continue
        for resample_to in (None, "flair", "t2"):
            with pytest.raises(CaseError, match=rf"lie on different grids in different spaces \((scanner and {space}|"
                                                rf"{space} and scanner) coordinates, by their headers' sform/qform "
                                                r"codes\).*register them into one space"):
                read_case(paths, resample_to=resample_to)


def test_a_header_that_contradicts_itself_is_said(phantom_root, tmp_path):
    """nibabel (and so this product) reads the sform; ITK (ITK-SNAP, 3D Slicer) reads the qform and takes the
    voxel size from pixdim. A scan whose sform and qform disagree, or whose sform's voxel size is not its pixdim,
    lay elsewhere or measured other volumes there than in the summary, and nothing said so."""
    from app.inference.pipeline import summary_notes

    flair = load(phantom_root / "Phantom_000" / "Phantom_000_flair.nii.gz")
    data, affine = np.asarray(flair.dataobj), flair.affine
    turned = affine.copy()
    turned[:3, :3] = affine[:3, :3] @ np.array([[1, 0, 0], [0, np.cos(0.1), -np.sin(0.1)], [0, np.sin(0.1), np.cos(0.1)]])
    disagree = nib.Nifti1Image(data, turned)
    disagree.set_sform(turned, code=1)
    disagree.set_qform(affine, code=1)  # e.g. a registration that rewrote the sform only
    nib.save(disagree, str(tmp_path / "disagree.nii.gz"))
    stretched = affine @ np.diag([1.0, 1.0, 3.0, 1.0])
    pixdim = nib.Nifti1Image(data, stretched)
    pixdim.set_qform(None, code=0)
    pixdim.header["pixdim"][1:4] = 1.0  # a writer that set the sform but left pixdim
    nib.save(pixdim, str(tmp_path / "pixdim.nii.gz"))
    case = read_case({"flair": str(tmp_path / "disagree.nii.gz"), "t2": str(tmp_path / "pixdim.nii.gz")},
                     resample_to="flair")
    assert case.header_conflicts["flair"].startswith("its sform and qform disagree (by up to ")
    assert case.header_conflicts["t2"] == "its sform's voxel size (1x1x3 mm) is not its pixdim (1x1x1 mm)"
    notes = summary_notes({"header_conflicts": {**case.header_conflicts, "t1": case.header_conflicts["t2"]},
                           "inference": {}})
    assert len(notes) == 2 and notes[1] == ("WARNING: t2, t1: its sform's voxel size (1x1x3 mm) is not its pixdim (1x1x1 mm); positions and "
                        "volumes here follow the sform (as nibabel and FSL read it), ITK-SNAP and 3D Slicer read the "
                        "qform (when set) and pixdim")
    # a consistent header (the phantoms: the sform only, as nibabel writes it) says nothing
    assert read_case({"flair": str(phantom_root / "Phantom_000" / "Phantom_000_flair.nii.gz")}).header_conflicts == {}


def test_a_sequence_that_is_a_copy_of_another_is_refused_as_in_training(phantom_root, tmp_path):
    """T1 saved as T1ce (also in another voxel order, as another converter stores it) was segmented as a contrast
    scan, while training refused the case; the shared check (app.data.transforms) now refuses it in both."""
    case_dir = phantom_root / "Phantom_000"
    t1 = load(case_dir / "Phantom_000_t1.nii.gz")
    nib.save(t1.as_reoriented(np.array([[2, -1], [1, -1], [0, 1]])), str(tmp_path / "t1ce_lps.nii.gz"))
    paths = {"flair": str(case_dir / "Phantom_000_flair.nii.gz"), "t1": str(case_dir / "Phantom_000_t1.nii.gz"),
             "t1ce": str(tmp_path / "t1ce_lps.nii.gz")}
    with pytest.raises(CaseError, match=r"t1ce_lps\.nii\.gz \(t1ce\) holds the same voxels as "
                                        r".*Phantom_000_t1\.nii\.gz \(t1\).*counts as lacking t1ce"):
        read_case(paths)
    del paths["t1ce"]  # left out: the case lacks T1ce
    assert read_case(paths).sequences == ["flair", "t1"]


def test_head_outside_share_counts_a_voxel_outside_only_beyond_half_a_voxel_from_the_other_grid():
    """A voxel centre within half a voxel of the other grid's outer centres lies in that grid's outer voxel, so it
    is covered: a co-registered grid shifted by less than a voxel (a whole head from edge to edge) is covered
    whole, and --resample-to must not warn that part of the head lies outside it."""
    from app.inference.io import head_outside_share

    head = np.ones((10, 10, 10), dtype=bool)
    shifted = np.eye(4)
    shifted[:3, 3] = 0.4  # the other grid's voxel 0 is centred 0.4 mm from this one's
    assert head_outside_share(head, np.eye(4), (10, 10, 10), shifted) == 0.0
    assert head_outside_share(head, shifted, (10, 10, 10), np.eye(4)) == 0.0
    shifted[:3, 3] = [0.6, 0.0, 0.0]  # beyond half a voxel along x: this grid's first slice is outside
    assert head_outside_share(head, np.eye(4), (10, 10, 10), shifted) == 0.1
    assert head_outside_share(np.zeros_like(head), np.eye(4), (10, 10, 10), shifted) == 0.0


def test_a_sequence_given_as_an_empty_channel_is_not_said_to_be_not_given():
    """A sequence missing as an all-zero channel of a 4D file was given: its note says so, once, and only the
    sequences no file or channel gave are "not given"."""
    from app.inference.pipeline import summary_notes

    notes = summary_notes({"empty_channels": ["t1"], "sequences_missing": ["t1", "t2"]})
    assert notes[:2] == ["t1 channel all zero: missing", "t2 not given"]
    assert not any(note.startswith("t1, ") or note.startswith("t1 not given") for note in notes), notes


def test_a_header_placed_by_its_qform_alone_has_no_conflict(phantom_root, tmp_path):
    """A converter that sets only the qform (sform_code 0) leaves the sform's rows unused, often zero: nibabel,
    FSL and ITK all read the qform then, so there is nothing to warn about."""
    t2 = load(phantom_root / "Phantom_000" / "Phantom_000_t2.nii.gz")
    image = nib.Nifti1Image(np.asarray(t2.dataobj), t2.affine)
    image.set_qform(t2.affine, code=1)
    image.set_sform(None, code=0)
    for row in ("srow_x", "srow_y", "srow_z"):
        image.header[row] = 0.0
    nib.save(image, str(tmp_path / "t2.nii.gz"))
    volume = read_volume(tmp_path / "t2.nii.gz", "t2")
    assert volume.oriented and volume.header_conflict is None

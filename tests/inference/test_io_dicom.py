"""Reading a DICOM series folder for inference (``app.inference.io``): the voxel values and the world
geometry must be those of the series as a PACS exports it."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest

from app.data.errors import CaseError
from app.inference.io import read_case, read_volume
from tests.inference.conftest import needs_simpleitk

pytestmark = needs_simpleitk


def _volume(shape=(12, 10, 8), seed=0) -> np.ndarray:
    """A [z, y, x] volume of head-like values (no constant slice)."""
    return np.random.default_rng(seed).uniform(50, 1000, size=shape).astype(np.float32)


def _write_series(folder: Path, data: np.ndarray, spacing=(1.5, 1.2, 3.0), origin=(-10.0, 20.0, 5.0),
                  direction: Sequence[float] = (1, 0, 0, 0, 1, 0, 0, 0, 1), slopes: Sequence[float] | None = None,
                  in_plane_drift: float = 0.0, prefix: str = "IM", uid: str = "1.2.826.0.1.3680043.2.1125.7.1",
                  description: str = "AX FLAIR", series_number: int = 3, tags: dict[str, str] | None = None,
                  intercept: float = 0.0, stored_int16: bool = False) -> None:
    """Write ``data`` ([z, y, x]) as one DICOM file per slice, as a PACS exports an MR series.

    Args:
        slopes: per-slice rescale slope (the stored integers times the slope are the values).
        uid, description, series_number: the series instance UID, description and number.
        prefix: start of the file names (another acquisition written into the same folder).
        in_plane_drift: mm by which each slice's position moves along the column direction from the
            previous one (a gantry-tilted acquisition: the slice stack is sheared).
        tags: further tags written into every slice (e.g. the pixel padding value).
        intercept: rescale intercept written into every slice.
        stored_int16: write ``data`` (integer values) as int16 pixels: GDCM stores ``(value - intercept) / slope``
            and the rescale tags as given, instead of choosing its own rescale for float values.
    """
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    rows, cols, normal = np.asarray(direction, dtype=float).reshape(3, 3).T
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k, plane in enumerate(data):
        slope = 1.0 if slopes is None else slopes[k]
        # float: GDCM stores it with the rescale tags
        img = sitk.GetImageFromArray(plane.astype(np.int16 if stored_int16 else np.float32)[None])
        position = np.asarray(origin) + k * spacing[2] * normal + k * in_plane_drift * cols
        for tag, value in {"0020|000d": "1.2.826.0.1.3680043.2.1125.7", "0020|000e": uid,
                           "0008|0060": "MR", "0008|103e": description, "0020|0011": str(series_number),
                           "0020|0013": str(k + 1),
                           "0020|0037": "\\".join(f"{v:.10f}" for v in (*rows, *cols)),
                           "0020|0032": "\\".join(f"{v:.10f}" for v in position),
                           "0028|0030": f"{spacing[1]}\\{spacing[0]}", "0018|0050": str(spacing[2]),
                           "0028|1053": repr(slope), "0028|1052": repr(intercept),
                           "0028|0100": "16", "0028|0101": "16", "0028|0102": "15", "0028|0103": "1",
                           **(tags or {})}.items():
            img.SetMetaData(tag, value)
        img.SetSpacing((spacing[0], spacing[1], spacing[2]))
        writer.SetFileName(str(folder / f"{prefix}{k:04d}.dcm"))
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


def _write_multi_frame(image: Any, path: Path) -> None:
    """Write a SimpleITK volume as one multi-frame MR file of a fixed series (folders created)."""
    import SimpleITK as sitk

    for tag, value in {"0020|000d": "1.2.826.0.1.3680043.2.1125.8", "0020|000e": "1.2.826.0.1.3680043.2.1125.8.1",
                       "0008|0060": "MR"}.items():
        image.SetMetaData(tag, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    writer.Execute(image)


@pytest.mark.parametrize("layout", ["slices", "multi_frame"])
def test_a_series_larger_than_the_memory_left_is_refused_before_it_is_read(tmp_path, monkeypatch, layout):
    """A series of thousands of slices that the memory left cannot hold was read until the out-of-memory killer
    ended the run (or another process on the server); its size is known from one header and the file count. One
    multi-frame DICOM file holds the whole volume: its size is its header's frames, not the file count."""
    import SimpleITK as sitk

    if layout == "slices":
        _write_series(tmp_path / "flair", _volume())  # 12 slices of 8 x 10
    else:
        image = sitk.Cast(sitk.GetImageFromArray(np.round(_volume())), sitk.sitkInt16)  # 12 frames of 8 x 10
        _write_multi_frame(image, tmp_path / "flair" / "volume.dcm")
    monkeypatch.setattr("app.data.transforms.available_memory", lambda: 8 * 10 * 12 * 4 - 1, raising=False)
    executed = []
    monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", lambda self, *a: executed.append(1))
    with pytest.raises(CaseError) as info:
        read_volume(tmp_path / "flair", "flair")
    assert str(info.value).startswith(f"Not enough memory to read {tmp_path / 'flair'} (shape (8, 10, 12)")
    assert executed == []


def test_a_named_pipe_in_the_series_folder_is_named(tmp_path):
    """GDCM found no series at all in a folder holding a named pipe beside the slices, and the message said the
    folder held no DICOM series."""
    import os

    _write_series(tmp_path / "flair", _volume())
    os.mkfifo(tmp_path / "flair" / "IM9999.dcm")
    with pytest.raises(CaseError) as info:
        read_volume(tmp_path / "flair", "flair")
    assert str(info.value) == (f"{tmp_path / 'flair'} holds 1 entry(ies) that are not files (first: IM9999.dcm, a "
                               "named pipe), which are not read: remove them from the series folder.")


def _oblique_direction() -> tuple[float, ...]:
    """Direction cosines (columns: row, column and slice directions) of a double-oblique acquisition."""
    a, b = np.deg2rad(17.0), np.deg2rad(-11.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return tuple((rz @ rx).ravel())


def test_gantry_tilted_series_is_refused(tmp_path):
    """Slices that move within their plane from one to the next (a tilted gantry) are a sheared stack;
    it was read as an orthogonal grid, displacing the top of the volume by the whole drift (here 11 x
    0.8 mm), so the label map would be shifted against the scan in any viewer."""
    _write_series(tmp_path / "flair", _volume(), in_plane_drift=0.8)
    with pytest.raises(CaseError, match=r"flair: the DICOM slices are not stacked along the slice normal \(IM0011.dcm "
                                        r"lies 8.8 mm off it .*gantry-tilted.*dcm2niix"):
        read_volume(tmp_path / "flair", "flair")


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1),  # axial
                                       (0, 0, 1, 1, 0, 0, 0, 1, 0),  # sagittal
                                       (1, 0, 0, 0, 0, 1, 0, -1, 0),  # coronal
                                       _oblique_direction()], ids=["axial", "sagittal", "coronal", "oblique"])
def test_voxels_map_to_the_world_points_of_the_series(tmp_path, direction):
    """Every voxel's RAS point (the affine) is the LPS point of the same DICOM voxel, for any
    acquisition plane, and the untilted oblique series passes the tilt check."""
    import SimpleITK as sitk

    data = _volume()
    _write_series(tmp_path / "flair", np.round(data), direction=direction)
    volume = read_volume(tmp_path / "flair", "flair")
    reference = sitk.ReadImage(sorted(str(p) for p in (tmp_path / "flair").iterdir()), sitk.sitkFloat32)
    for ijk in [(0, 0, 0), (7, 9, 11), (3, 5, 2), (7, 0, 11)]:
        ras = volume.affine @ np.array([*ijk, 1.0])
        lps = (-ras[0], -ras[1], ras[2])
        np.testing.assert_allclose(reference.TransformPhysicalPointToContinuousIndex(lps), ijk, atol=1e-4)
        assert volume.data[ijk] == np.round(data)[ijk[::-1]]


def test_a_dicom_series_and_a_nifti_on_another_grid_resample_onto_each_other(tmp_path):
    """A DICOM series places every slice in scanner coordinates, so it resamples with a NIfTI scan of the same
    session on another grid (--resample-to), either way; only a NIfTI header placing its scan nowhere is
    refused."""
    import nibabel as nib

    from app.inference.io import read_case

    _write_series(tmp_path / "flair", np.round(_volume()))
    flair = read_volume(tmp_path / "flair", "flair")
    assert flair.oriented and flair.space == "scanner"
    shifted = flair.affine.copy()
    shifted[:3, 3] += 0.5  # the same session, on a grid half a voxel away
    nib.save(nib.Nifti1Image(flair.data, shifted), str(tmp_path / "t2.nii.gz"))
    paths = {"flair": tmp_path / "flair", "t2": tmp_path / "t2.nii.gz"}
    assert read_case(paths, resample_to="flair").resampled == ["t2"]
    assert read_case(paths, resample_to="t2").resampled == ["flair"]


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (0, 0, 1, 1, 0, 0, 0, 1, 0)],
                         ids=["axial", "sagittal"])
def test_multi_frame_file_is_read_as_its_volume(tmp_path, direction):
    """A PACS exporting an MR volume as one multi-frame DICOM file: the series reader stacked it as a
    4D image with one volume and the command stopped with 'error: matmul: Input operand 1 has a
    mismatch in its core dimension 0 …', naming neither the folder nor a fix."""
    import SimpleITK as sitk

    data = np.round(_volume())
    image = sitk.Cast(sitk.GetImageFromArray(data), sitk.sitkInt16)
    image.SetSpacing((1.5, 1.2, 3.0))
    image.SetOrigin((-10.0, 20.0, 5.0))
    image.SetDirection(direction)
    _write_multi_frame(image, tmp_path / "flair" / "volume.dcm")

    volume = read_volume(tmp_path / "flair", "flair")
    assert volume.data.shape == data.shape[::-1]
    np.testing.assert_array_equal(volume.data, data.transpose())
    for ijk in [(0, 0, 0), (7, 9, 11), (3, 5, 2)]:
        ras = volume.affine @ np.array([*ijk, 1.0])
        np.testing.assert_allclose(image.TransformPhysicalPointToContinuousIndex((-ras[0], -ras[1], ras[2])), ijk,
                                   atol=1e-4)


def test_localizer_filed_under_the_series_uid_is_named(tmp_path):
    """Three localizer slices sharing the series' UID: with the same matrix they were reported as a
    gantry tilt, with another matrix as ITK's 'ImageIO returns IO region that does not fully contain
    the requested', cut off mid-sentence. Both now say that another acquisition shares the series."""
    _write_series(tmp_path / "flair", _volume())
    _write_series(tmp_path / "flair", _volume(shape=(3, 10, 8)), direction=(0, 0, 1, 1, 0, 0, 0, 1, 0),
                  origin=(0.0, 0.0, 0.0), prefix="LOC")
    with pytest.raises(CaseError, match=r"flair: its DICOM slices have different orientations \(LOC0000.dcm is not "
                                        r"parallel to IM0000.dcm\), so another acquisition \(a localizer"):
        read_volume(tmp_path / "flair", "flair")

    _write_series(tmp_path / "t2", _volume())
    _write_series(tmp_path / "t2", _volume(shape=(3, 9, 8)), origin=(0.0, 0.0, 100.0), prefix="LOC")
    with pytest.raises(CaseError, match=r"t2: its DICOM slices have different sizes \(IM0000.dcm is 8x10, LOC0000.dcm "
                                        r"is 8x9\), so another acquisition .*move its files out of the folder"):
        read_volume(tmp_path / "t2", "t2")


def test_several_multi_frame_files_of_one_series_are_named(tmp_path):
    """Two multi-frame files of one series in one folder were stacked as a 4D image, and the command
    stopped with numpy's 'matmul: Input operand 1 has a mismatch in its core dimension 0'."""
    import SimpleITK as sitk

    (tmp_path / "flair").mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(2):
        image = sitk.Cast(sitk.GetImageFromArray(np.round(_volume(seed=k))), sitk.sitkInt16)
        image.SetOrigin((0.0, 0.0, 100.0 * k))
        for tag, value in {"0020|000d": "1.2.826.0.1.3680043.2.1125.9", "0020|000e": "1.2.826.0.1.3680043.2.1125.9.1",
                           "0008|0060": "MR"}.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / "flair" / f"volume{k}.dcm"))
        writer.Execute(image)
    with pytest.raises(CaseError, match=r"flair holds 2 multi-frame DICOM files of one series, each a volume, read as "
                                        r"a 4D image: put the file of this sequence in a folder of its own"):
        read_volume(tmp_path / "flair", "flair")


def test_series_exported_without_the_preamble_is_read_and_checked(tmp_path):
    """DICOM files without the 128-byte preamble and ``DICM`` (older PACS exports): GDCM found the
    series, then SimpleITK refused every file ('Unable to determine ImageIO reader'). Such a file cut
    short must still be an error, not a slice silently left out."""
    data = np.round(_volume())
    _write_series(tmp_path / "flair", data)
    files = sorted((tmp_path / "flair").iterdir())
    for path in files:
        path.write_bytes(path.read_bytes()[132:])
        path.rename(path.with_suffix(""))  # as such exports name them: IM0000, no extension
    volume = read_volume(tmp_path / "flair", "flair")
    np.testing.assert_array_equal(volume.data, data.transpose())

    last = files[-1].with_suffix("")
    last.write_bytes(last.read_bytes()[:300])
    with pytest.raises(CaseError, match=r"flair has 1 DICOM file\(s\) that could not be read as part of its series "
                                        r"\(first: IM0011; corrupt or truncated\)"):
        read_volume(tmp_path / "flair", "flair")


def test_slices_of_another_pixel_size_in_the_series_are_refused(tmp_path):
    """Slices of the same matrix and orientation but another field of view under the series' UID:
    ITK took the first slice's pixel size for all, so the upper half was read at half its size."""
    _write_series(tmp_path / "flair", _volume(shape=(6, 10, 8)))
    _write_series(tmp_path / "flair", _volume(shape=(6, 10, 8)), spacing=(3.0, 2.4, 3.0),
                  origin=(-10.0, 20.0, 23.0), prefix="FOV")
    with pytest.raises(CaseError, match=r"flair: its DICOM slices have different pixel sizes \(FOV0000.dcm: 2.4 x 3 mm, "
                                        r"IM0000.dcm: 1.2 x 1.5 mm\), so another acquisition"):
        read_volume(tmp_path / "flair", "flair")


def test_two_series_in_one_folder_are_named_by_description_and_size(tmp_path):
    """A FLAIR and its localizer, or a repeated FLAIR, exported into one folder: the error listed only
    the UIDs, which do not tell the user which files to move."""
    _write_series(tmp_path / "flair", _volume(), uid="1.2.826.0.1.3680043.2.1125.7.1")
    _write_series(tmp_path / "flair", _volume(shape=(3, 10, 8)), uid="1.2.826.0.1.3680043.2.1125.7.2",
                  description="LOCALIZER", series_number=1, origin=(0.0, 0.0, 100.0), prefix="LOC")
    with pytest.raises(CaseError, match=r"flair holds 2 DICOM series \(series 3 'AX FLAIR' 12 file\(s\), "
                                        r"1.2.826.0.1.3680043.2.1125.7.1; series 1 'LOCALIZER' 3 file\(s\), "
                                        r"1.2.826.0.1.3680043.2.1125.7.2\): put each series in its own folder"):
        read_volume(tmp_path / "flair", "flair")
    _write_series(tmp_path / "t2", _volume(), uid="1.2.826.0.1.3680043.2.1125.7.1", description="AX T2")
    _write_series(tmp_path / "t2", _volume(), uid="1.2.826.0.1.3680043.2.1125.7.3", description="AX T2",
                  series_number=9, prefix="REP")
    with pytest.raises(CaseError, match=r"t2 holds 2 DICOM series \(series 3 'AX T2' 12 file\(s\), .*; series 9 "
                                        r"'AX T2' 12 file\(s\), 1.2.826.0.1.3680043.2.1125.7.3\)"):
        read_volume(tmp_path / "t2", "t2")


def _element(group: int, element: int, vr: str, value: bytes) -> bytes:
    """One explicit-VR little-endian data element."""
    if len(value) % 2:
        value += b"\0" if vr == "UI" else b" "
    if vr in ("OB", "SQ"):
        return struct.pack("<HH", group, element) + vr.encode() + b"\0\0" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", group, element) + vr.encode() + struct.pack("<H", len(value)) + value


def _write_key_object(path: Path, series_uid: bytes, referenced_series_uid: bytes) -> None:
    """A Key Object Selection document (no pixel data) of its own series, referencing the images' series
    first (its Referenced Series Sequence comes before its own Series Instance UID in the file)."""
    sop_class, sop_instance = b"1.2.840.10008.5.1.4.1.1.88.59", series_uid + b".1"
    meta = (_element(2, 1, "OB", b"\0\1") + _element(2, 2, "UI", sop_class) + _element(2, 3, "UI", sop_instance)
            + _element(2, 0x10, "UI", b"1.2.840.10008.1.2.1"))
    meta = struct.pack("<HH", 2, 0) + b"UL" + struct.pack("<HI", 4, len(meta)) + meta
    item = _element(0x20, 0x0E, "UI", referenced_series_uid)
    body = (_element(8, 0x16, "UI", sop_class) + _element(8, 0x18, "UI", sop_instance) + _element(8, 0x60, "CS", b"KO")
            + _element(8, 0x1115, "SQ", struct.pack("<HHI", 0xFFFE, 0xE000, len(item)) + item)
            + _element(0x20, 0x0D, "UI", b"1.2.826.0.1.3680043.2.1125.7") + _element(0x20, 0x0E, "UI", series_uid))
    path.write_bytes(b"\0" * 128 + b"DICM" + meta + body)


def test_key_object_or_report_beside_the_slices_is_ignored(tmp_path):
    """A PACS export with a key object selection (or a report) beside the slices: ITK cannot read an
    object without pixel data, so it was taken for a truncated slice and the series refused as
    'corrupt or truncated', although other series' objects are documented as ignored."""
    data = np.round(_volume())
    _write_series(tmp_path / "flair", data)
    _write_key_object(tmp_path / "flair" / "KO000001", b"1.2.826.0.1.3680043.2.1125.7.50",
                      b"1.2.826.0.1.3680043.2.1125.7.1")
    np.testing.assert_array_equal(read_volume(tmp_path / "flair", "flair").data, data.transpose())
    # a slice cut short is still an error, also next to the key object
    last = tmp_path / "flair" / "IM0011.dcm"
    last.write_bytes(last.read_bytes()[:600])
    with pytest.raises(CaseError, match=r"flair has 1 DICOM file\(s\) that could not be read .*first: IM0011.dcm"):
        read_volume(tmp_path / "flair", "flair")


def test_pacs_export_root_names_the_series_subfolders(tmp_path):
    """A PACS export (DICOMDIR at the top, a folder per series below) given as the folder: the error said
    only 'holds no DICOM series', although the series are right there in its subfolders."""
    export = tmp_path / "export"
    _write_series(export / "DICOM" / "ST000001" / "SE000001", _volume(), uid="1.2.826.0.1.3680043.2.1125.7.1")
    _write_series(export / "DICOM" / "ST000001" / "SE000002", _volume(), uid="1.2.826.0.1.3680043.2.1125.7.2")
    (export / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    with pytest.raises(CaseError, match=r"export holds no DICOM series itself, but 2 of its subfolders hold DICOM files "
                                        r"\(DICOM/ST000001/SE000001, DICOM/ST000001/SE000002\): pass the subfolder of "
                                        r"this sequence's series\.$"):
        read_volume(export, "flair")


def test_slice_the_user_may_not_read_is_named_as_a_permission_problem(tmp_path, monkeypatch):
    """A slice file without read permission (a PACS export copied as another user): GDCM skips it as it
    skips a damaged file, and the check of the left-out files took it for a non-DICOM file, so the
    volume was read one slice short (first or last slice) without a word."""
    import builtins

    import SimpleITK as sitk

    _write_series(tmp_path / "flair", _volume())
    locked = str(tmp_path / "flair" / "IM0011.dcm")
    real_open, real_files = builtins.open, sitk.ImageSeriesReader.GetGDCMSeriesFileNames

    def refusing_open(file, *args, **kwargs):
        if str(file) == locked:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    # as root (CI), GDCM still opens the file: leave it out of the series as GDCM does for other users
    monkeypatch.setattr(builtins, "open", refusing_open)
    monkeypatch.setattr(sitk.ImageSeriesReader, "GetGDCMSeriesFileNames",
                        staticmethod(lambda *a, **k: tuple(f for f in real_files(*a, **k) if f != locked)))
    with pytest.raises(CaseError, match=r"IM0011.dcm is not readable by .*chmod a\+r"):
        read_volume(tmp_path / "flair", "flair")


def _replace_slice(folder: Path, k: int, direction: Sequence[float] = (1, 0, 0, 0, 1, 0, 0, 0, 1),
                   spacing=(1.5, 1.2, 3.0), origin=(-10.0, 20.0, 5.0)) -> None:
    """Rewrite slice ``k`` of a series written by ``_write_series`` (default geometry) at the same
    position, with the orientation or pixel size given (as ``IM{k:04d}_0000.dcm``)."""
    (folder / f"IM{k:04d}.dcm").unlink()
    position = np.asarray(origin, dtype=float) + k * 3.0 * np.array([0.0, 0.0, 1.0])
    _write_series(folder, _volume(shape=(1, 10, 8), seed=k), spacing=spacing, origin=tuple(position),
                  direction=direction, prefix=f"IM{k:04d}_")


@pytest.mark.parametrize("departure", ["tilt", "turn", "pixel_size"])
def test_small_departures_of_one_acquisition_are_refused(tmp_path, departure):
    """Departures too small to see in a viewer still misplace or rescale voxels: a tilt drift of 0.22 mm
    over the stack (tolerance: 0.1 of the 1.2 mm pixel), one slice turned by 1 degree in its plane, one
    slice whose pixels are 2.5 % larger. ITK reads each as the first slice's grid without a word."""
    folder = tmp_path / "flair"
    if departure == "tilt":
        _write_series(folder, _volume(), in_plane_drift=0.02)
        match = r"not stacked along the slice normal \(IM0011.dcm lies 0.22 mm off it"
    else:
        _write_series(folder, _volume())
        if departure == "turn":
            c, s = np.cos(np.deg2rad(1.0)), np.sin(np.deg2rad(1.0))
            _replace_slice(folder, 5, direction=(c, -s, 0, s, c, 0, 0, 0, 1))
            match = r"different orientations \(IM0005_0000.dcm is not parallel to IM0000.dcm\)"
        else:
            _replace_slice(folder, 5, spacing=(1.5375, 1.23, 3.0))
            match = r"different pixel sizes \(IM0005_0000.dcm: 1.23 x 1.5375 mm, IM0000.dcm: 1.2 x 1.5 mm\)"
    with pytest.raises(CaseError, match=match):
        read_volume(folder, "flair")


def test_drift_within_the_tolerance_is_read(tmp_path):
    """Positions rounded by the scanner (0.005 mm per slice, 0.055 mm over the stack) are no tilt."""
    data = np.round(_volume())
    _write_series(tmp_path / "flair", data, in_plane_drift=0.005)
    np.testing.assert_array_equal(read_volume(tmp_path / "flair", "flair").data, data.transpose())


def _strip_file_meta(path: Path) -> None:
    """Rewrite a DICOM file as the oldest exports wrote it: no preamble, no ``DICM``, no file meta
    group, so that the file starts with a group 0x0008 element."""
    raw = path.read_bytes()[132:]
    assert raw[:4] == b"\x02\x00\x00\x00" and raw[4:6] == b"UL"  # (0002,0000) group length
    body = raw[12 + struct.unpack("<I", raw[8:12])[0]:]
    assert body[:2] == b"\x08\x00"
    path.write_bytes(body)


def test_truncated_slice_without_file_meta_is_refused(tmp_path):
    """A slice cut short in a series exported without the file meta group (it starts with a group 8
    element): it was taken for a non-DICOM file, so the series was read one slice short without a word."""
    _write_series(tmp_path / "flair", np.round(_volume()))
    files = sorted((tmp_path / "flair").iterdir())
    for path in files:
        _strip_file_meta(path)
    last = files[-1]
    last.write_bytes(last.read_bytes()[:300])
    with pytest.raises(CaseError, match=r"flair has 1 DICOM file\(s\) that could not be read .*first: IM0011.dcm"):
        read_volume(tmp_path / "flair", "flair")


def test_slice_cut_short_after_its_series_uid_is_refused(tmp_path):
    """A slice cut short between its Series Instance UID and its pixel data has no pixel data, as a key
    object has; it names the series itself, so it is a damaged slice and not another series' object."""
    _write_series(tmp_path / "flair", np.round(_volume()))
    last = tmp_path / "flair" / "IM0011.dcm"
    raw = last.read_bytes()
    uid_at = raw.find(b"\x20\x00\x0e\x00")  # implicit VR, as the slices are written: a 4-byte length
    assert 0 < uid_at < raw.find(b"\xe0\x7f\x10\x00")
    last.write_bytes(raw[:uid_at + 8 + struct.unpack("<I", raw[uid_at + 4:uid_at + 8])[0] + 16])
    with pytest.raises(CaseError, match=r"flair has 1 DICOM file\(s\) that could not be read .*first: IM0011.dcm"):
        read_volume(tmp_path / "flair", "flair")


def test_implicit_vr_key_object_beside_the_slices_is_ignored(tmp_path):
    """A key object written in implicit VR little endian (the DICOM default transfer syntax): its
    series UID has a 4-byte length and no VR, and must still be read as another series'."""
    data = np.round(_volume())
    _write_series(tmp_path / "flair", data)

    def implicit(group: int, element: int, value: bytes) -> bytes:
        value += b"\0" * (len(value) % 2)
        return struct.pack("<HHI", group, element, len(value)) + value

    sop_class, series_uid = b"1.2.840.10008.5.1.4.1.1.88.59", b"1.2.826.0.1.3680043.2.1125.7.60"
    meta = (_element(2, 1, "OB", b"\0\1") + _element(2, 2, "UI", sop_class) + _element(2, 3, "UI", series_uid + b".1")
            + _element(2, 0x10, "UI", b"1.2.840.10008.1.2"))
    meta = struct.pack("<HH", 2, 0) + b"UL" + struct.pack("<HI", 4, len(meta)) + meta
    body = (implicit(8, 0x16, sop_class) + implicit(8, 0x18, series_uid + b".1") + implicit(8, 0x60, b"KO")
            + implicit(0x20, 0x0D, b"1.2.826.0.1.3680043.2.1125.7") + implicit(0x20, 0x0E, series_uid))
    (tmp_path / "flair" / "KO000002").write_bytes(b"\0" * 128 + b"DICM" + meta + body)
    np.testing.assert_array_equal(read_volume(tmp_path / "flair", "flair").data, data.transpose())


def test_a_folder_with_only_a_report_names_its_series_subfolder_alone(tmp_path):
    """An export folder holding a key object (no image series) beside a series subfolder: the folder itself is
    not one of 'its subfolders'."""
    export = tmp_path / "export"
    _write_series(export / "SE000001", _volume())
    _write_key_object(export / "KO000001", b"1.2.826.0.1.3680043.2.1125.7.50", b"1.2.826.0.1.3680043.2.1125.7.1")
    with pytest.raises(CaseError, match=r"export holds no DICOM series itself, but 1 of its subfolders hold DICOM files "
                                        r"\(SE000001\): pass the subfolder"):
        read_volume(export, "flair")


def test_a_folder_of_many_series_names_the_first_ones_and_counts_the_rest(tmp_path):
    """A whole study's folder: five series are described and the others counted; of many series subfolders,
    three are named and the rest marked."""
    for k in range(6):
        _write_series(tmp_path / "study", _volume(shape=(3, 10, 8)), uid=f"1.2.826.0.1.3680043.2.1125.7.{k + 1}",
                      series_number=k + 1, prefix=f"S{k}_", origin=(0.0, 0.0, 100.0 * k))
    with pytest.raises(CaseError, match=r"study holds 6 DICOM series \(series 1 .*; series 5 'AX FLAIR' 3 file\(s\), "
                                        r"1.2.826.0.1.3680043.2.1125.7.5; and 1 more\): put each series"):
        read_volume(tmp_path / "study", "flair")
    for k in range(4):
        _write_series(tmp_path / "export" / f"SE{k}", _volume(shape=(3, 10, 8)))
    with pytest.raises(CaseError, match=r"but 4 of its subfolders hold DICOM files \(SE0, SE1, SE2, \.\.\.\): pass"):
        read_volume(tmp_path / "export", "flair")


def test_a_series_folder_copied_as_another_sequence_is_refused(tmp_path):
    """A T1 series folder copied and given as T1ce (so that a case "has" a contrast scan) was segmented as one;
    only the same folder given twice was refused. Training refuses such a copy, and so does inference now."""
    import shutil

    _write_series(tmp_path / "t1", _volume(seed=1), description="AX T1")
    shutil.copytree(tmp_path / "t1", tmp_path / "t1ce")
    _write_series(tmp_path / "flair", _volume(seed=2))
    with pytest.raises(CaseError, match=rf"{tmp_path / 't1ce'} \(t1ce\) holds the same voxels as "
                                        rf"{tmp_path / 't1'} \(t1\)"):
        read_case({"flair": tmp_path / "flair", "t1": tmp_path / "t1", "t1ce": tmp_path / "t1ce"})
    assert read_case({"flair": tmp_path / "flair", "t1": tmp_path / "t1"}).sequences == ["flair", "t1"]


@pytest.mark.parametrize("padding, limit, intercept",
                         [(30000, None, 0.0), (0, None, 100.0), (30000, 30050, 0.0), (-32768, None, 0.0)],
                         ids=["positive", "positive_after_rescale", "range", "type_minimum"])
def test_pixel_padding_outside_the_field_of_view_is_background(tmp_path, padding, limit, intercept):
    """An MR export filling the area outside the reconstructed field of view with Pixel Padding Value (0028,0120):
    a padding value that is positive, or that the rescale intercept makes positive, was read as head tissue, so it
    entered the foreground crop and the z-score over voxels not 0. Padded voxels are now 0; with Pixel Padding Range
    Limit (0028,0121) every stored value of the range is padding. The type's minimum (-32768), outside the crop,
    still entered the normalisation over voxels not 0."""
    stored = np.round(_volume())  # 50 .. 1000
    padded = np.zeros(stored.shape, dtype=bool)
    padded[:, :2, :] = padded[:, :, -1:] = True
    stored[padded] = padding if limit is None else np.resize(np.arange(padding, limit + 1), stored[padded].shape)
    tags = {"0028|0120": str(padding), **({} if limit is None else {"0028|0121": str(limit)})}
    _write_series(tmp_path / "flair", stored + intercept, tags=tags, intercept=intercept, stored_int16=True)
    volume = read_volume(tmp_path / "flair", "flair")
    np.testing.assert_array_equal(volume.data, np.where(padded, 0.0, stored + intercept).transpose())

    # without the tag the same values are the scan's own, read unchanged
    _write_series(tmp_path / "t2", stored + intercept, intercept=intercept, stored_int16=True)
    np.testing.assert_array_equal(read_volume(tmp_path / "t2", "t2").data, (stored + intercept).transpose())


def test_monochrome1_series_is_refused(tmp_path):
    """A series stored as MONOCHROME1 (inverted grey values): GDCM inverts its stored values on read (x reads as
    -x-1), so the series was refused as 'has no positive voxel', with the advice to re-export it with its original
    intensities, which it has. It is now named as MONOCHROME1, with the fix."""
    _write_series(tmp_path / "flair", np.round(_volume()), stored_int16=True)
    for path in (tmp_path / "flair").iterdir():
        raw = path.read_bytes()
        assert raw.count(b"MONOCHROME2") == 1  # GDCM writes MONOCHROME2 whatever the tag says: set it in the file
        path.write_bytes(raw.replace(b"MONOCHROME2", b"MONOCHROME1"))
    with pytest.raises(CaseError, match=r"flair is stored as MONOCHROME1 \(Photometric Interpretation \(0028,0004\): "
                                        r"inverted grey values, .*: re-export the series as MONOCHROME2"):
        read_volume(tmp_path / "flair", "flair")

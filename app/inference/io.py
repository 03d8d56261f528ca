"""Read the sequences of one patient for inference, check them, and write results atomically.

Each sequence is a NIfTI file or a folder holding one DICOM series (read with SimpleITK, imported
only when a folder is given). Every problem with an input raises :class:`~app.data.CaseError` with
one line that names the file and the fix. Outputs are written to a temporary file in the target
folder and renamed into place, so a failed run never leaves a partial or stale-looking result.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from app.atomic import missing_hint
from app.data.discovery import CHANNEL_ALIASES
from app.data.errors import CaseError, check_readable, one_line, special_file_kind
from app.data.transforms import (AFFINE_TOLERANCE, check_affine, check_channels_last, check_distinct_sequences,
                                 check_fits_in_memory, check_not_a_slice, check_voxels,
                                 different_spaces_error, grid_reordering, has_orientation, header_conflict,
                                 no_orientation_error, open_nifti, read_voxels, reorder_voxels,
                                 xform_space)
from app.subsets import BRATS_MODALITIES

__all__ = [
    "Volume",
    "CaseInputs",
    "EmptyChannelError",
    "AtomicOutputs",
    "sequence_name",
    "option",
    "bundle_options",
    "read_volume",
    "read_case",
    "resample_to_grid",
    "head_outside_share",
    "voxel_volume_ml",
]

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
# any temporary name of AtomicOutputs.temp: ".<stem>.<8 hex>[-<pid>].tmp<suffix>", the suffix one of
# _NIFTI_SUFFIXES or .json, as _stem_suffix gives it (lower case), or none
_ANY_TEMPORARY_RE = re.compile(r"\.(?P<stem>.+)\.[0-9a-f]{8}(?:-\d+)?\.tmp(?P<suffix>\.nii\.gz|\.nii|\.json|)")


#: how the running entry point spells a setting: ``python -m app infer`` and ``python -m app.inference.batch`` take
#: ``--resample-to``, ``--overlap``; the batch bundle (inference.yaml) ``--resample_to``, ``--sw_overlap``
_BUNDLE_OPTIONS: ContextVar[bool] = ContextVar("bundle_options", default=False)
#: the bundle's name of a setting where it is not the command line's with ``_`` for ``-``
_BUNDLE_NAMES = {"overlap": "sw_overlap", "ckpt": "ckpt_path"}


def option(name: str) -> str:
    """The flag that sets ``name`` (``resample_to``, ``overlap``) in the entry point running: ``--resample-to`` and
    ``--overlap`` on the command lines, ``--resample_to`` and ``--sw_overlap`` in the batch bundle
    (:func:`bundle_options`). A message names the option as the user typed it, in the command they ran."""
    if _BUNDLE_OPTIONS.get():
        return "--" + _BUNDLE_NAMES.get(name, name)
    return "--" + name.replace("_", "-")


@contextlib.contextmanager
def bundle_options() -> Iterator[None]:
    """Within it, :func:`option` spells settings as the batch bundle's command line does (its entry points use it)."""
    token = _BUNDLE_OPTIONS.set(True)
    try:
        yield
    finally:
        _BUNDLE_OPTIONS.reset(token)


class EmptyChannelError(CaseError):
    """A channel of a 4D file is all zero: the MSD layout's only way to mark a sequence missing.

    :func:`read_case` leaves such a sequence out, as if it had not been given.
    """


@dataclass
class Volume:
    """One 3D sequence as read from disk.

    Attributes:
        name: sequence name from :data:`app.subsets.BRATS_MODALITIES`.
        source: the file or DICOM folder it came from.
        data: float32 voxels ``[X, Y, Z]`` in storage order.
        affine: voxel-to-world (RAS+ mm) matrix, float64 ``[4, 4]``.
        header: the NIfTI header (None for DICOM), copied into outputs so that qform/sform codes,
            units and intent survive.
    """

    name: str
    source: str
    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """The voxel grid's size ``(X, Y, Z)``."""
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def oriented(self) -> bool:
        """False for a NIfTI file whose qform_code and sform_code are both 0: its header places it nowhere, and
        its ``affine`` is nibabel's guess from the voxel sizes (centred, x flipped), not where the scan lay."""
        # DICOM (no header): the position and orientation of every slice
        return self.header is None or has_orientation(self.header)

    @property
    def header_conflict(self) -> str | None:
        """How the NIfTI header contradicts itself where readers differ, or None (see
        :func:`app.data.transforms.header_conflict`, which training and evaluation warn by too)."""
        return header_conflict(self.header)

    @property
    def space(self) -> str:
        """The space its ``affine`` maps to, by the NIfTI code of the matrix nibabel takes (the sform's when set,
        else the qform's): ``scanner`` for scanner and aligned anatomy (codes 1 and 2, which converters use for
        the same coordinates: ITK writes 1, nibabel 2) and for DICOM, else the template (Talairach, MNI 152)."""
        return xform_space(self.header)


@dataclass
class CaseInputs:
    """The sequences of one case, all on the grid of ``reference``.

    Attributes:
        volumes: ``{sequence: Volume}`` in :data:`BRATS_MODALITIES` order, all on one grid.
        reference: the sequence whose grid (shape, affine, header) the outputs use.
        resampled: sequences that were resampled onto the reference grid (``--resample-to``, the bundle's
            ``--resample_to``).
        empty_channels: sequences given as an all-zero channel of a 4D file, so missing (not in
            ``volumes``, False in :attr:`modality_mask`).
        header_conflicts: ``{sequence: description}`` of the NIfTI headers that contradict themselves where
            readers differ (:attr:`Volume.header_conflict`).
        coverage: for each resampled sequence, ``reference_head_outside``: the share of the reference's
            head (voxels not 0) outside the sequence's field of view, where it reads 0; and
            ``head_outside_reference``: the share of its own head outside the reference grid, which no
            output covers (see :func:`head_outside_share`).
    """

    volumes: dict[str, Volume]
    reference: str
    resampled: list[str] = field(default_factory=list)
    empty_channels: list[str] = field(default_factory=list)
    coverage: dict[str, dict[str, float]] = field(default_factory=dict)
    header_conflicts: dict[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> Volume:
        """The :class:`Volume` of the reference sequence."""
        return self.volumes[self.reference]

    @property
    def sequences(self) -> list[str]:
        """The sequences read (without the all-zero channels), in :data:`BRATS_MODALITIES` order."""
        return list(self.volumes)

    @property
    def modality_mask(self) -> torch.Tensor:
        """bool ``[4]``: True for the sequences given, in :data:`BRATS_MODALITIES` order."""
        return torch.tensor([s in self.volumes for s in BRATS_MODALITIES], dtype=torch.bool)


def sequence_name(name: str, option: str | None = None) -> str:
    """Map a user-given sequence name (``FLAIR``, ``t2w``, ``T1-Gd``, ...) to a BraTS sequence.

    Args:
        name: the name as the user spelt it.
        option: the setting it came from (``--resample-to``), named in the error.

    Raises:
        CaseError: the name is not a known spelling of FLAIR, T1, T1ce or T2.
    """
    key = re.sub(r"[^a-z0-9]", "", str(name).lower())
    for seq, aliases in CHANNEL_ALIASES.items():
        if key == seq or key in aliases:
            return seq
    what = f"{option} {name!r} is not a sequence name" if option else f"Unknown sequence name {name!r}"
    raise CaseError(f"{what}: use one of {list(BRATS_MODALITIES)} (or an alias such as t2f, t1n, t1c/t1gd, t2w).")


def _read_nifti(path: str) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header | None]:
    fix = "re-export it as .nii/.nii.gz or pass its DICOM series folder"
    img = open_nifti(path, missing_fix="check the path", corrupt_fix=fix)
    data = read_voxels(img, path, np.float32, corrupt_fix=fix)
    header = img.header.copy() if isinstance(img.header, nib.Nifti1Header) else None
    return np.asarray(data), np.asarray(img.affine, dtype=np.float64), header


#: Largest relative deviation of one slice step from the median step of a DICOM series. Rounded
#: positions stay far inside it; a missing slice doubles a step.
SLICE_STEP_TOLERANCE = 0.1


def _is_dicom_file(path: str) -> bool:
    """True for a file with the DICOM preamble (``DICM`` at byte 128), whatever its name, or for a
    preamble-less DICOM file (older exports), which starts with a little-endian tag of group 0x0002
    (file meta) or 0x0008 (identification)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return (len(head) == 132 and head[128:] == b"DICM") or head[:2] in (b"\x02\x00", b"\x08\x00")


def _dicom_header(sitk: Any, path: str) -> Any:
    """A ``SimpleITK.ImageFileReader`` holding the header of one DICOM file (no pixels read), through GDCM,
    which also reads files without the preamble.

    Raises:
        RuntimeError: ITK cannot read the file as an image.
    """
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader


def _other_dicom_object(sitk: Any, path: str, series_uid: str) -> bool:
    """True when ``path`` parses as a DICOM object of another series (a localizer, a report)."""
    try:
        reader = _dicom_header(sitk, path)
        uid = reader.GetMetaData("0020|000e") if reader.HasMetaDataKey("0020|000e") else ""
    except RuntimeError:
        # ITK reads images only: a key object selection, a structured report or a presentation state
        # (no pixel data) fails like a truncated slice, and PACS exports put them beside the images
        return _non_image_object_of_another_series(path, series_uid)
    return uid.strip().rstrip("\x00") != series_uid.strip().rstrip("\x00")


#: Tags looked for in the raw bytes (little endian, as nearly every export writes them).
_SERIES_UID_TAG = b"\x20\x00\x0e\x00"  # (0020,000E) Series Instance UID
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) Pixel Data


def _non_image_object_of_another_series(path: str, series_uid: str) -> bool:
    """True for a DICOM file without pixel data that names a series other than ``series_uid``.

    Such an object (a report, a key object selection) may reference the images' series inside a
    sequence, so any other series UID in it is enough. A slice of the series cut short carries only
    that series' UID, or pixel data, or neither, and is never taken for another object.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return False
    if _PIXEL_DATA_TAG in raw:
        return False
    wanted = series_uid.strip().rstrip("\x00").encode()
    start = raw.find(_SERIES_UID_TAG)
    while start >= 0:
        if raw[start + 4:start + 6] == b"UI":  # explicit VR: 2-byte length
            length, value_at = int.from_bytes(raw[start + 6:start + 8], "little"), start + 8
        else:  # implicit VR: 4-byte length
            length, value_at = int.from_bytes(raw[start + 4:start + 8], "little"), start + 8
        value = raw[value_at:value_at + length].rstrip(b"\x00 ")
        if 0 < length <= 64 and value_at + length <= len(raw) and re.fullmatch(rb"[0-9.]+", value) and value != wanted:
            return True
        start = raw.find(_SERIES_UID_TAG, start + 4)
    return False


def _check_all_dicom_files_read(sitk: Any, folder: str, series_uid: str, series_files: list[str]) -> None:
    """Refuse a folder where DICOM files were left out of its one series.

    GDCM silently skips a slice file it cannot parse (truncated, corrupt), and the volume would be
    segmented with a slice missing. Files that are not DICOM (notes, thumbnails), a
    ``DICOMDIR`` and DICOM objects of other series (images, or reports without pixel data) are ignored.
    """
    taken = {os.path.realpath(f) for f in series_files}
    others = sorted(entry.path for entry in os.scandir(folder) if entry.is_file()
                    and entry.name.upper() != "DICOMDIR" and os.path.realpath(entry.path) not in taken)
    for path in others:
        # GDCM skips a slice it may not open, as it does a damaged one; the fix is the permission
        check_readable(path)
    left_out = [path for path in others
                if _is_dicom_file(path) and not _other_dicom_object(sitk, path, series_uid)]
    if left_out:
        raise CaseError(f"{folder} has {len(left_out)} DICOM file(s) that could not be read as part of its series "
                        f"(first: {os.path.basename(left_out[0])}; corrupt or truncated): re-export the complete "
                        "series, or convert it to NIfTI.")


def _check_uniform_slices(folder: str, reader: Any, files: list[str], pixel_spacing: float) -> None:
    """Refuse a series whose slice positions are not evenly spaced (a missing or duplicated slice), or
    do not lie along the slice normal (a gantry-tilted acquisition).

    Positions (``0020|0032``) are projected on the slice normal from the first slice's orientation
    (``0020|0037``). Series without these tags, or with fewer than 3 slices, are not checked.

    Args:
        folder: the series folder, named in the errors.
        reader: the executed ``SimpleITK.ImageSeriesReader`` holding the per-slice tags.
        files: the slice files in the order read.
        pixel_spacing: the smallest in-plane voxel size (mm).
    """
    if len(files) < 3:
        return
    try:
        orientation = np.array([float(v) for v in reader.GetMetaData(0, "0020|0037").split("\\")])
        positions = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")]
                              for i in range(len(files))])
    except (RuntimeError, ValueError, IndexError):
        return  # tags absent (e.g. a multi-frame file): SimpleITK's own geometry is all there is
    if orientation.shape != (6,) or positions.shape != (len(files), 3):
        return
    try:
        orientations = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0037").split("\\")]
                                 for i in range(len(files))])
    except (RuntimeError, ValueError, IndexError):
        orientations = orientation[None]
    if orientations.shape[1:] == (6,):
        turned = np.flatnonzero(np.abs(orientations - orientation).max(axis=1) > 1e-3)
        if turned.size:  # e.g. a three-plane localizer filed under the series' UID
            raise CaseError(
                f"{folder}: its DICOM slices have different orientations ({os.path.basename(files[int(turned[0])])} "
                f"is not parallel to {os.path.basename(files[0])}), so another acquisition (a localizer, a "
                "reformat) shares the series: move its files out of the folder, or re-export the series alone.")
    try:
        pixel_spacings = np.array([[float(v) for v in reader.GetMetaData(i, "0028|0030").split("\\")]
                                   for i in range(len(files))])
    except (RuntimeError, ValueError, IndexError):
        pixel_spacings = np.ones((1, 2))
    if pixel_spacings.shape[1:] == (2,):
        # ITK takes the first slice's pixel size for all: slices of another field of view would be
        # read at the wrong scale
        other = np.flatnonzero(np.abs(pixel_spacings - pixel_spacings[0]).max(axis=1) > 1e-3 * pixel_spacings[0].min())
        if other.size:
            k = int(other[0])
            raise CaseError(
                f"{folder}: its DICOM slices have different pixel sizes ({os.path.basename(files[k])}: "
                f"{' x '.join(f'{v:g}' for v in pixel_spacings[k])} mm, {os.path.basename(files[0])}: "
                f"{' x '.join(f'{v:g}' for v in pixel_spacings[0])} mm), so another acquisition (a localizer, a "
                "reformat) shares the series: move its files out of the folder, or re-export the series alone.")
    normal = np.cross(orientation[:3], orientation[3:])
    # A tilted gantry moves each slice within its plane as well: the stack is sheared. SimpleITK
    # builds an orthogonal grid from the positions anyway, so the volume (and the label
    # map on its grid) would be displaced by up to the whole drift, tens of mm at the top of a head.
    offsets = positions - positions[0]
    drift = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    if drift.max() > SLICE_STEP_TOLERANCE * pixel_spacing:
        k = int(np.argmax(drift))
        raise CaseError(
            f"{folder}: the DICOM slices are not stacked along the slice normal ({os.path.basename(files[k])} lies "
            f"{drift[k]:.3g} mm off it in its plane; a gantry-tilted acquisition): convert the series to NIfTI with "
            "a converter that corrects gantry tilt (dcm2niix), or re-export it resampled to an orthogonal grid.")
    steps = np.diff(positions @ normal)
    median = float(np.median(np.abs(steps)))
    if median <= 0:
        raise CaseError(f"{folder}: its DICOM slices share one position: re-export the series with one "
                        "slice per position.")
    bad = np.flatnonzero(np.abs(np.abs(steps) - median) > SLICE_STEP_TOLERANCE * median)
    if bad.size:
        k = int(bad[0])
        raise CaseError(
            f"{folder}: the DICOM slices are not evenly spaced ({abs(steps[k]):.3g} mm between "
            f"{os.path.basename(files[k])} and {os.path.basename(files[k + 1])}, {median:.3g} mm elsewhere), so a "
            "slice is missing or duplicated: re-export the complete series, or convert it to NIfTI.")


def _check_same_slice_size(sitk: Any, folder: str, files: list[str]) -> None:
    """Name slices of another size in one series, which ITK reports only as an IO region or size mismatch.

    Run only once reading the series failed, so that a good series does not read every header twice.
    """
    sizes = {}
    for path in files:
        try:
            reader = _dicom_header(sitk, path)
        except RuntimeError:
            continue  # an unreadable file: the caller's error covers it
        sizes.setdefault(tuple(reader.GetSize()[:2]), path)
    if len(sizes) > 1:
        (first, a), (other, b) = list(sizes.items())[:2]
        raise CaseError(
            f"{folder}: its DICOM slices have different sizes ({os.path.basename(a)} is {first[0]}x{first[1]}, "
            f"{os.path.basename(b)} is {other[0]}x{other[1]}), so another acquisition (a localizer, a reformat) "
            "shares the series: move its files out of the folder, or re-export the series alone.")


def _describe_series(sitk: Any, reader: Any, folder: str, uid: str) -> str:
    """``series 3 'AX FLAIR' 155 file(s), UID``: the series number (``0020|0011``) and description
    (``0008|103e``) of one series, its file count and UID, by which a user tells the series of a
    folder apart (a repeated acquisition has the same description and another number)."""
    files = reader.GetGDCMSeriesFileNames(folder, uid)
    tags = {}
    try:
        info = _dicom_header(sitk, files[0])
        for tag in ("0020|0011", "0008|103e"):
            if info.HasMetaDataKey(tag):
                tags[tag] = info.GetMetaData(tag).strip().rstrip("\x00").strip()
    except (RuntimeError, IndexError):
        pass  # the UID and count still tell the series apart
    number = f"series {tags['0020|0011']} " if tags.get("0020|0011") else ""
    description = f"{tags['0008|103e']!r} " if tags.get("0008|103e") else ""
    return f"{number}{description}{len(files)} file(s), {uid}"


#: Most folders looked into below a folder without a series, so that pointing at a whole archive stays quick.
_MAX_FOLDERS_SEARCHED = 500


def _subfolders_with_dicom(folder: str) -> list[str]:
    """Subfolders (at any depth, sorted) holding DICOM files, judged by the first file of each one."""
    found = []
    for k, (root, dirs, files) in enumerate(os.walk(folder)):
        dirs.sort()
        if k >= _MAX_FOLDERS_SEARCHED:
            break
        names = sorted(f for f in files if f.upper() != "DICOMDIR")
        if root != folder and names and _is_dicom_file(os.path.join(root, names[0])):
            found.append(root)
    return found


def _tag_number(reader: Any, tag: str, index: int | None = None) -> float | None:
    """The first number of DICOM ``tag`` (``"0028|0120"``) in a header reader, or of slice ``index`` of an
    executed series reader; None when the tag is absent or not a number."""
    try:
        if index is None:
            text = reader.GetMetaData(tag) if reader.HasMetaDataKey(tag) else ""
        else:
            text = reader.GetMetaData(index, tag) if reader.HasMetaDataKey(index, tag) else ""
        return float(text.strip().rstrip("\x00").split("\\")[0])
    except (RuntimeError, ValueError, IndexError):
        return None


def _zero_pixel_padding(array: np.ndarray, header: Any, reader: Any | None) -> np.ndarray:
    """Set the voxels a series marks as padding to 0 (background), in place; ``array`` is ``[z, y, x]``.

    Pixel Padding Value (0028,0120), with Pixel Padding Range Limit (0028,0121) for a range, marks the area an MR
    export fills outside the reconstructed field of view. It is given in stored values, before the rescale slope and
    intercept that the read applied per slice. A positive padding value (or one the rescale makes positive) would
    count as head: the crop keeps voxels > 0 and normalisation uses every voxel not 0. Without the tag nothing
    changes.

    Args:
        array: the rescaled voxels, one ``[y, x]`` plane per slice file (or per frame of one file).
        header: a header reader of the first file, for a multi-frame file's tags.
        reader: the executed series reader holding each slice's tags, or None for one (multi-frame) file.
    """
    for k in range(array.shape[0]):
        tags, index = (reader, k) if reader is not None else (header, None)
        padding = _tag_number(tags, "0028|0120", index)
        if padding is None:
            continue
        limit = _tag_number(tags, "0028|0121", index)
        slope = _tag_number(tags, "0028|1053", index) or 1.0
        intercept = _tag_number(tags, "0028|1052", index) or 0.0
        stored = np.array([padding, padding if limit is None else limit])
        lo, hi = np.sort(stored * slope + intercept)
        # stored values are integers: half a rescaled step absorbs float32 rounding of the rescaled value
        tolerance = 0.5 * abs(slope)
        plane = array[k]
        plane[(plane >= lo - tolerance) & (plane <= hi + tolerance)] = 0.0
    return array


def _read_dicom(folder: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        import SimpleITK as sitk  # only needed for DICOM input
    except ImportError as err:
        raise CaseError(f"{folder} is a folder (DICOM series) but SimpleITK is not installed: "
                        "pip install SimpleITK, or convert the series to NIfTI.") from err
    sitk.ProcessObject_SetGlobalWarningDisplay(False)  # ITK's multi-line warnings would break the one-line error
    # GDCM finds no series at all in a folder holding a named pipe (or device, socket) beside the slices
    special = [(e.name, kind) for e in sorted(os.scandir(folder), key=lambda e: e.name)
               if (kind := special_file_kind(e.path)) is not None]
    if special:
        name, kind = special[0]
        raise CaseError(f"{folder} holds {len(special)} entry(ies) that are not files (first: {name}, a {kind}), which "
                        "are not read: remove them from the series folder.")
    reader = sitk.ImageSeriesReader()
    series = list(reader.GetGDCMSeriesIDs(folder))
    if not series:
        nested = _subfolders_with_dicom(folder)
        if nested:  # a PACS export: DICOMDIR at the top, one folder per series below it
            shown = ", ".join(os.path.relpath(d, folder) for d in nested[:3]) + (", ..." if len(nested) > 3 else "")
            raise CaseError(f"{folder} holds no DICOM series itself, but {len(nested)} of its subfolders hold DICOM "
                            f"files ({shown}): pass the subfolder of this sequence's series.")
        raise CaseError(f"{folder} holds no DICOM series: pass a folder of DICOM slices or a NIfTI file.")
    if len(series) > 1:
        # UIDs alone do not tell a reader which series is which: name each by its description and size
        # (each description rescans the folder: a whole study's folder names its first few series only)
        named = [_describe_series(sitk, reader, folder, uid) for uid in series[:5]]
        more = f"; and {len(series) - 5} more" if len(series) > 5 else ""
        raise CaseError(f"{folder} holds {len(series)} DICOM series ({'; '.join(named)}{more}): "
                        "put each series in its own folder and pass the one of this sequence.")
    files = list(reader.GetGDCMSeriesFileNames(folder, series[0]))
    _check_all_dicom_files_read(sitk, folder, series[0], files)
    try:  # a series of thousands of slices (or frames) that the memory left cannot hold: refused before it is read
        first = _dicom_header(sitk, files[0])
        size = tuple(first.GetSize())
        photometric = first.GetMetaData("0028|0004") if first.HasMetaDataKey("0028|0004") else ""
    except RuntimeError:
        first, size, photometric = None, (), ""  # an unreadable first slice: reading the series names it
    if photometric.strip().rstrip("\x00").strip().upper() == "MONOCHROME1":
        # inverted grey values (high values dark): GDCM inverts the stored values on read (an int16 slice's x reads
        # as -x-1), so the head would come out negative, or bright background around dark tissue, never as scanned
        raise CaseError(f"{folder} is stored as MONOCHROME1 (Photometric Interpretation (0028,0004): inverted grey "
                        "values, high values dark), which is not read as an MR scan: re-export the series as "
                        "MONOCHROME2, the usual MR setting.")
    if size:
        check_fits_in_memory(folder, size[:2] + ((len(files),) if len(files) > 1 else size[2:3]))
    try:
        reader.SetFileNames(files)
        # GDCM found the series; read it with GDCM too: SimpleITK's own format detection wants the
        # 128-byte preamble and refuses files exported without it, which GDCM reads.
        reader.SetImageIO("GDCMImageIO")
        # Float output: each slice's rescale slope/intercept is applied as that file is read, into a
        # buffer of the first slice's pixel type. With the default type (int16 when the first slice is
        # not rescaled) the other slices' fractional values are truncated and large ones wrap around.
        reader.SetOutputPixelType(sitk.sitkFloat32)
        reader.MetaDataDictionaryArrayUpdateOn()  # per-slice positions, for the spacing check
        # A series of one file is a multi-frame (enhanced) object holding the whole volume, or a single
        # slice. The series reader would stack it as a 4D image with one volume; the file reader gives
        # its 3D (or 2D) geometry from the frames' positions.
        if len(files) > 1:
            image = reader.Execute()
        else:
            image = sitk.ReadImage(files[0], sitk.sitkFloat32, imageIO="GDCMImageIO")
    except Exception as err:  # SimpleITK raises RuntimeError with multi-line text
        _check_same_slice_size(sitk, folder, files)
        raise CaseError(f"Cannot read the DICOM series in {folder} ({one_line(err)[:200]}): "
                        "re-export the series or convert it to NIfTI.") from err
    if image.GetDimension() > 3:  # the series reader stacks files that each hold a volume
        raise CaseError(f"{folder} holds {len(files)} multi-frame DICOM files of one series, each a volume, read as "
                        f"a {image.GetDimension()}D image: put the file of this sequence in a folder of its own.")
    _check_uniform_slices(folder, reader, files, min(image.GetSpacing()[:2]))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(f"{folder} is a {image.GetNumberOfComponentsPerPixel()}-component (colour/vector) series: "
                        "expected a grey-value MRI series.")
    # SimpleITK arrays are [z, y, x] and its geometry is in LPS; NIfTI affines map [x, y, z] to RAS
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if array.ndim == 3:  # padding outside the field of view is background, as in a skull-stripped scan
        # one multi-frame file: its tags are the first header's, read above
        header = None if len(files) > 1 else first if first is not None else _dicom_header(sitk, files[0])
        array = _zero_pixel_padding(array, header, reader if len(files) > 1 else None)
    data = array.transpose()  # a Fortran-order view, as NIfTI's
    ndim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
    affine = np.eye(4)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])[:ndim, :ndim]
    affine[:ndim, :ndim] = lps_to_ras @ direction @ np.diag(image.GetSpacing())
    affine[:ndim, 3] = lps_to_ras @ np.asarray(image.GetOrigin(), dtype=np.float64)
    return data, affine


def read_volume(
    path: str | os.PathLike, name: str, channel: int | None = None, cache: dict[str, Any] | None = None,
    n_channels: int | None = None,
) -> Volume:
    """Read and check one sequence: a NIfTI file, or a folder holding one DICOM series.

    Args:
        path: the file or DICOM folder.
        name: the sequence it is (any accepted spelling, see :func:`sequence_name`).
        channel: index of the sequence in a 4D ``X*Y*Z*C`` file (MSD Task01 layout); None for 3D files.
        cache: dict reused across calls so that a 4D file holding several sequences is read once.
        n_channels: how many channels the 4D file's ``dataset.json`` names (default ``channel + 1``), by which a
            file saved channel-first is told apart.

    Raises:
        CaseError: unreadable or corrupt file; not 3D (2D, a single slice, 4D with more than one
            volume); a 4D file saved channel-first; empty, constant or NaN/Inf voxels.
        EmptyChannelError: the ``channel`` of a 4D file is all zero, i.e. the sequence is missing.
    """
    seq = sequence_name(name)
    path = os.fspath(path)
    if not path.strip():  # an unset shell variable ("--flair $FLAIR") would otherwise name no file at all
        raise CaseError(f"The {seq} path is empty: give the file (or DICOM folder) of the {seq} scan, or leave "
                        "the sequence out.")
    if os.path.isdir(path):
        data, affine = _read_dicom(path)
        header = None
    else:
        if not os.path.exists(path):
            raise CaseError(f"{path} ({seq}) does not exist{missing_hint(path)}: check the path.")
        if not path.lower().endswith(_NIFTI_SUFFIXES):
            raise CaseError(f"{path} ({seq}) is not a .nii/.nii.gz file: convert it to NIfTI, or pass the folder "
                            "holding its DICOM series.")
        if cache is None or path not in cache:
            loaded = _read_nifti(path)
            if cache is not None:
                cache[path] = loaded
        data, affine, header = cache[path] if cache is not None else loaded
        header = header.copy() if header is not None else None
    if channel is not None:
        check_channels_last(path, tuple(data.shape), n_channels or int(channel) + 1)
        if data.ndim != 4 or not 0 <= int(channel) < data.shape[3]:
            raise CaseError(f"{path} has shape {tuple(data.shape)} but {seq} is described as channel {channel} of a "
                            "4D file: fix 'modality'/'channel_names' in dataset.json or re-export the 4D image.")
        data = data[..., int(channel)]
        if header is not None:
            header.set_data_shape(data.shape)
    shape = tuple(int(s) for s in data.shape)
    # some writers store a 3D volume as X*Y*Z*1
    if len(shape) > 3 and all(s == 1 for s in shape[3:]):
        data = data.reshape(shape[:3])
        shape = shape[:3]
        if header is not None:
            header.set_data_shape(shape)
    if data.ndim < 3:
        raise CaseError(f"{path} ({seq}) is {len(shape)}D with shape {shape}: expected a 3D volume; assemble the "
                        "slices into one 3D file, or pass the DICOM series folder.")
    if data.ndim > 3:
        raise CaseError(f"{path} ({seq}) is {len(shape)}D with shape {shape}: expected one 3D volume per sequence; "
                        "split it into one 3D file per sequence (or use an MSD dataset.json with --case-dir).")
    check_not_a_slice(f"{path} ({seq})", shape)
    if channel is not None and not data.any():
        # a 4D file cannot leave a sequence out, so an all-zero channel is how it marks one missing
        raise EmptyChannelError(f"{path} (channel {channel}, {seq}) is all zero, which marks {seq} missing: leave "
                                f"{seq} out of the case, or re-export the 4D image with the right channel.")
    what = f"{path} ({seq})" if channel is None else f"{path} (channel {channel}, {seq})"
    check_voxels(data, what, channel=channel is not None)
    check_affine(f"{path} ({seq})", affine)
    return Volume(seq, path, data, affine, header)


def _same_grid(a: Volume, b: Volume) -> bool:
    return a.shape == b.shape and float(np.abs(a.affine - b.affine).max()) <= AFFINE_TOLERANCE


def _spacing(affine: np.ndarray) -> list[float]:
    return np.round(np.linalg.norm(affine[:3, :3], axis=0), 4).tolist()


def resample_to_grid(
    data: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: tuple[int, ...]
) -> np.ndarray:
    """Trilinear resampling of ``data`` from its grid onto another grid; outside the source is 0.

    Args:
        data: ``[X, Y, Z]`` voxels on the grid of ``src_affine``.
        src_affine: voxel-to-world matrix of ``data``.
        dst_affine: voxel-to-world matrix of the target grid.
        dst_shape: spatial shape of the target grid.

    Returns:
        float32 ``[*dst_shape]``.
    """
    vox = torch.as_tensor(np.linalg.inv(src_affine) @ dst_affine, dtype=torch.float64)  # target -> source voxels
    src_shape = torch.as_tensor(data.shape, dtype=torch.float64)
    out = np.empty(dst_shape, dtype=np.float32)
    source = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None, None]
    ii, jj = torch.meshgrid(
        torch.arange(dst_shape[0], dtype=torch.float64), torch.arange(dst_shape[1], dtype=torch.float64), indexing="ij"
    )
    for k in range(dst_shape[2]):  # one target slice at a time keeps the coordinate grid small
        coords = torch.stack([ii, jj, torch.full_like(ii, float(k))], dim=-1) @ vox[:3, :3].T + vox[:3, 3]
        # snap to voxel centres within 1e-3 voxel: grids that differ only by flips, permutations or
        # whole-voxel shifts are then copied exactly, with no 1e-7 bleed into the zero background
        # (which would move the foreground crop and the non-zero normalisation mask)
        coords = torch.where((coords - coords.round()).abs() < 1e-3, coords.round(), coords)
        if bool((coords == coords.round()).all()):  # exact copy: grid_sample's float32 weights would bleed
            idx = coords.long()
            inside = ((idx >= 0) & (idx < src_shape.long())).all(dim=-1)
            idx = torch.where(inside[..., None], idx, torch.zeros_like(idx))
            values = source[0, 0][idx[..., 0], idx[..., 1], idx[..., 2]]
            out[:, :, k] = torch.where(inside, values, torch.zeros_like(values)).numpy()
            continue
        # grid_sample wants (W, H, D) = (z, y, x) order in [-1, 1], with corners at voxel centres
        grid = (2.0 * coords / (src_shape - 1) - 1.0).flip(-1).to(torch.float32)
        out[:, :, k] = F.grid_sample(source, grid[None, :, :, None], mode="bilinear", padding_mode="zeros",
                                     align_corners=True)[0, 0, :, :, 0].numpy()
    return out


def _check_distinct_files(named: Mapping[str, str]) -> None:
    """Refuse one 3D file (or DICOM folder) given for two sequences: a mix-up, never a real scan."""
    seen: dict[Any, str] = {}
    for seq, path in named.items():
        try:
            st = os.stat(path)
            key: Any = (st.st_dev, st.st_ino)  # catches hard links and symlinks too
        except OSError:
            key = os.path.realpath(path)  # read_volume reports a missing file
        if key in seen:
            raise CaseError(f"{path} is given as both {seen[key]} and {seq}: each sequence needs its own file; pass "
                            f"the right file for each, or leave out the sequence you do not have.")
        seen[key] = seq


def read_case(
    paths: Mapping[str, str | os.PathLike],
    resample_to: str | None = None,
    channels: Mapping[str, int] | None = None,
) -> CaseInputs:
    """Read the sequences of one case and make sure they share one grid.

    Args:
        paths: ``{sequence: file or DICOM folder}``; any non-empty subset of the four sequences,
            under any accepted spelling (see :func:`sequence_name`).
        resample_to: None to require one grid for all sequences (the default); a sequence name to
            resample the other sequences onto its grid instead. A ``resample_to`` sequence that is an
            all-zero channel of a 4D file gives way to another sequence of the same file (same grid),
            else to the first one read.
        channels: ``{sequence: channel index}`` of the sequences stored in one 4D file (MSD layout).
            A 4D file cannot leave a sequence out, so an all-zero channel marks it missing: the
            sequence is listed in ``empty_channels`` instead of ``volumes``.

    Raises:
        CaseError: no sequence, an unknown or repeated sequence name, one 3D file given for two
            sequences, two sequences holding the same voxels (a copy standing in for a missing one, see
            :func:`app.data.transforms.check_distinct_sequences`), any problem of :func:`read_volume`,
            sequences on different grids (without ``resample_to``), a ``resample_to`` sequence that was not
            given, or every sequence an all-zero channel.
    """
    if not paths:
        raise CaseError("No input sequence given: pass at least one of --flair, --t1, --t1ce, --t2 "
                        "(or --case-dir DIR).")
    named: dict[str, str] = {}
    for name, path in paths.items():
        seq = sequence_name(name)
        if seq in named:
            raise CaseError(f"Sequence {seq!r} given twice ({named[seq]} and {os.fspath(path)}): pass one file per "
                            "sequence.")
        named[seq] = os.fspath(path)
    index = {sequence_name(k): int(v) for k, v in (channels or {}).items()}
    _check_distinct_files({s: p for s, p in named.items() if s not in index})
    reference = sequence_name(resample_to, option("resample_to")) if resample_to else None
    if reference is not None and reference not in named:
        raise CaseError(f"{option('resample_to')} {resample_to} names a sequence that was not given (given: "
                        f"{list(named)}): pass one of those.")
    cache: dict[str, Any] = {}
    coverage: dict[str, dict[str, float]] = {}
    volumes: dict[str, Volume] = {}
    empty_channels: list[str] = []
    for seq in (s for s in BRATS_MODALITIES if s in named):
        try:
            volumes[seq] = read_volume(named[seq], seq, index.get(seq), cache,
                                       n_channels=max(index.values()) + 1 if seq in index else None)
        except EmptyChannelError:
            empty_channels.append(seq)
    if not volumes:
        files = ", ".join(sorted(set(named.values())))
        raise CaseError(f"{files}: every channel is 0, so the case holds no image: re-export the 4D image, or remove "
                        "the case.")
    if reference in empty_channels:
        reference = next((s for s, v in volumes.items() if v.source == named[reference]), None)
    reference = reference or next(iter(volumes))
    ref = volumes[reference]
    # before reordering or resampling drops the headers
    conflicts = {seq: conflict for seq, vol in volumes.items() if (conflict := vol.header_conflict)}
    resampled = []
    for seq, vol in volumes.items():
        if seq == reference or _same_grid(vol, ref):
            continue
        unplaced = next((v for v in (vol, ref) if not v.oriented), None)
        if unplaced is not None:
            # reordering or resampling by a guessed affine would move the scan (nibabel's guess is centred with x
            # flipped: a BraTS scan came out flipped front to back and 120 mm off), and the result would be written
            other = ref if unplaced is vol else vol
            raise no_orientation_error(f"{unplaced.source} ({unplaced.name})", unplaced.source,
                                       f"{other.source} ({other.name})", other.source, unplaced.shape, other.shape)
        reordering = grid_reordering(vol.shape, vol.affine, ref.shape, ref.affine)
        if reordering is not None:  # the same grid stored in another voxel order: exact, no resampling
            vol.data = reorder_voxels(vol.data, reordering)
            vol.affine, vol.header = ref.affine.copy(), None
            continue
        if vol.space != ref.space:
            # world coordinates of a template (a FLAIR registered to MNI 152) and of the scanner are not comparable:
            # resampling by them would put the other sequence somewhere in the head, and the result would be written
            raise different_spaces_error(f"{vol.source} ({seq})", f"{ref.source} ({reference})", vol.space, ref.space)
        if resample_to is None:
            diff = float(np.abs(vol.affine - ref.affine).max()) if vol.shape == ref.shape else float("nan")
            raise CaseError(
                f"{vol.source} ({seq}) and {ref.source} ({reference}) are on different grids (shape {vol.shape} vs "
                f"{ref.shape}, voxel size {_spacing(vol.affine)} vs {_spacing(ref.affine)} mm"
                + (f", largest affine difference {diff:.3g}" if diff == diff else "")
                + f"): register them onto one grid, or pass {option('resample_to')} {reference} to resample onto "
                f"{reference}."
            )
        # fields of view that cover different parts of the head (a FLAIR slab beside a whole-brain T1ce): the
        # reference grid leaves out tumour outside it, and the sequence reads 0 beyond its own field of view
        coverage[seq] = {
            "reference_head_outside": head_outside_share(ref.data != 0, ref.affine, vol.shape, vol.affine),
            "head_outside_reference": head_outside_share(vol.data != 0, vol.affine, ref.shape, ref.affine),
        }
        vol.data = resample_to_grid(vol.data, vol.affine, ref.affine, ref.shape)
        vol.affine, vol.header = ref.affine.copy(), None
        if not (vol.data > 0).any():
            raise CaseError(f"{vol.source} ({seq}) does not overlap {ref.source} ({reference}) in space: check that "
                            "both files belong to the same scan session.")
        resampled.append(seq)
    # a copy of one scan given as another sequence (T1 saved as T1ce, a series folder copied), which training refuses
    # too: the network would segment T1 as a contrast scan. Same-file mix-ups were refused above; this finds copies.
    check_distinct_sequences({seq: vol.data for seq, vol in volumes.items()},
                             {seq: vol.source if seq not in index else f"{vol.source} (channel {index[seq]})"
                              for seq, vol in volumes.items()})
    return CaseInputs(volumes, reference, resampled, empty_channels, coverage, conflicts)


def head_outside_share(head: np.ndarray, affine: np.ndarray, shape: Sequence[int], other_affine: np.ndarray) -> float:
    """Share of the voxels of ``head`` (a mask on the grid of ``affine``) whose centres lie outside the grid of
    ``shape`` and ``other_affine`` (beyond half a voxel from its outer voxel centres), rounded to 4 decimals; 0
    for an empty mask."""
    voxels = np.argwhere(head)
    if voxels.size == 0:
        return 0.0
    to_other = np.linalg.inv(np.asarray(other_affine, dtype=np.float64)) @ np.asarray(affine, dtype=np.float64)
    inside = np.ones(len(voxels), dtype=bool)
    for start in range(0, len(voxels), 1 << 20):  # in blocks: a whole head is millions of voxels
        block = voxels[start:start + (1 << 20)].astype(np.float64)
        coords = block @ to_other[:3, :3].T + to_other[:3, 3]
        inside[start:start + len(block)] = ((coords >= -0.5) & (coords <= np.asarray(shape[:3]) - 0.5)).all(axis=1)
    return round(float(1.0 - inside.mean()), 4)


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in millilitres (1 mL = 1000 mm^3) from a voxel-to-world matrix in mm."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


class AtomicOutputs:
    """Write several output files so that either all of them appear or none does.

    Use :meth:`temp` to get a temporary path in the destination folder (with the destination's
    suffix, so that nibabel picks the same format), write to it, and leave the ``with`` block: on
    success every temporary file is renamed over its destination (``os.replace`` is atomic within a
    folder); on an exception every temporary file is removed and the destinations are untouched.

    Example::

        with AtomicOutputs() as out:
            nib.save(img, out.temp("seg.nii.gz"))
            write_json(summary, out.temp("seg.json"))
    """

    def __init__(self) -> None:
        self._pending: list[tuple[str, str]] = []

    @staticmethod
    def _stem_suffix(name: str) -> tuple[str, str]:
        suffix = next((s for s in (*_NIFTI_SUFFIXES, ".json") if name.lower().endswith(s)), "")
        return name[: len(name) - len(suffix)], suffix

    @staticmethod
    def _temporary_match(candidate: str, destination: str) -> re.Match | None:
        stem, suffix = AtomicOutputs._stem_suffix(destination)
        return re.fullmatch(rf"\.{re.escape(stem)}\.[0-9a-f]{{8}}(?:-(\d+))?\.tmp{re.escape(suffix)}", candidate)

    @staticmethod
    def is_temporary_of(candidate: str, destination: str) -> bool:
        """Whether file name ``candidate`` is a temporary :meth:`temp` made for file name ``destination``
        (one a killed process left behind)."""
        return AtomicOutputs._temporary_match(candidate, destination) is not None

    @staticmethod
    def temporary_destination(candidate: str) -> str | None:
        """The file name whose temporary :meth:`temp` file name ``candidate`` is, or None when it is none.

        The name's suffix is given as :meth:`temp` writes it, in lower case (``X.NII.GZ``'s temporaries
        give ``X.nii.gz``). A folder listed once can then be looked up by output name: matching every
        file of a batch's output folder against every output name made each case's clean-up cost grow
        with the cases segmented before it.
        """
        match = _ANY_TEMPORARY_RE.fullmatch(candidate)
        if match is None:
            return None
        destination = match.group("stem") + match.group("suffix")
        return destination if AtomicOutputs.is_temporary_of(candidate, destination) else None

    @staticmethod
    def remove_abandoned(destination: str | os.PathLike) -> None:
        """Remove the temporaries of ``destination`` whose writer is gone (killed by SIGKILL or the OOM
        killer, so it could not remove them), as named by the process id :meth:`temp` records.

        A rerun of ``infer`` for the same output used to leave them, a hidden file of up to the size of
        a probability map per kill. The temporaries of a process still running (another job writing the
        same output) stay, and so do those of releases that recorded no process id.
        """
        dest = Path(destination).absolute()
        if not dest.parent.is_dir():
            return
        for entry in os.scandir(dest.parent):
            match = AtomicOutputs._temporary_match(entry.name, dest.name)
            if match is None or match.group(1) is None or not entry.is_file(follow_symlinks=False):
                continue
            try:
                os.kill(int(match.group(1)), 0)  # signal 0: only asks whether the process exists
                continue
            except ProcessLookupError:
                pass
            except OSError:  # it exists (another user's, EPERM)
                continue
            try:
                os.remove(entry.path)
            except FileNotFoundError:
                pass

    def temp(self, destination: str | os.PathLike) -> str:
        """A temporary path next to ``destination``, named with this process's id (see
        :meth:`remove_abandoned`); folders are created as needed."""
        dest = Path(destination).absolute()
        dest.parent.mkdir(parents=True, exist_ok=True)
        stem, suffix = self._stem_suffix(dest.name)
        tmp = dest.with_name(f".{stem}.{secrets.token_hex(4)}-{os.getpid()}.tmp{suffix}")
        self._pending.append((str(tmp), str(dest)))
        return str(tmp)

    def _cleanup(self) -> None:
        for tmp, _ in self._pending:
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass
        self._pending.clear()

    def __enter__(self) -> "AtomicOutputs":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self._cleanup()
            return
        try:
            for tmp, dest in self._pending:
                os.replace(tmp, dest)
        finally:
            self._cleanup()

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(list(self._pending))

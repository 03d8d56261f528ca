"""Load a discovered case into network-ready tensors, checking the files on the way.

:func:`load_case` reads a case record (see :func:`app.data.discovery.discover_cases`) with nibabel and
returns a 4-channel image in ``BRATS_MODALITIES`` order (absent sequences are zero channels, flagged
by ``modality_mask``) and, optionally, the WT/TC/ET region label. A sequence is absent when the case
has no file for it or, in an MSD 4D file, when its channel is all zero. :class:`LoadCased` is the MONAI
dictionary transform around it. Every problem with the files raises :class:`CaseError` naming the file.
"""

from __future__ import annotations

import gzip
import os
import zlib
from typing import Any, Hashable, Mapping, NamedTuple

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import ImageMetaKey, MetaKeys, SpaceKeys

from app.atomic import missing_hint
from app.data.cache import available_memory
from app.data.discovery import is_unedited_label_output, load_nifti
from app.data.errors import CaseError, check_readable, one_line, too_large_to_read, unreadable
from app.data.labels import LABEL_CONVENTIONS, labels_to_regions
from app.subsets import BRATS_MODALITIES

__all__ = [
    "AFFINE_TOLERANCE", "RECORD_KEYS", "LoadCased", "RegionVoxelsd", "ZeroAbsentSequencesd", "check_affine",
    "check_channels_last", "check_distinct_sequences", "check_fits_in_memory", "check_nifti_stream",
    "check_not_a_slice", "check_voxels", "different_spaces_error", "grid_reordering", "has_orientation", "header_conflict",
    "load_case",
    "no_orientation_error", "open_nifti", "read_voxels", "reorder_voxels", "xform_space",
]

#: Largest absolute difference between affine entries still treated as the same grid.
AFFINE_TOLERANCE = 1e-3

#: Largest value of a BraTS label map (4: enhancing tumour up to 2021, resection cavity in 2024).
MAX_LABEL_VALUE = max(v for parts in LABEL_CONVENTIONS.values() for values in parts.values() for v in values)

#: Keys of a discovery record that hold file locations rather than sample data.
RECORD_KEYS: tuple[str, ...] = ("images", "image4d", "channels", "label_map", "modalities", "label_file")


def check_fits_in_memory(path: str | os.PathLike, shape: tuple[int, ...], itemsize: int = 4) -> None:
    """Refuse a volume whose voxels (``itemsize`` bytes each, float32 as read) exceed the memory this process can
    still take (:func:`app.data.cache.available_memory`), before it is read.

    Allocating more than that does not fail at once on Linux: the pages are taken as they are filled, until the
    kernel's out-of-memory killer ends this process or another one on the machine (a shared clinical server).
    Without this check a scan too large for the machine was read until then.

    Raises:
        CaseError: :func:`app.data.errors.too_large_to_read`, naming the file, its shape and the memory it needs.
    """
    room = available_memory()
    need = itemsize * int(np.prod([int(n) for n in shape], dtype=object))
    if room is not None and need > room:
        raise too_large_to_read(path, tuple(shape), itemsize)


def check_nifti_stream(path: str, img: nib.spatialimages.SpatialImage) -> None:
    """Read a single-file NIfTI's whole (decompressed) stream once, before any voxel is read.

    nibabel reads only the bytes it needs, so a ``.nii.gz`` whose gzip CRC no longer matches (bit
    rot) or a file holding more voxels than its header's dims would otherwise load silently. The
    stream's length is also what makes reading safe against a file from elsewhere: a header that
    claims far more voxels than the file holds (a few kilobytes claiming gigabytes) is refused here,
    before nibabel allocates the memory the header asks for; and a stream that decompresses to more
    than the header describes (a gzip bomb) is refused as soon as it does, without decompressing
    the rest. An intact volume too large for the memory left is then refused (:func:`check_fits_in_memory`)
    before its voxels are read.

    Raises:
        CaseError: naming the file, for a CRC/length mismatch, a cut stream, surplus data, voxel data
            shorter than the header's dimensions, or voxels that do not fit in the memory left.
    """
    name = str(path).lower()
    if not name.endswith((".nii", ".nii.gz")) or not hasattr(img.header, "get_data_dtype"):
        return
    header = img.header
    offset = getattr(img.dataobj, "offset", None)  # the loaded header's vox_offset is reset; the proxy keeps it
    expected = None if offset is None else \
        int(offset) + int(np.prod(header.get_data_shape(), dtype=object)) * header.get_data_dtype().itemsize
    size = 0
    try:
        with (gzip.open if name.endswith(".gz") else open)(path, "rb") as f:
            while chunk := f.read(1 << 24):
                size += len(chunk)
                if expected is not None and size > expected:
                    break  # surplus: the rest of a (possibly endless) stream need not be decompressed
    except PermissionError:
        raise unreadable(path) from None
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise CaseError(f"{path} is corrupt or truncated ({type(err).__name__}: {err}): re-download or re-export it.") from err
    if expected is None:
        return
    if size > expected:
        raise CaseError(f"{path} holds at least {size - expected} bytes beyond the {header.get_data_shape()} voxels its "
                        "header describes: the header's dimensions are wrong; re-export the image.")
    if size < expected:
        raise CaseError(f"{path} holds {max(size - int(offset), 0)} bytes of voxels, but its header describes "
                        f"{header.get_data_shape()} {header.get_data_dtype()} voxels ({expected - int(offset)} bytes): "
                        "the file is truncated or its header's dimensions are wrong; re-download or re-export it.")
    check_fits_in_memory(path, header.get_data_shape())


def open_nifti(path: str, missing_fix: str = "restore the file or re-run discovery",
               corrupt_fix: str = "re-download or re-export it") -> nib.spatialimages.SpatialImage:
    """Open a NIfTI file (header only) and check that its stream holds the voxels the header describes.

    Training and clinical inference read scans through this one check; each names the fix that fits its user.

    Args:
        path: the file.
        missing_fix: what to do when the file does not exist.
        corrupt_fix: what to do when the file is corrupt or not NIfTI.

    Raises:
        CaseError: the file is missing, unreadable, corrupt, not NIfTI, or truncated.
    """
    check_readable(path)
    try:
        img = load_nifti(path)
    except FileNotFoundError as err:
        raise CaseError(f"{path} does not exist{missing_hint(path)}: {missing_fix}.") from err
    except Exception as err:  # nibabel raises many types for bad headers; all mean the same to the user
        raise CaseError(f"Cannot read {path} ({type(err).__name__}: {one_line(err)}): the file is corrupt or not "
                        f"NIfTI; {corrupt_fix}.") from err
    check_nifti_stream(path, img)
    return img


def read_voxels(img: nib.spatialimages.SpatialImage, path: str, dtype: type | None,
                corrupt_fix: str = "re-download or re-export it") -> np.ndarray:
    """Read the voxels of an image opened by :func:`open_nifti`, scaled by the header's slope and intercept
    (``dtype`` given) or as stored (``None``, for label maps); decompression errors only show up here.

    Raises:
        CaseError: the voxels do not fit in the memory left, or the file is corrupt or truncated.
    """
    try:
        return np.asanyarray(img.dataobj) if dtype is None else np.asanyarray(img.dataobj, dtype=dtype)
    except MemoryError:  # an intact file too large for the memory left: not a damaged file
        raise too_large_to_read(path, img.shape, np.dtype(dtype or img.get_data_dtype()).itemsize) from None
    except Exception as err:
        raise CaseError(f"Cannot read the voxels of {path} ({type(err).__name__}: {one_line(err)}): the file is "
                        f"corrupt or truncated; {corrupt_fix}.") from err


def _spatial_shape(shape: tuple[int, ...], path: str, channels: bool, label: bool = False) -> tuple[int, ...]:
    """Shape with singleton dims beyond the third removed (some writers store 3D volumes as X*Y*Z*1).

    ``label``: ``path`` is the case's segmentation, whose fix for extra dimensions is not a sequence's.
    """
    extra = tuple(d for d in shape[3:] if d != 1)
    if len(shape) < 3:
        raise CaseError(f"{path} is {len(shape)}D (shape {shape}); expected a 3D volume. Assemble the slices into "
                        "one 3D NIfTI file per sequence.")
    if channels:
        if len(extra) > 1:
            raise CaseError(
                f"{path} has shape {shape}; expected a 4D X*Y*Z*channels file as described by dataset.json."
            )
        return tuple(shape[:3]) + (extra or (1,))
    if extra and label:
        # a segmentation exported one channel per region or label (one-hot), as some pipelines save them
        raise CaseError(f"{path} is {len(shape)}D (shape {shape}); a segmentation is one 3D label map. Merge its "
                        "channels (one per region or label) into one map of the case's label values (e.g. 1 necrotic "
                        "core, 2 oedema, 4 enhancing under BraTS 2018-2021 names, 3 under BraTS 2023+ names) and save "
                        "it as a 3D file.")
    if extra:
        raise CaseError(f"{path} is {len(shape)}D (shape {shape}); expected one 3D volume per sequence. Split it "
                        "into one file per sequence, or describe it with an MSD dataset.json (imagesTr/ + 'modality').")
    return tuple(shape[:3])


class _Grid(NamedTuple):
    """Where an image of a case lies: its file, spatial shape and affine, whether its header places it
    (:func:`has_orientation`) and the space it is placed in (:func:`xform_space`)."""

    path: str
    shape: tuple[int, ...]
    affine: np.ndarray
    oriented: bool
    space: str


def _grid(path: str, shape: tuple[int, ...], img: Any) -> _Grid:
    """The :class:`_Grid` of ``img`` (a nibabel image) read from ``path`` with spatial ``shape``."""
    return _Grid(path, tuple(shape), img.affine, has_orientation(img.header), xform_space(img.header))

#: Spaces by NIfTI xform code. Codes 1 (scanner) and 2 (aligned anatomy) are the same coordinates as converters use
#: them (ITK writes 1, nibabel 2).
_XFORM_SPACES = {1: "scanner", 2: "scanner", 3: "Talairach", 4: "MNI 152", 5: "template"}


def header_conflict(header: Any) -> str | None:
    """How a NIfTI header contradicts itself where readers differ, or None, for training and inference alike: an
    sform and a qform (both set) that place the voxels differently, or an sform whose voxel size is not the header's
    pixdim.

    This product reads the sform, as nibabel and FSL do; ITK (ITK-SNAP, 3D Slicer) reads the qform and takes the
    voxel size from pixdim, so such a scan, and the label map that copies its header, lie elsewhere or measure other
    volumes there. Only the header is read.

    Args:
        header: a nibabel NIfTI header; None (DICOM) or a header without an sform gives None.
    """
    try:
        if header is None or int(header["sform_code"]) <= 0:
            return None
    except (KeyError, ValueError, TypeError):  # a format without the codes: one matrix, nothing to contradict
        return None
    sform = np.asarray(header.get_sform(), dtype=np.float64)
    if int(header["qform_code"]) > 0:
        diff = float(np.abs(np.asarray(header.get_qform(), dtype=np.float64) - sform).max())
        if diff > AFFINE_TOLERANCE:
            return f"its sform and qform disagree (by up to {diff:.3g} in the matrix)"
    zooms = np.linalg.norm(sform[:3, :3], axis=0)
    pixdim = np.abs(np.asarray(header["pixdim"][1:4], dtype=np.float64))
    if np.any(np.abs(zooms - pixdim) > 1e-3 * np.maximum(pixdim, 1e-6)):
        return (f"its sform's voxel size ({'x'.join(f'{z:.4g}' for z in zooms)} mm) is not its pixdim "
                f"({'x'.join(f'{z:.4g}' for z in pixdim)} mm)")
    return None


def xform_space(header: Any) -> str:
    """The space the affine nibabel takes from ``header`` maps to, by the NIfTI code of that matrix (the sform's
    when set, else the qform's): ``scanner`` for codes 1 and 2 and for a header without codes (DICOM: None), else
    the template (Talairach, MNI 152), for training and inference alike."""
    try:
        code = int(header["sform_code"]) or int(header["qform_code"])
    except (KeyError, ValueError, TypeError):  # no header, or a format without the codes
        return "scanner"
    return _XFORM_SPACES.get(code, f"xform code {code}") if code else "scanner"


def different_spaces_error(what: str, other_what: str, space: str, other_space: str) -> CaseError:
    """The error for two images of one case on different grids whose headers place them in different spaces
    (:func:`xform_space`), for training and inference alike: world coordinates of a template (a FLAIR registered
    to MNI 152) and of the scanner are not comparable, so resampling by them would put one scan somewhere in the
    other's head; the fix is registration, not resampling."""
    return CaseError(
        f"{what} and {other_what} lie on different grids in different spaces ({space} and {other_space} "
        "coordinates, by their headers' sform/qform codes), so neither can be resampled onto the other: register "
        "them into one space (or resample them onto one grid) first.")


def check_affine(what: str, affine: np.ndarray) -> None:
    """Refuse a degenerate voxel-to-world matrix (NaN/Inf, or singular: an sform row of zeros, pixdim 0 on an axis,
    as some converters write), for training and inference alike: it places the voxels nowhere, and grid
    comparisons and reorderings by it fail or mislead.

    Args:
        what: the image as named in the error (file, and sequence where known).
        affine: its voxel-to-world matrix.

    Raises:
        CaseError: naming ``what`` and the fix.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise CaseError(f"{what} has a degenerate voxel-to-world matrix {affine[:3].tolist()}: fix the header "
                        "(qform/sform) of the file.")


def has_orientation(header: Any) -> bool:
    """False for a NIfTI header whose qform_code and sform_code are both 0: it places the voxels nowhere, and the
    affine nibabel gives it is a guess from the voxel sizes (centred, x flipped), not where the scan lay."""
    try:
        return int(header["qform_code"]) > 0 or int(header["sform_code"]) > 0
    except (KeyError, ValueError, TypeError):  # a format without the codes: its affine is all there is
        return True


def no_orientation_error(what: str, path: str, other_what: str, other_path: str, shape: tuple[int, ...],
                         other_shape: tuple[int, ...]) -> CaseError:
    """The error for an image without orientation (:func:`has_orientation`) whose grid differs from another's of
    its case, for training and inference alike.

    Reordering or resampling it by nibabel's guessed affine would move it (a BraTS scan came out flipped front to
    back and 120 mm off), so the fix is to copy the geometry of the image it was stored beside.

    Args:
        what, other_what: the two images as named in the error (file, and sequence where known).
        path, other_path: their files, for the ``fslcpgeom`` command in the fix.
        shape, other_shape: their spatial shapes.
    """
    return CaseError(
        f"{what} has no orientation in its header (qform_code and sform_code are 0), so where it lies relative to "
        f"{other_what} is unknown and it cannot be put on the same grid: if both were stored on one grid (shape "
        f"{tuple(shape)} vs {tuple(other_shape)}), copy the geometry into it (fslcpgeom {other_path} {path}), else "
        "re-export it from the scanner's images.")


def _check_grid(path: str, shape: tuple[int, ...], affine: np.ndarray, ref: _Grid) -> None:
    ref_path, ref_shape, ref_affine = ref.path, ref.shape, ref.affine
    diff = float(np.abs(affine - ref_affine).max())
    if shape != ref_shape or diff > AFFINE_TOLERANCE:
        vox = np.round(np.linalg.norm(affine[:3, :3], axis=0), 4).tolist()
        ref_vox = np.round(np.linalg.norm(ref_affine[:3, :3], axis=0), 4).tolist()
        raise CaseError(
            f"{path} and {ref_path} are on different grids: shape {shape} vs {ref_shape}, voxel size {vox} vs "
            f"{ref_vox}, largest affine entry difference {diff:.4g} (tolerance {AFFINE_TOLERANCE}). Resample/register "
            "them onto one grid (e.g. resample every sequence and the label onto the first sequence) first."
        )


def grid_reordering(shape: tuple[int, ...], affine: np.ndarray, ref_shape: tuple[int, ...],
                    ref_affine: np.ndarray) -> np.ndarray | None:
    """The axis permutation and flips that put a volume stored in another voxel order exactly onto a
    reference grid, or None when no reordering does (or none is needed).

    Converters differ in how they store one acquisition (dcm2niix writes RAS-like arrays, ITK tools
    LPS), so a sequence can lie on the reference's grid with its axes permuted or flipped. Undoing
    that is exact, unlike resampling.

    Returns:
        A nibabel orientation transform for :func:`reorder_voxels`.
    """
    if len(shape) != 3:
        return None
    ornt = nib.orientations.io_orientation(affine)
    ref_ornt = nib.orientations.io_orientation(ref_affine)
    if np.array_equal(ornt, ref_ornt):
        return None
    transform = nib.orientations.ornt_transform(ornt, ref_ornt)
    new_shape = [0, 0, 0]
    for axis, (to, _) in enumerate(transform):
        new_shape[int(to)] = shape[axis]
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, shape)
    same = tuple(new_shape) == tuple(ref_shape) and float(np.abs(new_affine - ref_affine).max()) <= AFFINE_TOLERANCE
    return transform if same else None


def reorder_voxels(volume: np.ndarray, transform: np.ndarray | None) -> np.ndarray:
    """``volume`` in the reference's voxel order (``transform`` from :func:`grid_reordering`; None: as is)."""
    if transform is None:
        return volume
    return np.ascontiguousarray(nib.orientations.apply_orientation(volume, transform))


def _onto_grid(grid: _Grid, ref: _Grid) -> np.ndarray | None:
    """Refuse a volume (``grid``) off the reference grid; returns the reordering a volume on it in another voxel
    order needs (:func:`grid_reordering`), or None."""
    same = grid.shape == ref.shape and float(np.abs(grid.affine - ref.affine).max()) <= AFFINE_TOLERANCE
    if not (grid.oriented and ref.oriented) and not same:
        # by a guessed affine the grids differ, and "resample them onto one grid" would move the scan by the guess
        unplaced, other = (grid, ref) if not grid.oriented else (ref, grid)
        raise no_orientation_error(unplaced.path, unplaced.path, other.path, other.path, unplaced.shape, other.shape)
    transform = grid_reordering(grid.shape, grid.affine, ref.shape, ref.affine)
    if transform is None and grid.space != ref.space and not same:
        # "resample them onto one grid" would resample by the coordinates of two spaces
        raise different_spaces_error(grid.path, ref.path, grid.space, ref.space)
    if transform is None:
        _check_grid(grid.path, grid.shape, grid.affine, ref)
    return transform


def check_channels_last(path: str, shape: tuple[int, ...], channels: int) -> None:
    """Refuse an MSD 4D image saved from a channel-first array, for training and inference alike.

    A ``(C, X, Y, Z)`` array (as PyTorch and MONAI hold it) saved as it is puts the channels along the first axis,
    where MSD images hold them along the fourth: its "channels" would then be slices of every sequence, which
    training refused only as a label on "another grid" (whose fix, resampling, is wrong) and inference read as
    thin volumes (and refused as a head too small, or segmented).

    Args:
        path: the 4D file, named in the error.
        shape: its shape as stored.
        channels: the number of channels ``dataset.json`` names.

    Raises:
        CaseError: naming the file and the shape to save it in.
    """
    if len(shape) == 4 and shape[3] > channels and shape[0] == channels:
        raise CaseError(f"{path} has shape {tuple(shape)}: its {channels} channels lie along the first axis, "
                        f"where MSD images hold them along the fourth, so its 'channels' would be slices. Save the "
                        f"array channel-last, as shape {(*shape[1:], channels)} (numpy.moveaxis(data, 0, -1)).")


def check_not_a_slice(what: str, shape: tuple[int, ...]) -> None:
    """Refuse a volume one voxel thick along some axis, for training and inference alike.

    One slice of a series saved as a 3D file (``X*Y*1``, a 2D export) reads as a volume: training padded it to
    the patch size and trained on it, and evaluation scored it, without a word; inference refused it.

    Args:
        what: the file (and sequence) named in the error, e.g. ``"flair.nii.gz (flair)"``.
        shape: its spatial shape (the first three dimensions are checked).

    Raises:
        CaseError: naming ``what`` and the fix.
    """
    if len(shape) >= 3 and min(int(n) for n in shape[:3]) < 2:
        raise CaseError(f"{what} has shape {tuple(int(n) for n in shape)}, a single slice: expected a 3D volume; pass "
                        "the whole 3D series, not one slice.")


def check_voxels(data: np.ndarray, what: str, channel: bool = False) -> tuple[float, float]:
    """Refuse NaN/Inf voxels, constant volumes, label maps, masks (0 and one other value) and volumes without a
    positive voxel, for training and inference alike.

    A constant volume would count as a present sequence: training would fit its subsets on an
    empty image and inference would segment one. So would a segmentation given as a sequence
    (``--flair <case>_seg.nii.gz``): every voxel an integer from 0 to :data:`MAX_LABEL_VALUE`,
    which no MRI is (MRI intensities span hundreds or thousands of values, or are fractional).
    The foreground crop keeps the voxels above 0, so a volume with none (intensities shifted below 0 by an
    export) holds no head for the network: inference refused it, training used to train on it.
    A mask (0 and one value: a brain mask saved as 0/255 under a sequence's name) has a standard deviation of 0
    on its voxels that are not 0, so the z-score the network reads would be 0 everywhere.

    Args:
        data: one sequence's voxels.
        what: the file (and channel, sequence) named in the error, e.g. ``"t1.nii.gz (t1)"``.
        channel: ``data`` is one channel of a 4D file, whose fix is different.

    Returns:
        The smallest and largest voxel value.

    Raises:
        CaseError: naming ``what`` and the fix.
    """
    if not np.isfinite(data).all():
        n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        raise CaseError(f"{what} contains {n_bad} NaN/Inf voxel(s): replace them (e.g. with 0) or re-export the image.")
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        fix = ("re-export the 4D image with the right channel, or set the channel to 0 so the sequence counts as "
               "missing for this case." if channel else
               "pass the right file, or remove it so the sequence counts as missing for this case.")
        raise CaseError(f"{what} is constant (every voxel is {lo:g}) and holds no image: {fix}")
    # the range first: it rules out real MRI without the cost of an integrality check
    if lo >= 0.0 and hi <= MAX_LABEL_VALUE and np.array_equal(data, np.rint(data)):
        values = ", ".join(f"{v:g}" for v in np.unique(data))
        raise CaseError(f"{what} looks like a segmentation label map (every voxel is one of {values}), not an MRI "
                        "sequence: pass the MRI sequence instead.")
    if hi <= 0.0:
        raise CaseError(f"{what} has no positive voxel (range {lo:g} to {hi:g}): the model expects skull-stripped MRI "
                        "with positive brain intensities and 0 outside the brain; re-export the scan with its "
                        "original intensities.")
    # every voxel 0 or one value (a brain mask saved as 0/255): its z-score on the voxels not 0 has a standard
    # deviation of 0, which the normalisation replaces by 1, so the network would read a present sequence of zeros.
    # Only lo == 0 < hi can hold a single other value; a strided sample rules out real MRI without a full pass
    if lo == 0.0 and _zero_or(data[(slice(None, None, 7),) * data.ndim], hi) and _zero_or(data, hi):
        fix = ("re-export the 4D image with the right channel, or set the channel to 0 so the sequence counts as "
               "missing for this case." if channel else
               "pass the MRI sequence instead, or remove it so the sequence counts as missing for this case.")
        raise CaseError(f"{what} holds a single value ({hi:g}) on every voxel that is not 0: a mask, not an MRI "
                        "sequence (normalised on those voxels, as every sequence is, it would be 0 everywhere): "
                        f"{fix}")
    return lo, hi


def _zero_or(data: np.ndarray, value: float) -> bool:
    """Whether every voxel of ``data`` is 0 or ``value``."""
    return not bool(np.any((data != 0) & (data != value)))


def check_distinct_sequences(volumes: Mapping[str, np.ndarray], sources: Mapping[str, str]) -> None:
    """Refuse a case in which two sequences hold the same voxels, for training and inference alike.

    Some pipelines fill a missing sequence with a copy of another (T1 saved as T1ce, so that every case has
    four files): the network would then learn, be scored on, or segment T1 as if it were T1ce, without a word.
    A case may lack sequences, so the copy is to be left out. A few sampled voxels rule out almost every pair
    before a full comparison; they are taken by strided views, which copy nothing whatever the arrays' memory order
    (inference reads NIfTI voxels in Fortran order, and flattening those copied every volume).

    Args:
        volumes: ``{sequence: voxels}`` of the sequences a case has, all on one grid (in one voxel order).
        sources: ``{sequence: file}`` named in the error, e.g. ``"t1ce.nii.gz"`` or ``"img.nii.gz (channel 2)"``.

    Raises:
        CaseError: naming both files and the fix.
    """
    order = [s for s in BRATS_MODALITIES if s in volumes]
    for i, a in enumerate(order):
        va = volumes[a]
        sample = (slice(None, None, 7),) * va.ndim
        for b in order[i + 1:]:
            vb = volumes[b]
            if va.shape == vb.shape and np.array_equal(va[sample], vb[sample]) and np.array_equal(va, vb):
                raise CaseError(f"{sources[b]} ({b}) holds the same voxels as {sources[a]} ({a}): a copy standing in "
                                f"for a missing sequence would be read as {b}. Remove it so that the case counts as "
                                f"lacking {b} (a case may lack sequences), or put the real {b} scan in its place.")


def _meta_tensor(array: np.ndarray, affine: np.ndarray, path: str, case: str) -> MetaTensor:
    # the keys MONAI's LoadImage would set, so Orientationd/Spacingd/SaveImage treat it like a loaded image
    meta = {
        ImageMetaKey.FILENAME_OR_OBJ: path,
        MetaKeys.ORIGINAL_AFFINE: affine.copy(),
        MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape[1:]),
        MetaKeys.ORIGINAL_CHANNEL_DIM: 0,
        MetaKeys.SPACE: SpaceKeys.RAS,  # NIfTI affines map to RAS+ world coordinates
        "case": case,
    }
    return MetaTensor(torch.from_numpy(array), affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)


def load_case(record: Mapping[str, Any], load_label: bool = True) -> dict[str, Any]:
    """Read the images (and label) of one case record.

    Args:
        record: a case record from :func:`app.data.discovery.discover_cases`.
        load_label: read the label when the record has one.

    Returns:
        A copy of ``record`` where the label path moves from ``"label"`` to ``"label_file"``, plus

        * ``"image"``: float32 :class:`~monai.data.MetaTensor` ``[4, X, Y, Z]`` in ``BRATS_MODALITIES``
          order, zeros for absent sequences, affine and meta of the first present sequence;
        * ``"modality_mask"``: bool tensor ``[4]``, True where the sequence was read; False for a
          sequence without a file and for an all-zero channel of an MSD 4D file;
        * ``"modalities"``: the sequences of ``modality_mask``, in ``BRATS_MODALITIES`` order;
        * ``"label"``: float32 MetaTensor ``[3, X, Y, Z]`` with WT/TC/ET regions, only when loaded.

    Raises:
        CaseError: unreadable/corrupt file, image that is not 3D (MSD: not 4D), sequences or label on
            different grids (or on another grid and without orientation in its header), NaN/Inf in an image, a
            constant image (an all-zero 3D file included; in a 4D file a constant channel other than 0, or every
            channel 0), an image a single slice thick, label values unknown to the record's label map, 4D file
            with fewer channels than ``dataset.json`` names or with its channels along the first axis, two
            sequences holding the same voxels (a copy standing in for a missing one), a label with more than
            three dimensions.
    """
    case = str(record.get("case", "<unnamed case>"))
    images = dict(record.get("images") or {})
    image4d = record.get("image4d")
    channels = dict(record.get("channels") or {})
    unknown = sorted((set(images) | set(channels)) - set(BRATS_MODALITIES))
    if unknown:
        raise CaseError(f"Case {case!r}: unknown sequence name(s) {unknown} in record; use {list(BRATS_MODALITIES)}.")
    if not images and not image4d:
        raise CaseError(f"Case {case!r} has no image files in its record; re-run discovery on the case folder.")

    present: list[str] = []
    stacked: np.ndarray | None = None  # allocated once the grid is known; filled in place to avoid copies
    ref: _Grid | None = None
    if image4d:
        img = open_nifti(image4d)
        shape = _spatial_shape(tuple(img.shape), image4d, channels=True)
        need = max(channels.values(), default=-1) + 1
        if need == 0 or shape[3] < need:
            raise CaseError(f"{image4d} has {shape[3]} channel(s) but dataset.json names {need} ({channels}); "
                            "fix 'modality' in dataset.json or re-export the 4D image.")
        check_channels_last(image4d, tuple(img.shape), need)
        check_not_a_slice(image4d, shape)
        check_affine(image4d, img.affine)
        ref = _grid(image4d, shape[:3], img)
        data = read_voxels(img, image4d, np.float32).reshape(shape)
        stacked = np.zeros((len(BRATS_MODALITIES), *shape[:3]), dtype=np.float32)
        for seq, idx in channels.items():
            if not data[..., idx].any():
                # a 4D file cannot leave a sequence out, so an all-zero channel is how it marks one
                # missing: it stays a zero channel outside the mask, like a case without that file
                continue
            check_voxels(data[..., idx], f"{image4d} (channel {idx}, {seq})", channel=True)
            stacked[BRATS_MODALITIES.index(seq)] = data[..., idx]
            present.append(seq)
        del data
        if not present and not images:
            raise CaseError(f"{image4d}: every channel is 0, so the case holds no image: re-export the 4D image, "
                            "or remove the case (and its label).")
    for c, seq in enumerate(BRATS_MODALITIES):
        if seq not in images:
            continue
        path = images[seq]
        img = open_nifti(path)
        shape = _spatial_shape(tuple(img.shape), path, channels=False)
        check_not_a_slice(path, shape)
        check_affine(path, img.affine)
        transform = None
        if ref is None:
            ref = _grid(path, shape, img)
            stacked = np.zeros((len(BRATS_MODALITIES), *shape), dtype=np.float32)
        else:
            transform = _onto_grid(_grid(path, shape, img), ref)
        volume = reorder_voxels(read_voxels(img, path, np.float32).reshape(shape), transform)
        check_voxels(volume, path)
        stacked[c] = volume  # type: ignore[index]
        present.append(seq)
    assert ref is not None and stacked is not None  # at least one of images/image4d was read above
    ref_path, ref_affine = ref.path, ref.affine
    check_distinct_sequences({seq: stacked[BRATS_MODALITIES.index(seq)] for seq in present},
                             {seq: images[seq] if seq in images else f"{image4d} (channel {channels[seq]})"
                              for seq in present})

    out = {k: v for k, v in record.items() if k != "label"}
    out["label_file"] = record.get("label")
    # discovery only sees file names, so it lists an all-zero 4D channel as present
    out["modalities"] = [seq for seq in BRATS_MODALITIES if seq in present]
    out["image"] = _meta_tensor(stacked, np.asarray(ref_affine, dtype=np.float64), ref_path, case)
    out["modality_mask"] = torch.tensor([seq in present for seq in BRATS_MODALITIES], dtype=torch.bool)

    label_path = record.get("label")
    if load_label and label_path:
        if "label_map" not in record:
            raise CaseError(f"Case {case!r}: record has a label but no label_map; re-run discovery.")
        img = open_nifti(label_path)
        if is_unedited_label_output(img):
            # infer --out <case>_seg.nii.gz on an unlabelled case: as the case's label, it would score the model
            # against its own output (Dice near 1) and train on it, without a word
            raise CaseError(f"{label_path} is a label map written by this product's inference, unedited since, not a "
                            "reference segmentation: scoring or training against it would measure the model against "
                            "its own output. Move it out of the data folder (write inference outputs elsewhere), or "
                            "put the reference segmentation in its place.")
        shape = _spatial_shape(tuple(img.shape), label_path, channels=False, label=True)
        check_affine(label_path, img.affine)
        transform = _onto_grid(_grid(label_path, shape, img), ref)
        labels = reorder_voxels(read_voxels(img, label_path, None).reshape(shape), transform)
        regions = labels_to_regions(labels, record["label_map"], source=label_path, layout=record.get("layout"))
        out["label"] = _meta_tensor(regions, np.asarray(ref_affine, dtype=np.float64), label_path, case)
    return out


class LoadCased(MapTransform):
    """Dictionary transform: turn a discovery case record into ``image``/``modality_mask``/``label`` tensors.

    See :func:`load_case` for the outputs and the checks. By default the record's file-location keys
    (:data:`RECORD_KEYS`) are dropped from the output: they differ in structure between cases with
    different sequences, which breaks batch collation, and the file names stay available in the
    tensors' meta (``filename_or_obj``). ``"case"``, ``"layout"`` and any extra keys are kept.

    Args:
        load_label: read the label when the record has one.
        keep_record: keep the record's file-location keys (for single-case inference, not batching).
    """

    def __init__(self, load_label: bool = True, keep_record: bool = False) -> None:
        # the output keys are fixed by the record format; "label" is absent for unlabelled cases
        super().__init__(keys=("image", "label"), allow_missing_keys=True)
        self.load_label = load_label
        self.keep_record = keep_record

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = load_case(data, load_label=self.load_label)
        if not self.keep_record:
            for key in RECORD_KEYS:
                out.pop(key, None)
        return out


class RegionVoxelsd(MapTransform):
    """Dictionary transform: record the voxel count of each label channel before the foreground crop.

    ``CropForegroundd`` crops the label with the image, to the box where some sequence is above 0.
    Reference tumour outside that box (where every sequence is 0) would then drop out of the Dice
    silently, and the case would score higher than its label maps do: inference predicts nothing
    there either. With the counts taken before the crop, the evaluator counts those voxels as missed.

    Args:
        keys: label keys, ``[C, ...]`` region channels.
        count_key: the key the counts go to (``int64 [C]``); with several keys, ``<key>_voxels`` each.
        allow_missing_keys: skip a sample without a label.
    """

    def __init__(self, keys: Any = "label", count_key: str = "label_voxels", allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.count_key = count_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        keys = list(self.key_iterator(out))
        for key in keys:
            label = torch.as_tensor(out[key])
            counts = (label != 0).flatten(1).sum(dim=1, dtype=torch.int64)
            out[self.count_key if len(keys) == 1 else f"{key}_voxels"] = counts
        return out


class ZeroAbsentSequencesd(MapTransform):
    """Dictionary transform: set the channels of absent sequences (``modality_mask`` False) back to 0.

    Intensity augmentations such as ``RandShiftIntensityd`` shift every channel, absent ones
    included; this restores the rule that an absent sequence is a zero channel, so nothing
    downstream (a zero-channel check, a network reading every channel) sees a made-up input.

    Args:
        keys: image keys, ``[C, ...]`` with one channel per entry of the mask.
        mask_key: key of the boolean modality mask ``[C]``.
        allow_missing_keys: skip the keys a sample lacks instead of raising ``KeyError``, as with
            MONAI's dictionary transforms (the mask is then read only when some key is present).

    Raises:
        KeyError: a key or the mask is missing (without ``allow_missing_keys``).
        ValueError: an image's channels do not match the mask's entries.
    """

    def __init__(self, keys: Any = "image", mask_key: str = "modality_mask", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        keys = list(self.key_iterator(out))
        if not keys:
            return out
        if self.mask_key not in out:
            raise KeyError(f"{self.mask_key!r} (the modality mask) is not in the sample (keys: "
                           f"{sorted(map(str, out))}): load the case with LoadCased, or pass mask_key.")
        present = torch.as_tensor(out[self.mask_key]).bool()
        absent = (~present).nonzero().flatten().tolist()
        for key in keys:
            image = out[key]
            if image.shape[0] != present.numel():
                raise ValueError(f"{key!r} has {image.shape[0]} channels, {self.mask_key!r} {present.numel()} entries.")
            if absent:
                image = image.clone() if isinstance(image, torch.Tensor) else np.array(image, copy=True)
                image[absent] = 0
                out[key] = image
        return out

"""Find brain-tumour cases on disk and describe each as a JSON-serialisable record.

Three layouts are recognised anywhere below the root folder:

* BraTS 2018-2021: ``<case>_{flair,t1,t1ce,t2,seg}.nii(.gz)`` (enhancing tumour = 4);
* BraTS 2023+: ``<case>-{t2f,t1n,t1c,t2w,seg}.nii(.gz)`` (enhancing tumour = 3);
* MSD Task01 and nnU-Net v1/v2 raw folders: a folder with ``dataset.json``, images under ``imagesTr/``
  and ``imagesTs/`` (one 4D file per case, or one ``<case>_XXXX`` file per channel), labels under
  ``labelsTr/`` (and ``labelsTs/``); channel and label meanings come from ``dataset.json``. When labels
  are required, test images (``imagesTs/``) without a label are left out.

Discovery looks at names, plus one image header where an nnU-Net v1 folder's names leave open
whether its images are per channel; image contents are checked when loading (:mod:`app.data.transforms`).
"""

from __future__ import annotations

import copy
import gzip
import json
import logging
import math
import os
import re
import struct
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from app.atomic import escape_unsafe, missing_hint, unsafe_character
from app.data.errors import CaseError, check_regular_file
from app.data.labels import LABEL_CONVENTIONS, LABEL_PARTS, NON_TUMOUR_PART
from app.subsets import BRATS_MODALITIES

__all__ = ["CaseError", "ACCEPTED_LAYOUTS", "CHANNEL_ALIASES", "MAX_NIFTI_EXTENSION_BYTES", "OUTPUT_DESCRIPTION_PREFIX",
           "OUTPUT_CRC_RE", "brats2023_named", "is_unedited_label_output", "load_nifti", "recorded_crc_matches",
           "voxel_crc", "case_sources", "discover_cases", "record_files", "is_inference_output", "msd_channels", "msd_label_map"]

logger = logging.getLogger(__name__)

#: Start of the NIfTI header description of every image inference writes (``<case>.nii.gz``,
#: ``<case>_prob.nii.gz``): how discovery and a rerun recognise the product's own outputs.
OUTPUT_DESCRIPTION_PREFIX = "brats_gmd "


#: Most bytes of header extensions a NIfTI file may hold before its voxels. nibabel reads the extensions into
#: memory when it opens the header; a DICOM header kept in one takes kilobytes, dcmstack's JSON a few MiB.
MAX_NIFTI_EXTENSION_BYTES = 64 * 2**20


def _check_extension_size(path: str) -> None:
    """Refuse a single-file NIfTI whose header extensions (what lies between the header and ``vox_offset``)
    exceed :data:`MAX_NIFTI_EXTENSION_BYTES`, from its first bytes alone.

    nibabel reads every extension into memory as it opens the header, up to ``vox_offset``, which the file sets:
    a few megabytes of compressed zeros made it take gigabytes, in discovery (which opens every NIfTI header
    of a folder) before any other check ran. Files that cannot be read are left to nibabel.

    Raises:
        ValueError: the extensions' size, for the caller to name the file.
    """
    lower = path.lower()
    if not lower.endswith((".nii", ".nii.gz")):
        return
    try:
        with (gzip.open if lower.endswith(".gz") else open)(path, "rb") as f:
            head = f.read(540)
    except (OSError, EOFError, zlib.error):
        return
    for header_size, offset_at, kind in ((348, 108, "f"), (540, 168, "q")):  # NIfTI-1: float32; NIfTI-2: int64
        for order in "<>":
            if len(head) >= header_size and struct.unpack(f"{order}i", head[:4])[0] == header_size:
                vox_offset = struct.unpack_from(f"{order}{kind}", head, offset_at)[0]
                extensions = vox_offset - header_size - 4  # the 4 bytes of the extension flag
                if math.isfinite(vox_offset) and extensions <= MAX_NIFTI_EXTENSION_BYTES:
                    return
                raise ValueError(f"its header puts the voxels {vox_offset:.0f} bytes into the file, behind "
                                 f"{extensions / 2**20:.0f} MiB of header extensions (at most "
                                 f"{MAX_NIFTI_EXTENSION_BYTES // 2**20} MiB are read): the header is damaged, or the "
                                 "file was made to exhaust memory")


def load_nifti(path: str | os.PathLike) -> Any:
    """``nibabel.load`` of a NIfTI file whatever the case of its extension (``.nii.gz``, ``.NII.GZ``, ``.Nii.gz``).

    nibabel rebuilds the file name from its extension in lower or upper case, so a file whose extension mixes
    both (``.Nii.gz``, which discovery accepts as every spelling) was looked up under another, missing name and
    refused as a file that does not exist. Such a file is opened under its own name instead. A file with more
    header extensions than a scan holds is refused before nibabel reads them (:func:`_check_extension_size`).

    Raises:
        FileNotFoundError: there is no file at ``path``.
        CaseError: a named pipe, device or socket.
        ValueError: header extensions beyond :data:`MAX_NIFTI_EXTENSION_BYTES`.
        Exception: nibabel's own errors for a file it cannot read.
    """
    import nibabel as nib

    path = os.fspath(path)
    check_regular_file(path)  # a named pipe under a scan's name: nibabel would wait on it forever
    _check_extension_size(path)
    try:
        return nib.load(path)
    except FileNotFoundError:
        if not os.path.isfile(path):
            raise
    holder = nib.FileHolder(filename=path)
    try:
        return nib.Nifti1Image.from_file_map({"header": holder, "image": holder})
    except Exception as err:  # noqa: BLE001 - a NIfTI-2 header, or nibabel's error for a damaged file
        try:
            return nib.Nifti2Image.from_file_map({"header": holder, "image": holder})
        except Exception:  # noqa: BLE001 - the NIfTI-1 reading's error says more about a damaged file
            raise err from None


def is_inference_output(path: str | os.PathLike) -> bool:
    """Whether the NIfTI file at ``path`` is a label or probability map written by inference.

    Batch inference may write into a folder that also holds scans (an nnU-Net ``imagesTs``); a rerun
    must not take its own earlier outputs for misnamed scans. Only the header is read; a file that
    cannot be read is not known to be an output.
    """
    try:
        return bytes(load_nifti(path).header["descrip"]).startswith(OUTPUT_DESCRIPTION_PREFIX.encode())
    except Exception:  # noqa: BLE001 - unreadable or not NIfTI: the caller's own checks report it
        return False


#: How an output image's header description records the checksum of its voxels.
OUTPUT_CRC_RE = re.compile(r" crc32=([0-9a-f]{8})\b")


def voxel_crc(data: Any) -> str:
    """CRC-32 of an image's voxels (values in storage order, whatever their byte order on disk)."""
    import numpy as np

    arr = np.asarray(data)
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)
    return f"{zlib.crc32(arr.tobytes(order='F')):08x}"


def recorded_crc_matches(img: Any) -> bool | None:
    """Whether the voxels of the nibabel image ``img`` still have the checksum its header description
    records (:data:`OUTPUT_CRC_RE`); None when it records none (not an output, or one of a release before
    the checksum). A map corrected by hand keeps the header in most viewers, but not the checksum."""
    import numpy as np

    crc = OUTPUT_CRC_RE.search(bytes(img.header["descrip"]).decode("ascii", "replace"))
    return None if crc is None else crc.group(1) == voxel_crc(np.asarray(img.dataobj))


def is_unedited_label_output(img: Any) -> bool:
    """Whether the nibabel image ``img`` is a label map written by inference and not edited since.

    Its header description names it (``brats_gmd labels …``) and records the checksum of the voxels
    written; a label map corrected by hand keeps the header in most viewers but not the checksum, and
    an output of a release before the checksum cannot be told from an edit, so both count as edited.
    """
    if not bytes(img.header["descrip"]).startswith(f"{OUTPUT_DESCRIPTION_PREFIX}labels".encode()):
        return False
    return recorded_crc_matches(img) is True


ACCEPTED_LAYOUTS = (
    "BraTS 2018-2021 '<case>_{flair,t1,t1ce,t2,seg}.nii.gz'; "
    "BraTS 2023+ '<case>-{t2f,t1n,t1c,t2w,seg}.nii.gz'; "
    "MSD Task01 / nnU-Net (v1 or v2) folder with dataset.json, imagesTr/ (imagesTs/) and labelsTr/"
)

# DOTALL: a case id holding a newline is found, and refused (app.atomic.unsafe_character), rather than not found
_BRATS2018_RE = re.compile(r"^(?P<case>.+)_(?P<seq>flair|t1ce|t1|t2|seg)\.nii(?:\.gz)?$", re.IGNORECASE | re.DOTALL)
_BRATS2023_RE = re.compile(r"^(?P<case>.+)-(?P<seq>t2f|t1n|t1c|t2w|seg)\.nii(?:\.gz)?$", re.IGNORECASE | re.DOTALL)
_BRATS2023_SEQ = {"t2f": "flair", "t1n": "t1", "t1c": "t1ce", "t2w": "t2", "seg": "seg"}
# nnU-Net v2 stores one file per channel: <case>_0000.nii.gz. Extensions are matched in any case
# (.NII.GZ), as in the BraTS names above and as nibabel reads them
_NNUNET_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<idx>\d{4})\.nii(?:\.gz)?$", re.IGNORECASE | re.DOTALL)
_NIFTI_RE = re.compile(r"^(?P<case>.+)\.nii(?:\.gz)?$", re.IGNORECASE | re.DOTALL)
# how the releases are downloaded (a .tar of BraTS 2021 or MSD, a .zip of BraTS 2023); a .nii.gz is no archive
_ARCHIVE_RE = re.compile(r"\.(?:zip|tar|tgz|tar\.gz|tar\.bz2|tar\.xz|7z)$", re.IGNORECASE)


def brats2023_named(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sequence named as BraTS 2023+ names them (``<case>-t2f.nii.gz``, ...).

    Such names say the case comes with the 2023 label values (enhancing tumour 3), which training
    reads from them (``label_convention auto``) and inference writes (``--labels auto``).
    """
    m = _BRATS2023_RE.match(os.path.basename(os.fspath(path).rstrip("/\\")))
    return m is not None and m.group("seq").lower() != "seg"


#: Accepted spellings of each sequence in ``dataset.json``, compared after lower-casing and
#: dropping everything but letters and digits ("T1-Gd" -> "t1gd").
CHANNEL_ALIASES: dict[str, tuple[str, ...]] = {
    "flair": ("flair", "t2flair", "flairt2", "t2f", "fl"),
    "t1": ("t1", "t1w", "t1n", "t1native", "nativet1", "t1pre", "t1precontrast"),
    "t1ce": (
        "t1ce", "t1c", "t1gd", "t1wgd", "t1gad", "t1cgd", "t1post", "t1postcontrast",
        "t1contrast", "t1wce", "cet1", "t1wc", "t1enhanced",
    ),
    "t2": ("t2", "t2w"),
}
_ALIAS_TO_SEQ = {alias: seq for seq, aliases in CHANNEL_ALIASES.items() for alias in aliases}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _label_part(name: str) -> str | None:
    """Map a label name from dataset.json to background / ncr / ed / et / wt / tc / other, or None if unknown."""
    n = _norm(name)
    if n in ("background", "bg", "clear", "healthy", "normal", "none"):
        return "background"
    # BraTS 2024's resection cavity: labelled, but part of no tumour region
    if n in ("rc", "cavity") or "resection" in n:
        return NON_TUMOUR_PART
    if n in ("wt", "wholetumor", "wholetumour"):
        return "wt"
    if n in ("tc", "tumorcore", "tumourcore"):
        return "tc"
    # oedema first: BraTS 2023 calls it "surrounding non-enhancing FLAIR hyperintensity" (SNFH)
    if n == "ed" or "edema" in n or "oedema" in n or "snfh" in n or "hyperintens" in n:
        return "ed"
    # non-enhancing before enhancing: "non-enhancing tumor" contains "enhancing"
    if n in ("ncr", "net", "ncrnet", "netc") or "necro" in n or "nonenhanc" in n:
        return "ncr"
    if n == "et" or "enhancing" in n or "enhanced" in n:
        return "et"
    return None


def _read_dataset_json(path: Path) -> dict[str, Any]:
    check_regular_file(path)  # a named pipe in a folder from an archive: open() would wait forever
    try:
        with open(path, encoding="utf-8") as f:
            desc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CaseError(f"Cannot read {path}: {err}. Fix the JSON or remove the file.") from err
    if not isinstance(desc, dict):
        raise CaseError(
            f"{path} is not a JSON object: expected MSD/nnU-Net keys 'modality'/'channel_names' and 'labels'."
        )
    return desc


def msd_channels(desc: dict[str, Any], source: str | os.PathLike = "dataset.json") -> dict[str, int]:
    """Map BraTS sequence names to channel indices from an MSD ``modality`` / nnU-Net ``channel_names`` entry.

    Args:
        desc: parsed ``dataset.json``.
        source: path of ``dataset.json``, for error messages.

    Returns:
        ``{seq: channel index}`` with ``seq`` from :data:`app.subsets.BRATS_MODALITIES`.

    Raises:
        CaseError: no channel mapping, a channel that is no BraTS sequence, two channels for one sequence,
            or a channel key that is not an integer.
    """
    names = desc.get("channel_names", desc.get("modality"))
    if not isinstance(names, dict) or not names:
        raise CaseError(f"{source} has no 'modality' (MSD) or 'channel_names' (nnU-Net v2) mapping: add e.g. "
                        '{"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}.')
    channels: dict[str, int] = {}
    for idx, name in names.items():
        seq = _ALIAS_TO_SEQ.get(_norm(name))
        if seq is None:
            raise CaseError(
                f"{source}: channel {idx} is named {name!r}, which is not a BraTS sequence. Rename it to one of "
                f"{ {s: list(a) for s, a in CHANNEL_ALIASES.items()} } (case and punctuation are ignored)."
            )
        if seq in channels:
            raise CaseError(
                f"{source}: channels {channels[seq]} and {idx} both map to {seq!r}; give each sequence one channel."
            )
        try:
            channels[seq] = int(idx)
        except ValueError as err:
            raise CaseError(f"{source}: channel key {idx!r} is not an integer index; use '0', '1', ...") from err
    return channels


def msd_label_map(desc: dict[str, Any], source: str | os.PathLike = "dataset.json") -> dict[str, list[int]]:
    """Build ``{"ncr": [...], "ed": [...], "et": [...]}`` from the ``labels`` entry of ``dataset.json``.

    Accepts MSD style (``{"1": "edema", ...}``), nnU-Net v2 style (``{"edema": 1, ...}``) and nnU-Net v2
    region style (``{"whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}``), from which
    the parts are derived as NCR = TC \\ ET and ED = WT \\ TC.

    Raises:
        CaseError: no ``labels`` mapping, non-integer values, regions without an enhancing-tumour label,
            or a value given to two parts.
    """
    labels = desc.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise CaseError(f"{source} has no 'labels' mapping: add e.g. "
                        '{"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}.')
    pairs: list[tuple[str, list[int]]] = []
    try:
        if all(isinstance(v, str) for v in labels.values()):  # MSD: value -> name
            pairs = [(name, [int(k)]) for k, name in labels.items()]
        else:  # nnU-Net v2: name -> value or list of values
            pairs = [
                (name, [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]) for name, v in labels.items()
            ]
    except (TypeError, ValueError) as err:
        raise CaseError(f"{source}: label values in {labels!r} must be integers. Fix the 'labels' entry.") from err
    found: dict[str, set[int]] = {}
    for name, values in pairs:
        part = _label_part(name)
        if part is None:
            raise CaseError(
                f"{source}: label {name!r} ({values}) is not a known tumour label. Rename it to one of 'background', "
                "'edema', 'non-enhancing tumor'/'necrosis', 'enhancing tumor' (or regions 'whole tumor', 'tumor core'), "
                "or 'resection cavity' for a labelled structure outside the tumour regions."
            )
        if part != "background":
            found.setdefault(part, set()).update(values)
    parts = {p: set(found.get(p, set())) for p in LABEL_PARTS}
    if not parts["et"] and "tc" in found and "wt" in found:
        raise CaseError(f"{source}: regions given but no enhancing-tumour label; add e.g. 'enhancing tumor': 3.")
    if "tc" in found and not parts["ncr"]:
        parts["ncr"] = found["tc"] - parts["et"]
    if "wt" in found and not parts["ed"]:
        parts["ed"] = found["wt"] - found.get("tc", parts["ncr"] | parts["et"])
    missing = [p for p in LABEL_PARTS if not parts[p]]
    if missing:
        raise CaseError(
            f"{source}: labels {labels!r} give no value for {missing} (ncr = necrosis/non-enhancing core, "
            "ed = edema, et = enhancing tumour). Name each tumour label in 'labels'."
        )
    named = (*LABEL_PARTS, NON_TUMOUR_PART)
    parts[NON_TUMOUR_PART] = set(found.get(NON_TUMOUR_PART, set()))
    for i, a in enumerate(named):
        for b in named[i + 1:]:
            if parts[a] & parts[b]:
                raise CaseError(f"{source}: label value(s) {sorted(parts[a] & parts[b])} are both {a!r} and {b!r}; "
                                "give each value one meaning.")
    return {p: sorted(parts[p]) for p in named if p in LABEL_PARTS or parts[p]}


def _record(case: str, layout: str, images: dict[str, str], image4d: str | None, channels: dict[str, int],
            label: str | None, label_map: dict[str, list[int]]) -> dict[str, Any]:
    present = set(images) | (set(channels) if image4d else set())
    return {
        "case": case,
        "layout": layout,
        "images": {s: images[s] for s in BRATS_MODALITIES if s in images},
        "image4d": image4d,
        "channels": {s: channels[s] for s in BRATS_MODALITIES if s in channels},
        "label": label,
        "label_map": copy.deepcopy(label_map),
        "modalities": [s for s in BRATS_MODALITIES if s in present],
    }


def record_files(record: Mapping[str, Any], label: bool = False) -> list[str]:
    """The image files of a case record (its 3D sequences, or its MSD 4D file), and its segmentation with
    ``label``, as paths; entries left empty are skipped."""
    files = [*dict(record.get("images") or {}).values(), record.get("image4d"), *([record.get("label")] if label else [])]
    return [os.fspath(f) for f in files if f]


def case_sources(record: dict[str, Any]) -> list[str]:
    """Every file a case record's images are read through: its scans (3D files or the MSD 4D file)
    and, for the MSD / nnU-Net layout, the ``dataset.json`` that names their channels.

    Inference refuses an output path that is one of them, so a run never replaces its own input.
    """
    files = record_files(record)
    if record.get("layout") == "msd" and files:  # <folder>/imagesTr|imagesTs/<file>, see _msd_cases
        files.append(str(Path(files[0]).parent.parent / "dataset.json"))
    return files


#: the folder fsck recovers files into, at the top of every ext2/3/4 file system and readable by root alone: a data
#: disk's mount point holds one, and no case is ever in it
_LOST_AND_FOUND = "lost+found"


def _unlisted(folder: str | os.PathLike, err: OSError) -> CaseError:
    """The error for a folder of the data that cannot be listed: ``os.walk`` passed over it without a word, so
    a training, an evaluation or a batch ran without the cases in it (or said "No cases found" of a data folder
    the user may not read)."""
    folder, reason = os.fspath(folder), err.strerror or type(err).__name__
    if isinstance(err, PermissionError):
        who = f"user id {os.getuid()}" if hasattr(os, "getuid") else "this user"
        return CaseError(f"Cannot list the folder {folder} ({reason}): {who} may not read it, so the cases in it would "
                         f"be left out: make it readable (e.g. chmod a+rx {folder}), or run as a user who may read it "
                         "(Docker: --user with the folder owner's id).")
    return CaseError(f"Cannot list the folder {folder} ({reason}), so the cases in it would be left out: check that disk "
                     "(or the network share it is on), or move the folder out of the data folder.")


def _walk_error(err: OSError) -> None:
    """``onerror`` of discovery's ``os.walk``: a folder that cannot be listed stops discovery (:func:`_unlisted`),
    except one removed while the walk ran and the file system's own ``lost+found``."""
    if isinstance(err, (FileNotFoundError, NotADirectoryError)):
        return
    if os.path.basename(os.path.normpath(os.fspath(err.filename or ""))) == _LOST_AND_FOUND:
        return
    raise _unlisted(err.filename, err) from None


def _listdir(folder: str | os.PathLike) -> list[str]:
    """The sorted names in ``folder``; :func:`_unlisted` when it cannot be listed."""
    try:
        return sorted(os.listdir(folder))
    except OSError as err:
        raise _unlisted(folder, err) from None


def _case_problem(case_errors: dict[str, str] | None, case: str, message: str) -> None:
    """Raise ``message``, or keep it as ``case``'s problem (its first one) when the caller collects them."""
    if case_errors is None:
        raise CaseError(message)
    case_errors.setdefault(case, message)


def _nifti_files(folder: Path) -> dict[str, list[str]]:
    """``{case id: paths}`` of the NIfTI files in ``folder`` (none when it is missing), extensions in any case.

    A case id has several paths when it has several files (``X.nii.gz`` and ``X.nii``), which
    :func:`_msd_cases` refuses as BraTS-named cases refuse two files of one sequence.
    """
    if not folder.is_dir():
        return {}
    files: dict[str, list[str]] = {}
    for fname in _listdir(folder):
        if not fname.startswith(".") and (m := _NIFTI_RE.match(fname)) is not None:
            files.setdefault(m.group("case"), []).append(str(folder / fname))
    return files


def _by_prefix(fnames: Sequence[str], sep: str) -> dict[str, list[str]]:
    """``{prefix: names}``: each name under every prefix that ends before one of its ``sep`` characters
    (``A_1_mask.nii.gz`` under ``A`` and ``A_1`` for ``_``), in the given order.

    A case ``C`` looks up the files named ``C<sep>...`` here instead of testing every file of its
    folder, which in a flat folder of thousands of cases took a time growing with their square.
    """
    index: dict[str, list[str]] = {}
    for fname in fnames:
        for i, char in enumerate(fname):
            if char == sep:
                index.setdefault(fname[:i], []).append(fname)
    return index


def _is_3d(path: str) -> bool | None:
    """Whether the NIfTI header at ``path`` describes one 3D volume (a 4th axis of length 1 included).

    ``None`` when the header cannot be read: loading the file reports it, naming the file.
    """
    try:
        shape = tuple(load_nifti(path).shape)
    except Exception:  # noqa: BLE001 - the loader's own checks report a corrupt file
        return None
    return len(shape) == 3 or (len(shape) > 3 and all(d == 1 for d in shape[3:]))


def _split_channels(folder: Path, desc: dict[str, Any], channels: dict[str, int]) -> bool:
    """Whether the images are split into ``<case>_XXXX`` files, one per channel.

    nnU-Net v2 says so with ``channel_names``. nnU-Net v1 keeps MSD's ``modality`` key, but its
    ``training`` entries name ``imagesTr/<case>.nii.gz``, a file that does not exist beside
    ``<case>_XXXX.nii.gz`` (any listed channel). Without entries, every image file carrying a listed channel suffix (and
    some case having two) tells the same. But ``<case>_0000.nii.gz`` reads either way (a cohort with
    one sequence per case, or MSD ids ending in four digits, ``pat_0001``), so the labels decide first:
    ``labelsTr/<case>.nii.gz`` says per channel, a label named as an image says MSD 4D; then the
    image header: a 3D volume is one channel, an MSD image holds its channels along a 4th axis.
    """
    if "channel_names" in desc:
        return True
    for entry in desc.get("training") or []:
        image = entry.get("image") if isinstance(entry, dict) else None
        if isinstance(image, str) and (m := _NIFTI_RE.match(Path(image).name)) is not None:
            listed, stem = folder / image, m.group("case")
            on_disk = _nifti_files(listed.parent)  # by case id: the extension's case may differ from the list's
            if stem in on_disk:
                return False
            # any listed channel, not only _0000: a case may lack that sequence
            if any(f"{stem}_{idx:04d}" in on_disk for idx in channels.values()):
                return True
            # neither file: a case without images (reported later) tells nothing; ask the next entry
    found: dict[str, list[str]] = {}
    images = {img_dir: _nifti_files(folder / img_dir) for img_dir in ("imagesTr", "imagesTs")}
    for listed_files in images.values():
        for stem, paths in listed_files.items():
            m = _NNUNET_CHANNEL_RE.match(Path(paths[0]).name)
            if m is None or int(m.group("idx")) not in channels.values():
                return False
            found.setdefault(m.group("case"), []).append(stem)
    if not found:
        return False
    labels = {stem for lbl_dir in ("labelsTr", "labelsTs") for stem in _nifti_files(folder / lbl_dir)}
    if labels & set(found):
        return True
    if labels & {stem for stems in found.values() for stem in stems}:
        return False
    first = next(iter(images["imagesTr"].values()), None) or next(iter(images["imagesTs"].values()))
    if (three_d := _is_3d(first[0])) is not None:
        return three_d
    return max(len(stems) for stems in found.values()) > 1


def _unread_files(folder: Path, filenames: list[str], dirnames: list[str]) -> list[str]:
    """NIfTI files in an MSD / nnU-Net ``folder`` outside the four folders its layout names.

    Discovery reads such a folder through ``dataset.json`` alone, so cases kept beside it (a BraTS
    case folder, a loose scan) would otherwise be left out without a word.
    """
    unread = [str(folder / f) for f in filenames if not f.startswith(".") and _NIFTI_RE.match(f)]
    for d in dirnames:
        if d in ("imagesTr", "imagesTs", "labelsTr", "labelsTs"):
            continue
        # links not followed: a loop must not hang discovery; a folder it cannot list is passed over, as no case
        # is read from these folders (the warning is about what is there to see)
        for sub, subdirs, files in os.walk(folder / d):
            subdirs[:] = [x for x in subdirs if not x.startswith(".")]
            unread += [os.path.join(sub, f) for f in sorted(files) if not f.startswith(".") and _NIFTI_RE.match(f)]
    return [f for f in unread if not is_inference_output(f)]  # a batch run's outputs kept there are no cases


def _msd_cases(
    folder: Path, desc: dict[str, Any], case_errors: dict[str, str] | None = None
) -> list[tuple[dict[str, Any], str, str]]:
    """Records of an MSD / nnU-Net v2 folder, each with its location and expected label file name.

    Problems of one case go through :func:`_case_problem`; such a case is left out.
    """
    source = folder / "dataset.json"
    channels = msd_channels(desc, source)
    label_map = msd_label_map(desc, source)
    per_channel = _split_channels(folder, desc, channels)  # nnU-Net v1/v2: <case>_XXXX files
    idx_to_seq = {i: s for s, i in channels.items()}
    out = []
    seen_labels: set[str] = set()
    for img_dir, lbl_dir in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        if not (folder / img_dir).is_dir():
            continue
        cases: dict[str, dict[str, str]] = {}
        four_d: dict[str, str] = {}
        bad: set[str] = set()
        for fname in _listdir(folder / img_dir):
            if fname.startswith("."):  # MSD tarballs ship macOS '._*' resource files
                continue
            path = str(folder / img_dir / fname)
            if not per_channel:
                if (m := _NIFTI_RE.match(fname)) is not None and not is_inference_output(path):
                    if (case := m.group("case")) in four_d:  # X.nii and X.nii.gz: which one holds the scan?
                        _case_problem(case_errors, case,
                                      f"Case {case!r} has two image files: {four_d[case]} and {path}. Keep one.")
                        bad.add(case)
                    four_d.setdefault(case, path)
                continue
            if (m := _NNUNET_CHANNEL_RE.match(fname)) is None:
                if (n := _NIFTI_RE.match(fname)) is not None and not is_inference_output(path):
                    _case_problem(
                        case_errors, n.group("case"),
                        f"{path}: nnU-Net v2 image files must be named <case>_XXXX.nii.gz (XXXX = channel index "
                        f"from {source}); rename it, or describe 4D files with the MSD 'modality' key.",
                    )
                    bad.add(n.group("case"))
                continue
            idx = int(m.group("idx"))
            if idx not in idx_to_seq:
                _case_problem(case_errors, m.group("case"),
                              f"{path}: channel {idx:04d} is not listed in {source} {sorted(idx_to_seq)}; "
                              "add it to 'channel_names' ('modality' for nnU-Net v1) or remove the file.")
                bad.add(m.group("case"))
                continue
            channel_files = cases.setdefault(m.group("case"), {})
            if (seq := idx_to_seq[idx]) in channel_files:  # X_0000.nii and X_0000.nii.gz, as BraTS names refuse
                _case_problem(case_errors, m.group("case"),
                              f"Case {m.group('case')!r} has two {seq!r} files (channel {idx:04d}): "
                              f"{channel_files[seq]} and {path}. Keep one.")
                bad.add(m.group("case"))
                continue
            channel_files[seq] = path
        label_files = _nifti_files(folder / lbl_dir)
        for case in sorted(set(cases) | set(four_d) | bad):
            labels = label_files.get(case, [])
            seen_labels.update(labels)
            if len(labels) > 1 and case not in bad:
                _case_problem(case_errors, case,
                              f"Case {case!r} has two label files: {' and '.join(labels)}. Keep one.")
                bad.add(case)
            if case in bad:  # reported above; its label is still its own, not one without image
                continue
            label = labels[0] if labels else None
            # "channels" indexes into image4d; per-channel nnU-Net files need none
            rec = _record(case, "msd", cases.get(case, {}), four_d.get(case), {} if per_channel else channels,
                          label, label_map)
            location = rec["image4d"] or next(iter(rec["images"].values()))
            out.append((rec, location, str(folder / lbl_dir / f"{case}.nii.gz")))
    for lbl_dir in ("labelsTr", "labelsTs"):
        if (folder / lbl_dir).is_dir():
            for fname in _listdir(folder / lbl_dir):
                path = str(folder / lbl_dir / fname)
                if not fname.startswith(".") and (m := _NIFTI_RE.match(fname)) and path not in seen_labels:
                    _case_problem(case_errors, m.group("case"),
                                  f"{path} has no image in {folder / lbl_dir.replace('labels', 'images')}: a case "
                                  "needs at least one image sequence; add the image or remove the label.")
    return out


def _link_above(dirpath: str, name: str, real_root: str) -> bool:
    """Whether ``dirpath/name`` is a symbolic link to the data folder or to a folder that holds it (``..``, ``/``),
    which is then not followed, with a warning.

    Linked folders are followed (a cohort assembled from links to scans elsewhere), but a link above the data
    folder only widens the search to everything beside it: another site's or study's cases, or with a link
    to ``/`` every case on the machine, which training, evaluation and batch inference then read as this
    folder's. Visiting each real folder once did not stop it, as the folders beside the data folder were new.
    """
    path = os.path.join(dirpath, name)
    if not os.path.islink(path):
        return False
    target = os.path.realpath(path)
    if os.path.commonpath([target, real_root]) != target:
        return False
    if target == real_root:  # a link back to the data folder itself widens nothing: skipped quietly
        return True
    logger.warning("%s is a symbolic link to %s, which holds the data folder %s: it is not followed, so no case "
                   "outside the data folder is read through it. Remove the link, or pass the folder you mean as the "
                   "data folder.", path, target, real_root)
    return True


def discover_cases(
    root: str | os.PathLike,
    require_label: bool = False,
    case_errors: dict[str, str] | None = None,
    label_convention: str | None = None,
) -> list[dict[str, Any]]:
    """Find every case below ``root`` in the BraTS 2018, BraTS 2023, MSD Task01 or nnU-Net layout.

    Args:
        root: folder to search recursively (symlinked folders are followed).
        require_label: raise if any case has no segmentation (for training and evaluation data).
            MSD / nnU-Net v2 test images (``imagesTs/``) without a label in ``labelsTs/`` are left
            out instead, and their number is logged: the downloads ship them unlabelled.

        case_errors: when given, a problem of one case (two files of one sequence, a label without
            image, an nnU-Net image file that is misnamed or not in ``dataset.json``, a case id used
            twice, a case id holding a control or invisible character, keyed by its escaped form) is
            stored here as ``{case: message}`` and that case is left out, instead of
            raising; the other cases are returned (batch inference). Problems of the whole folder
            (missing root, no case at all, a folder that cannot be listed, unusable ``dataset.json``) and
            missing labels (``require_label``) still raise.
        label_convention: label values of BraTS-named cases: ``None`` or ``"auto"`` picks them by the
            naming (``brats2018`` for ``<case>_seg``, ``brats2023`` for ``<case>-seg``); a name from
            :data:`app.data.labels.LABEL_CONVENTIONS` applies to them all, except that ``brats2024``
            (BraTS 2024 post-treatment glioma, whose files are named as BraTS 2023's) applies to the
            cases with those names: cases with BraTS 2018-2021 names keep ``brats2018``, whose 4 is
            enhancing tumour, so one option reads a union of releases. MSD and nnU-Net folders name
            their labels in ``dataset.json``.

    Returns:
        Case records sorted by case id::

            {"case": str, "layout": "brats2018" | "brats2023" | "msd",
             "images": {seq: path}, "image4d": path | None, "channels": {seq: index},
             "label": path | None, "label_map": {"ncr": [...], "ed": [...], "et": [...], ["other": [...]]},
             "modalities": [present sequences in BRATS_MODALITIES order]}

        Paths are absolute strings; the record is JSON-serialisable.

    Raises:
        CaseError: missing/empty root, a folder that cannot be listed (:func:`_unlisted`; the file system's
            ``lost+found`` is passed over), a case without image sequences, duplicate case ids or
            duplicate files of one sequence, a case id holding a control or invisible character (with
            ``case_errors``: stored under the id with those characters escaped), unusable ``dataset.json``, or (with
            ``require_label``) a case without label other than an ``imagesTs/`` one, or no
            labelled case at all.
        ValueError: ``label_convention`` is neither ``auto`` nor a name from ``LABEL_CONVENTIONS``.
    """
    convention = str(label_convention or "auto").strip().lower()
    convention = None if convention == "auto" else convention
    if convention is not None and convention not in LABEL_CONVENTIONS:
        raise ValueError(f"--label_convention {label_convention!r} is not a label convention: use auto (by the file "
                         f"names) or one of {sorted(LABEL_CONVENTIONS)}, e.g. --label_convention auto.")
    root_path = Path(root).expanduser().absolute()
    if not root_path.is_dir():
        raise CaseError(
            f"Data folder {root_path} does not exist or is not a folder{missing_hint(root_path)}: pass the folder holding "
            "the cases."
        )

    found: list[tuple[dict[str, Any], str, str]] = []  # (record, location for messages, expected label path)
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    unmatched: dict[str, list[str]] = {}  # folder -> NIfTI files no layout names, for the warning below
    archives: list[str] = []  # archives of cases not yet extracted, named when no case is found
    visited: set[str] = set()
    real_root = os.path.realpath(root_path)
    for dirpath, dirnames, filenames in os.walk(root_path, followlinks=True, onerror=_walk_error):
        real = os.path.realpath(dirpath)
        if real in visited:  # symlink loop or two links to one folder
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not _link_above(dirpath, d, real_root))
        folder = Path(dirpath)
        if "dataset.json" in filenames:
            desc = _read_dataset_json(folder / "dataset.json")
            if "modality" in desc or "channel_names" in desc:
                found.extend(_msd_cases(folder, desc, case_errors))
                if unread := _unread_files(folder, filenames, dirnames):
                    logger.warning("%s makes %s an MSD / nnU-Net folder, read from imagesTr/, imagesTs/, labelsTr/ "
                                   "and labelsTs/ only: %d other NIfTI file(s) in it are not read (e.g. %s). Move "
                                   "them out of %s if they are cases.", folder / "dataset.json", folder, len(unread),
                                   unread[0], folder)
                dirnames[:] = []  # the MSD folder is fully described by dataset.json
                continue
        for fname in sorted(filenames):
            if fname.startswith("."):
                continue
            if _ARCHIVE_RE.search(fname):
                archives.append(os.path.relpath(folder / fname, root_path))
                continue
            if (m := _BRATS2018_RE.match(fname)) is not None:
                layout, seq = "brats2018", m.group("seq").lower()
            elif (m := _BRATS2023_RE.match(fname)) is not None:
                layout, seq = "brats2023", _BRATS2023_SEQ[m.group("seq").lower()]
            else:
                if _NIFTI_RE.match(fname):
                    unmatched.setdefault(dirpath, []).append(fname)
                continue
            group = groups.setdefault((dirpath, layout, m.group("case")), {"images": {}, "label": None})
            path = str(folder / fname)
            previous = group["label"] if seq == "seg" else group["images"].get(seq)
            if previous is not None:
                _case_problem(case_errors, m.group("case"),
                              f"Case {m.group('case')!r} has two {seq!r} files: {previous} and {path}. Keep one.")
                group["bad"] = True
                continue
            if seq == "seg":
                group["label"] = path
            else:
                group["images"][seq] = path

    stray_index: dict[tuple[str, str], dict[str, list[str]]] = {}  # (folder, separator) -> _by_prefix
    kept_2018: list[str] = []  # BraTS 2018-named cases that label_convention brats2024 leaves on brats2018
    for (dirpath, layout, case), group in groups.items():
        if group.get("bad"):
            continue
        sep = "_" if layout == "brats2018" else "-"
        if not group["images"] and is_inference_output(group["label"]):
            # a label map this product wrote beside the scans under a name that ends as a BraTS label does
            # (infer --out <case>_pred_seg.nii.gz): an output, not a case, so a rerun finds only the scans' case
            continue
        if not group["images"]:
            names = "{flair,t1,t1ce,t2}" if layout == "brats2018" else "{t2f,t1n,t1c,t2w}"
            _case_problem(
                case_errors, case,
                f"Folder {dirpath}: case {case!r} has a label ({os.path.basename(group['label'])}) but no image "
                f"sequence; expected at least one of {case}{sep}{names}.nii.gz. Add the images or remove the case.",
            )
            continue
        case_convention = convention or layout
        if convention == "brats2024" and layout == "brats2018":
            # BraTS 2024 ships with the 2023 names; under 2018 names, 4 is enhancing tumour, not a cavity. Such a
            # case keeps its own values, so a union of releases (BraTS 2020 beside BraTS 2024 post-treatment)
            # trains with this one option: refusing it left the user between two errors (auto: "pass brats2024"
            # for the 2024 cases; brats2024: "use auto" for the 2020 ones)
            case_convention = "brats2018"
            kept_2018.append(case)
        absent = [q for q in BRATS_MODALITIES if q not in group["images"]]
        # only a case lacking a sequence is checked: a complete case's other files (a brain mask, a
        # prediction beside each case of a flat folder) are not read
        if absent and (dirpath, sep) not in stray_index:
            stray_index[dirpath, sep] = _by_prefix(unmatched.get(dirpath, ()), sep)
        strays = [f for f in stray_index[dirpath, sep].get(case, ())
                  if not is_inference_output(os.path.join(dirpath, f))] if absent else []
        if absent and strays:  # e.g. <case>_t1c.nii.gz under 2018 names: a misnamed sequence, not a missing one
            logger.warning("Folder %s: case %r is used without %s, but %s %s no accepted sequence name (%s): rename "
                           "the file if it holds one of them.", dirpath, case, "/".join(absent), ", ".join(strays),
                           "has" if len(strays) == 1 else "have",
                           "_flair, _t1, _t1ce, _t2" if layout == "brats2018" else "-t2f, -t1n, -t1c, -t2w")
        rec = _record(case, layout, group["images"], None, {}, group["label"], LABEL_CONVENTIONS[case_convention])
        found.append((rec, next(iter(rec["images"].values())), str(Path(dirpath) / f"{case}{sep}seg.nii.gz")))

    if not found and not case_errors:
        # a release as downloaded (BraTS2021_Training_Data.tar, a BraTS 2023 .zip, Task01_BrainTumour.tar) holds
        # its cases in an archive, which discovery does not open
        fix = (f" {root_path} holds {len(archives)} archive(s) ({', '.join(archives[:3])}), whose cases are not read "
               "from inside them: extract them there first (tar -xf / unzip)." if archives else "")
        raise CaseError(f"No cases found under {root_path}. Accepted layouts: {ACCEPTED_LAYOUTS}.{fix}")
    if kept_2018:
        named_2023 = sum(rec["layout"] == "brats2023" for rec, _, _ in found)
        (logger.info if named_2023 else logger.warning)(
            "label_convention brats2024 reads the %d case(s) with BraTS 2023 names; the %d with BraTS 2018-2021 names "
            "(e.g. %s) keep brats2018, whose 4 is enhancing tumour, not a resection cavity.%s", named_2023,
            len(kept_2018), kept_2018[0], "" if named_2023 else " No case has BraTS 2023 names: the option changes "
            "nothing here.")

    where: dict[str, str] = {}
    unsafe: set[str] = set()
    for rec, location, _ in found:
        case = rec["case"]
        if any(unsafe_character(c) for c in case):
            # the id names the case in one-line errors, logs, report rows, datalist.json and output file names;
            # refused here, once for every layout and entry point, and shown only through its escaped form
            unsafe.add(case)
            _case_problem(
                case_errors, escape_unsafe(case),
                f"Case id {case!r} (from {location!r}) holds a control or invisible character, which would split or "
                "rewrite the messages, logs and report rows that name the case: rename its files with printable "
                "characters only.",
            )
            continue
        if case in where:
            _case_problem(
                case_errors, case,
                f"Duplicate case id {case!r}: {where[case]} and {location}. "
                "Remove or rename one copy, or point discovery at a folder holding only one.",
            )
        elif case_errors and case in case_errors:  # a copy with a problem: the outputs would share one name
            case_errors[case] += f" Case id {case!r} is also used at {location}, left out too: ids must be unique."
        where.setdefault(case, location)
    if case_errors or unsafe:
        found = [item for item in found if item[0]["case"] not in (case_errors or {}) and item[0]["case"] not in unsafe]

    if require_label:
        # MSD / nnU-Net test images have no labels by definition (a Task01 download has 266 of them):
        # they are for inference, so leaving them out lets the download train as it comes
        test_only = [item for item in found if item[0]["label"] is None and item[0]["layout"] == "msd"
                     and Path(item[2]).parent.name == "labelsTs"]
        if test_only:
            folders = sorted({str(Path(expected).parent.with_name("imagesTs")) for _, _, expected in test_only})
            left_out = {rec["case"] for rec, _, _ in test_only}  # ids are unique by now
            found = [item for item in found if item[0]["case"] not in left_out]
            if not found:
                task = Path(folders[0]).parent
                raise CaseError(
                    f"No labelled case under {root_path}: only {len(test_only)} test image(s) in "
                    f"{', '.join(folders)}, which have no labels. Add the training cases ({task / 'imagesTr'} + "
                    f"{task / 'labelsTr'}), or the test images' labels in {task / 'labelsTs'}."
                )
            logger.info("Left out %d unlabelled test case(s) in %s: labels are required here.",
                        len(test_only), ", ".join(folders))
        missing = [(rec["case"], expected) for rec, _, expected in found if rec["label"] is None]
        if missing:
            cases_in = Counter(dirpath for dirpath, _, _ in groups)

            def hint(case: str, expected: str) -> str:
                # a segmentation under another name (BraTS 2020's case 355 ships W39_1998.09.19_Segm.nii): the
                # NIfTI files no layout names in the case's own folder, or named after the case in a shared one
                folder = os.path.dirname(expected)
                sep = "-" if expected.endswith(("-seg.nii.gz", "-seg.nii")) else "_"
                strays = [f for f in unmatched.get(folder, ())
                          if (cases_in[folder] == 1 or f.startswith(f"{case}{sep}"))
                          and not is_inference_output(os.path.join(folder, f))]
                if not strays:
                    return ""
                stem = os.path.basename(expected).rsplit(".nii", 1)[0]  # <case>_seg, named with its own extension
                target = (f"{stem}{'.nii.gz' if strays[0].lower().endswith('.gz') else '.nii'}" if len(strays) == 1
                          else f"{stem}.nii.gz (.nii if it is not compressed)")
                return (f" (its folder holds {', '.join(strays[:3])}, which no accepted name matches: if "
                        f"{'it is' if len(strays) == 1 else 'one is'} the segmentation, rename it to {target})")

            shown = "; ".join(f"case {c!r}: expected {e}{hint(c, e)}" for c, e in missing[:5])
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CaseError(f"{len(missing)} case(s) have no label: {shown}{more}. Add the segmentation files, "
                            "or segment unlabelled cases with inference (python -m app infer, or the batch bundle).")

    return sorted((rec for rec, _, _ in found), key=lambda r: r["case"])

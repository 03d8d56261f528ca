"""Tumour label conventions and conversion between label maps and WT/TC/ET region channels.

BraTS releases disagree on the value of the enhancing-tumour label (4 until 2021, 3 from 2023),
BraTS 2024 adds a resection-cavity label that belongs to no tumour region, and MSD Task01 uses yet
another order, so every case record carries its own ``label_map``
(``{"ncr": [...], "ed": [...], "et": [...]}``, optionally ``"other": [...]``) and all conversions
go through it.
"""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import numpy as np
import torch

from app.data.errors import CaseError

__all__ = [
    "LABEL_CONVENTIONS",
    "LABEL_PARTS",
    "NON_TUMOUR_PART",
    "REGION_NAMES",
    "check_label_values",
    "label_map_values",
    "labels_to_regions",
    "regions_to_labels",
]

LabelMap = Mapping[str, Sequence[int]]
ArrayLike = Union[np.ndarray, torch.Tensor]


#: Label parts of a tumour: necrotic/non-enhancing core, oedema, enhancing tumour.
LABEL_PARTS: tuple[str, ...] = ("ncr", "ed", "et")

#: Optional label-map entry for labelled structures outside WT/TC/ET (BraTS 2024's resection
#: cavity): accepted in label files and counted as background by every region.
NON_TUMOUR_PART = "other"

#: Output channel order of :func:`labels_to_regions`: whole tumour, tumour core, enhancing tumour.
REGION_NAMES: tuple[str, ...] = ("wt", "tc", "et")

#: Label values of each tumour part per BraTS naming generation.
LABEL_CONVENTIONS: dict[str, dict[str, list[int]]] = {
    "brats2018": {"ncr": [1], "ed": [2], "et": [4]},
    "brats2023": {"ncr": [1], "ed": [2], "et": [3]},
    # post-treatment glioma: 4 is the resection cavity, outside WT/TC/ET as BraTS 2024 scores them
    "brats2024": {"ncr": [1], "ed": [2], "et": [3], NON_TUMOUR_PART: [4]},
}

#: How each convention is chosen for BraTS-named files (the naming picks brats2018 or brats2023).
_CONVENTION_USE: dict[str, str] = {
    "brats2018": "BraTS 2018-2021, <case>_seg.nii.gz, enhancing tumour 4",
    "brats2023": "BraTS 2023, <case>-seg.nii.gz, enhancing tumour 3",
    "brats2024": "BraTS 2024 post-treatment, enhancing tumour 3, resection cavity 4",
}


def _resolve(label_map: LabelMap | str) -> LabelMap:
    if isinstance(label_map, str):
        if label_map not in LABEL_CONVENTIONS:
            raise ValueError(f"Unknown label convention {label_map!r}: use one of {sorted(LABEL_CONVENTIONS)}.")
        return LABEL_CONVENTIONS[label_map]
    missing = [p for p in LABEL_PARTS if p not in label_map]
    if missing:
        raise ValueError(
            f"label_map {dict(label_map)!r} lacks {missing}: give label values for each of {list(LABEL_PARTS)}."
        )
    return label_map


def label_map_values(label_map: LabelMap | str) -> set[int]:
    """All tumour label values of ``label_map`` (a mapping or a name from :data:`LABEL_CONVENTIONS`)."""
    lm = _resolve(label_map)
    return {int(v) for p in LABEL_PARTS for v in lm[p]}


def _known_values(label_map: LabelMap | str) -> set[int]:
    """Background, tumour and non-tumour values: everything a label file may hold."""
    lm = _resolve(label_map)
    return label_map_values(lm) | {int(v) for v in lm.get(NON_TUMOUR_PART, ())} | {0}


#: Largest distance from a whole number of a float label value taken for a whole label stored with
#: rounding error (3.9999) rather than one interpolated between two labels (a resampled boundary).
_ROUNDING_ERROR = 1e-3


def _present_values(label: np.ndarray, source: str | None) -> np.ndarray:
    """Sorted distinct values of an integer-valued label array; non-integer values are an error."""
    if label.dtype.kind == "f":
        if not np.isfinite(label).all():
            raise CaseError(f"Label {source or '<array>'} contains NaN/Inf: re-export the segmentation as integers.")
        rounded = np.rint(label)
        if not np.array_equal(rounded, label):
            off = rounded != label
            bad = np.unique(label[off])[:5]
            if float(np.abs(label[off] - rounded[off]).max()) <= _ROUNDING_ERROR:
                # 3.9999 is a 4 stored through a float scaling, not an interpolated boundary: a tool that truncates
                # reads it as 3, so which label was meant is not for this product to guess
                raise CaseError(
                    f"Label {source or '<array>'} holds whole label values stored with rounding error (e.g. "
                    f"{bad.tolist()}): re-export the segmentation with integer voxels (round each value to the "
                    "nearest whole number, then save as uint8 or int16)."
                )
            raise CaseError(
                f"Label {source or '<array>'} has non-integer values (e.g. {bad.tolist()}); it was probably resampled "
                "with linear interpolation: resample segmentations with nearest-neighbour instead."
            )
        label = rounded.astype(np.int64)
    elif label.dtype.kind == "b":
        label = label.astype(np.uint8)
    # bincount is several times faster than np.unique on full-resolution volumes
    lo, hi = (int(label.min()), int(label.max())) if label.size else (0, 0)
    if lo >= 0 and hi < 65536:
        return np.flatnonzero(np.bincount(label.ravel(), minlength=1))
    return np.unique(label)


def _fitting_conventions(present: set[int], layout: str | None = None) -> list[str]:
    """Conventions that know every value in ``present``. Under BraTS 2018 names a convention that
    reads a present value as no tumour is left out when another reads it as tumour (a 2018 label's 4
    is enhancing tumour, not a cavity); under the 2023 names, which BraTS 2024 shares, both stay."""
    fits = [name for name, conv in LABEL_CONVENTIONS.items() if present <= _known_values(conv)]
    if layout == "brats2023":
        return fits
    as_tumour = [n for n in fits if not present & set(LABEL_CONVENTIONS[n].get(NON_TUMOUR_PART, ()))]
    return as_tumour or fits


def check_label_values(
    label: ArrayLike, label_map: LabelMap | str, source: str | None = None, layout: str | None = None
) -> list[int]:
    """Raise :class:`CaseError` if ``label`` holds values that ``label_map`` does not know.

    Args:
        label: integer-valued label volume (numpy or torch).
        label_map: ``{"ncr": [...], "ed": [...], "et": [...]}`` (plus optional ``"other": [...]``,
            values that are known but no tumour) or a name from :data:`LABEL_CONVENTIONS`.
        source: file the label came from, used in the error message.
        layout: the case's layout (``"msd"`` when ``dataset.json`` names the labels), for the fix
            the error message suggests.

    Returns:
        The distinct values present in ``label`` (sorted).
    """
    arr = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    present = _present_values(arr, source).tolist()
    unknown = sorted(set(present) - _known_values(label_map))
    if unknown:
        fits = _fitting_conventions(set(present), layout)
        if layout == "msd":
            hint = (" Name every value in the 'labels' entry of dataset.json (a labelled structure outside the "
                    "tumour, such as BraTS 2024's resection cavity, as 'resection cavity'), or relabel the "
                    "segmentation.")
        elif layout == "brats2018" and fits == ["brats2024"]:
            # brats2024 reads 2018-named cases as brats2018 (their 4 is enhancing tumour): suggesting the
            # option alone would not change how this case is read
            hint = (f" These values fit only 'brats2024' ({_CONVENTION_USE['brats2024']}: "
                    f"{LABEL_CONVENTIONS['brats2024']}), which is read under BraTS 2023 names only. If these are "
                    "post-treatment cases, rename the files to <case>-{t2f,t1n,t1c,t2w,seg}.nii.gz and pass "
                    "--label_convention brats2024; otherwise relabel the segmentation.")
        elif fits:
            hint = (
                f" These values fit {' / '.join(f'{n!r} ({_CONVENTION_USE[n]}: {LABEL_CONVENTIONS[n]})' for n in fits)}."
                " The file names pick 'brats2018' (<case>_seg.nii.gz) or 'brats2023' (<case>-seg.nii.gz): name "
                "the files accordingly, or pass the one that describes your data as --label_convention NAME "
                "(training and evaluation), or relabel the segmentation."
            )
            readings = {n: set(present) & set(LABEL_CONVENTIONS[n].get(NON_TUMOUR_PART, ())) for n in fits}
            if len(fits) > 1 and any(readings.values()) and not all(readings.values()):
                cavity = sorted(set().union(*readings.values()))
                hint += (f" They disagree on {cavity}: tumour for {[n for n in fits if not readings[n]]}, a resection "
                         f"cavity (no tumour) for {[n for n in fits if readings[n]]}; choose by what the value marks "
                         "in your data (post-treatment cases have cavities).")
        elif layout in ("brats2018", "brats2023"):
            # a BraTS-named case has no dataset.json: its values are a convention's, and none knows these
            conventions = "; ".join(f"{n}: {values}" for n, values in LABEL_CONVENTIONS.items())
            hint = (f" No BraTS label convention knows {unknown} ({conventions}): relabel the segmentation to the "
                    "values of its convention, or remove the case.")
        else:
            hint = " Relabel the segmentation to the known values or fix the label names in dataset.json."
        raise CaseError(
            f"Label {source or '<array>'} contains values {unknown} unknown to its label map "
            f"(found {present}; known: 0 background, {dict(_resolve(label_map))}).{hint}"
        )
    return present


def labels_to_regions(
    label: ArrayLike, label_map: LabelMap | str, source: str | None = None, layout: str | None = None
) -> ArrayLike:
    """Convert a label volume into overlapping WT/TC/ET region channels.

    WT is every tumour label, TC is necrosis/non-enhancing core plus enhancing tumour, ET is
    enhancing tumour alone; ``"other"`` values (BraTS 2024's resection cavity) are in no region.
    Unknown label values raise :class:`CaseError` rather than being treated as background, because
    a mis-identified convention silently removes a whole region.

    Args:
        label: integer-valued label volume of any spatial shape (numpy or torch), no channel dim.
        label_map: ``{"ncr": [...], "ed": [...], "et": [...]}`` or a name from :data:`LABEL_CONVENTIONS`.
        source: file the label came from, used in error messages.
        layout: the case's layout, for the fix the error message suggests (see :func:`check_label_values`).

    Returns:
        float32 array of shape ``[3, *label.shape]`` (WT, TC, ET), numpy or torch like the input.
    """
    lm = _resolve(label_map)
    is_torch = isinstance(label, torch.Tensor)
    arr = label.detach().cpu().numpy() if is_torch else np.asarray(label)
    check_label_values(arr, lm, source, layout)
    if arr.dtype.kind == "f":
        arr = np.rint(arr).astype(np.int64)

    def member(values: Sequence[int]) -> np.ndarray:
        return np.isin(arr, np.asarray(list(values), dtype=np.int64))

    ncr, ed, et = member(lm["ncr"]), member(lm["ed"]), member(lm["et"])
    regions = np.stack([ncr | ed | et, ncr | et, et]).astype(np.float32)
    if is_torch:
        return torch.from_numpy(regions).to(label.device)
    return regions


def regions_to_labels(regions: ArrayLike, convention: LabelMap | str = "brats2018") -> ArrayLike:
    """Convert WT/TC/ET region channels back into one label volume.

    Nested priority ET > TC > WT resolves inconsistent predictions: ET voxels get the enhancing label,
    TC voxels outside ET the necrosis label, WT voxels outside TC the oedema label. The first value of
    each part in the label map is written.

    Args:
        regions: ``[3, ...]`` region channels (WT, TC, ET). Boolean input is used as is; any other
            dtype is thresholded at 0.5, so pass probabilities only if 0.5 is the intended cut-off.
        convention: a name from :data:`LABEL_CONVENTIONS` or a label map.

    Returns:
        uint8 label volume of shape ``regions.shape[1:]``: numpy for numpy input, otherwise a plain
        torch tensor on the input's device.

    Raises:
        ValueError: ``regions`` has no 3 channels first, or the label map's values do not fit uint8.
    """
    lm = _resolve(convention)
    if regions.shape[0] != len(REGION_NAMES):
        raise ValueError(
            f"regions must have {len(REGION_NAMES)} channels (WT, TC, ET) first, got shape {tuple(regions.shape)}."
        )
    values = [int(lm[p][0]) for p in LABEL_PARTS]
    if max(values) > 255 or min(values) < 0:
        raise ValueError(f"Label values {values} do not fit uint8.")
    ncr_v, ed_v, et_v = values
    if isinstance(regions, torch.Tensor):  # stay on the tensor's device (GPU inference)
        binary = regions if regions.dtype == torch.bool else regions > 0.5
        out = torch.zeros(tuple(regions.shape[1:]), dtype=torch.uint8, device=regions.device)
    else:
        arr = np.asarray(regions)
        binary = arr if arr.dtype == np.bool_ else arr > 0.5
        out = np.zeros(arr.shape[1:], dtype=np.uint8)
    out[binary[0]] = ed_v
    out[binary[1]] = ncr_v
    out[binary[2]] = et_v
    return out

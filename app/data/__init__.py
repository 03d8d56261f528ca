"""Data layer: case discovery, label conventions, loading transforms, splits, phantom cases and
MMSA sentiment features.

Names are imported on first use (PEP 562) so that light entry points such as the phantom generator
and discovery do not pay for importing MONAI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CACHE_MEMORY_FRACTION": "app.data.cache",
    "CaseCacheDataset": "app.data.cache",
    "available_memory": "app.data.cache",
    "estimate_cache_bytes": "app.data.cache",
    "resolve_cache_rate": "app.data.cache",
    "SPACING_TOLERANCE": "app.data.datalist",
    "evaluation_cases": "app.data.datalist",
    "first_image_header": "app.data.datalist",
    "spacing_differs": "app.data.datalist",
    "spacing_outliers": "app.data.datalist",
    "name_outliers": "app.data.datalist",
    "median_spacing": "app.data.datalist",
    "prepare_datalist": "app.data.datalist",
    "ras_spacing": "app.data.datalist",
    "read_datalist": "app.data.datalist",
    "shard_cases": "app.data.datalist",
    "shared_scans": "app.data.datalist",
    "split_cases": "app.data.datalist",
    "write_datalist": "app.data.datalist",
    "ACCEPTED_LAYOUTS": "app.data.discovery",
    "CHANNEL_ALIASES": "app.data.discovery",
    "discover_cases": "app.data.discovery",
    "msd_channels": "app.data.discovery",
    "msd_label_map": "app.data.discovery",
    "CaseError": "app.data.errors",
    "LABEL_CONVENTIONS": "app.data.labels",
    "LABEL_PARTS": "app.data.labels",
    "NON_TUMOUR_PART": "app.data.labels",
    "REGION_NAMES": "app.data.labels",
    "check_label_values": "app.data.labels",
    "label_map_values": "app.data.labels",
    "labels_to_regions": "app.data.labels",
    "regions_to_labels": "app.data.labels",
    "MMSA_MODALITIES": "app.data.mmsa",
    "MMSADataset": "app.data.mmsa",
    "convert_mmsa": "app.data.mmsa",
    "feature_dims": "app.data.mmsa",
    "feature_statistics": "app.data.mmsa",
    "load_mmsa": "app.data.mmsa",
    "make_synthetic_mmsa": "app.data.mmsa",
    "mmsa_digest": "app.data.mmsa",
    "mmsa_split": "app.data.mmsa",
    "read_mmsa_splits": "app.data.mmsa",
    "seen_utterances": "app.data.mmsa",
    "utterance_digests": "app.data.mmsa",
    "write_mmsa_splits": "app.data.mmsa",
    "save_mmsa_npz": "app.data.mmsa",
    "write_synthetic_mmsa": "app.data.mmsa",
    "make_phantom": "app.data.phantoms",
    "write_phantoms": "app.data.phantoms",
    "LoadCased": "app.data.transforms",
    "RegionVoxelsd": "app.data.transforms",
    "ZeroAbsentSequencesd": "app.data.transforms",
    "load_case": "app.data.transforms",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from app.data.cache import (
        CACHE_MEMORY_FRACTION,
        CaseCacheDataset,
        available_memory,
        estimate_cache_bytes,
        resolve_cache_rate,
    )
    from app.data.datalist import (
        SPACING_TOLERANCE,
        evaluation_cases,
        first_image_header,
        spacing_differs,
        spacing_outliers,
        name_outliers,
        median_spacing,
        prepare_datalist,
        ras_spacing,
        read_datalist,
        shard_cases,
        shared_scans,
        split_cases,
        write_datalist,
    )
    from app.data.discovery import ACCEPTED_LAYOUTS, CHANNEL_ALIASES, discover_cases, msd_channels, msd_label_map
    from app.data.errors import CaseError
    from app.data.labels import (
        LABEL_CONVENTIONS,
        LABEL_PARTS,
        NON_TUMOUR_PART,
        REGION_NAMES,
        check_label_values,
        label_map_values,
        labels_to_regions,
        regions_to_labels,
    )
    from app.data.mmsa import (
        MMSA_MODALITIES,
        MMSADataset,
        convert_mmsa,
        feature_dims,
        feature_statistics,
        load_mmsa,
        make_synthetic_mmsa,
        mmsa_digest,
        mmsa_split,
        read_mmsa_splits,
        save_mmsa_npz,
        seen_utterances,
        utterance_digests,
        write_mmsa_splits,
        write_synthetic_mmsa,
    )
    from app.data.phantoms import make_phantom, write_phantoms
    from app.data.transforms import LoadCased, RegionVoxelsd, ZeroAbsentSequencesd, load_case


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'app.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

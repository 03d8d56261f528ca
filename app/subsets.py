"""Modality subsets: enumeration, stable naming and masks shared by every branch.

Subsets are ordered by size, then by the modality order of the branch (for BraTS: flair, t1,
t1ce, t2), so reports and diagnostics always list them the same way.
"""

from __future__ import annotations

from itertools import combinations
from typing import Sequence

import torch

__all__ = [
    "BRATS_MODALITIES",
    "MOSI_MODALITIES",
    "all_subsets",
    "check_fusable",
    "subset_name",
    "subset_from_name",
    "subset_masks",
]

BRATS_MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
MOSI_MODALITIES: tuple[str, ...] = ("text", "audio", "vision")


def all_subsets(num_modalities: int) -> list[tuple[int, ...]]:
    """Every non-empty subset of ``range(num_modalities)``, by size then lexicographically.

    Raises:
        ValueError: ``num_modalities`` is below 1.
    """
    if num_modalities < 1:
        raise ValueError(f"num_modalities must be >= 1, got {num_modalities}.")
    return [c for k in range(1, num_modalities + 1) for c in combinations(range(num_modalities), k)]


def subset_name(subset: Sequence[int], modalities: Sequence[str]) -> str:
    """Join the modality names of ``subset`` with ``+`` in the branch's modality order."""
    return "+".join(modalities[i] for i in sorted(subset))


def subset_from_name(name: str, modalities: Sequence[str]) -> tuple[int, ...]:
    """Inverse of :func:`subset_name`; raises ``ValueError`` naming the known modalities."""
    parts = [p.strip().lower() for p in name.split("+") if p.strip()]
    unknown = [p for p in parts if p not in modalities]
    if not parts or unknown:
        raise ValueError(f"Unknown modality subset {name!r}: use names from {list(modalities)} joined by '+'.")
    return tuple(sorted({modalities.index(p) for p in parts}))


def subset_masks(num_modalities: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean matrix ``[n_subsets, num_modalities]``; row ``j`` marks the modalities of subset ``j``."""
    subsets = all_subsets(num_modalities)
    masks = torch.zeros(len(subsets), num_modalities, dtype=torch.bool, device=device)
    for j, s in enumerate(subsets):
        masks[j, list(s)] = True
    return masks


def check_fusable(mask: torch.Tensor) -> None:
    """Raise unless every row of the ``[B, M]`` modality mask has a modality (reads the mask: a device
    sync on a GPU).

    Raises:
        ValueError: a row of the mask is all False.
    """
    if bool((mask.sum(dim=1) == 0).any()):
        raise ValueError("Cannot fuse a sample with no available modality: every sample needs at least one.")

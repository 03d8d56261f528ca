"""Engine helpers: which subsets a case counts for, from its modality mask."""

from __future__ import annotations

import torch

from app.engines.trainer import subset_sample_masks
from app.subsets import BRATS_MODALITIES, all_subsets, subset_name

NAMES = [subset_name(s, BRATS_MODALITIES) for s in all_subsets(4)]


def test_a_case_counts_for_a_subset_only_if_it_has_all_of_its_sequences():
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)  # no t1; all; t2 only
    valid, masks = subset_sample_masks(mask)
    masks = list(masks)
    assert valid.shape == (3, 15) and valid.dtype == torch.bool and len(masks) == 15
    # written out by hand: every subset without t1, every subset, t2 alone
    expected = [
        ["flair", "t1ce", "t2", "flair+t1ce", "flair+t2", "t1ce+t2", "flair+t1ce+t2"],
        NAMES,
        ["t2"],
    ]
    for row, names in zip(valid.tolist(), expected):
        assert [n for n, ok in zip(NAMES, row) if ok] == names
    # a subset the case has: its sequences only; one it lacks: the case's own mask (left out of the metrics)
    by_name = dict(zip(NAMES, masks))
    assert by_name["flair+t2"].int().tolist() == [[1, 0, 0, 1], [1, 0, 0, 1], [0, 0, 0, 1]]
    assert by_name["t1"].int().tolist() == [[1, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 1]]
    assert by_name["flair+t1+t1ce+t2"].int().tolist() == [[1, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]]

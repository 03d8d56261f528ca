"""Property tests of subset naming and ordering, and of the subset Dice.

Subsets: ``all_subsets(m)`` lists each of the ``2^m - 1`` non-empty subsets once, by size and then
lexicographically, the same way on every call; ``subset_masks`` rows mark exactly those subsets;
``subset_name``/``subset_from_name`` round-trip for any lower-case modality names, whatever the order
or case of the parts in the name.

Dice (hard, BraTS empty rule): symmetric in prediction and reference, within ``[0, 1]``, equal to
``2|P n T| / (|P| + |T|)`` counted independently (1 when both are empty); the subset accumulator's
per-subset and over-subset means stay within ``[0, 1]`` and do not depend on the update order.
``tests/metrics/test_dice.py::test_dice_properties`` checks symmetry, range and identity on 1-D
masks; here the masks are 3-D and the logits path and the accumulator are included.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from app.metrics import SubsetDiceAccumulator
from app.metrics.dice import dice_from_logits, hard_dice
from app.subsets import BRATS_MODALITIES, all_subsets, subset_from_name, subset_masks, subset_name

_names = st.lists(st.text("abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=6), min_size=1, max_size=6,
                  unique=True)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8))
def test_all_subsets_each_once_by_size_then_lexicographic(m):
    subsets = all_subsets(m)
    assert len(subsets) == 2**m - 1 and len(set(subsets)) == len(subsets)
    assert all(s and list(s) == sorted(set(s)) and 0 <= s[0] and s[-1] < m for s in subsets)
    keys = [(len(s), s) for s in subsets]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert all_subsets(m) == subsets
    masks = subset_masks(m)
    assert [tuple(torch.nonzero(row).flatten().tolist()) for row in masks] == subsets


def test_subset_name_is_in_modality_order_whatever_the_subset_order():
    # (2, 0) and (0, 2) are the same subset: both are named flair+t1ce, as reports key them
    assert subset_name((2, 0), BRATS_MODALITIES) == subset_name((0, 2), BRATS_MODALITIES) == "flair+t1ce"
    assert subset_name([3, 1, 0], BRATS_MODALITIES) == "flair+t1+t2"


@settings(max_examples=200, deadline=None)
@given(_names, st.data())
def test_subset_names_round_trip(modalities, data):
    subsets = all_subsets(len(modalities))
    subset = data.draw(st.sampled_from(subsets))
    name = subset_name(subset, modalities)
    assert subset_from_name(name, modalities) == subset
    # any order and case of the parts names the same subset, and the name is canonical again
    parts = data.draw(st.permutations(name.split("+")))
    shuffled = "+".join(p.upper() if data.draw(st.booleans()) else p for p in parts)
    assert subset_from_name(shuffled, modalities) == subset
    assert subset_name(subset_from_name(shuffled, modalities), modalities) == name
    # names are unique, so reports keyed by name never merge two subsets
    assert len({subset_name(s, modalities) for s in subsets}) == len(subsets)


@settings(max_examples=50, deadline=None)
@given(st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8))
def test_unknown_subset_name_is_refused(name):
    if name in BRATS_MODALITIES:
        return
    with pytest.raises(ValueError, match="Unknown modality subset"):
        subset_from_name(f"flair+{name}", BRATS_MODALITIES)


@st.composite
def mask_pairs(draw):
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), *[draw(st.integers(1, 4)) for _ in range(3)])
    n = int(np.prod(shape))
    bits = st.lists(st.booleans(), min_size=n, max_size=n)
    return (torch.tensor(draw(bits)).reshape(shape), torch.tensor(draw(bits)).reshape(shape))


@settings(max_examples=150, deadline=None)
@given(mask_pairs())
def test_dice_symmetric_bounded_and_exact(masks):
    pred, target = masks
    d = hard_dice(pred, target)
    assert torch.equal(d, hard_dice(target, pred))
    assert bool(((d >= 0) & (d <= 1)).all())
    p, t = pred.numpy(), target.numpy()
    for b in range(p.shape[0]):
        for c in range(p.shape[1]):
            inter, total = int((p[b, c] & t[b, c]).sum()), int(p[b, c].sum() + t[b, c].sum())
            assert float(d[b, c]) == (1.0 if total == 0 else 2.0 * inter / total)


@settings(max_examples=100, deadline=None)
@given(mask_pairs(), st.floats(0.05, 0.95))
def test_dice_from_logits_symmetric_in_thresholded_prediction(masks, threshold):
    pred, target = masks
    logits = torch.where(pred, torch.tensor(4.0), torch.tensor(-4.0))  # sigmoid 0.982 / 0.018
    d = dice_from_logits(logits, target, threshold)
    assert torch.equal(d, hard_dice(target, pred)) and bool(((d >= 0) & (d <= 1)).all())


_dice_rows = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 14),
              st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3)),
    min_size=1, max_size=30, unique_by=lambda r: (r[0], r[1]),
)


@settings(max_examples=100, deadline=None)
@given(_dice_rows, st.randoms(use_true_random=False))
def test_subset_accumulator_means_bounded_and_order_free(rows, rnd):
    acc = SubsetDiceAccumulator()
    for case, j, values in rows:
        acc.update_case(case, j, values)
    shuffled = list(rows)
    rnd.shuffle(shuffled)
    other = SubsetDiceAccumulator()
    for case, j, values in shuffled:
        other.update_case(case, j, values)
    result = acc.aggregate()
    assert result["subsets"] == other.aggregate()["subsets"]
    for row in result["subsets"].values():
        if row["n_cases"]:
            assert all(0.0 <= row[k] <= 1.0 for k in ("WT", "TC", "ET", "mean"))
    assert all(0.0 <= v <= 1.0 for v in result["mean_over_subsets"].values())

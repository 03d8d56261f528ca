"""Hard Dice with the BraTS empty-mask rule: hand-computed cases, MONAI cross-check, properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.metrics import DiceMetric

from app.metrics import dice_from_logits, hard_dice


def _mask(*rows: list[int]) -> torch.Tensor:
    """[1, C, N] mask with one channel per row."""
    return torch.tensor(rows, dtype=torch.bool)[None]


def test_both_empty_is_one():
    empty = torch.zeros(2, 3, 4, 4, dtype=torch.bool)
    assert torch.equal(hard_dice(empty, empty), torch.ones(2, 3, dtype=torch.float64))


def test_exactly_one_empty_is_zero():
    empty = torch.zeros(1, 1, 4, 4)
    full = torch.ones(1, 1, 4, 4)
    assert hard_dice(empty, full).item() == 0.0
    assert hard_dice(full, empty).item() == 0.0


def test_partial_overlap_by_hand():
    # |A| = 2, |B| = 3, |A ∩ B| = 1  ->  2 * 1 / (2 + 3) = 0.4
    pred = _mask([1, 1, 0, 0])
    target = _mask([0, 1, 1, 1])
    assert hard_dice(pred, target).item() == pytest.approx(0.4, abs=1e-15)
    # identical non-empty masks -> 1
    assert hard_dice(target, target).item() == 1.0


def test_channels_and_cases_are_independent():
    pred = torch.stack(
        [
            _mask([1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0])[0],  # case 0
            _mask([1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0])[0],  # case 1
        ]
    )
    target = torch.stack(
        [
            _mask([0, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0])[0],
            _mask([1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 1])[0],
        ]
    )
    # case 0: 2*1/5, both empty, disjoint; case 1: identical, pred only, target only
    expected = torch.tensor([[0.4, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    out = hard_dice(pred, target)
    assert out.shape == (2, 3) and out.dtype == torch.float64
    assert torch.allclose(out, expected, rtol=0, atol=1e-15)
    # changing one channel leaves the others untouched
    pred2 = pred.clone()
    pred2[0, 2] = target[0, 2]
    out2 = hard_dice(pred2, target)
    assert out2[0, 2] == 1.0
    assert torch.equal(out2[:, :2], out[:, :2]) and torch.equal(out2[1], out[1])


def test_accepts_01_floats_and_ints_like_bools():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(2, 3, 5, 5, 5, generator=g) > 0.5
    t = torch.rand(2, 3, 5, 5, 5, generator=g) > 0.5
    ref = hard_dice(p, t)
    assert torch.equal(hard_dice(p.float(), t.long()), ref)
    assert torch.equal(hard_dice(p.to(torch.uint8), t.half()), ref)


def test_any_non_zero_value_is_foreground_in_both_masks():
    # pred [0, 0.25, 1, 0] and target [0, 4, 1, 1] read as {2nd, 3rd} and {2nd, 3rd, 4th}:
    # Dice = 2 * 2 / (2 + 3) = 0.8 (a 0.5 threshold on pred would give 2 * 1 / (1 + 3) = 0.5)
    pred = torch.tensor([0.0, 0.25, 1.0, 0.0]).reshape(1, 1, 4)
    target = torch.tensor([0, 4, 1, 1]).reshape(1, 1, 4)
    assert hard_dice(pred, target).item() == pytest.approx(0.8)
    assert hard_dice(target, pred).item() == pytest.approx(0.8)


def test_shape_validation():
    with pytest.raises(ValueError, match="shapes differ"):
        hard_dice(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))
    with pytest.raises(ValueError, match="B, C"):
        hard_dice(torch.zeros(1, 3), torch.zeros(1, 3))


def test_dice_from_logits_thresholds_in_logit_space():
    target = torch.ones(1, 1, 4)
    # float32 sigmoid(1e-9) rounds to exactly 0.5, but the probability is > 0.5: foreground
    logits = torch.full((1, 1, 4), 1e-9)
    assert torch.sigmoid(logits)[0, 0, 0].item() == 0.5
    assert dice_from_logits(logits, target).item() == 1.0
    assert dice_from_logits(-logits, target).item() == 0.0
    # a general threshold: sigmoid(0.5) ~ 0.622 is above 0.6, below 0.7
    half = torch.full((1, 1, 4), 0.5)
    assert dice_from_logits(half, target, threshold=0.6).item() == 1.0
    assert dice_from_logits(half, target, threshold=0.7).item() == 0.0
    # the threshold is strict: a logit of exactly 0 is probability 0.5, not above 0.5, so background
    zero = torch.zeros(1, 1, 4)
    assert dice_from_logits(zero, target).item() == 0.0
    assert dice_from_logits(zero, torch.zeros(1, 1, 4)).item() == 1.0  # both empty
    # match the product's message: math.log itself raises ValueError (domain error) at 0
    for bad in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
            dice_from_logits(half, target, threshold=bad)


def test_dice_from_logits_matches_sigmoid_threshold():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 6, 6, 6, generator=g) * 3
    target = torch.rand(2, 3, 6, 6, 6, generator=g) > 0.5
    for thr in (0.3, 0.5, 0.8):
        expected = hard_dice(torch.sigmoid(logits.double()) > thr, target)
        assert torch.equal(dice_from_logits(logits, target, threshold=thr), expected)


def test_matches_monai_dice_metric_without_ignore_empty():
    g = torch.Generator().manual_seed(2)
    pred = torch.rand(4, 3, 8, 8, 8, generator=g) > 0.6
    target = torch.rand(4, 3, 8, 8, 8, generator=g) > 0.4
    # empty-mask cases: both empty, only target empty, only pred empty
    pred[0, 0] = False
    target[0, 0] = False
    target[1, 1] = False
    pred[2, 2] = False
    metric = DiceMetric(include_background=True, ignore_empty=False, reduction="none")
    expected = metric(pred.float(), target.float()).double()
    assert torch.allclose(hard_dice(pred, target), expected, rtol=0, atol=1e-6)
    assert hard_dice(pred, target)[0, 0] == 1.0


_masks = st.integers(min_value=1, max_value=2).flatmap(
    lambda b: st.integers(min_value=1, max_value=3).flatmap(
        lambda c: st.tuples(
            *[st.lists(st.lists(st.booleans(), min_size=6, max_size=6), min_size=c, max_size=c) for _ in range(2 * b)]
        )
    )
)


@settings(max_examples=60, deadline=None)
@given(_masks)
def test_dice_properties(cases):
    b = len(cases) // 2
    pred = torch.tensor(cases[:b])
    target = torch.tensor(cases[b:])
    d = hard_dice(pred, target)
    assert torch.equal(d, hard_dice(target, pred))  # symmetric
    assert bool(((d >= 0) & (d <= 1)).all())  # bounded
    assert torch.equal(hard_dice(pred, pred), torch.ones_like(d))  # identity


def test_missed_reference_voxels_add_to_the_reference_only():
    from app.metrics.dice import hard_dice

    pred = torch.zeros(1, 2, 4, 4, 4, dtype=torch.bool)
    target = torch.zeros_like(pred)
    pred[0, 0, :2] = True
    target[0, 0, :1] = True
    # channel 0: |P| 32, |T| 16 + 5 missed, overlap 16; channel 1: both empty but 2 reference voxels missed
    dice = hard_dice(pred, target, missed=torch.tensor([[5, 2]]))
    assert dice.tolist() == [[2 * 16 / (32 + 16 + 5), 0.0]]
    assert hard_dice(pred, target).tolist() == [[2 * 16 / 48, 1.0]]


@pytest.mark.parametrize("shape", [(3,), (3, 1), (1, 3)])
def test_missed_counts_of_another_shape_are_refused(shape):
    # 3 cases x 3 regions: a count per case [3] used to broadcast onto the regions (case 2's count
    # lowering every case's ET Dice), and [3, 1] / [1, 3] spread one count over a row or column
    pred = torch.zeros(3, 3, 4, 4, 4, dtype=torch.bool)
    pred[..., 0, 0, 0] = True
    with pytest.raises(ValueError, match=r"missed must hold one count per case and channel, \[B, C\] = \(3, 3\)"):
        hard_dice(pred, pred.clone(), missed=torch.full(shape, 2))
    assert hard_dice(pred, pred.clone(), missed=torch.zeros(3, 3, dtype=torch.int64)).eq(1).all()

"""The baseline strategies: plain training and modality dropout, against gradients written out directly."""

from __future__ import annotations

import pytest
import torch

from app.networks import DSUNet
from app.strategies import build_strategy
from app.strategies.base import random_submasks


def _loss(pred, target):
    return ((pred - target) ** 2).mean()


def _setup():
    torch.manual_seed(0)
    model = DSUNet(features=(4, 8), out_channels=2).double()
    x = torch.randn(3, 4, 8, 8, 8, dtype=torch.float64)
    y = torch.randn(3, 2, 8, 8, 8, dtype=torch.float64)
    # sample 1 lacks t1 and t1ce, sample 2 has t2 only
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 1], [0, 0, 0, 1]], dtype=torch.bool)
    return model, x, y, mask


def _grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _reference(model, x, y, mask):
    model.zero_grad()
    loss = _loss(model(x, mask), y)
    loss.backward()
    return loss.detach(), _grads(model)


def test_plain_trains_the_prediction_fused_over_every_available_modality():
    model, x, y, mask = _setup()
    loss, expected = _reference(model, x, y, mask)
    model.zero_grad()
    result = build_strategy("plain").step(model, x, mask, y, _loss)
    assert float(result.loss) == float(loss)
    for g, e in zip(_grads(model), expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_dropout_trains_a_random_submask_and_reports_the_full_prediction():
    """The loss and gradients are those of the prediction fused over the strategy's random submask
    (replayed from the same seed); the reported prediction is fused over every available modality."""
    model, x, y, mask = _setup()
    sub = random_submasks(mask, torch.Generator().manual_seed(4))
    # the draw must drop something and stay within each sample's modalities, or the check is vacuous
    assert not torch.equal(sub, mask) and (sub <= mask).all() and sub.any(dim=1).all()
    loss, expected = _reference(model, x, y, sub)
    _, full = _reference(model, x, y, mask)
    model.zero_grad()
    result = build_strategy("dropout", seed=4).step(model, x, mask, y, _loss)
    assert float(result.loss) == float(loss)
    for g, e in zip(_grads(model), expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert any(not torch.allclose(e, f) for e, f in zip(expected, full))  # dropping changed the gradient
    with torch.no_grad():
        torch.testing.assert_close(result.pred, model(x, mask), rtol=1e-10, atol=1e-12)


def test_subset_loss_is_the_mean_over_the_samples_that_have_a_modality_of_the_mask():
    from app.strategies.base import subset_loss

    class Fuse:
        def fuse(self, per_modality, mask, check=True):
            return per_modality[:, 0]

    per_mod = torch.tensor([[[1.0]], [[2.0]], [[4.0]]]).unsqueeze(-1)  # [B=3, M=1, C=1, 1]
    targets = torch.zeros(3, 1, 1)
    mask = torch.tensor([[True], [False], [True]])
    loss, pred = subset_loss(Fuse(), per_mod, mask, targets, lambda p, t: (p - t).flatten(1) ** 2)
    # samples 0 and 2 only: (1 + 16) / 2, not the sum 17 nor a mean over all three
    assert float(loss) == 8.5 and pred.flatten().tolist() == [1.0, 4.0]


def test_random_submasks_of_a_rank_are_its_rows_of_the_global_batch():
    mask = torch.ones(4, 4, dtype=torch.bool)
    whole = random_submasks(mask, torch.Generator().manual_seed(3), rank=0, world_size=1)
    halves = [random_submasks(mask[:2], torch.Generator().manual_seed(3), rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)
    assert not torch.equal(halves[0], halves[1])  # ranks draw different subsets


@pytest.mark.parametrize("name", ["plain", "dropout", "cggm"])
@pytest.mark.parametrize("empty_rows", [[2], [0, 1, 2]])
def test_a_sample_without_modality_is_refused_as_every_strategy_refuses_it(name, empty_rows):
    # plain and cggm used to leave such a sample out (pred with fewer rows than the batch); with every
    # sample empty, plain and dropout failed with AttributeError on a None loss
    model, x, y, mask = _setup()
    mask[empty_rows] = False
    model.zero_grad()
    with pytest.raises(ValueError, match="no available modality"):
        build_strategy(name).step(model, x, mask, y, _loss)
    assert all(p.grad is None for p in model.parameters())  # refused before any gradient

"""Baseline strategies: plain training on all available modalities, and modality dropout."""

from __future__ import annotations

from typing import Any, Callable

import torch

from app.strategies.base import GradientStrategy, StepResult, random_submasks, subset_loss
from app.subsets import check_fusable

__all__ = ["PlainStrategy", "DropoutStrategy"]


class PlainStrategy(GradientStrategy):
    """One loss on the prediction fused over every available modality."""

    name = "plain"

    def step(
        self, model: Any, inputs: Any, modality_mask: torch.Tensor, targets: torch.Tensor,
        loss_function: Callable, iteration: int = 0,
    ) -> StepResult:
        """One loss on the fused prediction of every sample.

        Raises:
            ValueError: a sample has no modality (as every strategy raises; the loss would otherwise
                leave it out and ``pred`` would have fewer rows than the batch).
        """
        check_fusable(modality_mask)
        per_mod = model.per_modality(inputs, modality_mask)
        every_row = torch.ones(modality_mask.shape[0], dtype=torch.bool)  # checked above: no second read of the mask
        loss, pred = subset_loss(model, per_mod, modality_mask, targets, loss_function, valid=every_row)
        loss.backward()
        return StepResult(loss=loss.detach(), pred=pred.detach())


class DropoutStrategy(GradientStrategy):
    """Modality dropout: each sample is trained on a random non-empty subset of its modalities.

    The reported loss is the one of the dropped-out prediction that was trained; the reported
    prediction is recomputed from the same per-modality outputs on all available modalities.
    """

    name = "dropout"

    def step(
        self, model: Any, inputs: Any, modality_mask: torch.Tensor, targets: torch.Tensor,
        loss_function: Callable, iteration: int = 0,
    ) -> StepResult:
        """One loss on each sample's random subset (see the class).

        Raises:
            ValueError: a sample has no modality.
        """
        check_fusable(modality_mask)
        per_mod = model.per_modality(inputs, modality_mask)
        sub = random_submasks(modality_mask, self.generator)
        loss, _ = subset_loss(model, per_mod, sub, targets, loss_function)
        loss.backward()
        with torch.no_grad():
            pred = model.fuse(per_mod.detach(), modality_mask)
        return StepResult(loss=loss.detach(), pred=pred)

"""Hard (thresholded) Dice with the BraTS empty-mask rule, per case and per channel.

BraTS scores a case whose reference and prediction are both empty for a region as a perfect
1.0 and a case where exactly one of them is empty as 0.0. ``monai.metrics.DiceMetric`` with its
default ``ignore_empty=True`` instead returns NaN for an empty reference, which would silently
drop those cases from the mean, so the rule is implemented here directly.
"""

from __future__ import annotations

import math

import torch

__all__ = ["hard_dice", "dice_from_logits", "logit_masks"]


def hard_dice(pred: torch.Tensor, target: torch.Tensor, missed: torch.Tensor | None = None) -> torch.Tensor:
    """Dice per case and per channel of binary masks, with the BraTS empty-mask rule.

    ``Dice = 2 |P ∩ T| / (|P| + |T|)``; when ``|P| + |T| == 0`` (both empty) the value is 1.0,
    and when exactly one mask is empty the formula already gives 0.0.

    Args:
        pred: binary prediction ``[B, C, *spatial]``, ``bool`` or ``{0, 1}`` valued (any non-zero
            value counts as foreground).
        target: binary reference of the same shape as ``pred``.
        missed: optional reference voxel counts ``[B, C]`` outside the arrays (cropped away with the
            background), where the prediction is empty: they add to ``|T|`` only.

    Returns:
        ``float64`` tensor ``[B, C]`` on the inputs' device. Voxel counts are accumulated as
        integers and divided in float64, so the result is exact up to the final division.

    Raises:
        ValueError: if the shapes differ, there is no spatial dimension, or ``missed`` is not ``[B, C]``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}.")
    if pred.ndim < 3:
        raise ValueError(f"Expected [B, C, *spatial] tensors, got shape {tuple(pred.shape)}.")
    p = pred.bool()
    t = target.bool()
    dims = tuple(range(2, p.ndim))
    # int64 counts are exact for any realistic volume; float32 sums lose integers above 2**24.
    intersection = (p & t).sum(dim=dims, dtype=torch.int64).to(torch.float64)
    denominator = p.sum(dim=dims, dtype=torch.int64) + t.sum(dim=dims, dtype=torch.int64)
    if missed is not None:
        missed = torch.as_tensor(missed, dtype=torch.int64, device=denominator.device)
        if missed.shape != denominator.shape:
            # broadcasting would add a per-case count [B] to every case's channels instead, or the reverse
            raise ValueError(f"missed must hold one count per case and channel, [B, C] = {tuple(denominator.shape)}, "
                             f"got {tuple(missed.shape)}.")
        denominator = denominator + missed
    denominator = denominator.to(torch.float64)
    both_empty = denominator == 0
    dice = 2.0 * intersection / denominator.clamp_min(1.0)
    return torch.where(both_empty, torch.ones_like(dice), dice)


def logit_masks(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """The boolean masks ``sigmoid(logits) > threshold``, compared in logit space.

    ``logits > log(t / (1 - t))`` (``logits > 0`` for the default 0.5) is mathematically identical but immune
    to ``sigmoid`` rounding small logits to exactly 0.5 in float32/float16.

    Raises:
        ValueError: ``threshold`` is not in ``(0, 1)``.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}.")
    return logits > math.log(threshold / (1.0 - threshold))


def dice_from_logits(
    logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5, missed: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`hard_dice` of ``sigmoid(logits) > threshold`` against ``target`` (masks from :func:`logit_masks`).

    Args:
        logits: raw network outputs ``[B, C, *spatial]`` (one independent sigmoid per channel).
        target: binary reference of the same shape.
        threshold: probability threshold in ``(0, 1)``.
        missed: reference voxels outside the arrays, see :func:`hard_dice`.

    Returns:
        ``float64`` tensor ``[B, C]``.

    Raises:
        ValueError: ``threshold`` is not in ``(0, 1)``, or as :func:`hard_dice`.
    """
    return hard_dice(logit_masks(logits, threshold), target, missed)

"""Regression-sentiment metrics (CMU-MOSI style labels in [-3, 3]) computed the way MMSA reports
them, and their per-modality-subset accumulator for the sentiment branch.

Implemented with numpy only (no scikit-learn dependency); the definitions follow MMSA's
``MetricsTop`` regression evaluation so numbers are comparable with published tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from app.metrics.subset_metrics import SubsetAccumulator, _as_1d
from app.subsets import MOSI_MODALITIES

__all__ = ["SENTIMENT_METRICS", "sentiment_metrics", "weighted_f1", "SubsetSentimentAccumulator"]

#: Metric keys of :func:`sentiment_metrics` (besides the count ``"n"``), in report order.
SENTIMENT_METRICS: tuple[str, ...] = ("Acc2", "Acc2_has0", "F1", "Acc7", "MAE", "Corr")


def weighted_f1(truth: np.ndarray, preds: np.ndarray) -> float:
    """Support-weighted F1 over the classes present in ``truth`` or ``preds`` (scikit-learn's
    ``f1_score(truth, preds, average="weighted")``).

    Per class ``F1 = 2 TP / (2 TP + FP + FN)``, weighted by the class's count in ``truth``; a class
    that only occurs in ``preds`` has weight 0. Returns NaN for empty inputs.

    Raises:
        ValueError: ``truth`` and ``preds`` have different sizes.
    """
    truth = np.asarray(truth).reshape(-1)
    preds = np.asarray(preds).reshape(-1)
    if truth.shape != preds.shape:
        raise ValueError(f"truth and preds sizes differ: {truth.size} vs {preds.size}.")
    if truth.size == 0:
        return float("nan")
    total = 0.0
    for c in np.unique(np.concatenate([truth, preds])):
        tp = np.sum((preds == c) & (truth == c))
        fp = np.sum((preds == c) & (truth != c))
        fn = np.sum((preds != c) & (truth == c))
        support = tp + fn
        if support:
            # support > 0 implies a non-zero denominator
            total += support * (2.0 * tp / (2.0 * tp + fp + fn))
    return float(total / truth.size)


def sentiment_metrics(
    preds: torch.Tensor | np.ndarray | Sequence[float], labels: torch.Tensor | np.ndarray | Sequence[float]
) -> dict[str, Any]:
    """MMSA regression metrics of sentiment predictions against labels in [-3, 3].

    - ``Acc2``: binary accuracy on non-zero labels only, ``preds > 0`` vs ``labels > 0`` (MMSA
      ``Non0_acc_2``, the usually reported "Acc-2").
    - ``Acc2_has0``: binary accuracy on all samples with 0 counted as negative: ``preds > 0`` vs
      ``labels > 0``. (MMSA's ``Has0_acc_2`` counts 0 as non-negative instead; this product follows
      the negative convention of its method notes.)
    - ``F1``: support-weighted F1 on the non-zero variant (MMSA ``Non0_F1_score``).
    - ``Acc7``: both sides clipped to [-3, 3] and rounded with ``np.round`` (halves to even, as in
      MMSA), then compared.
    - ``MAE``: mean absolute error of the unclipped values.
    - ``Corr``: Pearson correlation; defined as 0.0 when either side is constant, where it is
      otherwise undefined (no linear association can be measured).
    - ``n``: number of samples.

    ``Acc2`` and ``F1`` are NaN when every label is exactly 0.

    Args:
        preds: predicted sentiment, any shape (flattened).
        labels: reference sentiment, same number of elements.

    Returns:
        dict with float values for :data:`SENTIMENT_METRICS` and int ``"n"``.

    Raises:
        ValueError: ``preds`` and ``labels`` have different sizes, or no element.
    """
    p = _as_1d(preds)
    y = _as_1d(labels)
    if p.shape != y.shape:
        raise ValueError(f"preds and labels sizes differ: {p.size} vs {y.size}.")
    if p.size == 0:
        raise ValueError("sentiment_metrics needs at least one sample.")

    non_zero = y != 0
    if non_zero.any():
        truth_nz, preds_nz = y[non_zero] > 0, p[non_zero] > 0
        acc2 = float(np.mean(truth_nz == preds_nz))
        f1 = weighted_f1(truth_nz, preds_nz)
    else:
        acc2 = f1 = float("nan")
    acc2_has0 = float(np.mean((y > 0) == (p > 0)))
    acc7 = float(np.mean(np.round(np.clip(p, -3.0, 3.0)) == np.round(np.clip(y, -3.0, 3.0))))
    mae = float(np.mean(np.abs(p - y)))
    if np.ptp(p) == 0 or np.ptp(y) == 0:
        corr = 0.0
    else:
        corr = float(np.corrcoef(p, y)[0, 1])
    return {"Acc2": acc2, "Acc2_has0": acc2_has0, "F1": f1, "Acc7": acc7, "MAE": mae, "Corr": corr, "n": int(p.size)}


class SubsetSentimentAccumulator(SubsetAccumulator):
    """Sentiment predictions of every sample under every modality subset (text/audio/vision: 7).

    Rows are ``(prediction, label)`` pairs; each subset's metrics are :func:`sentiment_metrics` over
    all its samples (dataset-level, not averaged per sample), ``mean_over_subsets`` is the
    unweighted mean of each metric over the evaluated subsets (subsets with no sample are omitted)
    and the worst subset is the one with the lowest ``Acc2``, the headline metric of MOSI tables.

    :meth:`aggregate` returns ``{"subsets": {name: {"Acc2", "Acc2_has0", "F1", "Acc7", "MAE",
    "Corr": float, "n": int}}, "mean_over_subsets": {"Acc2", ..., "Corr": float},
    "worst_subset": {"name": str, "Acc2": float}, "subsets_without_cases": [name, ...], "per_case":
    [{"case": id, "subset": name, "pred": float, "label": float}, ...]}``: ``per_case`` is every
    utterance's prediction under every subset it was scored on, for paired comparisons of two models.

    Args:
        modalities: modality names in order; subset indices refer to ``all_subsets(len(modalities))``.
    """

    sample_word, input_word = "utterance", "modalities"

    def __init__(self, modalities: Sequence[str] = MOSI_MODALITIES) -> None:
        super().__init__(
            modalities, row_fields=("pred", "label"), metric_keys=SENTIMENT_METRICS, primary_key="Acc2", count_key="n"
        )

    def update(
        self,
        case_ids: Sequence[str],
        subset_index: int,
        preds: torch.Tensor | np.ndarray | Sequence[float],
        labels: torch.Tensor | np.ndarray | Sequence[float],
    ) -> None:
        """Record predictions ``[B]`` (or ``[B, 1]``) and labels ``[B]`` of ``case_ids`` under a subset.

        Raises:
            ValueError: ``preds`` and ``labels`` have different sizes.
        """
        p, y = _as_1d(preds), _as_1d(labels)
        if p.shape != y.shape:
            raise ValueError(f"preds and labels sizes differ: {p.size} vs {y.size}.")
        self._add_rows(case_ids, subset_index, np.stack([p, y], axis=1), name="preds/labels")

    def update_case(self, case_id: str, subset_index: int, pred: float, label: float) -> None:
        """Record one sample's prediction and label under subset ``subset_index``."""
        self.update([case_id], subset_index, [float(pred)], [float(label)])

    def update_from_preds(
        self,
        case_ids: Sequence[str],
        subset_preds: Mapping[int, torch.Tensor] | torch.Tensor,
        labels: torch.Tensor | np.ndarray | Sequence[float],
    ) -> None:
        """Record the predictions of several subsets at once.

        Args:
            case_ids: ``B`` sample ids.
            subset_preds: ``{subset_index: preds [B] or [B, 1]}``, or a tensor ``[B, S]`` / ``[B, S, 1]``
                holding all ``S = len(all_subsets)`` subsets in order.
            labels: ``B`` labels.

        Raises:
            ValueError: a ``subset_preds`` tensor is not ``[B, S]`` or ``[B, S, 1]``, or as :meth:`update`.
        """
        if isinstance(subset_preds, torch.Tensor):
            if subset_preds.ndim not in (2, 3) or subset_preds.shape[1] != len(self.subsets):
                raise ValueError(
                    f"subset_preds tensor must be [B, {len(self.subsets)}] or [B, {len(self.subsets)}, 1], "
                    f"got {tuple(subset_preds.shape)}."
                )
            items = [(j, subset_preds[:, j]) for j in range(len(self.subsets))]
        else:
            items = list(subset_preds.items())
        for j, preds in items:
            self.update(case_ids, j, preds, labels)

    def _subset_metrics(self, values: np.ndarray) -> dict[str, float]:
        return sentiment_metrics(values[:, 0], values[:, 1])

"""Scalar ignite metric over the 7 modality subsets of the sentiment branch, for model selection
and the per-subset reports, plus the accuracy/F1 accumulator of the classification head.

:class:`SubsetSentimentScore` collects every sample's prediction under every subset (computed by
:class:`app.engines.SentimentSubsetEvaluator` from one pass of the per-modality outputs) and
returns one number that ``CheckpointSaver`` can maximise. The default, ``key="MAE"``, returns
minus the mean over the 7 subsets of the MAE: on CMU-MOSI's 172 validation utterances one
utterance moves Acc-2 by 0.6 points, so accuracy-based selection follows noise, while the MAE
uses every label's full value. Any other metric of the report can be the key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.metrics.metric import reinit__is_reduced

from app.metrics.sentiment import SENTIMENT_METRICS, SubsetSentimentAccumulator, weighted_f1
from app.metrics.subset_metrics import SubsetAccumulator, SubsetScalarMetric
from app.subsets import MOSI_MODALITIES

__all__ = ["CLASSIFICATION_METRICS", "LOWER_IS_BETTER", "SubsetClassificationAccumulator", "SubsetSentimentScore"]

#: Per-subset metrics of the classification head (accuracy and support-weighted F1).
CLASSIFICATION_METRICS: tuple[str, ...] = ("Acc", "F1")
#: Metrics for which lower is better; as a key metric they are negated.
LOWER_IS_BETTER = frozenset({"MAE"})


class SubsetClassificationAccumulator(SubsetAccumulator):
    """Class predictions of every sample under every modality subset (IEMOCAP-style labels).

    Per subset: ``Acc`` (accuracy) and ``F1`` (support-weighted F1, as MMSA reports it); the worst
    subset is the one with the lowest ``Acc``.

    Args:
        modalities: modality names in order.
    """

    sample_word, input_word = "utterance", "modalities"

    def __init__(self, modalities: Sequence[str] = MOSI_MODALITIES) -> None:
        super().__init__(modalities, row_fields=("pred", "label"), metric_keys=CLASSIFICATION_METRICS,
                         primary_key="Acc", count_key="n")

    def update(self, case_ids: Sequence[str], subset_index: int, preds: Any, labels: Any, valid: Any = None) -> None:
        """Record class ids ``[B]`` predicted under subset ``subset_index`` and the labels ``[B]``.

        Raises:
            ValueError: ``preds`` and ``labels`` have different sizes.
        """
        p = np.asarray(torch.as_tensor(preds).detach().cpu(), dtype=np.float64).reshape(-1)
        y = np.asarray(torch.as_tensor(labels).detach().cpu(), dtype=np.float64).reshape(-1)
        if p.shape != y.shape:
            raise ValueError(f"preds and labels sizes differ: {p.size} vs {y.size}.")
        self._add_rows(case_ids, subset_index, np.stack([p, y], axis=1), valid, name="preds/labels")

    def _subset_metrics(self, values: np.ndarray) -> dict[str, float]:
        pred, label = values[:, 0].astype(np.int64), values[:, 1].astype(np.int64)
        return {"Acc": float(np.mean(pred == label)), "F1": weighted_f1(label, pred)}


class SubsetSentimentScore(SubsetScalarMetric):
    """Ignite metric: one metric averaged over all modality subsets (a scalar key metric).

    The (transformed) engine output must be a mapping with ``"case"`` (``B`` ids), ``"label"``
    (``[B]``/``[B, 1]`` sentiment, or ``[B]`` class ids) and ``"subset_preds"`` ``[B, S, C]``
    (``S = 7`` subsets in :func:`app.subsets.all_subsets` order; ``C = 1`` for regression, class
    logits for classification), optionally ``"subset_valid"`` bool ``[B, S]`` (a sample is left
    out of the subsets it does not fully have).

    The whole aggregate of the last :meth:`compute` (``{"subsets", "mean_over_subsets",
    "worst_subset"}``) stays on :attr:`last_result` for the report handler. Distributed runs gather
    the raw rows of every rank first.

    Args:
        key: metric averaged over subsets; ``MAE`` (lower is better) is returned negated so that
            higher is always better for ``CheckpointSaver``. ``auto``: ``MAE`` for regression,
            ``Acc`` for classification.
        task: ``regression`` (MMSA metrics) or ``classification`` (accuracy, weighted F1).
        modalities: modality names.
        output_transform: applied to ``engine.state.output`` before :meth:`update`.
        device: kept for the ignite ``Metric`` signature (rows live on the CPU).

    Raises:
        ValueError: an unknown ``task``, or a ``key`` that is no metric of it.
    """

    def __init__(
        self,
        key: str = "auto",
        task: str = "regression",
        modalities: Sequence[str] = MOSI_MODALITIES,
        output_transform: Callable = lambda x: x,
        device: str | torch.device = torch.device("cpu"),
    ) -> None:
        if task not in ("regression", "classification"):
            raise ValueError(f"task must be 'regression' or 'classification', got {task!r}.")
        allowed = SENTIMENT_METRICS if task == "regression" else CLASSIFICATION_METRICS
        if key == "auto":
            key = "MAE" if task == "regression" else "Acc"
        if key not in allowed:
            raise ValueError(f"key {key!r} is not a {task} metric: choose one of {list(allowed)}, or auto.")
        self.key, self.task, self.modalities = key, task, tuple(modalities)
        # created before Metric.__init__, which calls reset()
        self._accumulator = self._new_accumulator()
        self.last_result: dict[str, Any] | None = None
        super().__init__(output_transform=output_transform, device=device, skip_unrolling=True)

    @property
    def metrics(self) -> tuple[str, ...]:
        """Report columns of this task."""
        return SENTIMENT_METRICS if self.task == "regression" else CLASSIFICATION_METRICS

    def _new_accumulator(self) -> SubsetAccumulator:
        if self.task == "regression":
            return SubsetSentimentAccumulator(self.modalities)
        return SubsetClassificationAccumulator(self.modalities)

    @reinit__is_reduced
    def update(self, output: Mapping[str, Any]) -> None:
        """Add a batch: ``case``, ``label``, ``subset_preds [B, S, C]`` and optionally ``subset_valid [B, S]``.

        Raises:
            ValueError: an entry is missing, or ``subset_preds`` has another shape.
        """
        if not isinstance(output, Mapping) or not {"case", "label", "subset_preds"} <= set(output):
            keys = list(output) if isinstance(output, Mapping) else type(output).__name__
            raise ValueError(f"{type(self).__name__} needs 'case', 'label' and 'subset_preds' in the output, got {keys}.")
        case_ids = [str(c) for c in output["case"]]
        preds = torch.as_tensor(output["subset_preds"]).detach().float().cpu()
        labels = torch.as_tensor(output["label"]).detach().cpu()
        n_subsets = len(self._accumulator.subsets)
        if preds.ndim != 3 or preds.shape[1] != n_subsets or preds.shape[0] != len(case_ids):
            raise ValueError(f"subset_preds must be [B={len(case_ids)}, {n_subsets}, C], got {tuple(preds.shape)}.")
        valid = output.get("subset_valid")
        valid = torch.ones(preds.shape[:2], dtype=torch.bool) if valid is None else torch.as_tensor(valid).cpu().bool()
        for j in range(n_subsets):
            keep = valid[:, j]
            if not bool(keep.any()):
                continue
            ids = [c for c, k in zip(case_ids, keep.tolist()) if k]
            if self.task == "regression":
                self._accumulator.update(ids, j, preds[keep, j, 0], labels.reshape(len(case_ids), -1)[keep, 0])
            else:
                self._accumulator.update(ids, j, preds[keep, j].argmax(dim=-1), labels.reshape(-1)[keep])

    def scalar(self, result: dict[str, Any]) -> float:
        """The key metric's mean over the subsets, negated for the metrics where lower is better."""
        value = float(result["mean_over_subsets"][self.key])
        return -value if self.key in LOWER_IS_BETTER else value

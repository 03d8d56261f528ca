"""Evaluation engine and report handler of the sentiment branch (CMU-MOSI / MOSEI, 7 subsets).

:class:`SentimentSubsetEvaluator` runs the per-modality outputs of a batch once and fuses them
for every modality subset, so evaluating all 7 subsets costs one forward pass.
:class:`SentimentReportHandler` writes the metric's ``subset_metrics.{json,csv,md,png}``.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from app.engines.handlers import SubsetReportHandler
from app.engines.trainer import SubsetEvaluator, autocast_context, subset_fusions, subset_sample_masks
from app.flags import parse_bool
from app.subsets import all_subsets, subset_name

__all__ = [
    "SentimentSubsetEvaluator",
    "SentimentReportHandler",
    "subset_predictions",
    "predicted_subset_predictions",
    "check_finite_predictions",
]


def subset_predictions(network: Any, per_modality: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused predictions of every subset from one set of per-modality outputs.

    Args:
        network: the subset-aware model (its ``fuse`` is used, so any fusion rule works).
        per_modality: ``[B, M, ...]`` output of ``network.per_modality``.
        mask: ``[B, M]`` available modalities.

    Returns:
        ``preds [B, S, C]`` and ``valid [B, S]``; ``valid[b, j]`` says sample ``b`` has every modality
        of subset ``j`` (where it does not, the entry is its prediction from all it has and should be
        left out of that subset's metrics).
    """
    valid, fused = subset_fusions(network.fuse, per_modality, mask)
    return torch.stack(list(fused), dim=1), valid


def predicted_subset_predictions(network: Any, inputs: Any, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`subset_predictions` for a network that predicts its absent modalities (``predicts_missing``).

    One shared pass would hand each subset the real outputs of the modalities it lacks, so each
    subset runs ``per_modality(inputs, subset_mask)`` (its absent modalities are predicted from
    the present ones and never read) and fuses over ``network.completed_mask(subset_mask)``.
    """
    valid, masks = subset_sample_masks(mask)
    fused = [network.fuse(network.per_modality(inputs, sub).float(), network.completed_mask(sub)) for sub in masks]
    return torch.stack(fused, dim=1), valid


def check_finite_predictions(values: torch.Tensor, present: torch.Tensor, cases: Sequence[str],
                             names: Sequence[str]) -> None:
    """Refuse to score NaN or infinite outputs that a sample's predictions are made from.

    A NaN prediction would not be seen in the report: it counts as negative in Acc-2 and F1 and
    turns MAE and the correlation into NaN, so one broken sample would hide in a table of numbers.
    One non-finite modality output spoils every subset of its sample (the mean fusion weighs it by
    0, and 0 x NaN is NaN), so the whole sample is refused.

    Args:
        values: ``[B, K, ...]`` per-modality outputs, or per-subset predictions.
        present: ``[B, K]`` which of the K a sample has (the others are not read).
        cases: the samples' ids, for the error.
        names: the K modality or subset names, for the error.

    Raises:
        ValueError: names the first sample with non-finite outputs and which of the K they are.
    """
    bad = (~torch.isfinite(values)).flatten(2).any(dim=2) & present.to(torch.bool)  # [B, K]
    if not bool(bad.any()):
        return
    b = int(torch.nonzero(bad.any(dim=1))[0, 0])
    which = ", ".join(name for name, flag in zip(names, bad[b].tolist()) if flag)
    raise ValueError(
        f"Sample {cases[b]}: the network gave NaN or infinite outputs for {which}, so it cannot be scored "
        "(a NaN would count as negative in Acc-2 and make MAE NaN): check that the model file is intact and "
        "that its training did not diverge."
    )


class SentimentSubsetEvaluator(SubsetEvaluator):
    """Evaluates every modality subset of each sample from one pass of the per-modality outputs.

    The network must offer ``per_modality(inputs, mask)`` and ``fuse(per_modality, mask)`` (e.g.
    :class:`app.networks.DSTransformer`); ``inputs`` may be a dict of tensors. The output holds
    ``subset_preds [B, S, C]``, ``subset_valid [B, S]``, ``label``, ``case`` ids and ``pred`` (the
    prediction from all available modalities), ready for :class:`app.metrics.SubsetSentimentScore`.
    A network with ``predicts_missing`` true (:class:`app.networks.PromptedDSTransformer` with
    ``missing="predict"``) gets one pass per subset instead (:func:`predicted_subset_predictions`).
    Non-finite predictions stop the evaluation with the sample's id (:func:`check_finite_predictions`).

    Takes the arguments of :class:`~app.engines.SubsetEvaluator` (batch keys, ``amp``); its inferer
    is not used: the per-modality pass is a plain forward.
    """

    def _iteration(self, engine: SentimentSubsetEvaluator, batchdata: dict[str, Any]) -> dict:
        inputs, targets, mask, cases = engine.unpack(batchdata)
        with engine.mode(engine.network), torch.no_grad():
            if getattr(engine.network, "predicts_missing", False):
                with autocast_context(engine.state.device, self.use_amp):
                    preds, valid = predicted_subset_predictions(engine.network, inputs, mask)
                # the last subset is every modality: the prediction from all a sample has
                pred = preds[:, -1]
                modalities = engine.network.modalities
                check_finite_predictions(preds, valid, cases,
                                         [subset_name(s, modalities) for s in all_subsets(len(modalities))])
            else:
                with autocast_context(engine.state.device, self.use_amp):
                    per_mod = engine.network.per_modality(inputs, mask)
                per_mod = per_mod.float()
                check_finite_predictions(per_mod, mask, cases, engine.network.modalities)
                preds, valid = subset_predictions(engine.network, per_mod, mask)
                pred = engine.network.fuse(per_mod, mask)
        engine.state.output = {
            Keys.IMAGE: inputs, Keys.LABEL: targets, Keys.PRED: pred,
            "subset_preds": preds, "subset_valid": valid,
            "case": cases,
        }
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class SentimentReportHandler(SubsetReportHandler):
    """:class:`~app.engines.SubsetReportHandler` with the sentiment metric columns.

    Args:
        metric: a metric with ``last_result`` (and optionally ``metrics``, the report columns), e.g.
            :class:`app.metrics.SubsetSentimentScore`.
        output_dir: where ``<stem>.{json,csv,md,png}`` go.
        stem: file stem (default ``subset_metrics``).
        metrics: report columns; default: the metric's own (``Acc2, Acc2_has0, F1, Acc7, MAE, Corr``).
        print_table: also print the Markdown table.
        plot: also draw the PNG heatmap (about a second with matplotlib; training validations that
            run every epoch may skip it).
        checkpoint: the checkpoint an evaluation scores (recorded with its SHA-256, see the base class).
        during_training: the evaluator validates a training run (the report records the epoch, see the base
            class).
        summary_writer: optional TensorBoard ``SummaryWriter``: ``val_<metric>`` (means over the subsets, the
            MAE unnegated) and ``val_worst_subset_<metric>`` (Acc2, or Acc for classification) per epoch.

    Each report is also summed up in one log line: the mean of the key metric over the subsets, the other
    metrics' means and the worst subset.
    """

    def __init__(self, metric: Any, output_dir: str | os.PathLike, stem: str = "subset_metrics",
                 metrics: Sequence[str] | None = None, print_table: bool = False, plot: bool = True,
                 checkpoint: str | os.PathLike | None = None, during_training: bool = False,
                 summary_writer: Any = None) -> None:
        super().__init__(metric, output_dir, stem=stem, print_table=print_table, checkpoint=checkpoint,
                         during_training=during_training, summary_writer=summary_writer)
        self.metrics = tuple(metrics) if metrics is not None else None
        self.plot = parse_bool(plot, "plot")

    def __call__(self, engine: Any) -> None:
        from app.metrics.sentiment import SENTIMENT_METRICS
        from app.reports import format_table, write_subset_report

        result = getattr(self.metric, "last_result", None)
        if not result:
            return
        metrics = self.metrics or tuple(getattr(self.metric, "metrics", SENTIMENT_METRICS))
        result, title = self.annotated(engine, result)
        write_subset_report(result, self.output_dir, stem=self.stem, metrics=metrics, title=title, plot=self.plot)
        if self.print_table:
            print(format_table(result, metrics), flush=True)
        # led by the selection metric (the log's val_score is it negated for the MAE), else the first column
        headline = getattr(self.metric, "key", None)
        headline = headline if headline in metrics else metrics[0]
        worst_key = next((k for k in result.get("worst_subset") or {} if k != "name"), "score")
        self._summarise(engine, result, headline=headline, label=f"mean {headline}", columns=metrics,
                        worst_tag=f"val_worst_subset_{worst_key}")

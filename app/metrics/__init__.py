"""Evaluation metrics: BraTS hard Dice, MMSA sentiment metrics and their per-modality-subset
accumulators (plus a scalar ignite metric for checkpoint selection)."""

from app.metrics.dice import dice_from_logits, hard_dice
from app.metrics.sentiment import SENTIMENT_METRICS, SubsetSentimentAccumulator, sentiment_metrics, weighted_f1
from app.metrics.sentiment_metric import (
    CLASSIFICATION_METRICS,
    SubsetClassificationAccumulator,
    SubsetSentimentScore,
)
from app.metrics.subset_metrics import BRATS_REGIONS, SubsetAccumulator, SubsetDiceAccumulator, SubsetMeanDice

__all__ = [
    "BRATS_REGIONS",
    "CLASSIFICATION_METRICS",
    "SENTIMENT_METRICS",
    "SubsetAccumulator",
    "SubsetDiceAccumulator",
    "SubsetMeanDice",
    "SubsetSentimentAccumulator",
    "SubsetClassificationAccumulator",
    "SubsetSentimentScore",
    "dice_from_logits",
    "hard_dice",
    "sentiment_metrics",
    "weighted_f1",
]

"""Evaluation metrics: BraTS hard Dice and HD95, MMSA sentiment metrics and their per-modality-subset
accumulators (plus a scalar ignite metric for checkpoint selection)."""

from app.metrics.dice import dice_from_logits, hard_dice
from app.metrics.hausdorff import (
    BRATS_HD95_PENALTY, DEFAULT_HD95_WORKERS, HD95Scorer, affine_spacing, check_hd95, check_hd95_workers, hd95,
    hd95_from_logits,
)
from app.metrics.sentiment import SENTIMENT_METRICS, SubsetSentimentAccumulator, sentiment_metrics, weighted_f1
from app.metrics.sentiment_metric import (
    CLASSIFICATION_METRICS,
    SubsetClassificationAccumulator,
    SubsetSentimentScore,
)
from app.metrics.subset_metrics import (
    BRATS_REGIONS, SubsetAccumulator, SubsetDiceAccumulator, SubsetMeanDice, hd95_key,
)

__all__ = [
    "BRATS_HD95_PENALTY",
    "BRATS_REGIONS",
    "CLASSIFICATION_METRICS",
    "DEFAULT_HD95_WORKERS",
    "HD95Scorer",
    "SENTIMENT_METRICS",
    "SubsetAccumulator",
    "SubsetDiceAccumulator",
    "SubsetMeanDice",
    "SubsetSentimentAccumulator",
    "SubsetClassificationAccumulator",
    "SubsetSentimentScore",
    "affine_spacing",
    "check_hd95",
    "check_hd95_workers",
    "dice_from_logits",
    "hard_dice",
    "hd95",
    "hd95_from_logits",
    "hd95_key",
    "sentiment_metrics",
    "weighted_f1",
]

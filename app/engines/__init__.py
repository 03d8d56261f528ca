"""Engines and handlers: the strategy-driven trainer, the subset evaluators (segmentation and
sentiment) and their handlers."""

from app.engines.handlers import DiagnosticsHandler, SubsetReportHandler, TimeLimitHandler
from app.engines.sentiment import SentimentReportHandler, SentimentSubsetEvaluator, subset_predictions
from app.engines.trainer import SubsetEvaluator, SubsetTrainer, autocast_context, to_device
from app.engines.utils import ProgressBarHandler, check_patch_size, describe_state_dict, fit_roi, load_weights

__all__ = [
    "SubsetTrainer", "SubsetEvaluator", "to_device", "autocast_context", "TimeLimitHandler", "DiagnosticsHandler",
    "SubsetReportHandler", "ProgressBarHandler", "check_patch_size", "fit_roi", "describe_state_dict", "load_weights",
    "SentimentSubsetEvaluator", "SentimentReportHandler", "subset_predictions",
]

"""Engines and handlers: the strategy-driven trainer, the subset evaluator and their handlers."""

from app.engines.handlers import DiagnosticsHandler, SubsetReportHandler, TimeLimitHandler
from app.engines.trainer import SubsetEvaluator, SubsetTrainer, autocast_context, to_device
from app.engines.utils import ProgressBarHandler, check_patch_size, describe_state_dict, fit_roi, load_weights

__all__ = [
    "SubsetTrainer", "SubsetEvaluator", "to_device", "autocast_context", "TimeLimitHandler", "DiagnosticsHandler",
    "SubsetReportHandler", "ProgressBarHandler", "check_patch_size", "fit_roi", "describe_state_dict", "load_weights",
]

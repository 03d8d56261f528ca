"""Engines and handlers: the strategy-driven trainer, the subset evaluators (segmentation and
sentiment), their handlers, crash-safe checkpoints and multi-process training."""

from app.engines.checkpoint import (
    AtomicCheckpointSaver, ResumableCheckpoint, ResumableSampler, SeededDataset, atomic_save, check_resume,
    load_training_checkpoint, transform_settings,
)
from app.engines.distributed import (
    DistributedTimeLimitHandler, GradientSync, StopOnSignal, broadcast_module, check_shards, close_distributed, distributed_device,
    data_worker_init, init_distributed, is_distributed, mean_over_ranks, wait_for_ranks,
)
from app.engines.handlers import DiagnosticsHandler, LazySummaryWriter, SubsetReportHandler, TimeLimitHandler, TrainingProgressHandler
from app.metrics.hausdorff import check_hd95
from app.engines.sentiment import SentimentReportHandler, SentimentSubsetEvaluator, subset_predictions
from app.engines.trainer import NonFiniteLossError, SubsetEvaluator, SubsetTrainer, autocast_context, to_device
from app.engines.utils import (
    ProgressBarHandler, check_held_out, check_held_out_split, check_output_dir, check_modalities, check_patch_size, check_spacing, describe_state_dict, fit_roi, load_weights,
    report_input_errors, reseed_global_generator, resolve_device, set_cudnn, check_overrides, check_bools, check_counts, check_positive, check_share, lock_output_dir,
)

__all__ = [
    "NonFiniteLossError", "SubsetTrainer", "SubsetEvaluator", "to_device", "autocast_context", "TimeLimitHandler", "DiagnosticsHandler",
    "TrainingProgressHandler", "LazySummaryWriter",
    "SubsetReportHandler", "ProgressBarHandler", "check_held_out", "check_held_out_split", "check_output_dir", "check_modalities", "check_patch_size", "check_spacing", "set_cudnn", "reseed_global_generator", "fit_roi", "describe_state_dict", "load_weights",
    "SentimentSubsetEvaluator", "SentimentReportHandler", "subset_predictions",
    "AtomicCheckpointSaver", "ResumableCheckpoint", "ResumableSampler", "SeededDataset", "atomic_save",
    "load_training_checkpoint", "init_distributed", "close_distributed", "distributed_device", "is_distributed", "broadcast_module", "check_shards", "mean_over_ranks", "wait_for_ranks", "GradientSync",
    "DistributedTimeLimitHandler", "StopOnSignal", "data_worker_init", "report_input_errors", "check_overrides", "check_bools", "check_counts", "check_positive",
    "lock_output_dir", "check_resume", "transform_settings", "resolve_device", "check_share", "check_hd95",
]

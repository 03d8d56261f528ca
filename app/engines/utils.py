"""Workflow helpers used by the bundle configs: checks, weight loading (from
:mod:`app.networks.weights`) and the progress bar."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from ignite.engine import Engine

from app.flags import parse_bool
from app.networks.weights import describe_state_dict, load_weights

__all__ = ["check_patch_size", "set_cudnn", "fit_roi", "load_weights", "describe_state_dict", "ProgressBarHandler"]


def check_patch_size(patch_size: Sequence[int], network: Any) -> None:
    """Raise a ``ValueError`` that names the fix when the patch does not fit the network depth."""
    divisor = int(getattr(network, "divisor", 1))
    bad = [int(s) for s in patch_size if int(s) % divisor]
    if len(patch_size) != 3 or bad:
        fixed = [max(divisor, int(round(int(s) / divisor)) * divisor) for s in patch_size]
        raise ValueError(
            f"patch_size {list(patch_size)} must have 3 entries that are multiples of {divisor} "
            f"(2 ** (len(features) - 1)): use e.g. --patch_size \"{fixed}\"."
        )


def set_cudnn(deterministic: bool | str) -> None:
    """Deterministic cuDNN kernels (``true``), or autotuned ones (``false``: faster on GPU, not
    bit-reproducible). Call after ``monai.utils.set_determinism``, which forces the deterministic ones."""
    torch.backends.cudnn.deterministic = parse_bool(deterministic, "deterministic")
    torch.backends.cudnn.benchmark = not torch.backends.cudnn.deterministic


def fit_roi(roi_size: Sequence[int], spatial_shape: Sequence[int], divisor: int) -> tuple[int, ...]:
    """Sliding-window size for a volume: the training patch, shrunk to the volume (rounded up to
    ``divisor``) where the volume is smaller, so small volumes are not padded up to a whole patch."""
    return tuple(min(int(r), -(-int(s) // divisor) * divisor) for r, s in zip(roi_size, spatial_shape))


class ProgressBarHandler:
    """A tqdm progress bar over the iterations of each epoch, or nothing when disabled."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = parse_bool(enabled, "progress_bar")

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False).attach(engine, output_transform=lambda out: {"loss": float(out["loss"])})

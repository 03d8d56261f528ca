"""Workflow helpers used by the bundle configs: checks, weight loading and the progress bar."""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from ignite.engine import Engine

__all__ = ["check_patch_size", "fit_roi", "load_weights", "describe_state_dict", "ProgressBarHandler"]


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


def fit_roi(roi_size: Sequence[int], spatial_shape: Sequence[int], divisor: int) -> tuple[int, ...]:
    """Sliding-window size for a volume: the training patch, shrunk to the volume (rounded up to
    ``divisor``) where the volume is smaller, so small volumes are not padded up to a whole patch."""
    return tuple(min(int(r), -(-int(s) // divisor) * divisor) for r, s in zip(roi_size, spatial_shape))


def describe_state_dict(state: dict[str, torch.Tensor]) -> str:
    """Short description of a DS U-Net state dict (modalities and per-level widths)."""
    widths = []
    level = 0
    while f"encoders.0.levels.{level}.conv1.conv.weight" in state:
        widths.append(int(state[f"encoders.0.levels.{level}.conv1.conv.weight"].shape[0]))
        level += 1
    n_mod = len({k.split(".")[1] for k in state if k.startswith("encoders.")})
    if not widths:
        return f"{len(state)} tensors"
    return f"{n_mod} modality encoders, features {widths}"


def load_weights(network: torch.nn.Module, path: str | os.PathLike, map_location: Any = "cpu") -> torch.nn.Module:
    """Load a checkpoint into ``network`` safely (``weights_only=True``) with clear errors.

    Accepts a plain state dict or a dict holding it under ``model``/``network``/``state_dict``.

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: it cannot be read, or it was trained with another network configuration.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {path} not found: pass --ckpt_path to a model.pt written by training.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"Cannot read checkpoint {path} ({type(err).__name__}): it is corrupt or not a "
                         "PyTorch checkpoint; re-export it from training.") from err
    if isinstance(state, dict):
        for key in ("model", "network", "state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        if mismatched:
            key = mismatched[0]
            example = f"{key} is {tuple(state[key].shape)} there, {tuple(expected[key].shape)} here"
        else:
            example = f"{(missing or unexpected)[0]} is {'missing from' if missing else 'unexpected in'} it"
        raise ValueError(
            f"Checkpoint {path} was trained with a different network configuration "
            f"({describe_state_dict(state)}) than the one configured ({describe_state_dict(expected)}; "
            f"e.g. {example}): pass the training run's network settings (e.g. --features) when loading it."
        )
    network.load_state_dict(state)
    return network


class ProgressBarHandler:
    """A tqdm progress bar over the iterations of each epoch, or nothing when disabled."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = bool(enabled)

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False).attach(engine, output_transform=lambda out: {"loss": float(out["loss"])})

"""Training losses of the segmentation branch.

The network predicts three overlapping regions (WT, TC, ET), each with its own sigmoid. MONAI's
``DiceCELoss`` takes a binary cross-entropy only for a single output channel; with several channels it
takes ``torch.nn.CrossEntropyLoss``, a softmax over the channels, even with ``sigmoid=True``. For region
channels that is the wrong likelihood: a background voxel (target ``[0, 0, 0]``) has a soft-target
cross-entropy of exactly 0, so no background voxel is penalised, and a patch without tumour (a third of
the training crops) gives a constant loss (1, the Dice of empty regions) and no gradient at all; an
enhancing voxel (``[1, 1, 1]``) only pulls the three logits towards each other.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss as _MonaiDiceCELoss

from app.flags import parse_bool

__all__ = ["DiceCELoss", "check_loss", "loss_settings"]


def _plain_value(value: Any) -> Any:
    """A setting as plain Python (a tensor as its list of values), or None where it is not a setting."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__qualname__)}"
    return None


def loss_settings(loss: Any) -> dict[str, Any]:
    """The class of a loss and every setting that decides its value, as plain Python, to compare two runs' losses.

    A module gives its class under ``_target_`` (``app.losses.DiceCELoss``), then its own public attributes and
    buffers and those of its submodules (``dice.smooth_dr``, ``binary_cross_entropy.pos_weight``); a tensor gives
    its values. A function gives its qualified name alone. Two losses with equal settings compute the same value.
    """
    cls = type(loss)
    if not isinstance(loss, torch.nn.Module):
        return {"_target_": _plain_value(loss) if callable(loss) else f"{cls.__module__}.{cls.__qualname__}"}
    settings: dict[str, Any] = {}
    for prefix, module in loss.named_modules():
        items = [(k, v) for k, v in vars(module).items() if not k.startswith("_") and k != "training"]
        items += list(module.named_buffers(recurse=False))
        for key, value in items:
            plain = _plain_value(value)
            if plain is not None or value is None:
                settings[f"{prefix}.{key}" if prefix else key] = plain
    return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **{k: settings[k] for k in sorted(settings)}}


def _channel_weight(loss: Any) -> torch.Tensor | None:
    """The per-channel ``weight`` a loss was built with (MONAI's ``DiceCELoss``: its cross-entropy's, which is the
    whole ``weight``; its Dice's drops channel 0 without the background), or None."""
    for owner, name in (("binary_cross_entropy", "pos_weight"), ("dice", "class_weight"), ("", "class_weight")):
        module = getattr(loss, owner, None) if owner else loss
        value = getattr(module, name, None) if module is not None else None
        if isinstance(value, torch.Tensor):
            return value
    return None


def check_loss(loss: Any, channels: int, spatial_dims: int = 3) -> None:
    """Refuse a loss whose settings do not fit a prediction of ``channels`` channels, before any case is read.

    A ``weight`` of another length than the channels (``--loss#weight "[2.0]"`` for the three regions) was
    refused by MONAI only at the first training step, with a traceback, after ``datalist.json``, ``models/`` and
    ``tensorboard/`` were written. The weight is checked first; then the loss is computed once on an all-zero
    prediction of that shape (on a copy: MONAI's Dice expands a single weight to one per channel on its first call,
    which would change the settings a resume compares).

    Args:
        loss: the training loss, as the bundle builds it (``@loss``).
        channels: the network's output channels (``@network_def#out_channels``).
        spatial_dims: the prediction's spatial dimensions.

    Raises:
        ValueError: naming the setting and the fix.
    """
    weight = _channel_weight(loss)
    if weight is not None and weight.ndim > 0:
        values = [float(v) for v in weight.detach().cpu().flatten().tolist()]
        even = "[" + ",".join(["1.0"] * channels) + "]"
        include_background = getattr(getattr(loss, "dice", loss), "include_background", True)
        if weight.ndim != 1 or len(values) != channels:
            background = "" if include_background else " (also with --loss#include_background false)"
            raise ValueError(f"--loss#weight {values} has {len(values)} value(s), the network predicts {channels} "
                             f"channels: give one value per channel{background}, e.g. --loss#weight \"{even}\", "
                             "or one number for every channel.")
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(f"--loss#weight {values} must be finite numbers >= 0 (one per channel), "
                             f"e.g. --loss#weight \"{even}\".")
    shape = (1, int(channels), *([2] * spatial_dims))
    try:
        copy.deepcopy(loss)(torch.zeros(shape), torch.zeros(shape))
    except (ValueError, RuntimeError, IndexError, TypeError, AssertionError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"The loss ({type(loss).__qualname__}) cannot be computed on the network's {channels} output "
                         f"channels: {reason}. Fix its settings (--loss#...).") from None


class DiceCELoss(_MonaiDiceCELoss):
    """MONAI's ``DiceCELoss`` (same arguments), whose cross-entropy term with ``sigmoid=True`` is the mean
    binary cross-entropy of each channel's sigmoid, whatever the number of channels, for a target of the
    logits' shape (one mask per channel, as the bundles give). A class-index target (``to_onehot_y=True``) gets
    MONAI's loss unchanged.

    With ``sigmoid=True`` the loss is ``lambda_dice * Dice + lambda_ce * mean(BCE(sigmoid(x_c), y_c))``, the
    mean taken over samples, channels and voxels; ``weight`` (one value per channel) is then the positive
    weight of each channel's BCE (``pos_weight``), and ``label_smoothing`` does not apply (as in MONAI's
    single-channel BCE). Without ``sigmoid`` it is MONAI's loss unchanged.

    As in MONAI's loss, ``weight`` also weighs each channel's Dice, and ``include_background``, ``batch`` and the
    ``smooth_*`` settings apply to the Dice alone: with ``include_background=False`` the Dice leaves channel 0 out
    (``weight[1:]`` weighs the others) while the cross-entropy keeps every channel. ``weight`` may be a list
    (``--loss#weight "[1,2,4]"``, a recipe's ``weight: [1, 2, 4]``) or one number for every channel, the channels
    the Dice scores without the background included. The switches (``include_background``, ``sigmoid``, ...) take
    ``true``/``false`` as the command line gives them.
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: torch.Tensor | Sequence[float] | float | None = None,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        """MONAI's arguments; ``weight`` may also be a list or a number (MONAI takes a tensor only).

        Raises:
            ValueError: ``weight`` is not numbers, a switch is not true or false, a ``lambda_*`` is not a number
                >= 0 or ``reduction`` is neither ``mean`` nor ``sum`` (MONAI refuses the last two with a message that
                a bundle run shows at the bottom of a traceback).
        """
        # --loss#include_background false reaches the loss as the string "false", which Python reads as True: the
        # Dice went on scoring the background channel without a word
        switches = {"include_background": include_background, "to_onehot_y": to_onehot_y, "sigmoid": sigmoid,
                    "softmax": softmax, "squared_pred": squared_pred, "jaccard": jaccard, "batch": batch}
        switches = {name: parse_bool(value, f"loss#{name}") for name, value in switches.items()}
        for name, value, term in (("lambda_dice", lambda_dice, "Dice"), ("lambda_ce", lambda_ce, "cross-entropy")):
            try:
                good = not isinstance(value, bool) and math.isfinite(float(value)) and float(value) >= 0
            except (TypeError, ValueError):
                good = False
            if not good:
                raise ValueError(f"--loss#{name} {value!r} must be a number >= 0 (the weight of the {term} term), "
                                 f"e.g. --loss#{name} 1.0.")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"--loss#reduction {reduction!r} must be mean or sum (the Dice reduces the voxels, so "
                             "there is no per-voxel loss to return), e.g. --loss#reduction mean.")
        if weight is not None and not isinstance(weight, torch.Tensor):
            # MONAI's loss registers weight as a buffer of torch's losses, which refuse a list: the list a YAML
            # recipe or --loss#weight gives stopped the run with a traceback, after datalist.json was written
            try:
                weight = torch.as_tensor(weight, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"loss weight {weight!r} is not numbers: give one value per region channel, "
                                 'e.g. --loss#weight "[1.0,1.0,2.0]", or one number for every channel.') from None
        # MONAI's loss gives its Dice weight[1:] without the background, which stops with an IndexError on a single
        # number; its Dice applies one number to every channel it scores, so that number is the Dice's weight
        one_number = weight is not None and weight.ndim == 0 and not switches["include_background"]
        super().__init__(
            other_act=other_act, reduction=reduction, smooth_nr=smooth_nr, smooth_dr=smooth_dr,
            weight=None if one_number else weight, lambda_dice=lambda_dice, lambda_ce=lambda_ce,
            label_smoothing=label_smoothing, **switches,
        )
        if one_number:
            # the buffers MONAI's loss sets from weight (registered as None above)
            self.dice.class_weight = weight
            self.cross_entropy.weight = weight
            self.binary_cross_entropy.pos_weight = weight

    def bce(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of every channel's logits against its target, as one independent sigmoid each."""
        if not torch.is_floating_point(target):
            target = target.to(dtype=input.dtype)
        pos_weight = getattr(self.binary_cross_entropy, "pos_weight", None)
        if pos_weight is not None and pos_weight.numel() > 1:
            # one weight per channel: broadcast along the channel axis, not the last spatial axis
            # (device only: cast to bf16 logits' dtype, the weights were rounded to 8 bits before the cross-entropy,
            # which autocast computes in float32)
            pos_weight = pos_weight.to(device=input.device).reshape(-1, *([1] * (input.ndim - 2)))
        return F.binary_cross_entropy_with_logits(input, target, pos_weight=pos_weight,
                                                  reduction=self.binary_cross_entropy.reduction)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Dice plus binary cross-entropy per channel with ``sigmoid=True``; MONAI's ``DiceCELoss`` otherwise.

        Args:
            input: logits ``[B, C, *spatial]``.
            target: ``[B, C, *spatial]`` region masks (or what MONAI's loss accepts without ``sigmoid``).
        """
        if not self.dice.sigmoid or input.shape[1] == 1 or input.shape != target.shape:
            return super().forward(input, target)
        dice_loss = self.dice(input, target)
        return self.lambda_dice * dice_loss + self.lambda_ce * self.bce(input, target)

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

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss as _MonaiDiceCELoss

__all__ = ["DiceCELoss"]


class DiceCELoss(_MonaiDiceCELoss):
    """MONAI's ``DiceCELoss`` (same arguments), whose cross-entropy term with ``sigmoid=True`` is the mean
    binary cross-entropy of each channel's sigmoid, whatever the number of channels, for a target of the
    logits' shape (one mask per channel, as the bundles give). A class-index target (``to_onehot_y=True``) gets
    MONAI's loss unchanged.

    With ``sigmoid=True`` the loss is ``lambda_dice * Dice + lambda_ce * mean(BCE(sigmoid(x_c), y_c))``, the
    mean taken over samples, channels and voxels; ``weight`` (one value per channel) is then the positive
    weight of each channel's BCE (``pos_weight``), and ``label_smoothing`` does not apply (as in MONAI's
    single-channel BCE). Without ``sigmoid`` it is MONAI's loss unchanged.
    """

    def bce(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of every channel's logits against its target, as one independent sigmoid each."""
        if not torch.is_floating_point(target):
            target = target.to(dtype=input.dtype)
        pos_weight = getattr(self.binary_cross_entropy, "pos_weight", None)
        if pos_weight is not None and pos_weight.numel() > 1:
            # one weight per channel: broadcast along the channel axis, not the last spatial axis
            pos_weight = pos_weight.to(input).reshape(-1, *([1] * (input.ndim - 2)))
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

"""The segmentation loss by hand: Dice plus one binary cross-entropy per region channel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.losses import DiceLoss

from app.losses import DiceCELoss
from tests.bundles.helpers import TRAIN


def _bundle_loss() -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(TRAIN)
    return parser.get_parsed_content("loss")


def test_the_bundles_loss_trains_on_a_patch_without_tumour():
    # a third of the training crops hold no tumour: the loss of a softmax cross-entropy over the region channels was
    # the constant 1 there (every soft-target term 0, the Dice of empty regions 1), with no gradient at all
    logits = torch.tensor([-2.0, -0.5, 0.0, 1.5]).reshape(1, 1, 4, 1, 1).repeat(1, 3, 1, 1, 1).requires_grad_()
    target = torch.zeros_like(logits)
    loss = _bundle_loss()(logits, target)
    # Dice of an empty reference with smooth_nr 0 is 0, so its loss is 1; BCE by hand: log(1 + e^x) per voxel
    bce = sum(torch.log1p(torch.exp(torch.tensor(x))) for x in (-2.0, -0.5, 0.0, 1.5)) / 4
    assert float(loss.detach()) == pytest.approx(1.0 + float(bce), rel=1e-6)
    loss.backward()
    # d BCE / dx = sigmoid(x) / N: every background voxel is pushed down, the most confident false positive most
    expected = torch.sigmoid(logits.detach()) / logits.numel()
    assert torch.allclose(logits.grad, expected, rtol=1e-5)


def test_every_region_channel_is_its_own_sigmoid():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 5, 4)
    target = (torch.rand(2, 3, 6, 5, 4) > 0.6).float()
    target[:, 1] *= target[:, 0]  # nested regions, as WT/TC/ET are
    target[:, 2] *= target[:, 1]
    loss = DiceCELoss(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-5, lambda_dice=0.7, lambda_ce=0.4)
    dice = DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-5)(logits, target)
    assert float(loss(logits, target)) == pytest.approx(
        0.7 * float(dice) + 0.4 * float(F.binary_cross_entropy_with_logits(logits, target)), rel=1e-6)
    # an enhancing voxel ([1, 1, 1]) pulls every channel's logit up, whatever the others are
    voxel = torch.tensor([3.0, -1.0, 0.5]).reshape(1, 3, 1, 1, 1).requires_grad_()
    DiceCELoss(sigmoid=True, lambda_dice=0.0)(voxel, torch.ones_like(voxel)).backward()
    assert bool((voxel.grad < 0).all())


def test_per_channel_weights_weigh_each_channels_positives():
    logits = torch.zeros(1, 3, 2, 1, 1)
    target = torch.zeros_like(logits)
    target[0, :, 0] = 1.0
    weight = torch.tensor([1.0, 2.0, 4.0])
    loss = DiceCELoss(sigmoid=True, lambda_dice=0.0, weight=weight)(logits, target)
    # each voxel log 2; the positive voxel of channel c weighs weight[c]: (1 + w) log 2 / 2 per channel
    expected = sum((1.0 + float(w)) for w in weight) * torch.log(torch.tensor(2.0)) / 6
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_without_sigmoid_the_loss_is_monais():
    from monai.losses import DiceCELoss as MonaiDiceCELoss

    torch.manual_seed(1)
    logits = torch.randn(2, 3, 4, 4, 4)
    target = torch.randint(0, 3, (2, 1, 4, 4, 4))
    ours = DiceCELoss(softmax=True, to_onehot_y=True)(logits, target)
    assert float(ours) == pytest.approx(float(MonaiDiceCELoss(softmax=True, to_onehot_y=True)(logits, target)))


def test_the_reduction_and_a_boolean_label_are_honoured():
    # reduction="sum" sums the cross-entropy as MONAI's single-channel BCE does; the region masks the bundle caches as
    # bool give the loss of their float values
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 4, 3, 2)
    target = torch.rand(2, 3, 4, 3, 2) > 0.5
    summed = DiceCELoss(sigmoid=True, reduction="sum", lambda_dice=0.5)
    dice = DiceLoss(sigmoid=True, reduction="sum")(logits, target.float())
    expected = 0.5 * float(dice) + float(F.binary_cross_entropy_with_logits(logits, target.float(), reduction="sum"))
    assert float(summed(logits, target.float())) == pytest.approx(expected, rel=1e-6)
    assert float(summed(logits, target)) == pytest.approx(expected, rel=1e-6)

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


def test_a_weight_given_as_a_list_or_a_number_is_the_tensor_of_its_values():
    # the list a recipe (weight: [1, 2, 4]) or --loss#weight "[1,2,4]" gives stopped the run with MONAI's "cannot assign
    # 'list' object to buffer 'weight'" traceback, after datalist.json was written
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser["loss"]["weight"] = [1, 2, 4]
    from_config = parser.get_parsed_content("loss")
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 4, 3, 2)
    target = (torch.rand(2, 3, 4, 3, 2) > 0.5).float()
    tensor = DiceCELoss(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-5, weight=torch.tensor([1.0, 2.0, 4.0]))
    assert float(from_config(logits, target)) == pytest.approx(float(tensor(logits, target)), rel=1e-6)
    number = DiceCELoss(sigmoid=True, lambda_dice=0.0, weight=2)
    expected = F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(2.0))
    assert float(number(logits, target)) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match=r"loss weight \['high'\] is not numbers.*--loss#weight"):
        DiceCELoss(sigmoid=True, weight=["high"])


def test_per_channel_weights_keep_their_precision_under_bf16_autocast():
    # under the trainer's bf16 autocast the logits are bf16 and the cross-entropy runs in float32: the weights were
    # cast to the logits' dtype first, so 1.1 weighed as 1.1015625 (the BCE off by 1e-4 of its value)
    torch.manual_seed(4)
    logits = torch.randn(2, 3, 6, 5, 4).bfloat16()
    target = (torch.rand(2, 3, 6, 5, 4) > 0.6).float()
    weight = torch.tensor([1.1, 2.3, 3.7])
    loss = DiceCELoss(sigmoid=True, lambda_dice=0.0, weight=weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(logits, target)
    expected = F.binary_cross_entropy_with_logits(logits.float(), target, pos_weight=weight.reshape(3, 1, 1, 1))
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(float(expected), rel=1e-6)


def test_include_background_and_batch_apply_to_the_dice_alone():
    # as in MONAI's DiceCELoss: include_background=False leaves channel 0 out of the Dice (weight[1:] weighs the others),
    # the cross-entropy keeps every channel with its own positive weight; batch=True pools the Dice over the batch only
    torch.manual_seed(5)
    logits = torch.randn(2, 3, 4, 4, 2)
    target = (torch.rand(2, 3, 4, 4, 2) > 0.5).float()
    weight = torch.tensor([1.0, 2.0, 3.0])
    loss = DiceCELoss(sigmoid=True, include_background=False, batch=True, weight=weight)
    dice = DiceLoss(sigmoid=True, include_background=False, batch=True, weight=weight[1:])(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight.reshape(3, 1, 1, 1))
    assert float(loss(logits, target)) == pytest.approx(float(dice) + float(bce), rel=1e-6)


@pytest.mark.parametrize("include_background", [False, "false", "False"])
def test_one_weight_without_the_background_weighs_every_channel_the_dice_scores(include_background):
    """--loss#include_background false with --loss#weight 2.0 stopped with MONAI's IndexError (its weight[1:] of a single
    number) when the loss was built; the command line's "false" was the string, which Python reads as True, so the
    Dice went on scoring the background channel without a word."""
    from app.losses import check_loss, loss_settings

    torch.manual_seed(6)
    logits = torch.randn(2, 3, 4, 4, 2)
    target = (torch.rand(2, 3, 4, 4, 2) > 0.5).float()
    loss = DiceCELoss(sigmoid=True, squared_pred=True, include_background=include_background, weight=2.0)
    check_loss(loss, 3)
    # MONAI's Dice applies one number to every channel it scores; the cross-entropy weighs every channel's positives
    dice = DiceLoss(sigmoid=True, squared_pred=True, include_background=False, weight=2.0)(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(2.0))
    assert float(loss(logits, target)) == pytest.approx(float(dice) + float(bce), rel=1e-6)
    assert loss_settings(loss)["dice.include_background"] is False


def test_a_switch_that_is_not_true_or_false_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"--loss#include_background must be true or false, got 'no': pass "
                                         r"--loss#include_background true or --loss#include_background false\."):
        DiceCELoss(sigmoid=True, include_background="no")


def test_an_all_tumour_crop_and_a_crop_without_enhancing_tumour_train_every_channel():
    logits = torch.tensor([-2.0, 0.0, 1.0]).reshape(1, 3, 1, 1, 1).repeat(2, 1, 3, 2, 2).requires_grad_()
    loss = _bundle_loss()
    # every voxel tumour in every region: each logit is pushed up
    loss(logits, torch.ones_like(logits)).backward()
    assert bool((logits.grad < 0).all())
    # no enhancing tumour (an ET-absent label map): the ET channel's Dice is the constant 1 of an empty reference, but
    # its cross-entropy still pushes every ET logit down, by sigmoid(x) / N
    logits.grad = None
    target = torch.ones_like(logits)
    target[:, 2] = 0.0
    loss(logits, target).backward()
    expected = torch.sigmoid(logits.detach()[:, 2]) / logits.numel()
    assert torch.allclose(logits.grad[:, 2], expected, rtol=1e-5)


@pytest.mark.parametrize("settings, message", [
    ({"lambda_ce": -1.0}, r"--loss#lambda_ce -1\.0 must be a number >= 0 \(the weight of the cross-entropy term\)"),
    ({"lambda_dice": float("nan")}, r"--loss#lambda_dice nan must be a number >= 0 \(the weight of the Dice term\)"),
    ({"lambda_ce": "high"}, r"--loss#lambda_ce 'high' must be a number >= 0"),
    ({"reduction": "none"}, r"--loss#reduction 'none' must be mean or sum"),
])
def test_a_bad_setting_is_refused_naming_it(settings, message):
    # MONAI refused a negative weight and reduction='none' with messages a bundle run printed under a traceback, and
    # took a NaN weight, which made every loss NaN
    with pytest.raises(ValueError, match=message):
        DiceCELoss(sigmoid=True, **settings)


@pytest.mark.parametrize("settings, message", [
    ({"weight": [2.0]}, r'--loss#weight \[2.0\] has 1 value\(s\), the network predicts 3 channels: give one value per '
                        r'channel, e.g. --loss#weight "\[1.0,1.0,1.0\]", or one number for every channel.'),
    ({"weight": [1.0, 2.0, 4.0, 8.0]}, r"--loss#weight \[1.0, 2.0, 4.0, 8.0\] has 4 value\(s\)"),
    ({"weight": [2.0, 4.0], "include_background": False},
     r"has 2 value\(s\), the network predicts 3 channels: give one value per channel \(also with "
     r"--loss#include_background false\)"),
    ({"weight": [1.0, -1.0, 2.0]}, r"--loss#weight \[1.0, -1.0, 2.0\] must be finite numbers >= 0"),
])
def test_a_weight_that_does_not_fit_the_regions_is_refused_before_training(settings, message):
    """MONAI refused --loss#weight "[2.0]" for the three regions only at the first training step, with a traceback
    after datalist.json, models/ and tensorboard/ were written."""
    from app.losses import check_loss

    loss = DiceCELoss(sigmoid=True, squared_pred=True, **settings)
    with pytest.raises(ValueError, match=message):
        check_loss(loss, 3)


def test_a_fitting_loss_passes_the_check_unchanged():
    """One number, one per channel, no weight: accepted; the check leaves the loss as built (MONAI's Dice expands a
    single weight on its first call, which would change the settings a resume compares)."""
    from app.losses import check_loss, loss_settings

    for weight in (2.0, [1.0, 2.0, 4.0], None):
        loss = DiceCELoss(sigmoid=True, squared_pred=True, weight=weight)
        before = loss_settings(loss)
        check_loss(loss, 3)
        assert loss_settings(loss) == before

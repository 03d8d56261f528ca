"""Workflow helpers of the bundle configs."""

from __future__ import annotations

import pytest
import torch

from monai.inferers import SimpleInferer

from app.engines import ProgressBarHandler, SubsetEvaluator, SubsetTrainer, set_cudnn
from app.networks import DSUNet
from app.strategies import build_strategy


@pytest.fixture
def restore_cudnn():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@pytest.mark.parametrize("value, deterministic", [(True, True), ("false", False), ("1", True), (False, False)])
def test_set_cudnn_switches_between_deterministic_and_autotuned(restore_cudnn, value, deterministic):
    set_cudnn(value)
    assert torch.backends.cudnn.deterministic is deterministic
    assert torch.backends.cudnn.benchmark is (not deterministic)


def test_set_cudnn_names_the_fix_for_a_bad_value(restore_cudnn):
    with pytest.raises(ValueError, match="--deterministic false"):
        set_cudnn("fast")


def test_boolean_knobs_read_the_command_line_strings():
    """``monai.bundle run --amp false`` passes the string "false": it must switch bf16 off, not on."""
    net = DSUNet(features=[2, 4])
    common = {"device": torch.device("cpu"), "network": net}
    trainer = SubsetTrainer(max_epochs=1, train_data_loader=[], optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                            loss_function=torch.nn.L1Loss(), strategy=build_strategy("plain"), amp="false", **common)
    evaluator = SubsetEvaluator(val_data_loader=[], inferer=SimpleInferer(), amp="false", **common)
    assert trainer.use_amp is False and evaluator.use_amp is False
    assert SubsetEvaluator(val_data_loader=[], inferer=SimpleInferer(), amp="true", **common).use_amp is True
    assert ProgressBarHandler(enabled="false").enabled is False
    with pytest.raises(ValueError, match="--amp must be true or false"):
        SubsetEvaluator(val_data_loader=[], inferer=SimpleInferer(), amp="yes", **common)
    with pytest.raises(ValueError, match="--progress_bar must be true or false"):
        ProgressBarHandler(enabled="no")


"""Workflow helpers of the bundle configs."""

from __future__ import annotations

import pytest
import torch

from app.engines import set_cudnn


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

"""Instance norm from reductions against PyTorch's own instance_norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from app.networks import DSUNet, InstanceNorm3d, use_reduction_instance_norm


@pytest.mark.parametrize("affine", [False, True])
def test_matches_native_values_and_gradients(affine):
    torch.manual_seed(0)
    norm = InstanceNorm3d(3, affine=affine).double()
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.uniform_(-1.0, 1.0)
    x = (torch.randn(2, 3, 4, 5, 6, dtype=torch.float64) * 3 + 2).requires_grad_()
    g = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    ours = norm(x)
    ref = F.instance_norm(x, weight=norm.weight, bias=norm.bias, eps=norm.eps)
    assert torch.allclose(ours, ref, atol=1e-12)
    assert torch.allclose(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0], atol=1e-12)


def test_many_rows_use_the_native_kernels_with_the_same_result():
    x = torch.randn(4, 8, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    norm = InstanceNorm3d(8).double()
    assert x.shape[0] * x.shape[1] >= norm.native_from_rows
    ref = F.instance_norm(x)
    assert torch.allclose(norm(x), ref, atol=1e-12)
    norm.native_from_rows = 10**9  # force the reductions
    assert torch.allclose(norm(x), ref, atol=1e-12)


def test_second_order_gradients_for_cggm():
    x = torch.randn(1, 2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(InstanceNorm3d(2).double(), (x,))


def test_bf16_input_gives_bf16_output_from_float32_statistics():
    x = torch.randn(1, 4, 8, 8, 8) * 10 + 50
    y = InstanceNorm3d(4)(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), F.instance_norm(x.bfloat16().float()), atol=2e-2)


def test_swap_keeps_state_dict_and_scripts():
    native = DSUNet(features=(4, 8))
    assert not any(type(m) is nn.InstanceNorm3d for m in native.modules())
    assert sum(isinstance(m, InstanceNorm3d) for m in native.modules()) > 0
    block = nn.Sequential(nn.Conv3d(1, 2, 1), nn.InstanceNorm3d(2, affine=True))
    keys = set(block.state_dict())
    use_reduction_instance_norm(block)
    assert isinstance(block[1], InstanceNorm3d) and set(block.state_dict()) == keys
    x = torch.randn(1, 1, 4, 4, 4)
    assert torch.allclose(torch.jit.script(block)(x), block(x))


def test_running_statistics_and_bad_rank_are_refused():
    with pytest.raises(ValueError, match="nn.InstanceNorm3d"):
        InstanceNorm3d(2, track_running_stats=True)
    tracked = nn.Sequential(nn.InstanceNorm3d(2, track_running_stats=True))
    assert type(use_reduction_instance_norm(tracked)[0]) is nn.InstanceNorm3d
    with pytest.raises(ValueError, match="B, C, D, H, W"):
        InstanceNorm3d(2)(torch.randn(2, 4, 4, 4))

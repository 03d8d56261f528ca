"""Instance norm from reductions against PyTorch's own instance_norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from app.networks import DSUNet, InstanceNorm3d, use_reduction_instance_norm
from app.networks.norm import instance_norm_from_reductions


@pytest.mark.parametrize("affine", [False, True])
def test_matches_native_values_and_gradients(affine):
    torch.manual_seed(0)
    weight = torch.rand(3, dtype=torch.float64, requires_grad=True) + 0.5 if affine else None
    bias = torch.rand(3, dtype=torch.float64, requires_grad=True) - 0.5 if affine else None
    x = (torch.randn(2, 3, 4, 5, 6, dtype=torch.float64) * 3 + 2).requires_grad_()
    g = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    ours = instance_norm_from_reductions(x, weight, bias, 1e-5)
    ref = F.instance_norm(x, weight=weight, bias=bias, eps=1e-5)
    assert torch.allclose(ours, ref, atol=1e-12)
    inputs = [x] + ([weight, bias] if affine else [])
    for a, b in zip(torch.autograd.grad(ours, inputs, g), torch.autograd.grad(ref, inputs, g)):
        assert torch.allclose(a, b, atol=1e-12)


def test_cpu_and_many_rows_use_the_native_kernels(monkeypatch):
    calls = []
    native = F.instance_norm
    monkeypatch.setattr(F, "instance_norm", lambda *a, **k: calls.append(1) or native(*a, **k))
    x = torch.randn(1, 2, 3, 4, 5)
    assert torch.allclose(InstanceNorm3d(2)(x), native(x), atol=1e-6) and calls  # CPU: native
    if torch.cuda.is_available():
        calls.clear()
        InstanceNorm3d(2).cuda()(x.cuda())
        assert not calls  # few rows on a GPU: reductions
        InstanceNorm3d(8).cuda()(torch.randn(4, 8, 3, 4, 5, device="cuda"))
        assert calls  # 32 rows: native


def test_second_order_gradients_for_cggm():
    x = torch.randn(1, 2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(instance_norm_from_reductions, (x,))


def test_bf16_input_gives_bf16_output_from_float32_statistics():
    x = torch.randn(1, 4, 8, 8, 8) * 10 + 50
    y = instance_norm_from_reductions(x.bfloat16())
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
    assert torch.jit.script(instance_norm_from_reductions)(x).shape == x.shape


def test_running_statistics_and_bad_rank_are_refused():
    with pytest.raises(ValueError, match="nn.InstanceNorm3d"):
        InstanceNorm3d(2, track_running_stats=True)
    tracked = nn.Sequential(nn.InstanceNorm3d(2, track_running_stats=True))
    assert type(use_reduction_instance_norm(tracked)[0]) is nn.InstanceNorm3d
    with pytest.raises(ValueError, match="B, C, D, H, W"):
        InstanceNorm3d(2)(torch.randn(2, 4, 4, 4))

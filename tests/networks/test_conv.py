"""oneDNN convolutions for batch-1 CPU calls: the same values and gradients as ``nn.Conv3d``, without
PyTorch's im2col path."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.profiler import profile

from app.networks import DSUNet
from app.networks.conv import OneDNNConv3d, use_onednn_conv
from app.strategies import build_strategy

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


def _plain_copy(net: nn.Module) -> nn.Module:
    """``net`` with the same weights and plain ``nn.Conv3d`` layers: what the network ran before."""
    old = copy.deepcopy(net)
    for m in old.modules():
        if type(m) is OneDNNConv3d:
            m.__class__ = nn.Conv3d
    return old


def _im2col_kernels(run) -> list:
    """Kernel shapes of the convolutions that ran on PyTorch's im2col path ("slow_conv3d") during ``run()``."""
    with profile(record_shapes=True) as prof:
        run()
    return [tuple(e.input_shapes[1][2:]) for e in prof.events() if e.name == "aten::slow_conv3d_forward"]


def _grads(net: nn.Module) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in net.parameters()]


def _assert_close(new: list[torch.Tensor], old: list[torch.Tensor], rtol: float = 1e-4) -> None:
    # another summation order: compare each tensor relative to its own largest entry
    for a, b in zip(new, old):
        scale = float(b.abs().max()) or 1.0
        assert float((a - b).abs().max()) <= rtol * scale


def test_the_network_uses_onednn_convolutions():
    net = DSUNet(features=(4, 8))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    assert convs and all(type(m) is OneDNNConv3d for m in convs)
    assert set(net.state_dict()) == set(_plain_copy(net).state_dict())  # checkpoints load either way


def test_batch1_training_step_leaves_im2col_to_1x1_kernels():
    # a batch of one at 16^3 is what PyTorch sends to im2col: every 3x3x3 convolution, forward and backward
    torch.manual_seed(0)
    net = DSUNet(features=(4, 8))
    x = torch.randn(1, 4, 16, 16, 16)
    old = _plain_copy(net)
    assert (3, 3, 3) in _im2col_kernels(lambda: old(x).square().mean().backward())
    assert set(_im2col_kernels(lambda: net(x).square().mean().backward())) <= {(1, 1, 1)}  # only the head
    with torch.no_grad():  # validation and inference
        assert (3, 3, 3) in _im2col_kernels(lambda: old(x))
        assert set(_im2col_kernels(lambda: net(x))) <= {(1, 1, 1)}


@pytest.mark.parametrize("batch", [1, 2])
def test_values_and_gradients_equal_the_plain_network(batch):
    torch.manual_seed(0)
    net = DSUNet(features=(4, 8, 16))
    old = _plain_copy(net)
    x = torch.randn(batch, 4, 16, 16, 16)
    mask = torch.tensor([[True, False, True, True]] * batch)
    outs = []
    for model in (old, net):
        with torch.no_grad():
            frozen = model(x, mask)
        out = model(x, mask)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append([frozen, out.detach(), *_grads(model)])
    _assert_close(outs[1], outs[0])


@pytest.mark.parametrize("channels", [(1, 4, 3, 1), (3, 5, 3, 1), (2, 4, 3, 2), (2, 4, 1, 1)])
def test_layer_equals_conv3d_whatever_takes_the_fast_path(channels):
    # even and odd output widths, strides and a 1x1 kernel (left to PyTorch), with and without gradients
    c_in, c_out, k, stride = channels
    torch.manual_seed(0)
    ref = nn.Conv3d(c_in, c_out, k, stride=stride, padding=k // 2)
    layer = use_onednn_conv(nn.Sequential(copy.deepcopy(ref)))[0]
    assert type(layer) is OneDNNConv3d
    x = torch.randn(1, c_in, 12, 12, 12, requires_grad=True)
    g = torch.randn_like(ref(x))
    results = []
    for conv in (ref, layer):
        x.grad = None
        conv.zero_grad()
        conv(x).backward(g)
        with torch.no_grad():
            results.append([conv(x), x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()])
    _assert_close(results[1], results[0], rtol=1e-5)


@pytest.mark.parametrize("name,options", [("gmd", {"subsets": "all"}), ("gmd", {"subsets": "all", "vjp_chunk": 4}),
                                          ("cggm", {})])
def test_strategy_step_gives_the_gradients_of_the_plain_network(name, options):
    # exact GMD's per-modality trunk VJPs (batched ones too) and CGGM's second-order gradients
    torch.manual_seed(0)
    net = DSUNet(features=(4, 8))
    old = _plain_copy(net)
    x = torch.randn(2, 4, 16, 16, 16)
    y = (torch.rand(2, 3, 16, 16, 16) > 0.7).float()
    mask = torch.tensor([[True, True, True, True], [True, False, True, False]])  # batch-1 encoders and trunks
    loss = DiceCELoss(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-5)
    results = []
    for model in (old, net):
        strategy = build_strategy(name, seed=0, **options)
        model.zero_grad(set_to_none=True)
        result = strategy.step(model, x, mask, y, loss, iteration=1)
        results.append([result.loss, result.pred, *_grads(model)])
    _assert_close(results[1], results[0])

"""3D convolutions that keep batch-1 float32 CPU calls on oneDNN, for the DS U-Net's MONAI blocks.

PyTorch sends a CPU convolution with a batch of one, a kernel of at most 3 and ``C * D * H <= 20480``
(``use_mkldnn`` in ATen's ``Convolution.cpp``) to its im2col path ("slow_conv3d") instead of oneDNN.
The DS U-Net meets such calls whenever a modality's encoder or trunk runs on one sample: a batch of
one, a sequence that one case of the batch lacks (exact GMD runs the trunk per modality on the
samples that have it), the deep levels of any patch and the shallow ones of small patches, the last
sliding window of an odd count. There the backward of the im2col path was 4-8x slower than oneDNN's
(a 32^3 patch with 8-16 channels: 117 ms against 22 ms for one convolution), and it took most of a
batch-1 GMD step at 32^3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OneDNNConv3d", "use_onednn_conv"]


class OneDNNConv3d(nn.Conv3d):
    """``nn.Conv3d`` that takes oneDNN (MKL-DNN) for the float32 CPU calls PyTorch would send to im2col.

    For a batch of one that PyTorch's heuristic sends to im2col (see the module docstring):

    - without gradients (inference, validation): ``torch.mkldnn_convolution``;
    - with gradients: the input is given twice, as ``2 * C`` channels, to a convolution of two groups,
      each group computing half of the output channels from one copy with its own rows of the same
      weight. That is the same convolution (same multiply-adds, one extra copy of the input), but
      grouped convolutions take oneDNN, forward and backward. It needs an even number of output
      channels.

    Everything else (other devices and dtypes, batches of two or more, 1x1 kernels, for which PyTorch
    picks im2col on one thread because it is faster there) takes PyTorch's own path.

    Results equal ``nn.Conv3d``'s up to float rounding (another summation order). Same parameters and
    state-dict keys as ``nn.Conv3d``; written in the TorchScript subset (the inference export scripts it).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``nn.Conv3d.forward``, through oneDNN where the class says."""
        # PyTorch's use_mkldnn: float32 CPU calls with batch 1, groups 1, a kernel not larger than 3 in both
        # last axes and N*C*D*H <= 20480 go to im2col ("for some case, native is faster": not for these).
        # 1x1 kernels stay with PyTorch, which picks im2col for them on one thread because it is faster there
        if (input.device.type == "cpu" and input.dtype == torch.float32 and input.dim() == 5 and input.shape[0] == 1
                and self.groups == 1 and input.shape[1] * input.shape[2] * input.shape[3] <= 20480
                and not (self.kernel_size[1] > 3 and self.kernel_size[2] > 3)
                and (self.kernel_size[1] != 1 or self.kernel_size[2] != 1)):
            if not torch.is_grad_enabled() or not (input.requires_grad or self.weight.requires_grad):
                return torch.mkldnn_convolution(
                    input, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups
                )
            if self.out_channels % 2 == 0:
                return F.conv3d(torch.cat([input, input], dim=1), self.weight, self.bias, self.stride,
                                self.padding, self.dilation, 2)
        return self._conv_forward(input, self.weight, self.bias)


def use_onednn_conv(module: nn.Module) -> nn.Module:
    """Switch every plain zero-padded ``nn.Conv3d`` in ``module`` to :class:`OneDNNConv3d`, in place (same
    parameters and state-dict keys); nothing changes where PyTorch has no oneDNN. Returns ``module``."""
    if torch.backends.mkldnn.is_available():
        for sub in module.modules():
            if type(sub) is nn.Conv3d and sub.padding_mode == "zeros" and not isinstance(sub.padding, str):
                sub.__class__ = OneDNNConv3d
    return module

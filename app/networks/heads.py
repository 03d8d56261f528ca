"""Light per-modality prediction heads: probes of one encoder's representation (CGGM's f_i).

A probe predicts the task from a single modality's encoder output. It is trained on that output
detached, by its own optimizer, so it measures how useful the encoder is without changing it; it
is not part of the network, is never saved with the weights and never used at inference. Its final
layer has the shape of the network's fusion head, so the two layers' gradients can be compared.

- :class:`SequenceProbe` (sentiment): self-attention layers over the encoded sequence, masked mean
  pooling, LayerNorm and a Linear layer.
- :class:`SegmentationProbe` (segmentation): a light decoder that projects every skip level to
  ``features[0]`` channels, upsamples it trilinearly to full resolution and sums, then a
  nonlinearity and a 1x1x1 convolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from app.networks.ds_transformer import _encoder, masked_pool

__all__ = ["SequenceProbe", "SegmentationProbe"]


class SequenceProbe(nn.Module):
    """Sentiment probe on ``(h [n, L, hidden], padding [n, L])`` from ``DSTransformer.encode``.

    Args:
        hidden: width of the encoded sequence.
        out_channels: outputs (1 for regression, the number of classes for classification).
        num_layers: self-attention layers (at least 1).
        num_heads: attention heads (must divide ``hidden``).
        ff_mult: feed-forward width as a multiple of ``hidden``.
        dropout: dropout inside the attention layers.

    Raises:
        ValueError: ``num_layers`` is below 1.
    """

    def __init__(
        self, hidden: int, out_channels: int, num_layers: int = 1, num_heads: int = 4, ff_mult: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"A sequence probe needs at least one attention layer, got num_layers={num_layers}.")
        self.layers = _encoder(hidden, num_layers, num_heads, ff_mult, dropout)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, out_channels)

    def forward(self, representation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``(h [n, L, hidden], padding [n, L])`` -> ``[n, out_channels]``."""
        h, padding = representation
        h = self.layers(h, src_key_padding_mask=padding)
        return self.head(self.norm(masked_pool(h, padding)))

    def final_weight(self) -> nn.Parameter:
        """Weight ``[out_channels, hidden]`` of the output layer."""
        return self.head.weight


class SegmentationProbe(nn.Module):
    """Segmentation probe on the skip features ``[s_0, ..., s_L]`` from ``DSUNet.encode``.

    Args:
        features: channel widths of the skip levels (``s_0`` at full resolution).
        out_channels: output region channels.
    """

    def __init__(self, features: Sequence[int], out_channels: int) -> None:
        super().__init__()
        width = int(features[0])
        self.proj = nn.ModuleList(nn.Conv3d(int(f), width, kernel_size=1) for f in features)
        self.act = nn.LeakyReLU(0.01)
        self.head = nn.Conv3d(width, out_channels, kernel_size=1)

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Skip features of every level -> logits ``[n, out_channels, *skips[0].shape[2:]]``."""
        size = skips[0].shape[2:]
        x = None
        for proj, skip in zip(self.proj, skips):
            # projecting before upsampling keeps the full-resolution work at features[0] channels
            y = proj(skip)
            if y.shape[2:] != size:
                y = nn.functional.interpolate(y, size=size, mode="trilinear", align_corners=False)
            x = y if x is None else x + y
        return self.head(self.act(x))

    def final_weight(self) -> nn.Parameter:
        """Weight ``[out_channels, features[0], 1, 1, 1]`` of the final 1x1x1 convolution."""
        return self.head.weight

"""Dynamic Sharing 3D U-Net: per-modality encoders, one shared decoder trunk, mean fusion.

Each available modality is encoded by its own 3D U-Net encoder and decoded by the *shared* decoder
trunk with that modality's own skip features. The trunk ends in a linear 1x1x1 head, so fusing the
per-modality logits by a mean is the same as fusing the trunk features and then applying the
head. That makes every subset prediction a cheap masked mean over one set of per-modality outputs.
Absent modalities are skipped: their encoders never run and their inputs are never read.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetOutBlock, UnetUpBlock
from torch import nn

from app.networks.conv import use_onednn_conv
from app.networks.norm import use_reduction_instance_norm
from app.networks.weights import allow_missing_optional_keys
from app.subsets import BRATS_MODALITIES, check_fusable

__all__ = [
    "ModalityEncoder", "SharedDecoder", "DSUNet", "masked_mean", "check_fusable", "modality_index", "recorded_spacing",
]


def recorded_spacing(network: nn.Module) -> list[float] | None:
    """The training spacing (mm, RAS axes) a network recorded, or None when it did not (older
    checkpoints, other networks). Works for a :class:`DSUNet`, its DDP wrapper and its TorchScript export."""
    value = getattr(getattr(network, "module", network), "training_spacing", None)
    # the buffer is float32: 0.8594 mm would read back as 0.8593999743461609
    spacing = [] if value is None else [round(float(s), 4) for s in value]
    return spacing if len(spacing) == 3 and min(spacing) > 0 else None


def masked_mean(per_modality: torch.Tensor, mask: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Mean over the modality axis (dim 1) of ``per_modality`` restricted to ``mask``.

    Args:
        per_modality: ``[B, M, ...]`` per-modality outputs.
        mask: ``[B, M]`` bool; every row must have at least one ``True``.
        check: raise on a row without modality. The check reads the mask, a device sync on a GPU:
            callers that already know every row is non-empty (GMD's per-subset losses) pass False.

    Raises:
        ValueError: when a sample has no modality to fuse (with ``check``).
    """
    if check:
        check_fusable(mask)
    count = mask.sum(dim=1)
    weights = mask.to(per_modality.dtype) / count.to(per_modality.dtype).unsqueeze(1)
    weights = weights.reshape(*weights.shape, *([1] * (per_modality.ndim - 2)))
    return (per_modality * weights).sum(dim=1)


def modality_index(encoded: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, modality_ids)`` of the entries of an ``encode()`` list ``[(m, rows, ...), ...]``, in
    order: where the trunk's outputs on the stacked encodings go in a ``[B, M, ...]`` tensor."""
    return (torch.cat([idx for _, idx, *_ in encoded]),
            torch.cat([torch.full_like(idx, m) for m, idx, *_ in encoded]))


class ModalityEncoder(nn.Module):
    """3D U-Net encoder for one modality; returns the skip features of every level."""

    def __init__(self, in_channels: int, features: Sequence[int], norm_name: str | tuple = "instance") -> None:
        super().__init__()
        blocks = []
        prev = in_channels
        for level, width in enumerate(features):
            stride = 1 if level == 0 else 2
            blocks.append(UnetBasicBlock(3, prev, width, kernel_size=3, stride=stride, norm_name=norm_name))
            prev = width
        self.levels = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The features of every level of ``x [B, in_channels, D, H, W]``, shallowest first."""
        skips = []
        for block in self.levels:
            x = block(x)
            skips.append(x)
        return skips


class SharedDecoder(nn.Module):
    """The shared trunk: U-Net decoder from the deepest features up, plus a linear 1x1x1 head."""

    def __init__(self, features: Sequence[int], out_channels: int, norm_name: str | tuple = "instance") -> None:
        super().__init__()
        ups = []
        for level in range(len(features) - 1, 0, -1):
            ups.append(
                UnetUpBlock(
                    3,
                    features[level],
                    features[level - 1],
                    kernel_size=3,
                    stride=2,
                    upsample_kernel_size=2,
                    norm_name=norm_name,
                )
            )
        self.ups = nn.ModuleList(ups)
        self.head = UnetOutBlock(3, features[0], out_channels)

    def forward(self, skips: Sequence[torch.Tensor], release: bool = False) -> torch.Tensor:
        """Logits decoded from one encoder's skip features, shallowest first (:class:`ModalityEncoder`'s output).

        Args:
            skips: the features of every level, shallowest first.
            release: empty ``skips`` (a list the caller gives away) as the levels are decoded, so that
                without gradients each level's features are freed once its up block has concatenated them.
                The full-resolution skip is as large as the up block's output, and holding it through that
                block's convolutions raised the peak memory of an evaluation window by that much. Otherwise
                ``skips`` is left as it is. The logits are the same either way.
        """
        levels = skips if release else list(skips)
        x = levels.pop()
        for up in self.ups:
            # UnetUpBlock.forward, whose ``skip`` argument would keep the features alive through its convolutions;
            # two statements, so that the level below (still named x during a one-line call) is freed before them
            x = torch.cat((up.transp_conv(x), levels.pop()), dim=1)
            x = up.conv_block(x)
        return self.head(x)


class DSUNet(nn.Module):
    """Dynamic Sharing network for multi-sequence 3D segmentation with missing sequences.

    Args:
        modalities: names of the input sequences, in channel order of the image tensor.
        out_channels: number of output region channels (WT, TC, ET).
        features: channel widths per level; the number of levels is ``len(features)`` and the
            input size must be divisible by ``2 ** (len(features) - 1)``.
        norm_name: normalisation for the MONAI blocks; instance norms are computed from reductions
            (:class:`app.networks.norm.InstanceNorm3d`, same results, faster on GPUs), and 3D convolutions
            keep batch-1 CPU calls on oneDNN (:class:`app.networks.conv.OneDNNConv3d`, same results up to
            float rounding, 4-8x faster than PyTorch's im2col path there).

    ``task`` is ``"segmentation"``: per-channel sigmoid logits scored by hard Dice.

    ``forward(image, modality_mask)`` takes ``image [B, M, D, H, W]`` (one channel per modality,
    ``D, H, W`` multiples of :attr:`divisor`, at least one of them larger than it) and ``modality_mask [B, M]`` (bool; None: every
    modality) and returns the fused logits ``[B, out_channels, D, H, W]``. Inputs of another shape
    raise a ``ValueError`` naming the fix.

    The buffer ``training_spacing`` (mm, RAS axes; zeros when unknown) is the voxel size of the
    training data, set by training (:meth:`set_training_spacing`) and saved with the weights, so
    that inference can bring a scan of another resolution to the one the network learnt.

    Raises:
        ValueError: ``features`` is not two or more positive widths.
    """

    task = "segmentation"
    #: state-dict keys a checkpoint may lack (written before they existed); they keep their default
    optional_state_keys: tuple[str, ...] = ("training_spacing",)

    def __init__(
        self,
        modalities: Sequence[str] = BRATS_MODALITIES,
        out_channels: int = 3,
        features: Sequence[int] = (16, 32, 64, 128, 256),
        norm_name: str | tuple = "instance",
    ) -> None:
        super().__init__()
        try:  # a single number (--features 16) or a string is no list of widths: name the fix, not a TypeError
            widths = None if isinstance(features, (str, bytes)) else [int(f) for f in features]
        except (TypeError, ValueError):
            widths = None
        if widths is None or len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"--features {features!r} must list two or more positive widths, one per level: use e.g. "
                             "--features \"[16, 32, 64, 128, 256]\" (the default) or \"[8, 16, 32, 64]\".")
        self.modalities = tuple(modalities)
        self.features = tuple(widths)
        self.out_channels = out_channels
        self.encoders = nn.ModuleList(ModalityEncoder(1, self.features, norm_name) for _ in self.modalities)
        self.trunk = SharedDecoder(self.features, out_channels, norm_name)
        self.register_buffer("training_spacing", torch.zeros(3))
        self.register_load_state_dict_post_hook(allow_missing_optional_keys)
        use_reduction_instance_norm(self)  # same maths, much faster on GPUs (app.networks.norm)
        use_onednn_conv(self)  # same maths, batch-1 CPU convolutions 4-8x faster (app.networks.conv)
        # instance normalisation cannot normalise a single voxel: the deepest level needs two or more
        self.single_voxel_refused = any(isinstance(m, nn.InstanceNorm3d) for m in self.modules())

    def set_training_spacing(self, spacing: Sequence[float] | None) -> None:
        """Record the training data's voxel size (mm, RAS axes); None or zeros: unknown.

        Raises:
            ValueError: ``spacing`` is not 3 non-negative values.
        """
        values = torch.zeros(3) if spacing is None else torch.as_tensor([float(s) for s in spacing])
        if values.shape != (3,) or bool((values < 0).any()) or not bool(torch.isfinite(values).all()):
            raise ValueError(f"training spacing needs 3 non-negative values (mm), got {spacing}.")
        self.training_spacing.copy_(values.to(self.training_spacing))

    @property
    def num_modalities(self) -> int:
        """Number of modalities, ``M``."""
        return len(self.modalities)

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this."""
        return 2 ** (len(self.features) - 1)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters shared by all modalities (decoder trunk and head)."""
        return self.trunk.parameters()

    def modality_parameters(self) -> Iterator[nn.Parameter]:
        """Modality-specific parameters (the encoders)."""
        return self.encoders.parameters()

    def _full_mask(self, image: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if image.ndim != 5 or image.shape[1] != self.num_modalities:
            raise ValueError(
                f"Expected image [B, {self.num_modalities}, D, H, W] for modalities {list(self.modalities)}, "
                f"got {tuple(image.shape)}."
            )
        if any(int(size) % self.divisor for size in image.shape[2:]):
            # the decoder would fail deep inside on a skip of another size; say what to change instead
            raise ValueError(
                f"Spatial size {tuple(image.shape[2:])} is not a multiple of {self.divisor} (2 ** (len(features) - 1) "
                f"for features {list(self.features)}): pad or crop the image to multiples of {self.divisor}, or run "
                f"it through a sliding window whose roi_size is."
            )
        if self.single_voxel_refused and max(int(size) for size in image.shape[2:]) <= self.divisor:
            # the deepest level would hold a single voxel, which instance normalisation refuses deep inside
            raise ValueError(
                f"Spatial size {tuple(image.shape[2:])} leaves a single voxel at the deepest level (features "
                f"{list(self.features)}): give at least {2 * self.divisor} along one axis (pad the image, or use a "
                f"larger patch or roi_size)."
            )
        if mask is None:
            return torch.ones(image.shape[0], self.num_modalities, dtype=torch.bool, device=image.device)
        if tuple(mask.shape) != (image.shape[0], self.num_modalities):
            # a mask of other rows (e.g. one per case while windows are batched) would leave samples unencoded
            raise ValueError(f"modality_mask must be [B, {self.num_modalities}] for image {tuple(image.shape)}, "
                             f"got {tuple(mask.shape)}: give one row per image in the batch.")
        return mask.to(device=image.device, dtype=torch.bool)

    def encode(
        self, image: torch.Tensor, modality_mask: torch.Tensor | None = None
    ) -> list[tuple[int, torch.Tensor, list[torch.Tensor]]]:
        """Run each modality's encoder on the samples that have it.

        Returns, per present modality, ``(m, rows, skips)``: the modality index, the batch rows that
        have it and the encoder's skip features of every level (``skips[0]`` at full resolution).
        """
        mask = self._full_mask(image, modality_mask)
        encoded = []
        for m, encoder in enumerate(self.encoders):
            idx = torch.nonzero(mask[:, m], as_tuple=False).flatten()
            if idx.numel() == 0:
                continue
            encoded.append((m, idx, encoder(image[idx, m : m + 1])))
        return encoded

    def decode(
        self, encoded: list[tuple[int, torch.Tensor, list[torch.Tensor]]], batch_size: int,
        inputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-modality logits ``[B, M, C, D, H, W]`` from :meth:`encode`; absent entries are zero.

        The shared trunk runs once on all (sample, modality) pairs stacked along the batch axis,
        which is exact because instance normalisation is per sample.

        Args:
            encoded: output of :meth:`encode`.
            batch_size: ``B``.
            inputs: the image given to :meth:`encode`; the output takes its dtype, device and size
                (needed when ``encoded`` is empty). Without it they come from the skip features.

        Raises:
            ValueError: ``encoded`` is empty and ``inputs`` is not given.
        """
        if inputs is not None:
            dtype, device, spatial = inputs.dtype, inputs.device, inputs.shape[2:]
        elif encoded:
            first = encoded[0][2][0]
            dtype, device, spatial = torch.promote_types(first.dtype, torch.float32), first.device, first.shape[2:]
        else:
            raise ValueError("Nothing to decode and no inputs to size the output: pass inputs=image.")
        out = torch.zeros(batch_size, self.num_modalities, self.out_channels, *spatial, dtype=dtype, device=device)
        if not encoded:
            return out
        index = modality_index(encoded)
        stacked = [torch.cat(level, dim=0) for level in zip(*(skips for _, _, skips in encoded))]
        # the stacked copies are all the trunk needs: without gradients, the encoders' own features (as large
        # as the copies) are freed here unless the caller keeps ``encoded`` (per_modality() does not), and each
        # stacked level once the trunk has used it
        del encoded
        decoded = self.trunk(stacked, release=True)
        return out.index_put(index, decoded.to(out.dtype))

    def per_modality(self, image: torch.Tensor, modality_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-modality logits ``[B, M, C, D, H, W]``; entries of absent modalities are zero.

        The encoders run only on the samples that have their modality (:meth:`encode`); the shared
        trunk then runs once on all (sample, modality) pairs (:meth:`decode`).
        """
        return self.decode(self.encode(image, modality_mask), image.shape[0], inputs=image)

    def per_modality_parts(
        self, image: torch.Tensor, modality_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor, torch.Tensor]]]:
        """Like :meth:`per_modality`, but the trunk runs separately for each modality.

        Returns the ``[B, M, C, ...]`` outputs and, per present modality, ``(m, rows, decoded)``
        with ``decoded = per_modality[rows, m]`` holding its own autograd graph. Exact GMD uses the
        parts to take each subset's vector-Jacobian product through the trunks of that subset's
        modalities only, instead of through the whole batched trunk.
        """
        out = image.new_zeros(image.shape[0], self.num_modalities, self.out_channels, *image.shape[2:])
        parts = []
        for m, idx, skips in self.encode(image, modality_mask):
            decoded = self.trunk(skips).to(out.dtype)
            out = out.index_put((idx, torch.full_like(idx, m)), decoded)
            parts.append((m, idx, decoded))
        return out, parts

    def fusion_head_weight(self) -> nn.Parameter:
        """Weight ``[C, features[0], 1, 1, 1]`` of the shared head's 1x1x1 convolution (the fusion head)."""
        return self.trunk.head.conv.conv.weight

    def make_modality_heads(self) -> nn.ModuleList:
        """One light segmentation decoder per modality (probes of the encoders, not part of the network).

        Each head's final 1x1x1 convolution has the shape of :meth:`fusion_head_weight`.
        """
        from app.networks.heads import SegmentationProbe  # heads build on both networks' modules

        return nn.ModuleList(SegmentationProbe(self.features, self.out_channels) for _ in self.modalities)

    def fuse(self, per_modality: torch.Tensor, modality_mask: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Mean of the per-modality logits over the modalities in ``modality_mask`` (``check``: see
        :func:`masked_mean`)."""
        return masked_mean(per_modality, modality_mask.to(per_modality.device, torch.bool), check)

    def forward(self, image: torch.Tensor, modality_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Fused logits ``[B, C, D, H, W]`` of ``image [B, M, D, H, W]`` over ``modality_mask [B, M]`` (None: all).

        Raises:
            ValueError: an image of another shape, spatial sizes not multiples of :attr:`divisor`, a mask
                that is not one row per image, or a sample without any modality.
        """
        mask = self._full_mask(image, modality_mask)
        return self.fuse(self.per_modality(image, mask), mask)

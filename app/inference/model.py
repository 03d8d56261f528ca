"""The network for inference: settings, checkpoint loading (state dict or TorchScript) and export.

:class:`FusedDSUNet` is the inference form of :class:`app.networks.DSUNet`. It holds copies of the
DS U-Net's modules under the same state-dict keys, runs one modality at a time and accumulates the
fused mean, so peak memory does not grow with the number of sequences, and it is written in the
TorchScript subset so that it can be scripted. Scripting (not tracing) matters: the modality mask decides at
run time which encoders run, and a trace would freeze the mask used while tracing.

Network settings are resolved in this order: explicit arguments (``--features``), then the
checkpoint itself (the widths are read from the state-dict shapes, or from the attributes of an
exported TorchScript model), then the bundle's ``configs/train.yaml`` defaults.
"""

from __future__ import annotations

import copy
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

import torch
import yaml
from torch import nn

from app.atomic import atomic_write
from app.engines.utils import load_weights
from app.networks import DSUNet
from app.networks.conv import OneDNNConv3d, use_onednn_conv
from app.networks.ds_unet import recorded_spacing
from app.networks.weights import allow_missing_optional_keys, check_archive, check_finite, checkpoint_missing
from app.subsets import BRATS_MODALITIES

__all__ = [
    "DEFAULT_BUNDLE",
    "DEFAULT_SETTINGS",
    "FusedDSUNet",
    "OneDNNConv3d",
    "TORCHSCRIPT_SUFFIX",
    "bundle_defaults",
    "bundle_version",
    "checkpoint_features",
    "export_torchscript",
    "is_torchscript",
    "is_weights_file",
    "load_network",
    "network_from_checkpoint",
]

#: The bundle of this repository; used when no bundle is named.
DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "brats_gmd"

#: Used when neither the arguments, the checkpoint nor the bundle say otherwise (train.yaml values).
DEFAULT_SETTINGS: dict[str, Any] = {
    "features": [16, 32, 64, 128, 256],
    "patch_size": [96, 96, 96],
    "sw_overlap": 0.5,
    "sw_batch_size": 2,
}


class _Trunk(nn.Module):
    """The DS U-Net's shared trunk with a scriptable forward (same submodules, same state-dict keys)."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.ups = trunk.ups
        self.head = trunk.head

    def forward(self, skips: List[torch.Tensor]) -> torch.Tensor:
        """Logits decoded from one encoder's features, shallowest first; empties ``skips`` as it goes.

        :class:`FusedDSUNet` gives the encoder's list away, so that, run as it is (inference from a ``model.pt``), each
        level's features are freed once its up block has concatenated them (as
        :meth:`~app.networks.ds_unet.SharedDecoder.forward` does with ``release=True``), and the level below once it
        is upsampled. Held through the block's convolutions, the full-resolution skip and the level below raised the
        tensors' peak for a 128x176x144 window of the default network from 1,064 to 1,378 MiB. An exported model had
        the lower peak already (TorchScript's executor frees them after their last use), earlier exports included.
        The logits are the same.
        """
        x = skips.pop()
        for up in self.ups:
            # UnetUpBlock.forward, whose ``skip`` argument would keep the features alive through its convolutions;
            # two statements, so that the level below is freed before the convolutions too
            x = torch.cat((up.transp_conv(x), skips.pop()), dim=1)
            x = up.conv_block(x)
        return self.head(x)


class FusedDSUNet(nn.Module):
    """Scriptable inference form of :class:`~app.networks.DSUNet` with the same weights.

    ``forward(image [B, M, D, H, W], modality_mask [B, M])`` (``D, H, W`` multiples of
    :attr:`divisor`, at least one of them larger than it, one mask row per image, else a ``ValueError``; no mask: every modality present,
    as :meth:`DSUNet.forward` and the bundle metadata's ``network_data_format`` take it, so that
    ``monai.bundle verify_net_in_out``, which passes the image alone, runs on it) returns the fused logits
    ``[B, C, D, H, W]``: for every modality present in any sample, its encoder runs on the samples
    that have it and the shared trunk decodes them; the logits are summed and divided by the
    number of present modalities, which equals :meth:`DSUNet.forward` (instance normalisation is
    per sample, and the head is linear) up to float rounding.

    Args:
        net: the DS U-Net to serve; its modules are copied (with convolutions switched to
            :class:`OneDNNConv3d`), so ``net`` itself is left as it is.
    """

    optional_state_keys = DSUNet.optional_state_keys

    def __init__(self, net: DSUNet) -> None:
        super().__init__()
        net = use_onednn_conv(copy.deepcopy(net))
        self.encoders = net.encoders
        self.trunk = _Trunk(net.trunk)
        # plain attributes survive scripting and describe the model to the loader
        self.modalities: List[str] = list(net.modalities)
        self.features: List[int] = [int(f) for f in net.features]
        self.out_channels: int = int(net.out_channels)
        self.divisor: int = int(net.divisor)
        self.single_voxel_refused: bool = bool(net.single_voxel_refused)
        # a buffer, as in DSUNet, so the same state dict loads into both
        self.register_buffer("training_spacing", net.training_spacing.detach().clone())
        self.register_load_state_dict_post_hook(allow_missing_optional_keys)

    def forward(self, image: torch.Tensor, modality_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fused logits ``[B, C, D, H, W]`` (see the class); without a mask every sequence is present.

        Raises:
            ValueError: an image that is not ``[B, M, D, H, W]`` with sizes multiples of :attr:`divisor` (and
                more than one voxel at the deepest level), a mask that is not ``[B, M]``, or a sample without any
                modality.
        """
        if image.dim() != 5 or image.shape[1] != len(self.modalities):
            raise ValueError("FusedDSUNet expects image [B, M, D, H, W] with one channel per modality.")
        for size in image.shape[2:]:
            if size % self.divisor != 0:
                # the trunk would fail deep inside on a skip of another size; say what to change instead
                raise ValueError(f"FusedDSUNet expects spatial sizes that are multiples of {self.divisor}, got "
                                 f"{list(image.shape[2:])}: pad or crop the image, or run it through a sliding "
                                 "window whose roi_size is.")
        largest = 0
        for size in image.shape[2:]:
            largest = max(largest, int(size))
        if self.single_voxel_refused and largest <= self.divisor:
            # the deepest level would hold a single voxel, which instance normalisation refuses deep inside
            raise ValueError(f"FusedDSUNet needs more than {self.divisor} voxels along at least one axis, got "
                             f"{list(image.shape[2:])}: the deepest level would hold a single voxel. Pad the image to "
                             f"{2 * self.divisor} along one axis, or use a larger roi_size.")
        if modality_mask is None:
            modality_mask = torch.ones([image.shape[0], len(self.modalities)], dtype=torch.bool, device=image.device)
        if modality_mask.dim() != 2 or modality_mask.shape[0] != image.shape[0] \
                or modality_mask.shape[1] != len(self.modalities):
            # a mask of other rows would leave the other images unencoded: logits 0, no tumour, without a word
            raise ValueError("FusedDSUNet expects modality_mask [B, M] with one row per image in the batch.")
        mask = modality_mask.to(device=image.device, dtype=torch.bool)
        count = mask.sum(dim=1)
        if bool((count == 0).any()):
            raise ValueError("Every sample needs at least one modality in modality_mask.")
        out = torch.zeros(
            [image.shape[0], self.out_channels, image.shape[2], image.shape[3], image.shape[4]],
            dtype=torch.float32,
            device=image.device,
        )
        m = 0
        for encoder in self.encoders:
            idx = torch.nonzero(mask[:, m]).flatten()
            if idx.numel() > 0:
                logits = self.trunk(encoder(image[idx, m : m + 1]))
                out.index_add_(0, idx, logits.to(torch.float32))
            m += 1
        return out / count.to(out.dtype).reshape(-1, 1, 1, 1, 1)


def bundle_defaults(bundle: str | os.PathLike | None) -> dict[str, Any]:
    """Network and sliding-window defaults from ``<bundle>/configs/train.yaml``.

    Only literal values are read (the YAML is parsed, never executed); ids that are missing or hold
    an expression fall back to :data:`DEFAULT_SETTINGS`. ``bundle=None`` uses :data:`DEFAULT_BUNDLE`
    when it exists, else :data:`DEFAULT_SETTINGS`.

    Raises:
        FileNotFoundError: ``bundle`` is given but has no ``configs/train.yaml``.
        ValueError: the file is not valid YAML.
    """
    out = {k: (list(v) if isinstance(v, list) else v) for k, v in DEFAULT_SETTINGS.items()}
    if bundle is None:
        if not (DEFAULT_BUNDLE / "configs" / "train.yaml").is_file():
            return out
        bundle = DEFAULT_BUNDLE
    path = Path(bundle) / "configs" / "train.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass --bundle the bundle folder (e.g. bundles/brats_gmd).")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"Cannot parse {path} ({type(err).__name__}): fix the YAML.") from err
    for key in DEFAULT_SETTINGS:
        value = config.get(key)
        if isinstance(value, list) and all(isinstance(v, int) for v in value):
            out[key] = list(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return out


def bundle_version(bundle: str | os.PathLike | None) -> str | None:
    """The release of the bundle (``version`` in ``<bundle>/configs/metadata.json``), recorded in every
    inference summary beside the checkpoint's SHA-256; ``bundle=None`` reads :data:`DEFAULT_BUNDLE`. None
    when the bundle has no readable metadata (a package installed without its bundles)."""
    path = Path(DEFAULT_BUNDLE if bundle is None else bundle) / "configs" / "metadata.json"
    try:
        version = json.loads(path.read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError, AttributeError):
        return None
    return str(version) if version is not None else None


def _archive_records(path: str | os.PathLike) -> set[str]:
    """Names of the records (``data.pkl``, ``constants.pkl``, ...) of a torch zip archive, whatever
    folder it stores them under; empty for another file or no file."""
    try:
        with zipfile.ZipFile(path) as archive:
            return {name.rsplit("/", 1)[-1] for name in archive.namelist()}
    except (zipfile.BadZipFile, OSError):
        return set()


#: The ending of a file that inference may run as TorchScript (:func:`load_network`), and that export writes.
TORCHSCRIPT_SUFFIX = ".ts"


def is_torchscript(path: str | os.PathLike) -> bool:
    """True when ``path`` is a TorchScript archive (``torch.jit.save``), False for ``torch.save`` files."""
    return "constants.pkl" in _archive_records(path)


def is_weights_file(path: str | os.PathLike) -> bool:
    """True for a ``torch.save`` archive (a training checkpoint such as ``model.pt``), False for a
    TorchScript model, another file or no file."""
    records = _archive_records(path)
    return "data.pkl" in records and "constants.pkl" not in records


def checkpoint_features(path: str | os.PathLike) -> list[int] | None:
    """Per-level widths of the DS U-Net saved in a state-dict checkpoint, or None if they cannot be read."""
    try:
        try:
            state = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files of the legacy (non-zip) format cannot be memory-mapped
            state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - load_weights reports unreadable files with the full message
        return None
    if not isinstance(state, dict):
        return None
    for key in ("model", "network", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    widths = []
    while f"encoders.0.levels.{len(widths)}.conv1.conv.weight" in state:
        widths.append(int(state[f"encoders.0.levels.{len(widths)}.conv1.conv.weight"].shape[0]))
    return widths or None


def load_network(
    ckpt: str | os.PathLike,
    features: Sequence[int] | None = None,
    bundle: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint for inference.

    Args:
        ckpt: a state dict written by training (``model.pt``) or a TorchScript model written by
            :func:`export_torchscript` / ``monai.bundle ckpt_export``.
        features: network widths; None to read them from the checkpoint (or the bundle).
        bundle: bundle folder for defaults when the checkpoint does not tell.
        device: where the network runs.

    Returns:
        ``(network, settings)``: a module with ``forward(image, modality_mask)`` in eval mode on
        ``device`` and ``{"modalities", "features", "divisor", "format", "training_spacing"}``
        (``training_spacing``: mm, RAS axes, or None when the model did not record it).

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: it cannot be read, or does not match ``features``.
    """
    path = os.fspath(ckpt)
    if not path.strip():  # an unset variable (BRATS_CKPT=, --ckpt "$MODEL"): there is no file to name
        from app.inference.io import option

        flag = option("ckpt")  # the batch bundle's --ckpt_path, which the batch command's BRATS_CKPT does not set
        where = flag if flag.endswith("_path") else f"{flag}, BRATS_CKPT"
        raise ValueError("The checkpoint path is empty (an unset variable?): give the model.pt written by training "
                         f"(<output_dir>/models/model.pt) or a model.ts exported from it ({where}).")
    if not os.path.isfile(path):
        raise checkpoint_missing(path, "give the model.pt written by training (<output_dir>/models/model.pt) or a "
                                 "model.ts exported from it.")
    if is_torchscript(path):
        # a TorchScript archive is a program that runs when loaded, unlike a state dict (torch.load with
        # weights_only=True): it is run only from a file named as one, so a model.pt from elsewhere stays data
        if not path.lower().endswith(TORCHSCRIPT_SUFFIX):
            raise ValueError(f"{path} is a TorchScript model, which is a program that runs when it is loaded, not a "
                             f"weights file: only a file ending in {TORCHSCRIPT_SUFFIX} is run as TorchScript. If you "
                             f"exported it yourself or trust its source, rename it to end in {TORCHSCRIPT_SUFFIX}; "
                             "otherwise ask for the model.pt written by training.")
        check_archive(path)
        try:
            network = torch.jit.load(path, map_location=device)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"Cannot load TorchScript model {path} ({type(err).__name__}): re-export it with "
                             "python -m app.inference.export.") from err
        try:
            ts_features = [int(f) for f in network.features]
            modalities = [str(m) for m in network.modalities]
        except AttributeError as err:
            raise ValueError(f"{path} is a TorchScript model but not an exported DS U-Net (no 'features'/'modalities' "
                             "attributes): export it with python -m app.inference.export.") from err
        if features is not None and [int(f) for f in features] != ts_features:
            raise ValueError(f"{path} was exported with features {ts_features}, not {list(features)}: drop --features "
                             "or pass the matching value.")
        if tuple(modalities) != BRATS_MODALITIES:
            raise ValueError(f"{path} serves modalities {modalities}, not {list(BRATS_MODALITIES)}.")
        check_finite(network.state_dict().items(), path)
        network.eval()
        return network, {"modalities": modalities, "features": ts_features, "divisor": 2 ** (len(ts_features) - 1),
                         "format": "torchscript", "training_spacing": recorded_spacing(network)}
    network = network_from_checkpoint(path, features, bundle).to(device)
    return network, {"modalities": list(network.modalities), "features": list(network.features),
                     "divisor": network.divisor, "format": "state_dict",
                     "training_spacing": recorded_spacing(network)}


def network_from_checkpoint(
    ckpt: str | os.PathLike, features: Sequence[int] | None = None, bundle: str | os.PathLike | None = None
) -> FusedDSUNet:
    """A :class:`FusedDSUNet` with the widths of the state-dict checkpoint ``ckpt`` and its weights loaded.

    Used by the bundle's ``export_network`` id, so that ``monai.bundle ckpt_export`` needs no ``--features``.
    """
    if features is None:
        features = checkpoint_features(ckpt) or bundle_defaults(bundle)["features"]
    net = DSUNet(modalities=BRATS_MODALITIES, out_channels=3, features=[int(f) for f in features])
    load_weights(net, ckpt, map_location="cpu")
    return FusedDSUNet(net).eval()


def export_torchscript(
    network: DSUNet | FusedDSUNet, path: str | os.PathLike, check: Callable[[Path], None] | None = None
) -> str:
    """Script ``network`` (as :class:`FusedDSUNet`) and save it atomically to ``path``.

    The saved model takes ``(image [B, 4, D, H, W] float, modality_mask [B, 4] bool)`` (without the mask:
    every sequence present) and returns the fused logits; spatial sizes must be multiples of
    ``2 ** (len(features) - 1)``.

    Args:
        network: the trained network; left as it is (a copy is moved to the CPU and scripted, so a
            network served on a GPU stays there, in the mode it was in).
        path: the TorchScript file; an existing one is replaced only by a complete, checked model.
        check: called with the temporary file before it replaces ``path`` (see
            :func:`app.atomic.atomic_write`); if it raises, ``path`` is left as it was.

    Returns:
        The path written.
    """
    # FusedDSUNet(network) copies the modules; a FusedDSUNet given is copied here, as .cpu() and .eval() act in place
    fused = copy.deepcopy(network) if isinstance(network, FusedDSUNet) else FusedDSUNet(network)
    scripted = torch.jit.script(fused.cpu().eval())
    return str(atomic_write(Path(path).absolute(), lambda f: torch.jit.save(scripted, f), check=check))

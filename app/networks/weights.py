"""Reading checkpoints into networks: safe loading (``weights_only``) with errors that name the fix."""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from typing import Any, Sequence

import torch

from app.atomic import missing_hint
from app.data.errors import special_file_kind, unreadable

#: what a mismatch error tells the user to do, unless the caller knows better
RETRAINED_FIX = ("pass the training run's network settings when loading it (BraTS: --features; sentiment: --hidden, "
                 "--encoder_layers, --trunk_layers, --task, --out_channels, --fusion, and data with the same feature "
                 "sizes)")

__all__ = [
    "allow_missing_optional_keys", "apply_state_dict", "check_archive", "check_finite", "checkpoint_missing",
    "checkpoint_sha256",
    "describe_state_dict",
    "load_weights", "loaded_sha256", "optional_state_keys", "read_state_dict",
]

#: SHA-256 of the bytes :func:`read_state_dict` last loaded, by absolute path.
_LOADED_SHA256: dict[str, str] = {}


def loaded_sha256(path: str | os.PathLike) -> str | None:
    """SHA-256 of the checkpoint this process last loaded from ``path`` (None: none loaded from it).

    A report names the model it scored by this, not by hashing ``path`` when it is written: a running
    training replaces ``models/model.pt`` at each better validation, so an evaluation of that file used to
    name the model found there once scoring ended, not the one it had loaded and scored.
    """
    return _LOADED_SHA256.get(os.path.abspath(os.fspath(path)))


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint file: which model made a label map or a report, whatever the file is called later."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _layer_count(state: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def _kind(state: dict[str, torch.Tensor]) -> tuple[str, str] | None:
    """``(what the model does, the bundle that trains it)`` of a state dict, when recognisable."""
    if "encoders.0.levels.0.conv1.conv.weight" in state:
        return "brain-tumour segmentation (DS U-Net)", "brats_gmd"
    if "encoders.0.proj.weight" in state:
        return "sentiment (DS transformer)", "mosi_gmd"
    return None


def _head_settings(rows: int) -> str:
    """The sentiment settings a DS transformer head of ``rows`` outputs can come from.

    Confidence fusion adds one confidence logit to the ``out_channels`` outputs, so the row count
    alone is ambiguous: naming the settings spares a regression user a hint towards ``--out_channels 2``.
    """
    mean = "regression with --fusion mean" if rows == 1 else f"--out_channels {rows} with --fusion mean"
    if rows < 2:
        return mean
    confidence = ("regression with --fusion confidence" if rows == 2
                  else f"--out_channels {rows - 1} with --fusion confidence")
    return f"{confidence}, or {mean}"


def describe_state_dict(state: dict[str, torch.Tensor]) -> str:
    """Short description of a DS U-Net state dict (modalities and per-level widths) or of a DS
    transformer's (input feature sizes, width, layers, outputs)."""
    if "encoders.0.proj.weight" in state:
        n_mod = _layer_count(state, "encoders.")
        sizes = [int(state[f"encoders.{i}.proj.weight"].shape[1]) for i in range(n_mod)
                 if f"encoders.{i}.proj.weight" in state]
        head = state.get("trunk.head.weight")
        return (f"{n_mod} modality encoders, feature sizes {sizes}, hidden {int(state['encoders.0.proj.weight'].shape[0])}, "
                f"{_layer_count(state, 'encoders.0.layers.layers.')} encoder and "
                f"{_layer_count(state, 'trunk.layers.layers.')} trunk layer(s)"
                + ("" if head is None else f", head of {int(head.shape[0])} output(s): {_head_settings(int(head.shape[0]))}"))
    widths = []
    level = 0
    while f"encoders.0.levels.{level}.conv1.conv.weight" in state:
        widths.append(int(state[f"encoders.0.levels.{level}.conv1.conv.weight"].shape[0]))
        level += 1
    n_mod = _layer_count(state, "encoders.")
    if not widths:
        return f"{len(state)} tensors"
    return f"{n_mod} modality encoders, features {widths}"


def checkpoint_missing(path: str | os.PathLike, fix: str) -> FileNotFoundError:
    """The error for a checkpoint path that is no file, saying what is there instead.

    A folder (``--ckpt O/models``) or a named pipe, device or socket under the checkpoint's name was
    reported as "not found" although ``ls`` lists it; only a path where nothing is gets that wording.

    Args:
        path: the checkpoint path given.
        fix: what to pass instead (the setting and the file), ending the message.
    """
    text = os.fspath(path)
    if os.path.isdir(text):
        return FileNotFoundError(f"Checkpoint {text} is a folder, not a model file: {fix}")
    kind = special_file_kind(text)
    if kind is not None:
        return FileNotFoundError(f"Checkpoint {text} is a {kind}, not a model file (it is not read: reading it would "
                                 f"wait or run forever): {fix}")
    return FileNotFoundError(f"Checkpoint {text} not found{missing_hint(text)}: {fix}")


def read_state_dict(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, torch.Tensor]:
    """A checkpoint's state dict, read safely (``weights_only=True``): a plain state dict or one held
    under ``model``/``network``/``state_dict``.

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: it cannot be read, is a TorchScript model, or holds no state dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise checkpoint_missing(path, "pass --ckpt_path to a model.pt written by training.")
    check_archive(path)
    if _is_torchscript_archive(path):
        # torch.load(weights_only=True) refuses it with a RuntimeError, which read as a corrupt file to re-export
        raise ValueError(f"{path} is a TorchScript model (an export for python -m app infer), not a training "
                         "checkpoint: pass the model.pt written by training (<output_dir>/models/model.pt) instead.")
    try:
        with open(path, "rb") as f:  # read once: the bytes loaded are the bytes hashed (loaded_sha256)
            data = f.read()
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except PermissionError:
        raise unreadable(path) from None
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"Cannot read checkpoint {path} ({type(err).__name__}): it is corrupt or not a "
                         "PyTorch checkpoint; re-export it from training.") from err
    if isinstance(state, dict):
        for key in ("model", "network", "state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"Checkpoint {path} holds no state dict: pass a model.pt written by training.")
    check_finite(state.items(), path)
    _LOADED_SHA256[os.path.abspath(path)] = hashlib.sha256(data).hexdigest()
    return state


def _is_torchscript_archive(path: str) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``: a ``constants.pkl`` record), not a
    ``torch.save`` checkpoint."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


_ARCHIVE_FIX = "Copy the model again from where it was trained or exported, or re-export it."


def check_archive(path: str | os.PathLike, fix: str = _ARCHIVE_FIX) -> None:
    """Refuse a damaged checkpoint or TorchScript archive before it is loaded.

    ``torch.load`` does not verify the zip checksums, so a flipped byte in a weight loads as a wrong
    (possibly NaN) value, and the model then quietly segments nothing. Legacy (non-zip) files are
    left to the loader.

    Args:
        path: the file.
        fix: what the message tells the user to do (a training checkpoint is not copied or re-exported).

    Raises:
        ValueError: an entry fails its checksum, or the archive is cut short.
    """
    path = os.fspath(path)
    entry = None
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size > 0:
                    continue  # saved without checksums (torch's compute_crc32 = False): nothing to verify
                entry = info.filename
                with archive.open(info) as f:  # zipfile compares the CRC at the end of each entry
                    while f.read(1 << 24):
                        pass
    except PermissionError:
        raise unreadable(path) from None
    except (OSError, EOFError, zipfile.BadZipFile, RuntimeError) as err:
        where = f"entry {entry}" if entry else "its index"
        raise ValueError(f"{path} is damaged ({where}: {type(err).__name__}: {err}). {fix}") from None


def check_finite(tensors: Any, path: str | os.PathLike,
                 fix: str = "copy it again or use another checkpoint.") -> None:
    """Refuse weights with NaN or infinite values (a diverged run or a damaged file): a model with
    them segments nothing, without any other sign. ``tensors`` yields ``(name, tensor)`` pairs; ``fix``
    ends the message.

    Raises:
        ValueError: a tensor holds NaN or infinite values, naming ``path`` and the tensors.
    """
    bad = [name for name, t in tensors if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{os.fspath(path)} holds NaN or infinite weights in {len(bad)} tensor(s) (e.g. {bad[0]}): "
                         f"the file is damaged or its training diverged; {fix}")


def load_weights(
    network: torch.nn.Module, path: str | os.PathLike, map_location: Any = "cpu",
    optional_prefixes: Sequence[str] = (), fix: str = RETRAINED_FIX,
) -> torch.nn.Module:
    """Load a checkpoint into ``network`` safely (``weights_only=True``) with clear errors:
    :func:`read_state_dict` then :func:`apply_state_dict`.

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: it cannot be read, or it was trained with another network configuration.
    """
    return apply_state_dict(network, read_state_dict(path, map_location), path, optional_prefixes, fix)


def optional_state_keys(network: torch.nn.Module) -> list[str]:
    """State-dict keys of ``network`` that older checkpoints lack (``optional_state_keys`` of its modules)."""
    return [f"{name}.{key}" if name else key for name, module in network.named_modules()
            for key in getattr(type(module), "optional_state_keys", ())]


def allow_missing_optional_keys(module: torch.nn.Module, incompatible: Any) -> None:
    """``load_state_dict`` post-hook: the module's ``optional_state_keys`` may be missing from a
    checkpoint written before they existed (also for loaders outside this package, e.g. MONAI's
    ``ckpt_export``). Register it with ``module.register_load_state_dict_post_hook``."""
    names = getattr(type(module), "optional_state_keys", ())
    for key in list(incompatible.missing_keys):
        if any(key == n or key.endswith(f".{n}") for n in names):
            incompatible.missing_keys.remove(key)


def apply_state_dict(
    network: torch.nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike,
    optional_prefixes: Sequence[str] = (), fix: str = RETRAINED_FIX,
) -> torch.nn.Module:
    """Load ``state`` (read from ``path``) into ``network`` after checking that it fits.

    Args:
        network: the configured network.
        state: the checkpoint's state dict (see :func:`read_state_dict`).
        path: where ``state`` came from, for the error message.
        optional_prefixes: the tensors of ``network`` under one of these key prefixes may all be
            absent from the checkpoint and keep their initialisation (e.g. parts a pretrained
            network lacks); a group present in part is an error, as is any other missing tensor.
        fix: what the error message tells the user to do on a mismatch.

    Raises:
        ValueError: ``state`` was trained with another network configuration.
    """
    path = os.fspath(path)
    expected = network.state_dict()
    kinds = _kind(state), _kind(expected)
    if None not in kinds and kinds[0] != kinds[1]:
        raise ValueError(f"Checkpoint {path} holds a {kinds[0][0]} model, but a {kinds[1][0]} model is configured: "
                         f"pass a checkpoint written by the {kinds[1][1]} bundle.")
    # what the weights were trained for (the sentiment head's task and classes), before the shapes: a head of
    # another task may have the same shape, and one of another shape is better named by its task
    check = getattr(network, "check_checkpoint", None)
    if callable(check):
        check(state, path)
    optional: set[str] = set()
    for prefix in (*optional_prefixes, *optional_state_keys(network)):
        group = {k for k in expected if k.startswith(prefix)}
        if not group & set(state):  # absent as a whole; in part, the rest is reported missing
            optional |= group
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        if mismatched:
            key = mismatched[0]
            example = f"{key} is {tuple(state[key].shape)} there, {tuple(expected[key].shape)} here"
        else:
            example = f"{(missing or unexpected)[0]} is {'missing from' if missing else 'unexpected in'} it"
        raise ValueError(
            f"Checkpoint {path} was trained with a different network configuration "
            f"({describe_state_dict(state)}) than the one configured ({describe_state_dict(expected)}; "
            f"e.g. {example}): {fix}."
        )
    network.load_state_dict(state, strict=not optional)
    return network

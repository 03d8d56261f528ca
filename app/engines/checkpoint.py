"""Crash-safe training: an atomic ``checkpoint_last.pt`` and a resume that continues bit for bit.

:class:`ResumableCheckpoint` writes ``<save_dir>/checkpoint_last.pt`` at every epoch end (and every
``interval`` iterations) through :func:`atomic_save`: a temporary file in the same folder, flushed and
fsynced, then renamed over the old checkpoint, so a kill at any moment leaves either the old or the new
checkpoint, never a partial one. The checkpoint holds only tensors and plain containers and is read
with ``torch.load(weights_only=True)``.

An uninterrupted run and a killed-then-resumed run see the same batches because the data order does
not depend on process history: :class:`ResumableSampler` draws each pass over the data from
``(seed, pass)`` and can start a pass part-way through, and :class:`SeededDataset` re-seeds the random
transforms for every sample from a seed the sampler hands out with the index (so it does not matter
how many samples, workers or processes came before).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import random
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import ignite.distributed as idist
import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver
from monai.data.utils import set_rnd
from torch.utils.data import Dataset, DistributedSampler

from app.atomic import atomic_write, stale_temporaries
from app.bundle_args import argument_flags
from app.engines.handlers import format_duration
from app.networks.weights import check_archive, check_finite, describe_state_dict, optional_state_keys
from app.flags import parse_bool
from app.losses import loss_settings
from app.strategies import BUNDLE_SETTINGS, strategy_options
from app.strategies.base import process_group

__all__ = [
    "CHECKPOINT_FORMAT",
    "check_resume",
    "ABLATION_STAGE_ENV",
    "resume_hint",
    "in_ablation_stage",
    "AtomicCheckpointSaver",
    "atomic_save",
    "stale_temporaries",
    "capture_rng_state",
    "restore_rng_state",
    "load_training_checkpoint",
    "ResumableSampler",
    "SeededDataset",
    "ResumableCheckpoint",
    "transform_settings",
]

logger = logging.getLogger(__name__)

#: Value of the ``format`` entry of every checkpoint written by :class:`ResumableCheckpoint`.
CHECKPOINT_FORMAT = "app.training_checkpoint/1"

def atomic_save(obj: Any, path: str | os.PathLike) -> str:
    """``torch.save`` to ``path`` so that readers see the old file or the complete new one
    (:func:`app.atomic.atomic_write`, with the folder fsynced after the rename). After a kill the
    temporary file stays behind and :func:`stale_temporaries` finds it.

    Returns:
        ``path`` as a string.
    """
    return str(atomic_write(path, lambda f: torch.save(obj, f), sync_dir=True))


class _AtomicDiskSaver(BaseSaveHandler):
    """ignite's save handler for :class:`AtomicCheckpointSaver`: every file through :func:`atomic_save`.

    ``filename`` fixes the file name (``model.pt``), as MONAI's own handler does. ignite removes the
    file it replaces *before* writing its successor; under a fixed name the successor replaces it
    atomically anyway, so that removal is skipped: the best model never disappears in between.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None, save_on_rank: int = 0) -> None:
        self.dirname = Path(dirname)
        self.filename = filename
        self.save_on_rank = save_on_rank

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if idist.get_rank() == self.save_on_rank:
            atomic_save(checkpoint, self.dirname / (self.filename or filename))

    def remove(self, filename: str) -> None:
        if self.filename is None and idist.get_rank() == self.save_on_rank:
            with contextlib.suppress(FileNotFoundError):
                (self.dirname / filename).unlink()


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) writing each file atomically.

    MONAI's saver removes the previous ``model.pt`` and then writes the new one in place (``torch.save``),
    so a run killed in between (SIGKILL, the OOM killer, a scheduler's time limit) left no
    ``model.pt``, or a truncated one that no evaluation can read, in place of the best model so far;
    ``model_final.pt`` likewise. Here readers see the old file or the complete new one
    (:func:`atomic_save`), and a kill leaves at most a hidden temporary file, which the next run's
    :class:`ResumableCheckpoint` (where the config has one) removes.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                old = checkpoint.save_handler
                checkpoint.save_handler = _AtomicDiskSaver(old.dirname, getattr(old, "filename", None),
                                                           getattr(old, "save_on_rank", 0))


# -- random number generators --------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's, torch's and (if used) CUDA's global generators, as tensors.

    Only tensors, numbers, strings and None, so the result loads with ``weights_only=True``.
    """
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python_version": int(version),
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": gauss,
        "numpy_name": str(np_name),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate((int(state["python_version"]), tuple(int(x) for x in state["python_state"].tolist()),
                     state["python_gauss"]))
    np.random.set_state((state["numpy_name"], state["numpy_keys"].numpy().astype(np.uint32), int(state["numpy_pos"]),
                         int(state["numpy_has_gauss"]), float(state["numpy_gauss"])))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in cuda_states])
        else:
            logger.warning("The checkpoint holds CUDA generator states of %d device(s), this machine has %d: "
                           "CUDA random numbers will differ from the interrupted run.",
                           len(cuda_states), torch.cuda.device_count())


#: set (to ``1``) by ``python -m app ablate`` in the environment of each stage it runs
ABLATION_STAGE_ENV = "APP_ABLATION_STAGE"


def in_ablation_stage() -> bool:
    """Whether this process is a stage that ``python -m app ablate`` runs (:data:`ABLATION_STAGE_ENV`)."""
    return os.environ.get(ABLATION_STAGE_ENV) == "1"


def resume_hint() -> str:
    """How to continue a training stopped before its end, as the user started it: the words after "to continue".

    A training started by hand continues with its own command and ``--resume true``. A stage of
    ``python -m app ablate`` (its log under ``<output_dir>/<strategy>/train.log``) was started by the ablation, which
    passes ``--resume true`` itself when it is run again under the same settings: the bundle command in the log,
    rerun by hand with ``--resume true``, would train the stage outside the ablation, which would then not know it
    finished.
    """
    if in_ablation_stage():
        return "run the same python -m app ablate command again (it resumes this stage from its checkpoint)"
    return "run the same command with --resume true"


def _resume_mode(resume: bool | str) -> str:
    """``"true"``, ``"false"`` or ``"auto"`` for the bundles' ``--resume`` value; ``ValueError`` naming the fix otherwise."""
    if isinstance(resume, str) and resume.strip().lower() == "auto":
        return "auto"
    try:
        return "true" if parse_bool(resume, "resume") else "false"
    except ValueError:
        raise ValueError(f"--resume must be true, false or auto, got {resume!r}: pass --resume true.") from None


def check_resume(resume: bool | str, output_dir: str | os.PathLike, filename: str = "checkpoint_last.pt") -> None:
    """Refuse a bad ``--resume`` value, or ``--resume true`` without ``<output_dir>/models/<filename>``.

    Called in the training configs' ``initialize``: :class:`ResumableCheckpoint` finds both only when the
    trainer starts, after the cases were read and ``datalist.json``, ``models/`` and ``tensorboard/`` were
    written into an output folder that held no run to resume.

    Raises:
        ValueError: ``resume`` is not true, false or auto.
        FileNotFoundError: ``resume`` is true and there is no checkpoint to resume from.
    """
    if _resume_mode(resume) == "true":
        path = Path(output_dir) / "models" / filename
        if not path.is_file():
            raise FileNotFoundError(f"No training checkpoint at {path} to resume from: check --output_dir, or drop "
                                    "--resume to start a new run.")


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :class:`ResumableCheckpoint` (``weights_only=True``).

    The file is checked as a model file is: its zip checksums (``torch.load`` does not verify them, so a
    byte changed after the write resumed with a wrong weight, without a word) and its network weights (no
    NaN or infinite value).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is unreadable, damaged or is not such a checkpoint (e.g. a ``model.pt`` of weights).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No training checkpoint at {path} to resume from: check --output_dir, or drop "
                                "--resume to start a new run.")
    fix = "it cannot be resumed: delete it and start again with --resume false."
    check_archive(path, fix=fix[0].upper() + fix[1:])
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every unreadable file gets the same advice
        raise ValueError(f"Cannot read training checkpoint {path} ({type(err).__name__}): it is corrupt or not a "
                         "checkpoint written by training; delete it and start again with --resume false.") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a training checkpoint ({CHECKPOINT_FORMAT}); model.pt/model_final.pt hold "
                         "only weights: evaluate them with --ckpt_path, or resume from models/checkpoint_last.pt.")
    if isinstance(state.get("network"), Mapping):
        check_finite(state["network"].items(), path, fix=fix)
    return state


# -- data order ----------------------------------------------------------------------------------
class ResumableSampler(DistributedSampler):
    """A ``DistributedSampler`` whose order depends only on ``(seed, pass)`` and which can start mid-pass.

    Each call of ``__iter__`` is one pass over the data (the ``DataLoader`` calls it once per pass). The
    pass is a permutation drawn from ``seed + pass index``, padded and split between ``num_replicas``
    ranks like ``DistributedSampler`` does. It yields ``(index, sample_seed)`` pairs: wrap the dataset
    in :class:`SeededDataset`, which seeds the random transforms of each sample with ``sample_seed``.

    The pass index is counted by the sampler rather than taken from ``set_epoch`` (which is ignored):
    ignite keeps one data iterator across epochs when ``epoch_length`` is shorter than the loader,
    so epochs and passes differ in general. :meth:`resume` puts the sampler at any batch position.

    Args:
        dataset: the map-style dataset.
        shuffle: permute each pass; ``False`` keeps the dataset order.
        seed: base seed of the permutations and the per-sample seeds.
        num_replicas, rank: default to the world size and rank of ``torch.distributed`` when it is
            initialised, else 1 and 0 (no process group needed).
        drop_last: drop the tail instead of padding so every rank gets the same number of samples.
    """

    def __init__(
        self,
        dataset: Dataset,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        world, this_rank = process_group()
        num_replicas = world if num_replicas is None else num_replicas
        rank = this_rank if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.pass_index = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Ignored: passes are counted by the sampler (see the class docstring)."""

    def resume(self, batches_done: int, batches_per_pass: int, batch_size: int) -> None:
        """Continue after ``batches_done`` batches of ``batch_size`` samples (``batches_per_pass`` per pass).

        Raises:
            ValueError: ``batches_per_pass`` is below 1.
        """
        if batches_per_pass < 1:
            raise ValueError(f"batches_per_pass must be >= 1, got {batches_per_pass}.")
        self.pass_index = batches_done // batches_per_pass
        self._skip = (batches_done % batches_per_pass) * batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed + self.pass_index)
        n = len(self.dataset)  # type: ignore[arg-type]
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        # one seed per dataset index and pass: the augmentation of a sample does not depend on its position
        seeds = torch.randint(0, 2**31 - 1, (n,), generator=g).tolist()
        if self.drop_last:
            order = order[: self.total_size]
        else:
            pad = self.total_size - len(order)
            order += (order * math.ceil(pad / max(n, 1)))[:pad]
        shard = order[self.rank : self.total_size : self.num_replicas][self._skip :]
        self._skip = 0
        self.pass_index += 1
        return iter([(i, seeds[i]) for i in shard])


class SeededDataset(Dataset):
    """Dataset wrapper that seeds the random transforms of each sample from the key it is given.

    ``dataset[(index, seed)]`` seeds every ``Randomizable`` of ``dataset.transform`` (e.g. a MONAI
    ``Compose``) with ``seed`` and returns ``dataset[index]``; a plain ``index`` passes through. Because
    the augmentation of a sample depends only on its seed, it is the same with any number of workers
    or after a resume (see :class:`ResumableSampler`).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, tuple):
            index, seed = key
            transform = getattr(self.dataset, "transform", None)
            if transform is not None:
                set_rnd(transform, int(seed))
            return self.dataset[index]
        return self.dataset[key]


# -- the handler ---------------------------------------------------------------------------------
def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)  # DistributedDataParallel / DataParallel keep the net in .module


def _plain(value: Any) -> Any:
    """``value`` as plain lists, numbers and strings, so that ``(32, 32, 32)`` equals ``[32, 32, 32]``."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _plain(value.tolist())
    if isinstance(value, Counter):  # MultiStepLR's milestones, as --lr_scheduler#milestones gives them
        return sorted(value.elements())
    if isinstance(value, Mapping):  # a group of settings (transform_settings)
        return {str(k): _plain(v) for k, v in value.items()}
    return value


_NOT_A_SETTING = object()


def _setting_value(value: Any) -> Any:
    """A transform's attribute as plain Python (a dtype or function by its name), or ``_NOT_A_SETTING``."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return str(value)  # also MONAI's str enums ("constant")
    if isinstance(value, (torch.dtype, np.dtype)):
        return str(value)
    if isinstance(value, type) or inspect.isfunction(value) or inspect.isbuiltin(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '')}"
    if isinstance(value, (list, tuple)):
        items = [_setting_value(v) for v in value]
        return _NOT_A_SETTING if any(v is _NOT_A_SETTING for v in items) else items
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return _NOT_A_SETTING


def _constructor_parameters(obj: Any) -> set[str]:
    try:
        return set(inspect.signature(type(obj)).parameters)
    except (TypeError, ValueError):
        return set()


def _transform_values(transform: Any, depth: int = 0) -> dict[str, Any]:
    """The public settings of ``transform`` and of the transforms it holds (``RandFlipd``'s ``Flip``).

    A held transform's setting is named as the outer transform's constructor argument that sets it
    (``RandFlipd``'s ``spatial_axis``, kept by its ``flipper``) where the outer one takes such an argument,
    else ``<attribute>.<setting>`` (``cropper.pos_ratio``).
    """
    from monai.transforms import Transform

    values: dict[str, Any] = {}
    params = _constructor_parameters(transform)
    own = vars(transform)
    for name, value in own.items():
        if name.startswith("_") or name == "R":  # private state and the random generator, not settings
            continue
        plain = _setting_value(value)
        if plain is not _NOT_A_SETTING:
            values[name] = plain
        elif isinstance(value, Transform) and depth < 3:
            for sub, inner in _transform_values(value, depth + 1).items():
                values[sub if sub in params and sub not in own else f"{name}.{sub}"] = inner
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Transform) for v in value) and depth < 3:
            # the transforms of OneOf / RandomOrder / a nested Compose, named as their overrides (transforms#0#prob)
            for index, item in enumerate(value):
                values[f"{name}#{index}#_target_"] = _class_name(item)
                values.update({f"{name}#{index}#{k}": v for k, v in _transform_values(item, depth + 1).items()})
    return values


def transform_settings(transforms: Any, flag: str) -> dict[str, Any]:
    """The class and settings of each transform of a list or ``Compose``, as ``{"<flag>#<index>#<setting>": value}``.

    For :class:`ResumableCheckpoint`'s ``settings`` (the bundles: ``train#augmentation: ...``): an augmentation
    probability or an intensity setting changed on the command line (``--train#augmentation#2#prob 0.1``) or
    in a recipe made the resumed run train on other samples than the one it continues, without a word.
    The index and the constructor argument name the override that restores a setting
    (``--train#augmentation#2#prob 0.5``); the class is ``<flag>#<index>#_target_``.

    Args:
        transforms: a sequence of transforms, or an object with a ``transforms`` sequence (``Compose``).
        flag: the config id of the list (``train#augmentation``), which starts each key.
    """
    # MONAI's config parser rewrites "#" to its other separator "::" inside "$" expressions
    flag = flag.replace("::", "#")
    items = list(getattr(transforms, "transforms", transforms) or [])
    settings: dict[str, Any] = {}
    for index, transform in enumerate(items):
        settings[f"{flag}#{index}#_target_"] = _class_name(transform)
        settings.update({f"{flag}#{index}#{k}": v for k, v in _transform_values(transform).items()})
    return settings


def _cli_value(value: Any) -> str:
    """``value`` as it is written on the ``monai.bundle`` command line (``"[32,32,32]"``, ``auto``)."""
    if isinstance(value, list):
        return '"[' + ",".join(str(v) for v in value) + ']"'
    return str(value)


def _option(flag: str) -> str:
    """A setting's flag: ``--patch_size``; a name with a space is another command's flag as it is written
    (``torchrun --nproc_per_node``)."""
    return flag if " " in flag else f"--{flag}"


def _class_name(obj: Any) -> str:
    """``obj``'s class as ``--optimizer#_target_`` names it: ``torch.optim.AdamW`` (the public module where
    the class is exported from it), else ``module.Class``."""
    cls = type(obj)
    module = cls.__module__
    parent = module.rsplit(".", 1)[0]
    if "." in module and getattr(sys.modules.get(parent), cls.__name__, None) is cls:
        module = parent
    return f"{module}.{cls.__qualname__}"


def _group_keys(optimizer_state: Mapping[str, Any]) -> list[frozenset]:
    """The hyperparameter names of each parameter group of an optimizer ``state_dict()`` (its class's
    fingerprint: SGD has ``momentum``, Adam ``betas``), without those a scheduler adds."""
    return [frozenset(g) - {"params", "initial_lr"} for g in optimizer_state.get("param_groups", [])]


#: entries of a learning-rate scheduler's state that record its progress, not its settings
_SCHEDULE_PROGRESS = frozenset({"last_epoch", "base_lrs", "verbose"})

#: optimizer hyperparameters a resume compares, with the bundle setting that sets each (others: the optimizer's)
_OPTIMIZER_SETTINGS = {"lr": "--learning_rate", "weight_decay": "--weight_decay", "betas": "betas", "eps": "eps",
                       "momentum": "momentum", "dampening": "dampening", "nesterov": "nesterov", "amsgrad": "amsgrad"}
#: those that a learning-rate scheduler may move during training (OneCycleLR cycles the momentum too)
_SCHEDULED = frozenset({"lr", "betas", "momentum"})


def _optimizer_changes(
    configured: Mapping[str, Any], saved: Mapping[str, Any], scheduled: bool
) -> list[tuple[str, Any, Any]]:
    """``(setting, saved value, configured value)`` for each hyperparameter of the optimizer configured for
    this run that differs from the one the checkpoint's optimizer was built with.

    Args:
        configured, saved: optimizer ``state_dict()`` of this run (before loading) and of the checkpoint.
        scheduled: a learning-rate scheduler drives the optimizer. Its learning rate is then compared as
            the scheduler recorded the starting value (``initial_lr``), and the values a scheduler may move
            without recording where they started (``lr`` without ``initial_lr``, ``betas``, ``momentum``)
            are not compared.
    """
    changes = []
    for index, (now, then) in enumerate(zip(configured.get("param_groups", []), saved.get("param_groups", []))):
        for key, setting in _OPTIMIZER_SETTINGS.items():
            if key == "lr" and "initial_lr" in now and "initial_lr" in then:
                key = "initial_lr"
            elif scheduled and key in _SCHEDULED:
                continue
            if key not in now or key not in then:
                continue
            a, b = then[key], now[key]
            same = list(a) == list(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b
            if not same:
                changes.append((setting if index == 0 else f"{setting} (parameter group {index})", a, b))
    return changes


def _strategy_settings(text: str) -> tuple[str, dict[str, str]] | None:
    """``("GMDStrategy", {"subsets": "3", "seed": "0"})`` for a strategy's repr ``GMDStrategy(subsets=3, seed=0)``."""
    match = re.fullmatch(r"(\w+)\((.*)\)", text.strip(), flags=re.S)
    if match is None:
        return None
    args = [a for a in re.split(r", (?=[A-Za-z_]\w*=)", match.group(2)) if a]
    if not all("=" in a for a in args):
        return None
    return match.group(1), dict(a.split("=", 1) for a in args)


def _strategy_fix(written: str, configured: str, wiring: Mapping[str, str] | None = None) -> str:
    """The flags that restore the strategy settings of ``written`` where this run's strategy is of its class and
    differs in its settings (``--gmd_subsets 3``), else ``""``.

    ``wiring`` is the flag of each ``strategy_def`` argument in this run's config
    (:func:`app.bundle_args.argument_flags`): ``--gmd_subsets`` where ``train.yaml`` wires ``subsets`` to it, but
    ``--strategy_def#subsets`` where a recipe sets the argument itself, since the bundles then refuse
    ``--gmd_subsets`` as a setting the run would ignore. An argument it does not list, and every argument of a
    recipe's own strategy without it (``aux_weight``), takes ``--strategy_def#NAME``, which reaches any argument.
    Without it (no bundle command line) an option of the built-in strategies takes its bundle setting.
    """
    old, new = _strategy_settings(written), _strategy_settings(configured)
    if old is None or new is None or old[0] != new[0]:
        return ""
    flags = []
    for name, value in old[1].items():
        if new[1].get(name) != value:
            if wiring is not None:
                flag = wiring.get(name, f"--strategy_def#{name}")
            else:
                flag = f"--{BUNDLE_SETTINGS.get(name, name)}" if name in strategy_options() else f"--strategy_def#{name}"
            flags.append(f"{flag} {value.strip(chr(39))}")
    return " ".join(flags)


#: how many differing settings a refused resume names (then how many more)
_LISTED = 6


class ResumableCheckpoint:
    """Writes ``<save_dir>/<filename>`` atomically during training and resumes from it.

    Written at every ``EPOCH_COMPLETED`` (attach it after the LR-scheduler and validation handlers so
    the checkpoint holds their updates), every ``interval`` iterations, and at ``TERMINATE`` when that
    happens mid-epoch (e.g. the time limit). ``terminate()`` at an epoch's last iteration fires no
    ``EPOCH_COMPLETED``, so that iteration is saved at ``TERMINATE`` (without the epoch-end updates:
    :class:`~app.engines.TimeLimitHandler` therefore stops at ``EPOCH_COMPLETED`` instead).

    The checkpoint holds the network, optimizer, LR scheduler, gradient scaler, strategy state, epoch,
    iteration, ``epoch_length``, the validator's best metric and the key-metric saver's record (so
    ``model.pt`` is only replaced by a better model after a resume), and the generator states of
    every rank. With ``resume`` the handler restores all of it at ``STARTED`` (after refusing a run configured
    with other ``settings``, another network, training voxel size, epoch length, ``max_epochs``, learning rate, weight
    decay, strategy or loss);
    ignite then continues from the restored iteration, and a :class:`ResumableSampler` of the trainer's loader
    is moved to the same batch.

    In a distributed run every rank must attach the handler (the generator states are gathered);
    only rank 0 writes. ``save_dir`` must be reachable by all ranks to resume.

    Args:
        save_dir: folder of the checkpoint (the bundle uses ``<output_dir>/models``).
        network, optimizer: what training updates.
        lr_scheduler: optional LR scheduler.
        strategy: the gradient strategy; default: the trainer's ``strategy`` attribute.
        validator: optional evaluator whose ``best_metric``/``best_metric_epoch`` are kept.
        key_metric_saver: optional MONAI ``CheckpointSaver`` saving the best model; its record of the
            best score is kept.
        resume: ``True`` to continue from the checkpoint (error if there is none), ``"auto"`` to continue
            if it exists, ``False`` to start a new run (an existing checkpoint is overwritten).
        interval: also write every this many iterations (``0``: only at epoch ends).
        filename: checkpoint file name.
        time_limit: optional :class:`~app.engines.TimeLimitHandler` of the trainer: the training time
            spent is kept, so a resumed run continues its wall-clock budget instead of starting a new one.
        settings: named settings that a resumed run must keep, each named by the command-line flag that sets
            it (the segmentation bundle: ``patch_size``, ``batch_size``, ``num_samples``, ``label_convention``,
            ``features``, ``strategy``, ``amp``, ``sw_overlap``, ``seed``, the transforms as
            :func:`transform_settings` describes them, the number of processes ``torchrun --nproc_per_node``: a
            name with a space is written as is), recorded in the checkpoint: with another value the run would
            continue on other samples or numerics than the one it resumes, while the weights and the data order
            carried on without a word. A value may be a mapping of settings, each named by its flag (compared
            entry by entry).
        loss_function: the training loss, whose class and settings (:func:`app.losses.loss_settings`) are recorded
            and must be the same in a resumed run; default: the trainer's ``loss_function`` attribute.
        warn: names of ``settings`` whose change is logged as a warning instead of refused: the experiment stays the
            same (the bundle: ``deterministic``, which only loses bit-for-bit reproducibility on a GPU, and
            ``dataset_dir``, a moved copy of the data: the split and the voxel size are checked on their own).
        digests: ``settings`` that are a digest of the data another setting names, by the name of that setting (the
            sentiment bundle: ``{"data": "data_path"}``, the utterance ids and labels of its splits): a changed digest
            is refused naming that setting's values and the recorded one as the fix, a digest being no flag. The
            setting it is of is then in ``warn``: a copy of the same data elsewhere, or converted, resumes.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any = None,
        strategy: Any = None,
        validator: Engine | None = None,
        key_metric_saver: Any = None,
        resume: bool | str = False,
        interval: int = 0,
        filename: str = "checkpoint_last.pt",
        time_limit: Any = None,
        settings: Mapping[str, Any] | None = None,
        loss_function: Any = None,
        warn: Sequence[str] = (),
        digests: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(save_dir) / filename
        self.loss_function = loss_function
        self._loss_settings: dict[str, Any] | None = None
        self.time_limit = time_limit
        self.settings = {str(k): _plain(v) for k, v in (settings or {}).items()}
        self.warn = frozenset(str(k) for k in warn)
        self.digests = {str(k): str(v) for k, v in (digests or {}).items()}
        self.network = network
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.strategy = strategy
        self.validator = validator
        self.key_metric_saver = key_metric_saver
        self.resume = _resume_mode(resume)
        self.interval = max(0, int(interval or 0))
        self._saved_at: int | None = None  # iteration of the last save
        self._read: tuple[tuple[int, int, int], dict[str, Any]] | None = None  # (file's key, state): _checkpoint
        self._kept: tuple[int, int] | None = None  # (epoch, iteration) of the checkpoint on disk that this run continues

    def attach(self, engine: Engine) -> None:
        """Resume at ``STARTED``; save every ``interval`` iterations, at each epoch end and at ``TERMINATE``.

        Args:
            engine: the trainer.
        """
        engine.resumable_checkpoint = self  # read by SubsetTrainer.run for resume_note()
        engine.add_event_handler(Events.STARTED, self._started)
        if self.interval:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        engine.add_event_handler(Events.TERMINATE, self._terminated)

    # -- events -----------------------------------------------------------------------------------
    def _epoch_end(self, engine: Engine) -> bool:
        length = engine.state.epoch_length
        return bool(length) and engine.state.iteration % length == 0

    def _iteration_completed(self, engine: Engine) -> None:
        if not self._epoch_end(engine):  # the EPOCH_COMPLETED save follows right after
            self.save(engine)

    def _terminated(self, engine: Engine) -> None:
        # a stop at an epoch's last iteration fires no EPOCH_COMPLETED, so its save may not have happened
        if self._saved_at != engine.state.iteration:
            self.save(engine)

    def _started(self, engine: Engine) -> None:
        # read when the run starts (MONAI's SupervisedTrainer sets loss_function after attaching its handlers) and
        # before any step: a loss may rewrite a setting on its first call (MONAI's DiceLoss expands a scalar weight to
        # one per class), which would tell a resumed run's loss from the one that wrote the checkpoint
        self._read_loss_settings(engine)
        _, rank = process_group()
        if self._resuming():
            state = self._checkpoint()
            self._read = None  # the restore trains on from this state: a later resume reads the file again
            self.restore(engine, state)
            self._kept = (int(engine.state.epoch), int(engine.state.iteration))
        elif self.path.is_file() and rank == 0:
            if in_ablation_stage():  # the ablation said why (other settings) before this stage
                logger.warning("Starting a new run: %s will be overwritten.", self.path)
            else:
                logger.warning("Starting a new run: %s will be overwritten (pass --resume true to continue it).",
                               self.path)
        if rank == 0:
            # checkpoint_last.pt's, and model.pt's and model_final.pt's (AtomicCheckpointSaver): every *.pt's
            for tmp in stale_temporaries(self.path.with_name("*.pt")):
                logger.info("Removing %s, left by a run killed while writing a checkpoint.", tmp)
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

    def _resuming(self) -> bool:
        """Whether this run continues ``checkpoint_last.pt``: ``--resume true``, or ``auto`` and the file exists."""
        return self.resume == "true" or (self.resume == "auto" and self.path.is_file())

    def _read_loss_settings(self, engine: Engine) -> None:
        loss = self.loss_function if self.loss_function is not None else getattr(engine, "loss_function", None)
        self._loss_settings = None if loss is None else loss_settings(loss)

    # -- state ------------------------------------------------------------------------------------
    def _strategy(self, engine: Engine) -> Any:
        return self.strategy if self.strategy is not None else getattr(engine, "strategy", None)

    def state_dict(self, engine: Engine) -> dict[str, Any]:
        """Everything needed to continue ``engine``; the RNG entry is this rank's only."""
        world, _ = process_group()
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "epoch": int(engine.state.epoch),
            "iteration": int(engine.state.iteration),
            "epoch_length": int(engine.state.epoch_length or 0),
            "max_epochs": int(engine.state.max_epochs or 0),
            "world_size": world,
            "network": _unwrap(self.network).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_class": _class_name(self.optimizer),
        }
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
            state["lr_scheduler_class"] = _class_name(self.lr_scheduler)
        scaler = getattr(engine, "scaler", None)
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        strategy = self._strategy(engine)
        if strategy is not None and hasattr(strategy, "state_dict"):
            state["strategy"] = strategy.state_dict()
        if strategy is not None:
            # the strategy and its settings (e.g. "GMDStrategy(subsets=5, seed=0, sync=None)"), checked by a resume
            state["strategy_config"] = repr(strategy)
        if self._loss_settings is not None:
            state["loss_config"] = dict(self._loss_settings)
        if self.validator is not None:
            vstate = self.validator.state
            state["validator"] = {"best_metric": float(vstate.best_metric),
                                  "best_metric_epoch": int(vstate.best_metric_epoch)}
        # MONAI's CheckpointSaver exposes load_state_dict but no getter; its ignite Checkpoint has both
        tracker = getattr(self.key_metric_saver, "_key_metric_checkpoint", None)
        if tracker is not None:
            state["key_metric_saver"] = {k: [(float(p), str(f)) for p, f in v] for k, v in tracker.state_dict().items()}
        if self.time_limit is not None:
            state["time_limit"] = self.time_limit.state_dict()
        if self.settings:
            state["settings"] = dict(self.settings)
        loader = getattr(engine, "data_loader", None)
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, ResumableSampler):
            state["sampler"] = {"seed": int(sampler.seed), "num_replicas": int(sampler.num_replicas)}
        return state

    def save(self, engine: Engine) -> None:
        """Write the checkpoint (rank 0) with the generator states of every rank."""
        self._saved_at = engine.state.iteration
        world, rank = process_group()
        rng = capture_rng_state()
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, rng)
        else:
            gathered = [rng]
        if rank != 0:
            return
        state = self.state_dict(engine)
        state["rng"] = gathered
        atomic_save(state, self.path)
        self._kept = (int(engine.state.epoch), int(engine.state.iteration))
        logger.info("Wrote %s (epoch %d, iteration %d).", self.path, engine.state.epoch, engine.state.iteration)

    def resume_note(self) -> str:
        """For the message of a write that stopped the run (a full disk): the checkpoint it leaves to continue from,
        or ``""`` before the first (an atomic write that failed, ``checkpoint_last.pt``'s own included, keeps the
        file before it). ``write_error``'s fix, "write to another folder", would otherwise start the run over."""
        if self._kept is None:
            return ""
        epoch, iteration = self._kept
        return (f" The resumable checkpoint {self.path} (epoch {epoch}, iteration {iteration}) is kept: once the disk "
                f"can take the run's files, {resume_hint()} to continue from it.")

    def _check_settings(self, recorded: Mapping[str, Any]) -> list[str]:
        """Refuse a resume whose ``settings`` differ from those the checkpoint recorded; those in ``warn`` are only
        described, in the warnings returned (logged once every other check passed).

        A setting the checkpoint does not record (written by an earlier version) is not compared: the warnings name
        it. A group of settings (a mapping, e.g. :func:`transform_settings`) is compared entry by entry, each entry
        named by its own flag, an entry on one side only counting as a change (a transform added or removed).

        Returns:
            the warnings: the settings the checkpoint does not record, and the changed settings of ``warn``.

        Raises:
            ValueError: a refused setting differs: names each one's two values and the flags that restore them.
        """
        changes: list[tuple[str, str, Any, Any]] = []  # (setting, flag, saved value, this run's value)
        for key, now in self.settings.items():
            if key not in recorded:
                continue
            then = _plain(recorded[key])
            if isinstance(now, Mapping) and isinstance(then, Mapping):
                for sub in dict.fromkeys([*then, *now]):
                    if then.get(sub, _NOT_A_SETTING) != now.get(sub, _NOT_A_SETTING):
                        changes.append((key, sub, then.get(sub, _NOT_A_SETTING), now.get(sub, _NOT_A_SETTING)))
            elif then != now:
                changes.append((key, key, then, now))
        # a transform setting that follows a changed setting (the crops' spatial_size is --patch_size): named once
        followed = [(old, new) for key, flag, old, new in changes if key == flag]
        changes = [c for c in changes if c[0] == c[1] or (c[2], c[3]) not in followed]

        def shown(value: Any) -> str:
            return "(none)" if value is _NOT_A_SETTING else repr(value)

        def more(items: list[tuple[str, str, Any, Any]]) -> str:
            # a transform list of a recipe replaced as a whole differs in dozens of settings: the line names a few
            return f" and {len(items) - _LISTED} more" if len(items) > _LISTED else ""

        def source(key: str) -> tuple[str, Any, Any]:
            # the setting a digest is of (--data_path), with its recorded value and this run's
            name = self.digests[key]
            return name, _plain(recorded.get(name, _NOT_A_SETTING)), self.settings.get(name, _NOT_A_SETTING)

        def change(key: str, flag: str, old: Any, new: Any) -> str:
            if key not in self.digests:
                return f"{_option(flag)} {shown(old)} there, {shown(new)} here"
            name, then, now = source(key)
            where = (f"{_option(name)} {shown(now)}" if then == now
                     else f"{_option(name)} {shown(then)} there, {shown(now)} here")
            return f"{where}, whose data differ: digest {old} there, {new} here"

        def listed(items: list[tuple[str, str, Any, Any]]) -> str:
            return "; ".join(change(*item) for item in items[:_LISTED]) + more(items)

        def restore(key: str, flag: str, old: Any) -> str | None:
            if key in self.digests:  # the digest is no flag: the setting it is of restores it, where that moved
                name, then, now = source(key)
                return None if then is _NOT_A_SETTING or then == now else f"{_option(name)} {_cli_value(then)}"
            # a transform's setting held by an inner object (cropper.pos_ratio) has no flag of its own
            if old is _NOT_A_SETTING or "." in flag.rsplit("#", 1)[-1]:
                return None
            return f"{_option(flag)} {_cli_value(old)}"

        def fix(items: list[tuple[str, str, Any, Any]]) -> str:
            flags = [f for f in (restore(key, flag, old) for key, flag, old, _ in items[:_LISTED]) if f]
            return " ".join(flags) + (more(items) if flags else "")

        warned = [c for c in changes if c[0] in self.warn]
        refused = [c for c in changes if c[0] not in self.warn]
        unrecorded = [k for k in self.settings if k not in recorded]
        if refused:
            # the weights, optimizer and data order would carry on with other samples or numerics than the run's
            restore = fix(refused)
            raise ValueError(
                f"{self.path} was written by a run with other training settings ({listed(refused)}): resume with "
                f"{restore or 'the original settings'}, or start a new run in another --output_dir to train with the "
                "new ones."
            )
        warnings = []
        if unrecorded and recorded:
            # a run started before this version recorded them (the checkpoint of a run under way at an upgrade); a
            # checkpoint that records no settings at all is named by _warn_unrecorded
            names = ", ".join(f"digest of the {_option(self.digests[k])} data" if k in self.digests
                              else f"the {k} transforms" if isinstance(self.settings[k], Mapping) else _option(k)
                              for k in unrecorded)
            warnings.append(f"{self.path} records no {names} (it was written by an earlier version): those are not "
                            "compared beyond what its weights, strategy and split show, so make sure this command "
                            "passes the values the run started with.")
        if warned:
            warnings.append(f"{self.path} was written by a run with other settings ({listed(warned)}): the resumed run "
                            f"continues the same experiment with the new value(s) (pass "
                            f"{fix(warned) or 'the original settings'} to keep the original).")
        return warnings

    def _check_same_spacing(self, expected: Mapping[str, Any], saved: Mapping[str, Any],
                            recorded: Mapping[str, Any]) -> None:
        """Refuse a resume whose training cases have another voxel size than those the checkpoint was trained on.

        The network records the median spacing of its training cases (``training_spacing``, set in ``initialize``);
        loading the checkpoint brought the first run's value back over this run's, so a resume on a copy of the
        cases at another resolution (the same case ids, e.g. the full-resolution release instead of the 2 mm one)
        trained on at the new voxel size, and the model kept recording the old one for inference.

        Args:
            expected, saved: this run's network state (before loading) and the checkpoint's.
            recorded: the checkpoint's ``settings``: its ``dataset_dir``, where recorded, is named as the fix.

        Raises:
            ValueError: both spacings are known and differ: names them and the fix.
        """
        if "training_spacing" not in expected or "training_spacing" not in saved:
            return
        now = [float(v) for v in torch.as_tensor(expected["training_spacing"]).flatten().tolist()]
        then = [float(v) for v in torch.as_tensor(saved["training_spacing"]).flatten().tolist()]
        if len(now) != len(then) or not any(now) or not any(then):
            return  # unknown on one side (zeros): nothing to compare
        if all(math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-4) for a, b in zip(now, then)):
            return
        data = f"--dataset_dir {recorded['dataset_dir']}" if recorded.get("dataset_dir") else "--dataset_dir"
        raise ValueError(
            f"{self.path} was written by a run trained on cases of median voxel size {[round(v, 4) for v in then]} mm, "
            f"this run's training cases have {[round(v, 4) for v in now]} mm: resume with the data the run trained on "
            f"({data}), or start a new run in another --output_dir to train at the new voxel size."
        )

    def _check_same_class(self, configured: Any, saved_kind: str | None, unknown: str, keys_differ: bool,
                          verb: str, option: str, what: str) -> None:
        """Refuse a resume whose optimizer or scheduler is of another class than the saved one.

        Args:
            configured: this run's optimizer or scheduler.
            saved_kind: the class the checkpoint records (None: written before the class was recorded).
            unknown: what to call the saved one when only its state's keys tell it apart.
            keys_differ: whether the saved state's keys differ from the configured one's.
            verb, option, what: the error's wording ("training with", "--optimizer#_target_", "optimizer").
        """
        kind = _class_name(configured)
        if saved_kind is None and keys_differ:
            saved_kind = unknown
        if saved_kind is not None and saved_kind != kind:
            raise ValueError(
                f"{self.path} was written by a run {verb} {saved_kind}, this run is configured with {kind} "
                f"({option}): a resume continues the saved {what}, so resume with the original {option}, or start "
                "a new run in another --output_dir to train with the new one."
            )

    def _warn_unrecorded(self, state: Mapping[str, Any], strategy: Any, rank: int) -> None:
        """Say which of this run's choices a checkpoint from before they were recorded cannot confirm.

        Checkpoints of brats_gmd before 0.5.0 record neither the strategy nor the time trained, and those before
        0.5.2 not the sample settings (patch size, batch size, samples, label convention): such a resume used to
        continue under whatever this command says (``--strategy plain`` on GMD weights, another ``--patch_size``,
        a new whole time budget) without a word, while a newer checkpoint refuses the mismatch.
        """
        if rank != 0:
            return
        unchecked = []
        if strategy is not None and state.get("strategy_config") is None:
            unchecked.append(f"strategy ({strategy!r})")
        if self.settings and not isinstance(state.get("settings"), Mapping):
            # the values to pass where a flag passes them; a transform list (hundreds of entries) and a digest by name
            flags = [f"{_option(k)} {_cli_value(v)}" for k, v in self.settings.items()
                     if not isinstance(v, Mapping) and k not in self.digests]
            named = [f"the {k} transforms" if isinstance(v, Mapping) else f"digest of the "
                     f"{_option(self.digests[k])} data" for k, v in self.settings.items()
                     if isinstance(v, Mapping) or k in self.digests]
            unchecked.append("training settings (" + "; ".join(filter(None, [" ".join(flags), ", ".join(named)])) + ")")
        budget = getattr(self.time_limit, "seconds", None)
        if budget is not None and "time_limit" not in state:
            unchecked.append(f"time trained (the {budget / 60:g}-minute budget counts from this resume)")
        if unchecked:
            logger.warning(
                "%s records no %s (it was written by an earlier version): the resume cannot check them against the run "
                "it continues, so it trains with this command's. Resume with the run's original --strategy and "
                "settings, or start a new run in another --output_dir.", self.path, "; no ".join(unchecked))

    def _check_same_loss(self, written: Any, rank: int) -> None:
        """Refuse a resume whose loss is not the one the checkpoint was trained with; warn where it records none.

        Raises:
            ValueError: the loss's class or a setting differs, naming both values and the fix.
        """
        if self._loss_settings is None:
            return
        if not isinstance(written, Mapping):
            if rank == 0:
                # checkpoints from before the loss was recorded: those of the brats_gmd bundle before 0.6.0 were
                # trained with MONAI's DiceCELoss (a softmax cross-entropy over the region channels)
                target = self._loss_settings["_target_"]
                if target.startswith("monai.losses.") and target.endswith(".DiceCELoss"):
                    # the command gives the loss the other wording tells it to pass (--loss#_target_
                    # monai.losses.DiceCELoss): naming the flag again read as if the command lacked it
                    advice = ("the loss of brats_gmd checkpoints from before bundle version 0.6.0 (a softmax "
                              "cross-entropy over the region channels); if this one was trained with another, start a "
                              "new run in another --output_dir to train with one loss throughout.")
                else:
                    advice = ("A brats_gmd checkpoint from before bundle version 0.6.0 was trained with "
                              "monai.losses.DiceCELoss (a softmax cross-entropy over the region channels), so the run "
                              "would mix two objectives: start a new run in another --output_dir to train with one "
                              "loss throughout, or pass --loss#_target_ monai.losses.DiceCELoss to continue with that "
                              "one.")
                logger.warning("%s records no training loss (it was written by an earlier version): the resumed run "
                               "trains with %s%s %s", self.path, target, "," if advice.startswith("the") else ".",
                               advice)
            return

        def trained(key: str) -> Any:
            # a switch the command line gave as "false" reached the loss as that string before the loss parsed its
            # switches (app.losses), and the loss read it as true: that is the objective the weights were trained with
            value, now = written.get(key), self._loss_settings.get(key)
            return bool(value) if isinstance(now, bool) and isinstance(value, str) else value

        def shown(key: str) -> str:
            value = written.get(key)
            return f"{value!r} (read as {trained(key)})" if trained(key) is not value else repr(value)

        keys = [k for k in dict.fromkeys([*written, *self._loss_settings]) if trained(k) != self._loss_settings.get(k)]
        if not keys:
            return
        listed = "; ".join(f"{k} {shown(k)} there, {self._loss_settings.get(k)!r} here" for k in keys)

        def restore(key: str) -> str | None:
            if trained(key) is not written.get(key):  # such a switch is the loss's argument of that name, given as text
                return f"--loss#{key.rsplit('.', 1)[-1]} {str(trained(key)).lower()}"
            return f"--loss#{key} {_cli_value(written[key])}" if "." not in key and key in written else None

        fix = " ".join(filter(None, map(restore, keys)))
        raise ValueError(
            f"{self.path} was written by a run training with another loss ({listed}): a resume must train with the "
            f"loss the weights were trained with, so resume with the original loss settings{f' ({fix})' if fix else ''}, "
            "or start a new run in another --output_dir to train with the new loss."
        )

    def check(self, engine: Engine) -> None:
        """Refuse now, before the run writes anything, a resume that :meth:`restore` would refuse at ``STARTED``.

        A bundle calls it before it writes into the output folder (the split, the TensorBoard events): a refused
        resume then leaves the run it would continue as it was. Without ``resume`` (or with ``"auto"`` and no
        checkpoint) it does nothing; the checks read the configured settings, not the engine's progress.

        Args:
            engine: the trainer, built but not started.

        Raises:
            ValueError: as :meth:`restore`.
        """
        if not self._resuming():
            return
        self._read_loss_settings(engine)
        length = engine.state.epoch_length
        if not length:
            # ignite takes one pass over the loader per epoch when epoch_length is not set
            with contextlib.suppress(TypeError):
                length = len(getattr(engine, "data_loader", None))  # type: ignore[arg-type]
        self._check(engine, self._checkpoint(), int(length or 0), logged=False)

    def _checkpoint(self) -> dict[str, Any]:
        """:func:`load_training_checkpoint` of ``self.path``, read once for :meth:`check` and the restore at
        ``STARTED`` while the file stays the same (its inode, size and modification time): each read checks every byte
        of the archive and unpickles it (0.4 s for a 200 MB checkpoint of the default segmentation network)."""
        try:
            stat = os.stat(self.path)
            key: tuple[int, int, int] | None = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        except OSError:
            key = None
        if key is None or self._read is None or self._read[0] != key:
            self._read = None  # no file (load_training_checkpoint names the fix), or another one
            state = load_training_checkpoint(self.path)
            if key is not None:
                self._read = (key, state)
            return state
        return self._read[1]

    def restore(self, engine: Engine, state: Mapping[str, Any]) -> None:
        """Load ``state`` (from :func:`load_training_checkpoint`) into the objects and ``engine``.

        Raises:
            ValueError: the checkpoint was written with another recorded setting, network, training voxel size,
                epoch length, number of epochs, scheduler or optimizer setting, strategy or loss: the message names
                the resume that fits.
        """
        length = int(engine.state.epoch_length or 0)
        saved, strategy = self._check(engine, state, length, logged=True)
        self._load(engine, state, saved, strategy, length)

    def _check(self, engine: Engine, state: Mapping[str, Any], length: int, logged: bool) -> tuple[dict, Any]:
        """The checks of :meth:`restore` (``length``: this run's iterations per epoch, 0 if unknown); ``logged``:
        log the warnings of a resume that passed. Returns the network state to load and the strategy."""
        _, rank = process_group()
        # first: each setting names the flag that restores it (--features, --strategy), which the checks below, of
        # what the settings lead to, cannot
        warnings = self._check_settings(state.get("settings") or {})
        net = _unwrap(self.network)
        expected, saved = net.state_dict(), state["network"]
        # tensors added to the network after the checkpoint was written keep their current value
        saved = {**{k: expected[k] for k in optional_state_keys(net) if k in expected}, **saved}
        if set(expected) != set(saved) or any(tuple(saved[k].shape) != tuple(v.shape) for k, v in expected.items()):
            raise ValueError(
                f"{self.path} was written for a different network configuration ({describe_state_dict(saved)}) than "
                f"the one configured ({describe_state_dict(expected)}): resume with the run's original network "
                "settings (BraTS: --features; sentiment: --hidden and the layer counts), or start a new run in another "
                "--output_dir."
            )
        self._check_same_spacing(expected, saved, state.get("settings") or {})
        # a sentiment head of another task, class count or fusion may have the same shapes: it would go on training
        # the weights as another task's
        check = getattr(net, "check_checkpoint", None)
        if callable(check):
            check(saved, str(self.path))
        if state["epoch_length"] and length and state["epoch_length"] != length:
            raise ValueError(
                f"{self.path} was written with {state['epoch_length']} iterations per epoch, this run has {length}: "
                f"resume with --epoch_length {state['epoch_length']} (or the original --batch_size and data, where "
                "the run took one pass over the training cases per epoch)."
            )
        planned = int(engine.state.max_epochs or 0)
        if state.get("max_epochs") and planned and int(state["max_epochs"]) != planned and self.lr_scheduler is not None:
            # the scheduler's horizon (e.g. cosine T_max) comes back from the checkpoint: the extra epochs of a
            # longer run would train at the end of the old schedule (a learning rate near 0)
            raise ValueError(
                f"{self.path} was written by a run of {state['max_epochs']} epochs, this run asks for {planned}: the "
                "learning-rate schedule was set for the original length, so resume with --max_epochs "
                f"{state['max_epochs']}, or start a new run in another --output_dir to train for {planned}."
            )
        # the saved state (AdamW's moments and hyperparameters) loaded into SGD failed at the first step with
        # KeyError 'momentum'; into Adam it went on silently as AdamW, with decoupled weight decay
        self._check_same_class(self.optimizer, state.get("optimizer_class"), "another optimizer",
                               _group_keys(state["optimizer"]) != _group_keys(self.optimizer.state_dict()),
                               "training with", "--optimizer#_target_", "optimizer")
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            # loading the saved state into another scheduler went on silently: the run switched schedules
            # half-way (e.g. from the cosine one to StepLR), carrying the old one's attributes along
            self._check_same_class(self.lr_scheduler, state.get("lr_scheduler_class"),
                                   "another learning-rate scheduler",
                                   set(state["lr_scheduler"]) != set(self.lr_scheduler.state_dict()),
                                   "scheduled by", "lr_scheduler", "schedule")
            # the saved state brings the scheduler's settings back too (--lr_scheduler#eta_min would be ignored)
            configured, saved_schedule = self.lr_scheduler.state_dict(), state["lr_scheduler"]
            moved = [(k, saved_schedule[k], configured[k]) for k in sorted(set(configured) & set(saved_schedule))
                     if not k.startswith("_") and k not in _SCHEDULE_PROGRESS
                     and isinstance(configured[k], (int, float, str, bool, list, tuple, Counter, type(None)))
                     and _plain(saved_schedule[k]) != _plain(configured[k])]
            if moved:
                listed = "; ".join(f"{k} {_plain(old)!r} there, {_plain(new)!r} here" for k, old, new in moved)
                fix = " ".join(f"--lr_scheduler#{k} {_cli_value(_plain(old))}" for k, old, _ in moved)
                raise ValueError(
                    f"{self.path} was written by a run with other learning-rate scheduler settings ({listed}): a resume "
                    f"continues the saved schedule, so the new values would be ignored. Resume with the original "
                    f"settings ({fix}), or start a new run in another --output_dir to train with the new ones."
                )
        changed = _optimizer_changes(self.optimizer.state_dict(), state["optimizer"], self.lr_scheduler is not None)
        if changed:
            # loading the optimizer's state brings its hyperparameters back: the values asked for would be ignored
            listed = "; ".join(f"{name} {old!r} there, {new!r} here" for name, old, new in changed)
            fix = " ".join(f"{name} {old}" for name, old, _ in changed if name.startswith("--"))
            raise ValueError(
                f"{self.path} was written by a run with other optimizer settings ({listed}): a resume continues the "
                f"saved optimizer, so the new values would be ignored. Resume with the original settings"
                f"{' (' + fix + ')' if fix else ''}, or start a new run in another --output_dir to train with the new "
                "ones."
            )
        strategy = self._strategy(engine)
        written_by = state.get("strategy_config")
        if strategy is not None and written_by is not None and str(written_by) != repr(strategy):
            # the strategy's state would load silently into another one and the run would mix two methods
            try:
                wiring = argument_flags("strategy_def")
            except (OSError, ValueError):  # a config file changed since the run started: the refusal still comes
                wiring = None
            fix = _strategy_fix(str(written_by), repr(strategy), wiring)
            raise ValueError(
                f"{self.path} was written by a run training with {written_by}, this run trains with {strategy!r}: "
                + (f"resume with {fix}" if fix else "resume with the original --strategy and its settings "
                   "(--gmd_subsets, --seed, the cggm_* and predict knobs)")
                + ", or start a new run in another --output_dir."
            )
        shown = rank if logged else -1  # -1: no rank logs (the check before the run: restore warns once)
        self._warn_unrecorded(state, strategy, shown)
        self._check_same_loss(state.get("loss_config"), shown)
        if rank == 0 and logged:
            for warning in warnings:  # once nothing refused the resume
                logger.warning(warning)
        return saved, strategy

    def _load(self, engine: Engine, state: Mapping[str, Any], saved: dict, strategy: Any, length: int) -> None:
        world, rank = process_group()
        net = _unwrap(self.network)
        net.load_state_dict(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        if strategy is not None and "strategy" in state:
            strategy.load_state_dict(state["strategy"])
        if self.validator is not None and "validator" in state:
            self.validator.state.best_metric = state["validator"]["best_metric"]
            self.validator.state.best_metric_epoch = state["validator"]["best_metric_epoch"]
        if self.key_metric_saver is not None and "key_metric_saver" in state:
            self.key_metric_saver.load_state_dict(state["key_metric_saver"])

        iteration = int(state["iteration"])
        length = length or int(state["epoch_length"])
        engine.state.iteration = iteration
        # ignite counts completed epochs and restarts a partial one at iteration % epoch_length
        engine.state.epoch = iteration // length if length else int(state["epoch"])
        loader = getattr(engine, "data_loader", None)
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, ResumableSampler) and loader is not None:
            sampler.resume(iteration, len(loader), int(loader.batch_size or 1))
            # rank 0 wrote its own sampler's seed; the other ranks' may differ from it (a seed per rank)
            if rank == 0 and state.get("sampler", {}).get("seed", sampler.seed) != sampler.seed:
                logger.warning("The sampler seed changed since %s was written: the data order differs.", self.path)
        elif iteration and rank == 0:
            logger.warning("The trainer's data loader has no ResumableSampler: after the resume the data order "
                           "differs from an uninterrupted run.")
        rng_states = list(state.get("rng") or [])
        if rng_states:
            if len(rng_states) != world and rank == 0:
                logger.warning("%s was written by %d process(es), this run has %d: random numbers and the data split "
                               "between ranks differ from an uninterrupted run.", self.path, len(rng_states), world)
            restore_rng_state(rng_states[rank if rank < len(rng_states) else 0])
        if rank == 0:
            # the one line of the log that says where the run resumed (TrainingProgressHandler's "Run:" line follows)
            done = iteration - engine.state.epoch * length if length else 0
            trained = ""
            if self.time_limit is not None:
                recorded = state.get("time_limit")
                # a checkpoint from before the time trained was recorded (brats_gmd before 0.5.0): not 0:00:00
                trained = (f", with {format_duration(float(recorded.get('elapsed_seconds', 0.0)))} trained before"
                           if isinstance(recorded, Mapping) else
                           ", the time trained before it unknown (the checkpoint was written by an earlier version)")
            logger.info("Resumed from %s at iteration %d (epoch %d, %d of its %d iterations done)%s.", self.path,
                        iteration, engine.state.epoch + 1, done, length, trained)
        self._saved_at = iteration  # the file holds this state: a stop right away need not write it again
        if self.time_limit is not None and "time_limit" in state:
            self.time_limit.load_state_dict(state["time_limit"], engine)

"""The gradient-strategy seam: one object decides how a training iteration produces gradients.

The trainer zeroes the gradients, calls :meth:`GradientStrategy.step` inside its autocast context
and steps the optimizer. A strategy only needs the subset-aware model protocol:

- ``per_modality(inputs, modality_mask) -> Tensor [B, M, ...]``: per-modality outputs;
- ``fuse(per_modality, modality_mask) -> Tensor``: fused prediction for any modality mask;
- ``shared_parameters()`` / ``modality_parameters()``: the trunk and the per-modality parts;
- ``modalities`` (names) and ``num_modalities``.

Both the BraTS DS U-Net and the sentiment DS transformer implement it, so every strategy serves
both branches unchanged.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

__all__ = ["StepResult", "GradientStrategy", "subset_loss", "random_submasks", "process_group"]


@dataclass
class StepResult:
    """What one strategy step reports back to the trainer.

    Attributes:
        loss: detached scalar, the loss of the prediction fused over the available modalities.
        pred: detached fused prediction over the available modalities.
        diagnostics: optional per-step diagnostics (GMD conflict statistics, CGGM balance terms): a dict
            of numbers and lists, written by :class:`app.engines.DiagnosticsHandler` to
            ``<output_dir>/<strategy>_diagnostics.jsonl`` (GMD: ``gmd_diagnostics.jsonl``) and TensorBoard;
            its ``strategy`` entry names the file, the strategy's ``name`` when it has none.
    """

    loss: torch.Tensor
    pred: torch.Tensor
    diagnostics: dict | None = field(default=None)


def subset_loss(
    model: Any,
    per_modality: torch.Tensor,
    mask: torch.Tensor,
    targets: torch.Tensor,
    loss_function: Callable,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Loss of the prediction fused over ``mask``, on the samples that have any modality in it.

    Args:
        model: a subset-aware network (its ``fuse(per_modality, mask)``).
        per_modality: the per-modality outputs ``[B, M, ...]``.
        mask: ``[B, M]`` modalities to fuse for each sample.
        targets: ``[B, ...]`` targets of the fused prediction.
        loss_function: loss of ``(prediction, targets)``; its mean is taken.
        valid: ``mask.any(dim=1)`` as a CPU tensor, when the caller has it; otherwise it is read
            from ``mask`` (a device sync on a GPU).

    Returns:
        ``(loss, prediction)`` over the samples that have a modality of ``mask``, or ``(None, None)``
        when none has.
    """
    if valid is None:
        valid = mask.any(dim=1).cpu()
    if not bool(valid.any()):
        return None, None
    # every row fused below has a modality of mask: fuse need not read the mask again
    if bool(valid.all()):
        pred = model.fuse(per_modality, mask, check=False)
        return loss_function(pred, targets).mean(), pred
    rows = torch.nonzero(valid).flatten()
    if per_modality.is_cuda:  # from pinned memory the copy does not wait for the queued GPU work
        rows = rows.pin_memory().to(per_modality.device, non_blocking=True)
    pred = model.fuse(per_modality[rows], mask[rows], check=False)
    return loss_function(pred, targets[rows]).mean(), pred


def process_group() -> tuple[int, int]:
    """World size and rank of the initialised ``torch.distributed`` group; ``(1, 0)`` outside one.

    Read from ``torch.distributed`` itself (by the strategies and the resumable checkpoint and sampler):
    ``ignite.distributed`` discovers a group it did not create with a collective that also initialises
    CUDA, which a training step should not run on the side (and which fails in a worker forked after CUDA
    was used).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def random_submasks(
    mask: torch.Tensor, generator: torch.Generator, rank: int | None = None, world_size: int | None = None
) -> torch.Tensor:
    """A uniformly random non-empty subset of each sample's available modalities.

    With several processes (``torch.distributed``, or ``rank``/``world_size`` given) every rank
    draws for the whole global batch from its copy of the shared generator and keeps its own rows,
    so ranks get independent subsets, the generators stay in step, and the draws equal those of one
    process on the concatenated batch (for equal per-rank batches).
    """
    if world_size is None:
        world_size, rank = process_group()
    rank = rank or 0
    batch, m = mask.shape
    draws = torch.rand(world_size * batch, dtype=torch.float64, generator=generator)[rank * batch : (rank + 1) * batch]
    out = torch.zeros_like(mask)
    cpu_mask = mask.cpu()
    for b in range(batch):
        avail = torch.nonzero(cpu_mask[b]).flatten()
        if avail.numel() == 0:
            continue
        n_subsets = 2 ** avail.numel() - 1
        code = 1 + min(int(draws[b] * n_subsets), n_subsets - 1)
        chosen = [int(avail[i]) for i in range(avail.numel()) if code >> i & 1]
        out[b, chosen] = True
    return out.to(mask.device)


class GradientStrategy:
    """Base class: computes the gradients of one iteration.

    Subclasses implement :meth:`step`. ``state_dict``/``load_state_dict`` carry the strategy's own
    random state so a resumed run continues identically.

    Args:
        seed: seed of the strategy's private random generator.
    """

    name = "base"
    #: the branches whose networks the strategy can train (``"segmentation"``, ``"sentiment"``), so that
    #: ``python -m app ablate`` refuses a strategy that its bundle's network lacks before anything trains
    branches: tuple[str, ...] = ("segmentation", "sentiment")
    #: constructor arguments left out of the settings a resume compares (``repr``): they change what is
    #: recorded or how the work is batched, not the gradients, so a resumed run may change them
    unrecorded: tuple[str, ...] = ("diagnostics_interval",)

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def check_model(self, model: Any) -> None:
        """Raise a ``ValueError`` naming the fix when this strategy cannot train ``model``.

        :class:`app.engines.SubsetTrainer` calls it when it is built, so a mismatch stops the run
        before the first step. Every network is accepted here.
        """

    def check_run_length(self, iterations: int) -> None:
        """Log a warning about a setting of this strategy that a run of ``iterations`` iterations leaves
        without effect.

        :class:`app.engines.SubsetTrainer` calls it when a run starts (or resumes), with the iterations its
        ``max_epochs`` and ``epoch_length`` make in all. Nothing depends on the run's length here.
        """

    def step(
        self,
        model: Any,
        inputs: Any,
        modality_mask: torch.Tensor,
        targets: torch.Tensor,
        loss_function: Callable,
        iteration: int = 0,
    ) -> StepResult:
        """Compute this iteration's gradients into the parameters' ``.grad`` (the trainer has zeroed them).

        Args:
            model: the subset-aware network (see the module docstring).
            inputs: the batch's inputs, as ``model.per_modality`` takes them.
            modality_mask: ``[B, M]`` bool, the modalities each sample has.
            targets: the batch's targets.
            loss_function: loss of ``(prediction, targets)``.
            iteration: the trainer's iteration count (1 for the first), for schedules and diagnostics.

        Returns:
            The detached loss and prediction fused over each sample's available modalities, with
            optional diagnostics.

        Raises:
            NotImplementedError: always; subclasses implement it.
        """
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The strategy's own state for a resumable checkpoint: its random generator, plus what subclasses add."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the state of :meth:`state_dict`, so that a resumed run continues identically."""
        self.generator.set_state(state["generator"])

    def __repr__(self) -> str:
        """The class and its settings: every constructor argument kept as an attribute of the same name.

        The constructors of the class and of its bases are read (a subclass taking ``**kwargs`` for its
        base's arguments keeps them), leaving out :attr:`unrecorded`. A resume compares this text with the
        one the checkpoint recorded (``strategy_config``), so a strategy of one's own, or a variant of a
        built-in one, given to the bundle as ``strategy_def: {_target_: my_module.MyStrategy, ...}``, has
        its settings checked without writing a ``__repr__``.
        """
        names: list[str] = []
        for cls in type(self).__mro__:
            init = cls.__dict__.get("__init__")
            if init is None or cls is object:
                continue
            for p in list(inspect.signature(init).parameters.values())[1:]:
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in names:
                    names.append(p.name)
        settings = [f"{n}={getattr(self, n)!r}" for n in names if n not in self.unrecorded and hasattr(self, n)]
        return f"{type(self).__name__}({', '.join(settings)})"

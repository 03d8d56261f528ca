"""Training and evaluation engines that delegate the gradient computation to a strategy.

:class:`SubsetTrainer` is a MONAI ``SupervisedTrainer`` whose iteration hands loss and backward to
a :class:`~app.strategies.GradientStrategy`; :class:`SubsetEvaluator` predicts every modality
subset of each case from one sliding-window pass of the per-modality outputs.
"""

from __future__ import annotations

import copy
import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.inferers import SlidingWindowInferer
from monai.utils import CommonKeys as Keys

from app.atomic import WriteError
from app.metrics.dice import dice_from_logits, logit_masks
from app.metrics.hausdorff import HD95Scorer, affine_spacing, check_hd95_workers
from app.engines.distributed import mean_over_ranks
from app.engines.utils import amp_dtype, fit_roi
from app.flags import parse_bool
from app.host_memory import keep_freed_host_memory, release_kept_host_memory
from app.networks.ds_unet import masked_mean
from app.strategies.base import GradientStrategy, process_group
from app.subsets import subset_masks

__all__ = ["NonFiniteLossError", "SubsetTrainer", "SubsetEvaluator", "to_device", "autocast_context", "subset_fusions", "subset_sample_masks"]


def to_device(data: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move a tensor, or a dict/list of tensors, to ``device``."""
    if isinstance(data, torch.Tensor):
        return data.to(device, non_blocking=non_blocking)
    if isinstance(data, dict):
        return {k: to_device(v, device, non_blocking) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(to_device(v, device, non_blocking) for v in data)
    return data


def subset_sample_masks(mask: torch.Tensor) -> tuple[torch.Tensor, Iterator[torch.Tensor]]:
    """Each sample's modality mask under every subset.

    Returns ``valid [B, S]`` (sample ``b`` has every modality of subset ``j``, in
    :func:`app.subsets.all_subsets` order) and an iterator over the ``S`` subsets of ``[B, M]``
    masks: ``mask & subset_j`` where the sample has the whole subset, else the sample's own ``mask``
    (that entry must be left out of subset ``j``'s metrics).
    """
    subsets = subset_masks(mask.shape[1], device=mask.device)
    valid = (mask[:, None, :] | ~subsets[None]).all(dim=2)
    return valid, (torch.where(valid[:, j : j + 1], mask & subsets[j], mask) for j in range(subsets.shape[0]))


def subset_fusions(
    fuse: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], per_modality: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, Iterator[torch.Tensor]]:
    """Every subset's fused prediction from one set of per-modality outputs.

    Returns ``valid [B, S]`` and an iterator over the ``S`` subsets of ``fuse(per_modality,
    mask_j)``, with the masks of :func:`subset_sample_masks`. Where a sample lacks part of subset
    ``j``, its entry is the fusion of all it has and must be left out of that subset's metrics.
    """
    valid, masks = subset_sample_masks(mask)
    return valid, (fuse(per_modality, sub) for sub in masks)


def autocast_context(device: torch.device, enabled: bool, training: bool = False) -> AbstractContextManager:
    """Autocast to :func:`~app.engines.utils.amp_dtype` when enabled: bf16 on GPUs that compute it
    natively (bf16 needs no gradient scaler); a no-op on CPU, and in training on older GPUs."""
    dtype = amp_dtype(device, enabled, training)
    return nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)


class _NotAResumption(logging.Filter):
    """Drop ignite's ``Engine run resuming from iteration ...`` record of a MONAI workflow's run.

    MONAI puts ``max_epochs`` into the engine's state when the workflow is built, so ignite takes every run of
    it, the first included, for the resumption of an earlier one: a fresh training logged "Engine run resuming
    from iteration 0, epoch 0 until 100 epochs", which reads as if a checkpoint were continued, and each
    validation "resuming from iteration 0, epoch E-1". A resumed training is restored when the run has started,
    after that record (which still says iteration 0), and says so in its own lines ("Resumed from ... at
    iteration N"), so the record is never true of these engines.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("Engine run resuming from iteration"))


_NOT_A_RESUMPTION = _NotAResumption()


class _FirstRankInfo(logging.Filter):
    """Keep an engine's informational records to rank 0 of a multi-process run.

    The multi-process configs leave the log handlers to rank 0, but ignite's own records ("Epoch[1] Complete",
    "Engine run finished") and MONAI's "Got new best metric" come from the engines themselves, so every rank
    logged them: with 8 GPUs each line 8 times, none naming its rank. The ranks run the same steps in step (the
    gradients and the validation scores are shared), so rank 0's lines say it for all; warnings and errors of
    every rank stay.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or process_group()[1] == 0


_FIRST_RANK_INFO = _FirstRankInfo()


def _quiet_engine_log(engine: Any) -> None:
    """The filters of the records that would be untrue or repeated (one of each per logger, however many engines
    share it)."""
    engine.logger.addFilter(_NOT_A_RESUMPTION)
    engine.logger.addFilter(_FIRST_RANK_INFO)


class NonFiniteLossError(ValueError):
    """The training loss or its gradient became NaN or infinite; raised before the optimizer step."""


class SubsetTrainer(SupervisedTrainer):
    """Supervised trainer whose gradients come from a gradient strategy.

    Args:
        strategy: the :class:`GradientStrategy` that computes the gradients of each iteration.
        image_key, label_key, mask_key: batch keys of the inputs, targets and modality masks.
        amp: bf16 autocast on CUDA.
        grad_sync: optional ``grad_sync(network, strategy)`` run after the strategy's backward and
            before ``BACKWARD_COMPLETED``, e.g. :class:`app.engines.GradientSync` to average the
            gradients over the ranks of a multi-process run.
        kwargs: everything else goes to ``SupervisedTrainer``.
    """

    def __init__(
        self,
        *args: Any,
        strategy: GradientStrategy,
        image_key: str = Keys.IMAGE,
        label_key: str = Keys.LABEL,
        mask_key: str = "modality_mask",
        amp: bool = False,
        grad_sync: Callable[[torch.nn.Module, GradientStrategy], None] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("decollate", False)
        super().__init__(*args, amp=False, **kwargs)
        _quiet_engine_log(self)
        self.strategy = strategy
        strategy.check_model(self.network)  # a network the strategy cannot train fails here, before the first step
        # the run's length is known once it starts (epoch_length from the data loader when not set)
        self.add_event_handler(Events.STARTED, self._check_run_length)
        self.use_amp = parse_bool(amp, "amp")
        self.grad_sync = grad_sync
        self.keys = (image_key, label_key, mask_key)

    def run(self) -> None:
        """Train; an output that cannot be written (:class:`app.atomic.WriteError`: a full disk, a folder made
        read-only) stops the run with its message, which names the resumable checkpoint that is kept, if any
        (:meth:`app.engines.ResumableCheckpoint.resume_note`).

        On CPU, the memory each step frees is kept for the next (:func:`app.host_memory.keep_freed_host_memory`):
        the kernel no longer maps and zeroes it again every step. The results are the same.
        """
        if self.state.device is not None and torch.device(self.state.device).type == "cpu":
            keep_freed_host_memory()
        try:
            super().run()
        except WriteError as err:
            checkpoint = getattr(self, "resumable_checkpoint", None)
            note = checkpoint.resume_note() if checkpoint is not None else ""
            if note:
                err.args = (f"{err}{note}",)  # the same error, raised where the write failed: one line still
            raise

    def _check_run_length(self, engine: SubsetTrainer) -> None:
        if engine.state.max_epochs and engine.state.epoch_length:
            self.strategy.check_run_length(int(engine.state.max_epochs) * int(engine.state.epoch_length))

    @staticmethod
    def check_finite(engine: SubsetTrainer, loss: torch.Tensor) -> None:
        """Stop training before a step that would write NaN or inf into the weights.

        One such step spoils every later one (and AdamW's moments with it), while the run would go on
        for hours and save a model that predicts nothing. Checked after the gradients are synchronised,
        so every rank of a multi-process run sees the same values and stops together.

        Raises:
            NonFiniteLossError: the loss or a gradient is NaN or infinite.
        """
        grads = [p.grad for p in engine.network.parameters() if p.grad is not None]
        finite = torch.isfinite(loss.detach()).all()
        if grads:
            finite = finite & torch.stack([torch.isfinite(g).all() for g in grads]).all()
        if bool(finite):
            return
        what = "training loss" if not bool(torch.isfinite(loss.detach()).all()) else "gradient of the training loss"
        # --amp false is a fix only where the step ran in reduced precision (CUDA); on CPU it changes nothing
        autocast = amp_dtype(loss.device, bool(getattr(engine, "use_amp", False)), training=True) is not None
        # sentiment features hold no NaN by then: the loader reads NaN and infinite values as 0, with a warning
        images = getattr(engine.network, "task", "segmentation") == "segmentation"
        raise NonFiniteLossError(
            f"The {what} is not finite (loss {float(loss.detach().float().mean())}) at epoch "
            f"{engine.state.epoch}, iteration {engine.state.iteration}: training stopped before this step, "
            "so no NaN reached the weights or the saved models. Start again "
            f"with a lower --learning_rate{' (or --amp false)' if autocast else ''}"
            + (", and check the training images for NaN or infinite voxels." if images else ".")
        )

    def _iteration(self, engine: SubsetTrainer, batchdata: dict[str, Any]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        image_key, label_key, mask_key = self.keys
        device = engine.state.device
        inputs = to_device(batchdata[image_key], device, engine.non_blocking)
        targets = to_device(batchdata[label_key], device, engine.non_blocking)
        mask = to_device(batchdata[mask_key], device, engine.non_blocking).bool()
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with autocast_context(device, self.use_amp, training=True):
            result = self.strategy.step(
                engine.network, inputs, mask, targets, engine.loss_function, iteration=engine.state.iteration
            )
        loss = result.loss
        if self.grad_sync is not None:
            self.grad_sync(engine.network, self.strategy)
            loss = mean_over_ranks(loss)
        self.check_finite(engine, loss)
        engine.state.output = {
            Keys.IMAGE: inputs, Keys.LABEL: targets, Keys.PRED: result.pred, Keys.LOSS: loss,
            "diagnostics": result.diagnostics,
        }
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class SubsetEvaluator(SupervisedEvaluator):
    """Evaluates every modality subset of each case from one pass of the per-modality outputs.

    The network must offer ``per_modality(image, mask)`` (``[B, M, C, ...]``); the inferer (e.g. a
    Gaussian ``SlidingWindowInferer``) runs on it once, and each subset's prediction is a masked
    mean of those outputs. A case is scored on a subset only if it has every sequence of that
    subset. The output holds ``subset_dice [B, S, C]`` (hard Dice, sigmoid > 0.5), ``subset_valid
    [B, S]`` and ``case`` ids, so no full-resolution subset volumes are kept; with ``hd95`` also
    ``subset_hd95 [B, S, C]``, the HD95 in mm of the same masks on the evaluated grid
    (:func:`app.metrics.hausdorff.hd95`), its voxel size read from the label's affine.

    Args:
        image_key, label_key, mask_key: batch keys of the inputs, labels and modality masks.
        case_key: batch key of the case identifiers.
        amp: bf16 autocast on CUDA.
        hd95: also compute each region's HD95 for every subset (a surface-distance search per case,
            subset and region: CPU time, so off by default).
        hd95_workers: threads searching a case's HD95 distances at once (:class:`app.metrics.HD95Scorer`:
            the 45 of a case are independent); None: ``DEFAULT_HD95_WORKERS``, at most the usable CPU cores.
            The values do not depend on it.
        select_best: keep the best key metric over the runs and its epoch (a training's validation, which keeps
            the best model as ``model.pt``). False where one checkpoint is scored (``evaluate.yaml``): nothing is
            selected there, so MONAI's "Got new best metric" and the ``StatsHandler``'s "Key metric: ... best
            value ... at epoch" lines would tell of a selection that does not happen.
        kwargs: everything else goes to ``SupervisedEvaluator``.
    """

    def __init__(
        self,
        *args: Any,
        image_key: str = Keys.IMAGE,
        label_key: str = Keys.LABEL,
        mask_key: str = "modality_mask",
        case_key: str = "case",
        amp: bool = False,
        hd95: bool = False,
        hd95_workers: int | None = None,
        select_best: bool = True,
        **kwargs: Any,
    ) -> None:
        workers = check_hd95_workers(hd95_workers)
        select_best = parse_bool(select_best, "select_best")
        kwargs.setdefault("decollate", False)
        super().__init__(*args, amp=False, **kwargs)
        _quiet_engine_log(self)
        if not select_best:
            # MONAI compares the key metric with the best so far (and logs each new best) only when the state names
            # one; the metric itself is still computed under its name and read by the report
            self.state.key_metric_name = None
        self.select_best = select_best
        self.use_amp = parse_bool(amp, "amp")
        self.hd95 = parse_bool(hd95, "hd95")
        self.hd95_workers = workers
        self.keys = (image_key, label_key, mask_key, case_key)
        # the last batch (whole volumes, on the GPU in training) would otherwise be held until the next validation
        self.add_event_handler(Events.COMPLETED, SubsetEvaluator._release_batch)
        # a CPU training's heap is kept at its steps' high-water mark (SubsetTrainer.run): a validation's larger
        # blocks are mapped beside it, so give it back first (nothing happens in a process that did not keep it)
        self.add_event_handler(Events.STARTED, lambda engine: release_kept_host_memory())

    @staticmethod
    def _release_batch(engine: SubsetEvaluator) -> None:
        engine.state.batch = None

    def per_modality_outputs(self, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the inferer over the per-modality outputs; returns ``[B, M, C, ...]`` in float32.

        Each case goes through the inferer on its own: a sliding-window inferer batches
        ``sw_batch_size`` windows of one case into a network call, so the case's modality mask is
        repeated for every window of that call.
        """
        network = self.network
        m, c = network.num_modalities, network.out_channels
        inferer = self.inferer
        if isinstance(inferer, SlidingWindowInferer):
            roi = fit_roi(inferer.roi_size, inputs.shape[2:], network.divisor)
            if roi != tuple(inferer.roi_size):
                inferer = copy.copy(inferer)
                inferer.roi_size = roi
        outputs = []
        with autocast_context(self.state.device, self.use_amp):
            for b in range(inputs.shape[0]):
                case_mask = mask[b : b + 1]

                def _flat(x: torch.Tensor, case_mask: torch.Tensor = case_mask) -> torch.Tensor:
                    return network.per_modality(x, case_mask.expand(x.shape[0], -1)).flatten(1, 2)

                outputs.append(inferer(inputs[b : b + 1], _flat).float())
        flat = torch.cat(outputs)
        return flat.reshape(flat.shape[0], m, c, *flat.shape[2:])

    @staticmethod
    def missed_voxels(batchdata: Mapping[str, Any], targets: torch.Tensor) -> torch.Tensor | None:
        """Reference voxels per case and region ``[B, C]`` that the foreground crop removed, from the
        ``label_voxels`` counts :class:`app.data.RegionVoxelsd` took before it (None without them).

        The crop keeps the box where some sequence is above 0; tumour labelled outside it is tumour the
        prediction missed (inference labels nothing there), not tumour to leave out of the Dice.
        """
        counts = batchdata.get("label_voxels") if isinstance(batchdata, Mapping) else None
        if counts is None:
            return None
        counts = torch.as_tensor(counts, dtype=torch.int64).to(targets.device).reshape(targets.shape[:2])
        kept = (targets != 0).flatten(2).sum(dim=2, dtype=torch.int64)
        return (counts - kept).clamp_min(0)

    @staticmethod
    def voxel_spacing(targets: torch.Tensor, cases: Sequence[str]) -> torch.Tensor:
        """Voxel size in mm of each case's evaluated grid, ``[B, 3]``, from the label's affine (after the
        reorientation and crop of the preprocessing: the grid the masks are on).

        Raises:
            ValueError: the label carries no affine (a plain tensor): HD95 in voxels would pass for mm.
        """
        affine = getattr(targets, "affine", None)
        if affine is None:
            raise ValueError(f"Case {cases[0]}: the label has no affine, so HD95 cannot be measured in mm: load the "
                             "cases with the bundle's preprocessing (LoadCased keeps each file's header).")
        spacing = affine_spacing(affine)
        return spacing.expand(targets.shape[0], 3) if spacing.ndim == 1 else spacing  # one affine for the batch

    def unpack(self, batchdata: dict[str, Any] | None) -> tuple[Any, torch.Tensor, torch.Tensor, list[str]]:
        """``(inputs, targets, modality_mask, case_ids)`` of a batch, on the engine's device."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        image_key, label_key, mask_key, case_key = self.keys
        device = self.state.device
        inputs = to_device(batchdata[image_key], device, self.non_blocking)
        targets = to_device(batchdata[label_key], device, self.non_blocking)
        mask = to_device(batchdata[mask_key], device, self.non_blocking).bool()
        cases = list(batchdata.get(case_key, [str(i) for i in range(mask.shape[0])]))
        return inputs, targets, mask, cases

    @staticmethod
    def check_finite_outputs(per_mod: torch.Tensor, mask: torch.Tensor, cases: Sequence[str]) -> None:
        """Refuse to score NaN or infinite outputs of the sequences a case has.

        A NaN logit thresholds to "no tumour", so it would be scored as an empty prediction (Dice 1
        where the reference region is empty too) instead of being seen, as inference refuses to write
        such a label map.

        Raises:
            ValueError: names the first case with non-finite outputs and how many it has.
        """
        bad = (~torch.isfinite(per_mod)).flatten(2).sum(dim=2) * mask  # [B, M]: present sequences only
        if not bool(bad.any()):
            return
        b = int(torch.nonzero(bad.sum(dim=1))[0, 0])
        raise ValueError(
            f"Case {cases[b]}: the network gave {int(bad[b].sum())} NaN or infinite value(s), so it cannot be "
            "scored (a NaN logit would count as no tumour): check that the model file is intact and that its "
            "training did not diverge, and that the case's scans have plausible intensities."
        )

    def _iteration(self, engine: SubsetEvaluator, batchdata: dict[str, Any]) -> dict:
        inputs, targets, mask, cases = engine.unpack(batchdata)
        with engine.mode(engine.network), torch.no_grad():
            per_mod = self.per_modality_outputs(inputs, mask)
            self.check_finite_outputs(per_mod, mask, cases)
            valid, fused = subset_fusions(masked_mean, per_mod, mask)
            missed = self.missed_voxels(batchdata, targets)
            # every subset's masks against the same reference: searched together, repeats once, on a few threads
            scorer = HD95Scorer(targets, self.voxel_spacing(targets, cases), missed=missed,
                                workers=self.hd95_workers) if self.hd95 else None
            dice, slots = [], []
            for j, logits in enumerate(fused):
                dice.append(dice_from_logits(logits, targets, missed=missed))
                if scorer is not None:
                    # a subset no case of the batch has is left out of the report: no distances to search
                    slots.append(scorer.add(logit_masks(logits)) if bool(valid[:, j].any()) else None)
            hd95 = []
            if scorer is not None:
                values = scorer.compute()
                hd95 = [torch.zeros_like(d) if s is None else values[s] for d, s in zip(dice, slots)]
            pred = masked_mean(per_mod, mask)
        engine.state.output = {
            Keys.IMAGE: inputs, Keys.LABEL: targets, Keys.PRED: pred,
            "subset_dice": torch.stack(dice, dim=1), "subset_valid": valid,
            "case": cases,
        }
        if hd95:
            engine.state.output["subset_hd95"] = torch.stack(hd95, dim=1)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

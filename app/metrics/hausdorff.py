"""95th-percentile Hausdorff distance (HD95, millimetres) of binary masks, with the BraTS empty-mask rule.

BraTS tables report HD95 beside Dice for WT, TC and ET. The distances come from MONAI's
``compute_hausdorff_distance(percentile=95)``: the larger of the two directed 95th percentiles of the
distances between the masks' surface voxels, in the units of ``spacing`` (one size per axis, so an
anisotropic grid is measured as it is). In monai 1.6.1 that function returns NaN, with a warning, when
either mask is empty (``inf`` without a percentile), and ``HausdorffDistanceMetric``'s mean leaves NaN
out: a case whose prediction missed the whole region would silently not count. Empty masks are never
passed to it here; they follow the BraTS challenge's rule instead:

- both masks empty: 0 mm (nothing to miss, nothing predicted);
- exactly one empty: :data:`BRATS_HD95_PENALTY`, 373.13 mm, the diagonal of the BraTS image grid
  (240 x 240 x 155 voxels at 1 mm), which is what the challenge's evaluation assigns, so that the numbers
  compare with published BraTS tables.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from app.metrics.dice import logit_masks

__all__ = [
    "BRATS_HD95_PENALTY", "DEFAULT_HD95_WORKERS", "HD95_PERCENTILE", "HD95Scorer", "affine_spacing", "check_hd95",
    "check_hd95_workers", "hd95", "hd95_from_logits",
]

#: HD95 (mm) of a region that is empty in exactly one of prediction and reference: the diagonal of the
#: BraTS grid, sqrt(240^2 + 240^2 + 155^2) = 373.13 mm at 1 mm, as the BraTS challenge scores it.
BRATS_HD95_PENALTY: float = 373.13
#: The percentile of the surface distances that HD95 reports.
HD95_PERCENTILE: float = 95.0
#: Threads searching surface distances at once by default (``hd95_workers``), fewer where fewer CPU cores are
#: usable: the searches of a case are independent, and most of their time is spent in scipy with the GIL
#: released, while the GPU waits for them.
DEFAULT_HD95_WORKERS: int = 4


def check_hd95(enabled: bool | str, workers: int | str | None = None) -> bool:
    """Whether HD95 is on (``--hd95``), refusing it up front where it cannot be computed.

    MONAI finds the masks' surfaces and their distances with scipy, which it imports only when a distance
    is computed: without it the evaluation stopped at the first case, after every case had been read.

    Args:
        enabled: ``--hd95``.
        workers: ``--hd95_workers``, checked too (None: not given), so that a bad value stops the run
            before any case is read rather than when the evaluator is built, after all of them were.

    Raises:
        ValueError: ``enabled`` is not true or false, or it is true and scipy is not installed; ``workers``
            is not a whole number >= 1 (:func:`check_hd95_workers`).
    """
    from app.flags import parse_bool

    on = parse_bool(enabled, "hd95")
    if workers is not None:
        check_hd95_workers(workers)
    if on:
        import importlib.util

        if importlib.util.find_spec("scipy") is None:
            raise ValueError("--hd95 true needs scipy (MONAI's surface distances use it): pip install scipy, or "
                             "install this package with its hd95 extra (pip install '.[hd95]'); or leave --hd95 false.")
    return on


def check_hd95_workers(workers: int | str | None) -> int:
    """The threads searching HD95 distances at once (``--hd95_workers``): a whole number >= 1; None is
    :data:`DEFAULT_HD95_WORKERS`, capped at the CPU cores this process may use.

    Raises:
        ValueError: anything else, naming the setting and an example.
    """
    if workers is None:
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(DEFAULT_HD95_WORKERS, usable))
    try:
        ok = not isinstance(workers, (bool, np.bool_)) and float(workers) == int(workers) and int(workers) >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"--hd95_workers {workers!r} must be a whole number >= 1 (threads searching HD95 distances "
                         "at once; the values do not depend on it), e.g. --hd95_workers 4.")
    return int(workers)


def affine_spacing(affine: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Voxel size along each array axis of a voxel-to-world ``affine`` ``[..., 4, 4]``, as ``float64 [..., 3]``.

    The size along axis ``i`` is the length of the affine's column ``i`` (its rotation and any axis flip
    do not change it), so an anisotropic grid (1 x 1 x 3 mm) keeps a size per axis.
    """
    a = torch.as_tensor(np.asarray(affine) if not isinstance(affine, torch.Tensor) else affine.as_subclass(torch.Tensor))
    if a.shape[-2:] != (4, 4):
        raise ValueError(f"affine must be [..., 4, 4], got {tuple(a.shape)}.")
    return torch.linalg.vector_norm(a[..., :3, :3].to(torch.float64), dim=-2)


def _spacing_rows(spacing: torch.Tensor | np.ndarray | Sequence, batch: int, ndim: int) -> list[list[float]]:
    """``spacing`` as one list of ``ndim`` positive floats per case."""
    s = np.asarray(spacing.detach().cpu() if isinstance(spacing, torch.Tensor) else spacing, dtype=np.float64)
    if s.ndim == 1:
        s = np.broadcast_to(s, (batch, s.shape[0]))
    if s.shape != (batch, ndim):
        raise ValueError(f"spacing must be [{ndim}] or [B, {ndim}] = [{batch}, {ndim}], got {tuple(s.shape)}.")
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise ValueError(f"spacing must be positive and finite (mm per voxel), got {s.tolist()}.")
    return s.tolist()


def hd95(
    pred: torch.Tensor,
    target: torch.Tensor,
    spacing: torch.Tensor | np.ndarray | Sequence,
    empty_penalty: float = BRATS_HD95_PENALTY,
    missed: torch.Tensor | None = None,
    workers: int = 1,
) -> torch.Tensor:
    """HD95 in mm per case and per channel of binary masks, with the BraTS empty-mask rule.

    Args:
        pred: binary prediction ``[B, C, *spatial]`` (any non-zero value is foreground).
        target: binary reference of the same shape.
        spacing: voxel size per spatial axis in mm, ``[ndim]`` for every case or ``[B, ndim]`` (e.g.
            :func:`affine_spacing` of the evaluated grid's affine).
        empty_penalty: the value (mm) when exactly one of the masks is empty.
        missed: optional reference voxel counts ``[B, C]`` outside the arrays (cropped away with the
            background, see :func:`app.metrics.dice.hard_dice`): where they are non-zero the reference is
            not empty, so an empty prediction, or a reference left empty by the crop, scores
            ``empty_penalty``; where both masks hold voxels inside the arrays, the distance is measured
            on those (the voxels outside cannot be located).
        workers: threads searching the distances (see :class:`HD95Scorer`); the values do not depend on it.

    Returns:
        ``float64`` tensor ``[B, C]`` on the inputs' device, every value finite and ``>= 0``.

    Raises:
        ValueError: if the shapes differ, there is no spatial dimension, or ``spacing``/``missed`` do not fit.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}.")
    scorer = HD95Scorer(target, spacing, empty_penalty, missed, workers)
    scorer.add(pred)
    return scorer.compute()[0]


def _box(mask: np.ndarray) -> tuple[tuple[int, int], ...] | None:
    """The bounding box ``((start, stop), ...)`` of a boolean array's True voxels, None where it has none."""
    box = []
    for axis in range(mask.ndim):
        line = mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis))
        where = np.flatnonzero(line)
        if where.size == 0:
            return None
        box.append((int(where[0]), int(where[-1]) + 1))
    return tuple(box)


#: One surface search: the grid's voxel size, the cut masks' shape and the two masks packed 8 voxels a byte (the
#: key that finds a repeat, and what is kept until the searches run: 1/8 of the cut masks' size).
_Search = tuple[tuple[float, ...], tuple[int, ...], bytes, bytes]


def _surface_hd95(search: _Search) -> float:
    """MONAI's HD95 of one pair of non-empty masks cut to their union's box, on a grid of ``spacing`` mm (see
    :class:`HD95Scorer` for why the cut changes no value)."""
    # imported here: the strategies and the ablation runner import app.metrics and must not load MONAI to list names
    from monai.metrics import compute_hausdorff_distance

    spacing, shape, pred, target = search
    count = math.prod(shape)
    masks = [torch.from_numpy(np.unpackbits(np.frombuffer(m, dtype=np.uint8), count=count).astype(bool).reshape(shape))
             for m in (pred, target)]
    value = compute_hausdorff_distance(masks[0][None, None], masks[1][None, None], include_background=True,
                                       percentile=HD95_PERCENTILE, spacing=list(spacing))
    return float(value.reshape(-1)[0])


class HD95Scorer:
    """The HD95 of several predictions (one per sequence subset) against one reference, computed together.

    The evaluation scores 15 subsets x 3 regions per case. Searching the distances themselves is the small part
    of each HD95: MONAI's ``compute_hausdorff_distance`` first converts the whole volume to float and finds the
    masks' bounding box in it (about 85% of its time on a 240 x 240 x 155 case), then searches the surfaces
    inside that box. Here each pair of masks reaches MONAI already cut to their union's box, the reference's
    boxes found once per case instead of once per subset; a pair identical to one already added (two subsets
    with the same thresholded mask) is searched once; the pairs wait for :meth:`compute` packed 8 voxels a byte;
    and the distinct searches run on ``workers`` threads (scipy's KD-tree and erosion release the GIL), their
    values put back in the order the pairs were added.

    None of this changes a value, to the last bit: MONAI crops the masks to their union's box with a margin
    of one voxel (``CropForeground(margin=1, allow_smaller=False)``: background padding where the margin
    leaves the array) and measures everything in that cropped frame. Every voxel outside the union's box is
    background in both masks, so the whole volume and the box give MONAI the same cropped arrays, and so the
    same surface voxels at the same coordinates (the tests compare both, on real cases and phantoms).

    Args:
        target: binary reference ``[B, C, *spatial]`` (any non-zero value is foreground).
        spacing: voxel size per spatial axis in mm, ``[ndim]`` for every case or ``[B, ndim]``.
        empty_penalty: the value (mm) when exactly one of the masks is empty.
        missed: optional reference voxel counts ``[B, C]`` outside the arrays, as in :func:`hd95`.
        workers: threads searching distances at once (1: in the calling thread); see :func:`check_hd95`.

    Raises:
        ValueError: no spatial dimension, or ``spacing``/``missed``/``empty_penalty``/``workers`` do not fit.
    """

    def __init__(
        self,
        target: torch.Tensor,
        spacing: torch.Tensor | np.ndarray | Sequence,
        empty_penalty: float = BRATS_HD95_PENALTY,
        missed: torch.Tensor | None = None,
        workers: int = 1,
    ) -> None:
        if target.ndim < 3:
            raise ValueError(f"Expected [B, C, *spatial] tensors, got shape {tuple(target.shape)}.")
        if not (math.isfinite(empty_penalty) and empty_penalty >= 0):
            raise ValueError(f"empty_penalty must be a finite distance >= 0 (mm), got {empty_penalty}.")
        self.workers = check_hd95_workers(workers)
        self.shape = tuple(target.shape)
        batch, channels = self.shape[:2]
        self.spacing = [tuple(row) for row in _spacing_rows(spacing, batch, target.ndim - 2)]
        self.empty_penalty = float(empty_penalty)
        # MONAI's CPU path (a KD-tree over the surface voxels) needs neither cuCIM nor the volume on the GPU
        self._target = target.detach().bool().cpu().numpy()
        self._target_box = [[_box(self._target[b, c]) for c in range(channels)] for b in range(batch)]
        self._ref_elsewhere = np.zeros((batch, channels), dtype=bool)
        if missed is not None:
            missed = torch.as_tensor(missed).cpu()
            if tuple(missed.shape) != (batch, channels):
                raise ValueError(f"missed must hold one count per case and channel, [B, C] = {(batch, channels)}, "
                                 f"got {tuple(missed.shape)}.")
            self._ref_elsewhere = (missed > 0).numpy()
        # per added prediction: its device and one entry per case and channel, a value or the index of a search
        self._added: list[tuple[torch.device, list[list[float | int]]]] = []
        self._jobs: list[_Search] = []
        self._job_index: dict[_Search, int] = {}

    def add(self, pred: torch.Tensor) -> int:
        """Add a binary prediction ``[B, C, *spatial]`` of the reference's shape; returns its position in
        :meth:`compute`'s list.

        Raises:
            ValueError: ``pred`` is not shaped as the reference.
        """
        if tuple(pred.shape) != self.shape:
            raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {self.shape}.")
        p = pred.detach().bool().cpu().numpy()
        entries: list[list[float | int]] = []
        for b in range(self.shape[0]):
            row: list[float | int] = []
            for c in range(self.shape[1]):
                p_box, t_box = _box(p[b, c]), self._target_box[b][c]
                if p_box is None or t_box is None:
                    both_empty = p_box is None and t_box is None and not self._ref_elsewhere[b, c]
                    row.append(0.0 if both_empty else self.empty_penalty)
                    continue
                # the union's box: every voxel outside it is background in both masks, so MONAI crops this
                # and the whole volume to the same voxels (see the class docstring)
                crop = tuple(slice(min(pb[0], tb[0]), max(pb[1], tb[1])) for pb, tb in zip(p_box, t_box))
                pc, tc = p[(b, c, *crop)], self._target[(b, c, *crop)]
                # the exact masks and grid, not a hash of them: equal keys are the same search
                key = (self.spacing[b], pc.shape, np.packbits(pc).tobytes(), np.packbits(tc).tobytes())
                index = self._job_index.get(key)
                if index is None:
                    index = self._job_index[key] = len(self._jobs)
                    self._jobs.append(key)
                row.append(index)
            entries.append(row)
        self._added.append((pred.device, entries))
        return len(self._added) - 1

    @property
    def searches(self) -> int:
        """The distinct surface searches the predictions added so far need (repeats and empty masks not counted)."""
        return len(self._jobs)

    def compute(self) -> list[torch.Tensor]:
        """The HD95 ``float64 [B, C]`` of each added prediction, in the order added, each on its device.

        Raises:
            ValueError: a distance came out non-finite (never expected: empty masks do not reach MONAI).
        """
        with warnings.catch_warnings():
            # monai 1.6.1 passes its own deprecated get_mask_edges argument: a FutureWarning per run that
            # names nothing the user set. Filters are process-wide in this Python, so this one, set here in
            # the calling thread for as long as the searches run, also covers the pool's threads
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
            if self.workers == 1 or len(self._jobs) < 2:
                values = [_surface_hd95(job) for job in self._jobs]
            else:
                with ThreadPoolExecutor(max_workers=min(self.workers, len(self._jobs)),
                                        thread_name_prefix="hd95") as pool:
                    values = list(pool.map(_surface_hd95, self._jobs))  # map keeps the jobs' order
        results = []
        for device, entries in self._added:
            out = torch.tensor([[values[e] if isinstance(e, int) else e for e in row] for row in entries],
                               dtype=torch.float64)
            if not bool(torch.isfinite(out).all()):  # MONAI's NaN/inf for empty masks must never reach a mean
                raise ValueError(f"HD95 gave a non-finite value {out.tolist()}; the masks' empty cases are handled "
                                 "above.")
            results.append(out.to(device))
        return results


def hd95_from_logits(
    logits: torch.Tensor,
    target: torch.Tensor,
    spacing: torch.Tensor | np.ndarray | Sequence,
    threshold: float = 0.5,
    empty_penalty: float = BRATS_HD95_PENALTY,
    missed: torch.Tensor | None = None,
    workers: int = 1,
) -> torch.Tensor:
    """:func:`hd95` of ``sigmoid(logits) > threshold``: the masks :func:`~app.metrics.dice.dice_from_logits`
    scores (:func:`~app.metrics.dice.logit_masks`).

    Raises:
        ValueError: ``threshold`` is not in ``(0, 1)``, or as :func:`hd95`.
    """
    return hd95(logit_masks(logits, threshold), target, spacing, empty_penalty, missed, workers)

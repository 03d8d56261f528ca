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
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from app.metrics.dice import logit_masks

__all__ = ["BRATS_HD95_PENALTY", "HD95_PERCENTILE", "affine_spacing", "check_hd95", "hd95", "hd95_from_logits"]

#: HD95 (mm) of a region that is empty in exactly one of prediction and reference: the diagonal of the
#: BraTS grid, sqrt(240^2 + 240^2 + 155^2) = 373.13 mm at 1 mm, as the BraTS challenge scores it.
BRATS_HD95_PENALTY: float = 373.13
#: The percentile of the surface distances that HD95 reports.
HD95_PERCENTILE: float = 95.0


def check_hd95(enabled: bool | str) -> bool:
    """Whether HD95 is on (``--hd95``), refusing it up front where it cannot be computed.

    MONAI finds the masks' surfaces and their distances with scipy, which it imports only when a distance
    is computed: without it the evaluation stopped at the first case, after every case had been read.

    Raises:
        ValueError: ``enabled`` is not true or false, or it is true and scipy is not installed.
    """
    from app.flags import parse_bool

    on = parse_bool(enabled, "hd95")
    if on:
        import importlib.util

        if importlib.util.find_spec("scipy") is None:
            raise ValueError("--hd95 true needs scipy (MONAI's surface distances use it): pip install scipy, or "
                             "install this package with its hd95 extra (pip install '.[hd95]'); or leave --hd95 false.")
    return on


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

    Returns:
        ``float64`` tensor ``[B, C]`` on the inputs' device, every value finite and ``>= 0``.

    Raises:
        ValueError: if the shapes differ, there is no spatial dimension, or ``spacing``/``missed`` do not fit.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}.")
    if pred.ndim < 3:
        raise ValueError(f"Expected [B, C, *spatial] tensors, got shape {tuple(pred.shape)}.")
    if not (math.isfinite(empty_penalty) and empty_penalty >= 0):
        raise ValueError(f"empty_penalty must be a finite distance >= 0 (mm), got {empty_penalty}.")
    batch, channels, ndim = pred.shape[0], pred.shape[1], pred.ndim - 2
    rows = _spacing_rows(spacing, batch, ndim)
    # MONAI's CPU path (a KD-tree over the surface voxels) needs neither cuCIM nor the volume on the GPU
    p = pred.detach().bool().cpu()
    t = target.detach().bool().cpu()
    dims = tuple(range(2, p.ndim))
    p_any, t_any = p.any(dim=dims), t.any(dim=dims)
    ref_elsewhere = torch.zeros_like(t_any)
    if missed is not None:
        missed = torch.as_tensor(missed).cpu()
        if tuple(missed.shape) != (batch, channels):
            raise ValueError(f"missed must hold one count per case and channel, [B, C] = {(batch, channels)}, "
                             f"got {tuple(missed.shape)}.")
        ref_elsewhere = missed > 0
    # imported here: the strategies and the ablation runner import app.metrics and must not load MONAI to list names
    from monai.metrics import compute_hausdorff_distance

    out = torch.empty((batch, channels), dtype=torch.float64)
    for b in range(batch):
        for c in range(channels):
            if p_any[b, c] and t_any[b, c]:
                with warnings.catch_warnings():
                    # monai 1.6.1 passes its own deprecated get_mask_edges argument: a FutureWarning per run
                    # that names nothing the user set
                    warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
                    value = compute_hausdorff_distance(
                        p[b : b + 1, c : c + 1], t[b : b + 1, c : c + 1], include_background=True,
                        percentile=HD95_PERCENTILE, spacing=rows[b],
                    )
                out[b, c] = float(value.reshape(-1)[0])
            elif p_any[b, c] or t_any[b, c] or ref_elsewhere[b, c]:
                out[b, c] = float(empty_penalty)  # exactly one of them is empty
            else:
                out[b, c] = 0.0  # both empty
    if not bool(torch.isfinite(out).all()):  # MONAI's NaN/inf for empty masks must never reach a mean
        raise ValueError(f"HD95 gave a non-finite value {out.tolist()}; the masks' empty cases are handled above.")
    return out.to(pred.device)


def hd95_from_logits(
    logits: torch.Tensor,
    target: torch.Tensor,
    spacing: torch.Tensor | np.ndarray | Sequence,
    threshold: float = 0.5,
    empty_penalty: float = BRATS_HD95_PENALTY,
    missed: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`hd95` of ``sigmoid(logits) > threshold``: the masks :func:`~app.metrics.dice.dice_from_logits`
    scores (:func:`~app.metrics.dice.logit_masks`).

    Raises:
        ValueError: ``threshold`` is not in ``(0, 1)``, or as :func:`hd95`.
    """
    return hd95(logit_masks(logits, threshold), target, spacing, empty_penalty, missed)

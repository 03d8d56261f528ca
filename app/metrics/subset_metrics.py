"""Per-modality-subset evaluation: accumulate per-case scores for every subset, then report each
subset, the mean over subsets and the worst subset.

:class:`SubsetAccumulator` holds the logic shared by every branch (subset naming and ordering,
raw per-case rows that can be gathered across ranks, averaging, worst-subset selection);
:class:`SubsetDiceAccumulator` is the BraTS WT/TC/ET Dice version and :class:`SubsetMeanDice`
wraps it as a scalar ignite metric usable as a ``CheckpointSaver`` key metric.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced

from app.flags import parse_bool
from app.metrics.dice import dice_from_logits
from app.metrics.hausdorff import BRATS_HD95_PENALTY, HD95_PERCENTILE, hd95_from_logits
from app.subsets import BRATS_MODALITIES, all_subsets, subset_name

logger = logging.getLogger(__name__)

__all__ = [
    "SubsetAccumulator", "SubsetDiceAccumulator", "SubsetScalarMetric", "SubsetMeanDice", "BRATS_REGIONS", "hd95_key",
]

BRATS_REGIONS: tuple[str, ...] = ("WT", "TC", "ET")


def hd95_key(region: str) -> str:
    """The report key of a region's HD95 (``"HD95_WT"``), beside its Dice key (``"WT"``)."""
    return f"HD95_{region}"


def _as_2d_float64(values: torch.Tensor | np.ndarray | Sequence, n_fields: int, name: str) -> np.ndarray:
    """``values`` as a CPU float64 array ``[B, n_fields]``; a 1-D input is one value per case."""
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1 and n_fields == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[1] != n_fields:
        raise ValueError(f"{name} must have shape [B, {n_fields}], got {tuple(arr.shape)}.")
    return arr


def _as_1d(values: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    """``values`` flattened to a float64 numpy vector (a tensor is detached and copied to the CPU first)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


class SubsetAccumulator:
    """Base class: raw per-(case, subset) rows -> per-subset metrics, mean over subsets, worst subset.

    Every row is ``(case_id, subset_index, *values)`` with the floats named by ``row_fields`` (for
    Dice: one value per region; for sentiment: prediction and label); ``subset_index`` indexes
    :func:`app.subsets.all_subsets` for ``len(modalities)`` modalities. Every update counts: a
    ``(case_id, subset_index)`` seen twice (non-unique ids, or the samples a padding
    ``DistributedSampler`` repeats across ranks) is kept twice and triggers a warning rather than
    silently replacing the earlier row, which would lose data whenever ids are not unique. Use
    ``monai.data.DistributedSampler(even_divisible=False)`` for evaluation to avoid repeats.

    Subclasses implement :meth:`_subset_metrics`, which reduces the rows of one subset to the
    values named by ``metric_keys``.

    Args:
        modalities: modality names in the branch's order.
        row_fields: names of the floats stored per row.
        metric_keys: per-subset metrics, averaged over subsets in ``mean_over_subsets``.
        primary_key: metric of ``metric_keys`` used to pick the worst (lowest) subset.
        count_key: key holding the number of rows of a subset in the per-subset results.

    Raises:
        ValueError: ``primary_key`` is not in ``metric_keys``.
    """

    #: what a row is and what its inputs are called, in messages (segmentation: cases and sequences)
    sample_word = "case"
    input_word = "sequences"

    def __init__(
        self,
        modalities: Sequence[str],
        row_fields: Sequence[str],
        metric_keys: Sequence[str],
        primary_key: str,
        count_key: str,
    ) -> None:
        self.modalities: tuple[str, ...] = tuple(modalities)
        self.row_fields: tuple[str, ...] = tuple(row_fields)
        self.metric_keys: tuple[str, ...] = tuple(metric_keys)
        if primary_key not in self.metric_keys:
            raise ValueError(f"primary_key {primary_key!r} must be one of {self.metric_keys}.")
        self.primary_key = primary_key
        self.count_key = count_key
        self.subsets: list[tuple[int, ...]] = all_subsets(len(self.modalities))
        self.subset_names: list[str] = [subset_name(s, self.modalities) for s in self.subsets]
        self._rows: list[tuple[str, int, tuple[float, ...]]] = []
        self._seen: set[tuple[str, int]] = set()
        # the subsets the last aggregate could not score: kept over resets, so that a training's validation, which
        # scores the same cases every epoch, warns about them once instead of at every epoch
        self.unscored_warned: tuple[str, ...] | None = None

    def __len__(self) -> int:
        """Number of stored ``(case, subset)`` rows."""
        return len(self._rows)

    def reset(self) -> None:
        """Drop every stored row."""
        self._rows = []
        self._seen = set()

    def _check_subset(self, subset_index: int) -> int:
        j = int(subset_index)
        if not 0 <= j < len(self.subsets):
            raise IndexError(f"subset_index {subset_index} out of range for {len(self.subsets)} subsets.")
        return j

    def _add_rows(
        self, case_ids: Sequence[str], subset_index: int, values: Any, valid: Any = None, name: str = "values"
    ) -> None:
        """Store one row per case of ``values`` ``[B, len(row_fields)]`` for subset ``subset_index``,
        skipping the cases where the boolean ``valid`` ``[B]`` (if given) is False."""
        j = self._check_subset(subset_index)
        if isinstance(case_ids, str):
            raise TypeError("case_ids must be a sequence of case ids, not a single string.")
        arr = _as_2d_float64(values, len(self.row_fields), name)
        if len(case_ids) != arr.shape[0]:
            raise ValueError(f"Got {len(case_ids)} case ids for {arr.shape[0]} rows of {name}.")
        keep = [True] * arr.shape[0] if valid is None else _as_1d(valid).astype(bool).tolist()
        if len(keep) != arr.shape[0]:
            raise ValueError(f"valid must have {arr.shape[0]} entries, got {len(keep)}.")
        for case_id, row, k in zip(case_ids, arr.tolist(), keep):
            if k:
                self._append(str(case_id), j, tuple(row))

    def _append(self, case_id: str, j: int, values: tuple[float, ...]) -> None:
        if (case_id, j) in self._seen:
            warnings.warn(
                f"Case {case_id!r} was scored twice on subset {self.subset_names[j]!r}; both rows are counted. "
                "Case ids should be unique and evaluation samplers should not pad (even_divisible=False).",
                stacklevel=4,
            )
        self._seen.add((case_id, j))
        self._rows.append((case_id, j, values))

    def state_dict(self) -> dict[str, Any]:
        """Plain (picklable, JSON-serialisable) copy of the raw rows, for gathering across ranks.

        Returns:
            ``{"modalities": [...], "row_fields": [...], "rows": [[case_id, subset_index, *values], ...]}``.
        """
        return {
            "modalities": list(self.modalities),
            "row_fields": list(self.row_fields),
            "rows": [[case_id, j, *values] for case_id, j, values in self._rows],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the stored rows by those of ``state`` (see :meth:`state_dict`)."""
        self.reset()
        self.merge(state)

    def merge(self, other: SubsetAccumulator | Mapping[str, Any]) -> None:
        """Add the rows of another accumulator (or of its :meth:`state_dict`, e.g. from another rank).

        Rows whose ``(case_id, subset_index)`` is already stored are added too, with a warning.

        Raises:
            ValueError: if ``other`` was built for different modalities or row fields.
        """
        state = other.state_dict() if isinstance(other, SubsetAccumulator) else other
        if tuple(state["modalities"]) != self.modalities or tuple(state["row_fields"]) != self.row_fields:
            raise ValueError(
                f"Cannot merge rows for modalities {tuple(state['modalities'])} / fields {tuple(state['row_fields'])} "
                f"into an accumulator for {self.modalities} / {self.row_fields}."
            )
        n_fields = len(self.row_fields)
        for row in state["rows"]:
            if len(row) != n_fields + 2:
                raise ValueError(f"Malformed row {row!r}: expected case id, subset index and {n_fields} values.")
            self._append(str(row[0]), self._check_subset(row[1]), tuple(float(v) for v in row[2:]))

    def rows_by_subset(self) -> list[tuple[list[str], np.ndarray]]:
        """Per subset, in :func:`~app.subsets.all_subsets` order: the case ids (sorted by id then
        values, so the result does not depend on update or rank order) and their values
        ``[n, len(row_fields)]``."""
        grouped: list[list[tuple[str, tuple[float, ...]]]] = [[] for _ in self.subsets]
        for case_id, j, values in self._rows:
            grouped[j].append((case_id, values))
        out = []
        for rows in grouped:
            rows.sort()
            values = np.array([v for _, v in rows], dtype=np.float64).reshape(len(rows), len(self.row_fields))
            out.append(([c for c, _ in rows], values))
        return out

    def _subset_metrics(self, values: np.ndarray) -> dict[str, float]:
        """Reduce the rows ``[n, len(row_fields)]`` (``n >= 1``) of one subset to ``metric_keys``."""
        raise NotImplementedError

    def aggregate(self) -> dict[str, Any]:
        """Per-subset metrics, their mean over subsets and the worst subset.

        Subsets without any row are left out of ``"subsets"`` and of the mean, so the mean is over
        the evaluated subsets only (normally all of them). ``mean_over_subsets`` is the unweighted
        mean of the per-subset values: every subset counts the same whatever its number of cases.
        The worst subset is the one with the lowest ``primary_key`` value (NaN values ignored; ties
        go to the earlier subset in :func:`~app.subsets.all_subsets` order).

        Returns:
            ``{"subsets": {name: {*metric_keys: float, count_key: int}}, "mean_over_subsets":
            {*metric_keys: float}, "worst_subset": {"name": str, primary_key: float},
            "subsets_without_cases": [name, ...], "per_case": [{"case": str, "subset": name,
            *row_fields: float}, ...]}``, subsets in :func:`~app.subsets.all_subsets` order;
            ``per_case`` holds every stored row, sorted by subset then case id.

        Raises:
            ValueError: if no row has been stored.
        """
        if not self._rows:
            raise ValueError(f"{type(self).__name__} has no rows to aggregate; call update first.")
        subsets: dict[str, dict[str, Any]] = {}
        for name, (case_ids, values) in zip(self.subset_names, self.rows_by_subset()):
            if case_ids:
                metrics = self._subset_metrics(values)
                subsets[name] = {**{k: float(metrics[k]) for k in self.metric_keys}, self.count_key: len(case_ids)}
        mean_over = {k: math.fsum(m[k] for m in subsets.values()) / len(subsets) for k in self.metric_keys}
        # (value, position) pairs so that ties go to the earlier subset
        ranked = [(m[self.primary_key], i, n) for i, (n, m) in enumerate(subsets.items())]
        finite = [r for r in ranked if not math.isnan(r[0])]
        worst_name = min(finite)[2] if finite else ranked[0][2]
        missing = [name for name in self.subset_names if name not in subsets]
        if missing and tuple(missing) != self.unscored_warned:
            # a mean over fewer subsets cannot be compared with a full table: say so where it is read (the report's
            # line says "over 7 of 15 subsets" each time)
            logger.warning("%d of the %d subsets have no %s to score (%s): mean_over_subsets is over the other %d. "
                           "Add %ss that have those %s for a full table.", len(missing), len(self.subset_names),
                           self.sample_word, ", ".join(missing), len(subsets), self.sample_word, self.input_word)
        self.unscored_warned = tuple(missing)
        return {
            "subsets": subsets,
            "mean_over_subsets": mean_over,
            "worst_subset": {"name": worst_name, self.primary_key: subsets[worst_name][self.primary_key]},
            "subsets_without_cases": missing,
            # the rows themselves, so that a reader can recompute every figure or test differences per case
            "per_case": [
                {"case": case_id, "subset": name, **dict(zip(self.row_fields, row))}
                for name, (case_ids, values) in zip(self.subset_names, self.rows_by_subset())
                for case_id, row in zip(case_ids, values.tolist())
            ],
        }


class SubsetDiceAccumulator(SubsetAccumulator):
    """WT/TC/ET hard Dice of every case under every modality subset.

    Per subset, each region's Dice is averaged over the subset's cases and ``"mean"`` is the mean of
    the region means; ``mean_over_subsets`` then averages those over the evaluated subsets (subsets
    with no case are omitted, not counted as 0). The worst subset is the one with the lowest
    ``"mean"``.

    Example::

        acc = SubsetDiceAccumulator()
        acc.update_from_logits(batch["case"], logits, batch["label"])  # logits [B, 15, 3, H, W, D]
        acc.update_from_subset_dice(output["case"], output["subset_dice"], output["subset_valid"])  # or
        result = acc.aggregate()
        result["subsets"]["flair+t1ce"]["ET"], result["worst_subset"]["name"]

    With ``hd95=True`` every row also holds each region's HD95 in mm (:func:`app.metrics.hausdorff.hd95`,
    BraTS empty-mask rule), reported as ``HD95_<region>`` (:func:`hd95_key`) per case, per subset (mean over
    the subset's cases) and in ``mean_over_subsets``, and the aggregate gains ``"hd95"``, the convention
    used. The Dice keys, ``"mean"`` (of the region Dice) and the worst subset do not change.

    Args:
        modalities: modality names in order; subset indices refer to ``all_subsets(len(modalities))``.
        regions: channel names of the Dice rows (and of the label/logit channels).
        hd95: also record and report each region's HD95; every update must then give it.

    Raises:
        ValueError: ``regions`` is empty, repeats a name, or names one ``mean``.
    """

    def __init__(self, modalities: Sequence[str] = BRATS_MODALITIES, regions: Sequence[str] = BRATS_REGIONS,
                 hd95: bool = False) -> None:
        regions = tuple(regions)
        if "mean" in regions or len(set(regions)) != len(regions) or not regions:
            raise ValueError(f"regions must be non-empty, unique and must not be named 'mean', got {regions}.")
        self.regions = regions
        self.hd95 = bool(hd95)
        self.hd95_keys: tuple[str, ...] = tuple(hd95_key(r) for r in regions) if self.hd95 else ()
        super().__init__(
            modalities, row_fields=(*regions, *self.hd95_keys), metric_keys=(*regions, "mean", *self.hd95_keys),
            primary_key="mean", count_key="n_cases",
        )

    def _with_hd95(self, dice: Any, hd95: Any, shape: str) -> Any:
        """The Dice values, with the HD95 values beside them when this accumulator records HD95."""
        if self.hd95 != (hd95 is not None):
            raise ValueError(f"{type(self).__name__}(hd95={self.hd95}) " + (
                f"needs the HD95 {shape} of every update." if self.hd95 else
                "was given HD95 values it does not record: build it with hd95=True."))
        if hd95 is None:
            return dice
        n = len(self.regions)
        return np.concatenate([_as_2d_float64(dice, n, "dice"), _as_2d_float64(hd95, n, "hd95")], axis=1)

    def update(
        self,
        case_ids: Sequence[str],
        subset_index: int,
        dice: torch.Tensor | np.ndarray | Sequence[Sequence[float]],
        valid: torch.Tensor | np.ndarray | Sequence[bool] | None = None,
        hd95: torch.Tensor | np.ndarray | Sequence[Sequence[float]] | None = None,
    ) -> None:
        """Record the Dice ``[B, len(regions)]`` (and, with ``hd95=True``, the HD95 ``[B, len(regions)]``)
        of cases ``case_ids`` under subset ``subset_index``.

        Cases where the boolean ``valid`` ``[B]`` is False (e.g. a case lacking one of the subset's
        sequences) are not recorded.
        """
        self._add_rows(case_ids, subset_index, self._with_hd95(dice, hd95, "[B, R]"), valid, name="dice")

    def update_case(
        self, case_id: str, subset_index: int, dice_row: torch.Tensor | np.ndarray | Sequence[float],
        hd95_row: torch.Tensor | np.ndarray | Sequence[float] | None = None,
    ) -> None:
        """Record the Dice ``[len(regions)]`` (and HD95 ``[len(regions)]``) of one case under subset ``subset_index``."""
        hd95 = None if hd95_row is None else _as_1d(hd95_row)[None]
        self._add_rows([case_id], subset_index, self._with_hd95(_as_1d(dice_row)[None], hd95, "row"), name="dice_row")

    def update_from_subset_dice(
        self,
        case_ids: Sequence[str],
        subset_dice: torch.Tensor | np.ndarray,
        valid: torch.Tensor | np.ndarray | None = None,
        subset_hd95: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Record precomputed Dice (and HD95) of every subset at once.

        Args:
            case_ids: ``B`` case ids.
            subset_dice: ``[B, S, len(regions)]`` with ``S = len(all_subsets)`` in order (e.g. from
                :func:`~app.metrics.dice.dice_from_logits` per subset, stacked on dim 1).
            valid: optional boolean ``[B, S]``; ``valid[b, j] == False`` leaves case ``b`` out of subset ``j``.
            subset_hd95: ``[B, S, len(regions)]`` HD95 in mm, with ``hd95=True`` only.

        Raises:
            ValueError: ``subset_dice`` or ``valid`` has another shape.
        """
        s = len(self.subsets)
        if subset_dice.ndim != 3 or subset_dice.shape[1] != s:
            raise ValueError(f"subset_dice must be [B, {s}, {len(self.regions)}], got {tuple(subset_dice.shape)}.")
        if valid is not None and tuple(valid.shape) != tuple(subset_dice.shape[:2]):
            raise ValueError(f"valid must be [B, {s}], got {tuple(valid.shape)}.")
        if subset_hd95 is not None and tuple(subset_hd95.shape) != tuple(subset_dice.shape):
            raise ValueError(f"subset_hd95 must be shaped as subset_dice, {tuple(subset_dice.shape)}, "
                             f"got {tuple(subset_hd95.shape)}.")
        for j in range(s):
            self.update(case_ids, j, subset_dice[:, j], None if valid is None else valid[:, j],
                        None if subset_hd95 is None else subset_hd95[:, j])

    def update_from_logits(
        self,
        case_ids: Sequence[str],
        subset_logits: Mapping[int, torch.Tensor] | torch.Tensor,
        target: torch.Tensor,
        threshold: float = 0.5,
        valid: torch.Tensor | np.ndarray | None = None,
        spacing: torch.Tensor | np.ndarray | Sequence | None = None,
    ) -> None:
        """Threshold the logits of each subset and record their hard Dice (and HD95) against ``target``.

        Args:
            case_ids: ``B`` case ids.
            subset_logits: either ``{subset_index: logits [B, R, *spatial]}`` for any subsets, or a
                tensor ``[B, S, R, *spatial]`` holding all ``S = len(all_subsets)`` subsets in order.
            target: binary label ``[B, R, *spatial]`` with one channel per region.
            threshold: sigmoid probability threshold, see :func:`~app.metrics.dice.dice_from_logits`.
            valid: optional boolean ``[B, S]`` indexed by subset index, as in :meth:`update_from_subset_dice`.
            spacing: voxel size in mm, ``[ndim]`` or ``[B, ndim]``: needed with ``hd95=True``, for the HD95.

        Raises:
            ValueError: ``hd95=True`` without ``spacing``: the distances would be in voxels, not mm.
            ValueError: a ``subset_logits`` tensor is not ``[B, S, R, *spatial]``.
        """
        if self.hd95 and spacing is None:
            raise ValueError("HD95 is in millimetres: pass the evaluated grid's voxel size as spacing "
                             "(app.metrics.hausdorff.affine_spacing of the label's affine).")
        if isinstance(subset_logits, torch.Tensor):
            if subset_logits.ndim < 4 or subset_logits.shape[1] != len(self.subsets):
                raise ValueError(
                    f"subset_logits tensor must be [B, {len(self.subsets)}, {len(self.regions)}, *spatial], "
                    f"got {tuple(subset_logits.shape)}."
                )
            items: list[tuple[int, torch.Tensor]] = [(j, subset_logits[:, j]) for j in range(len(self.subsets))]
        else:
            items = list(subset_logits.items())
        for j, logits in items:
            dice = dice_from_logits(logits, target, threshold)
            hd95 = hd95_from_logits(logits, target, spacing, threshold) if self.hd95 else None
            self.update(case_ids, j, dice, None if valid is None else valid[:, j], hd95)

    def _subset_metrics(self, values: np.ndarray) -> dict[str, float]:
        # math.fsum keeps the means exact to rounding whatever the number of cases.
        means = {r: math.fsum(values[:, i]) / values.shape[0] for i, r in enumerate(self.row_fields)}
        means["mean"] = math.fsum(means[r] for r in self.regions) / len(self.regions)
        return means

    def aggregate(self) -> dict[str, Any]:
        """:meth:`SubsetAccumulator.aggregate`; with ``hd95=True`` also ``"hd95"``: the HD95 convention
        (percentile, unit, the values of empty masks), so that a table built from the report can state it."""
        result = super().aggregate()
        if self.hd95:
            result["hd95"] = {"percentile": HD95_PERCENTILE, "unit": "mm", "both_empty": 0.0,
                              "one_empty": BRATS_HD95_PENALTY, "keys": dict(zip(self.regions, self.hd95_keys))}
        return result


class SubsetScalarMetric(Metric):
    """Base of the scalar per-subset key metrics: rows go to a :class:`SubsetAccumulator`, and
    :meth:`compute` aggregates the rows of every rank, keeps the whole result on
    :attr:`last_result` and returns one number (:meth:`scalar`).

    Subclasses set ``self._accumulator = self._new_accumulator()`` before ``Metric.__init__`` (which
    calls :meth:`reset`) and implement :meth:`_new_accumulator`, ``update`` and :meth:`scalar`.
    """

    # the output mapping is passed whole to update()
    required_output_keys = None

    @property
    def accumulator(self) -> SubsetAccumulator:
        """The local (this rank's) accumulator."""
        return self._accumulator

    def _new_accumulator(self) -> SubsetAccumulator:
        raise NotImplementedError

    def scalar(self, result: dict[str, Any]) -> float:
        """The key-metric value of an aggregate (higher is better)."""
        raise NotImplementedError

    @torch.no_grad()
    def iteration_completed(self, engine: Engine) -> None:
        """Pass the transformed engine output to ``update`` as it is."""
        # ignite's default would turn a mapping into a tuple of fixed required_output_keys
        self.update(self._output_transform(engine.state.output))

    @reinit__is_reduced
    def reset(self) -> None:
        """Drop the rows of this rank's accumulator."""
        self._accumulator.reset()

    def compute(self) -> float:
        """Aggregate the rows of every rank into :attr:`last_result` and return its :meth:`scalar`.

        Raises:
            NotComputableError: no row on any rank.
        """
        accumulator = self._accumulator
        # every rank must take part in the gather, so check emptiness only after it
        if idist.get_world_size() > 1:
            accumulator = self._new_accumulator()
            accumulator.unscored_warned = self._accumulator.unscored_warned
            for state in idist.all_gather(self._accumulator.state_dict()):
                accumulator.merge(state)
        if len(accumulator) == 0:
            raise NotComputableError(f"{type(self).__name__} must have at least one example before it can be computed.")
        self.last_result = accumulator.aggregate()
        self._accumulator.unscored_warned = accumulator.unscored_warned
        return self.scalar(self.last_result)


class SubsetMeanDice(SubsetScalarMetric):
    """Ignite metric: hard Dice mean over regions and over all modality subsets (a scalar, so it can
    be the key metric of ``CheckpointSaver``/``ModelCheckpoint``; per-region values cannot).

    The full :meth:`SubsetDiceAccumulator.aggregate` dict of the last :meth:`compute` is kept on
    :attr:`last_result` so that a handler can write the per-subset report.

    The (transformed) engine output must be a mapping with a ``"case"`` list of ``B`` case ids and
    either

    - ``"subset_dice"``: precomputed hard Dice ``[B, S, R]``, ``S == len(all_subsets(len(modalities)))``
      in :func:`~app.subsets.all_subsets` order (preferred: no full-resolution volume per subset
      has to be kept), or
    - ``"subset_logits"``: ``[B, S, R, *spatial]`` (or ``{subset_index: [B, R, *spatial]}``) with
      ``"label"``: binary ``[B, R, *spatial]``, thresholded here,

    and optionally ``"subset_valid"``: boolean ``[B, S]``; a case is left out of the subsets where it
    is False (e.g. it lacks one of their sequences). With ``hd95=True`` the output must also hold
    ``"subset_hd95"`` ``[B, S, R]`` (mm) beside ``"subset_dice"``, or ``"spacing"`` (``[B, ndim]`` mm) beside
    ``"subset_logits"``; the HD95 goes into the report only, the scalar stays the mean Dice. With MONAI engines use ``decollate=False`` or
    an ``output_transform`` that yields these batched entries.

    In distributed runs :meth:`compute` gathers the raw rows of all ranks, so every rank returns the
    same value.

    Args:
        modalities: modality names; see :class:`SubsetDiceAccumulator`.
        regions: channel names; see :class:`SubsetDiceAccumulator`.
        threshold: sigmoid probability threshold for ``"subset_logits"``.
        output_transform: applied to ``engine.state.output`` before :meth:`update`.
        device: unused for the state (rows live on CPU); kept for the ignite ``Metric`` signature.
        hd95: also report each region's HD95 (see :class:`SubsetDiceAccumulator`).
    """

    def __init__(
        self,
        modalities: Sequence[str] = BRATS_MODALITIES,
        regions: Sequence[str] = BRATS_REGIONS,
        threshold: float = 0.5,
        output_transform: Callable = lambda x: x,
        device: str | torch.device = torch.device("cpu"),
        hd95: bool | str = False,
    ) -> None:
        # created before Metric.__init__, which calls reset()
        self._accumulator = SubsetDiceAccumulator(modalities, regions, hd95=parse_bool(hd95, "hd95"))
        self.threshold = threshold
        self.last_result: dict[str, Any] | None = None
        super().__init__(output_transform=output_transform, device=device, skip_unrolling=True)

    def _new_accumulator(self) -> SubsetDiceAccumulator:
        acc = self._accumulator
        return SubsetDiceAccumulator(acc.modalities, acc.regions, hd95=acc.hd95)

    @reinit__is_reduced
    def update(self, output: Mapping[str, Any]) -> None:
        """Add a batch: ``case`` with ``subset_dice``, or with ``subset_logits`` and ``label`` (see the class).

        Raises:
            ValueError: ``output`` is not a mapping with a ``case`` entry, or it has neither ``subset_dice`` nor
                ``subset_logits`` and ``label`` (as the sentiment metric refuses an output without its entries).
        """
        if not isinstance(output, Mapping) or "case" not in output:
            keys = list(output) if isinstance(output, Mapping) else type(output).__name__
            raise ValueError(f"{type(self).__name__} needs 'case', with 'subset_dice' or with 'subset_logits' and "
                             f"'label', in the output, got {keys}.")
        case_ids, valid = list(output["case"]), output.get("subset_valid")
        hd95 = self._accumulator.hd95
        if "subset_dice" in output:
            if hd95 and "subset_hd95" not in output:
                raise ValueError(f"{type(self).__name__}(hd95=True) needs 'subset_hd95' beside 'subset_dice' in the "
                                 "output: build the evaluator with hd95=True as well (the bundle's --hd95 sets both).")
            self._accumulator.update_from_subset_dice(
                case_ids, output["subset_dice"], valid, output["subset_hd95"] if hd95 else None)
        elif "subset_logits" in output and "label" in output:
            logits, label = output["subset_logits"], output["label"]
            self._accumulator.update_from_logits(case_ids, logits, label, self.threshold, valid,
                                                 output.get("spacing") if hd95 else None)
        else:
            raise ValueError(
                f"{type(self).__name__} needs 'subset_dice', or 'subset_logits' and 'label', in the output; "
                f"got keys {list(output)}."
            )

    def scalar(self, result: dict[str, Any]) -> float:
        """The mean Dice over the subsets and regions."""
        return float(result["mean_over_subsets"]["mean"])

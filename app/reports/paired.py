"""Paired comparison of two strategies on the same held-out cases: per subset, the difference of their scores
with a bootstrap interval over cases, and how many cases each one wins.

An ablation table gives each strategy's mean per subset; with the few held-out cases of a typical study
(tens, or six), a difference of 0.01 Dice between two strategies may be one case's luck. Every evaluation
report keeps its per-case rows (``per_case``), so the same cases can be compared pair by pair. The interval
resamples whole cases (all their subsets together, as the table's mean over subsets depends on them
jointly) and recomputes the table's figures from each resample: a percentile bootstrap, seeded, so the
report is reproducible.

Only metrics that are a mean over cases have per-case values: the Dice regions and their mean, HD95, the
sentiment ``MAE``, ``Acc2`` (non-zero labels only), ``Acc2_has0`` and ``Acc7``, and the classification ``Acc``.
Correlation and F1 are not compared here. The per-case values are checked against each report's own subset figures, so a report whose
metric is computed otherwise is left out rather than misread.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = ["BOOTSTRAP_RESAMPLES", "case_value", "paired_differences"]

#: Bootstrap resamples of the cases; the 2.5th and 97.5th percentiles of 2000 vary by about 0.1 of the
#: interval's width from one seed to another.
BOOTSTRAP_RESAMPLES = 2000

_REGIONS = ("WT", "TC", "ET")
#: The sentiment metrics that are means over utterances, from a row's ``pred`` and ``label``.
_PER_UTTERANCE = ("MAE", "Acc2", "Acc2_has0", "Acc7", "Acc")
#: Per-case differences within this of 0 are ties.
_TIE = 1e-9


def case_value(row: Mapping[str, Any], metric: str) -> float | None:
    """One case's value of ``metric`` from its ``per_case`` row; NaN where the case does not count (an Acc2 of
    a 0 label), None where the metric is not a mean over cases (F1, Corr) or the row lacks what it needs."""
    if metric in row and metric not in ("case", "subset"):
        value = row[metric]
        return math.nan if value is None else float(value)
    if metric == "mean" and all(r in row for r in _REGIONS):
        values = [math.nan if row[r] is None else float(row[r]) for r in _REGIONS]
        return math.fsum(values) / len(values)
    if metric in _PER_UTTERANCE and row.get("pred") is not None and row.get("label") is not None:
        pred, label = float(row["pred"]), float(row["label"])
        if metric == "MAE":
            return abs(pred - label)
        if metric == "Acc2" and label == 0:
            return math.nan
        if metric == "Acc7":  # np.round: halves to even, as the metric rounds
            return float(np.round(np.clip(pred, -3.0, 3.0)) == np.round(np.clip(label, -3.0, 3.0)))
        if metric == "Acc":  # classification rows: class ids
            return float(int(pred) == int(label))
        return float((pred > 0) == (label > 0))
    return None


def _matrix(report: Mapping[str, Any], metric: str, subsets: Sequence[str],
            cases: Sequence[str]) -> np.ndarray | None:
    """``[subset, case]`` values of ``metric`` (NaN where a case is not scored on a subset), or None where the
    report's rows cannot give them or do not reproduce its own subset figures."""
    index = {c: i for i, c in enumerate(cases)}
    values = np.full((len(subsets), len(cases)), np.nan)
    where = {s: i for i, s in enumerate(subsets)}
    for row in report.get("per_case") or []:
        if row.get("subset") not in where:
            continue
        value = case_value(row, metric)
        if value is None:
            return None
        values[where[row["subset"]], index[row["case"]]] = value
    for s, name in enumerate(subsets):
        stated = (report.get("subsets") or {}).get(name, {}).get(metric)
        row = values[s][~np.isnan(values[s])]
        if stated is None or not row.size or not math.isclose(float(row.mean()), float(stated), rel_tol=1e-6,
                                                               abs_tol=1e-9):
            return None
    return values


def _scored_cases(report: Mapping[str, Any]) -> dict[str, set[str]]:
    """``{subset: cases}`` of a report's per-case rows."""
    scored: dict[str, set[str]] = {}
    for row in report.get("per_case") or []:
        scored.setdefault(str(row.get("subset")), set()).add(str(row.get("case")))
    return scored


def paired_differences(reports: Mapping[str, Mapping[str, Any]], metric: str, subsets: Sequence[str],
                       lower_is_better: bool = False, reference: str | None = None,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                       group_of: Callable[[str], str] | None = None, group_word: str = "case") -> dict[str, Any]:
    """Each strategy's ``metric`` minus the reference strategy's, per subset and for the mean over subsets, on
    the cases both were scored on.

    Args:
        reports: ``{strategy: evaluation report}`` with ``subsets`` and ``per_case`` (see
            :meth:`app.metrics.SubsetAccumulator.aggregate`), all scored on the same held-out cases.
        metric: the metric compared (see :func:`case_value`).
        subsets: the subsets of the table, in its order (those without a case left out).
        lower_is_better: which way a case counts as better (HD95, MAE).
        reference: the strategy the others are compared with; default ``plain`` where there is one, else the
            first.
        resamples: bootstrap resamples of the cases.
        seed: seed of the resampling.
        group_of: the group of a case id, whose cases are resampled together (the video of a CMU-MOSI utterance,
            :func:`app.data.mmsa.video_of`: utterances of one video are alike, and resampling them one by one
            would give too narrow an interval); None: every case on its own.
        group_word: what a group is, for the report (``video``).

    Returns:
        ``{"metric", "reference", "cases", "resamples", "seed", "interval": 0.95, "strategies": {strategy:
        {"subsets": {name: entry}, "mean": entry}}}`` where an entry is ``{"difference", "low", "high",
        "better", "worse", "n"}``: the table's difference, its 95% interval, and how many cases scored better
        and worse than under the reference. Where the comparison cannot be made (fewer than two strategies,
        reports without per-case rows, another metric convention, different cases), ``{"metric",
        "unavailable": reason}``.
    """
    names = list(reports)
    if len(names) < 2:
        return {"metric": metric, "unavailable": "a comparison needs two strategies"}
    reference = reference if reference in reports else ("plain" if "plain" in reports else names[0])
    scored = {s: _scored_cases(r) for s, r in reports.items()}
    if any(scored[s] != scored[reference] for s in names):
        return {"metric": metric, "unavailable": "the strategies were not scored on the same cases"}
    cases = sorted(set().union(*scored[reference].values()))
    if len(cases) < 2:
        return {"metric": metric, "unavailable": "a comparison needs two held-out cases or more"}
    matrices = {s: _matrix(reports[s], metric, subsets, cases) for s in names}
    if any(m is None for m in matrices.values()):
        return {"metric": metric, "unavailable": f"the reports have no per-case {metric} (an earlier version's "
                                                  "reports, or a metric that is not a mean over cases)"}
    # each resample draws the groups (cases, or videos) with replacement: how many times each case is drawn
    groups = [group_of(c) for c in cases] if group_of is not None else list(cases)
    group_names = sorted(set(groups))
    n_groups, index = len(group_names), {g: i for i, g in enumerate(group_names)}
    if n_groups < 2:
        return {"metric": metric, "unavailable": f"a comparison needs two held-out {group_word}s or more"}
    drawn = np.random.default_rng(seed).multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=resamples)
    counts = drawn[:, [index[g] for g in groups]].astype(np.float64)

    def resampled(values: np.ndarray) -> np.ndarray:
        """``[resample, subset]`` means over the drawn cases (NaN where none of them has the subset)."""
        scored_mask = ~np.isnan(values)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (counts @ np.where(scored_mask, values, 0.0).T) / (counts @ scored_mask.T)

    ref = matrices[reference]
    ref_means = resampled(ref)
    sign = -1.0 if lower_is_better else 1.0
    out: dict[str, Any] = {}
    for name in names:
        if name == reference:
            continue
        values = matrices[name]
        boot = resampled(values) - ref_means  # [resample, subset]

        def entry(difference: float, draws: np.ndarray, per_case: np.ndarray) -> dict[str, Any]:
            draws = draws[np.isfinite(draws)]
            low, high = (np.percentile(draws, [2.5, 97.5]) if draws.size else (math.nan, math.nan))
            per_case = per_case[np.isfinite(per_case)] * sign
            # a tie within rounding (a mean over subsets of +0.1 and -0.1) is neither
            return {"difference": float(difference), "low": float(low), "high": float(high),
                    "better": int((per_case > _TIE).sum()), "worse": int((per_case < -_TIE).sum()),
                    "n": int(per_case.size)}

        with warnings.catch_warnings():  # a subset no drawn case has, a case no subset scores: NaN, left out
            warnings.simplefilter("ignore", RuntimeWarning)
            rows = {subset: entry(np.nanmean(values[s]) - np.nanmean(ref[s]), boot[:, s], values[s] - ref[s])
                    for s, subset in enumerate(subsets)}
            # the table's mean over subsets; a case's own mean over the subsets it has, for its win or loss
            difference = float(np.mean(np.nanmean(values, axis=1)) - np.mean(np.nanmean(ref, axis=1)))
            case_means = np.nanmean(values, axis=0) - np.nanmean(ref, axis=0)
            out[name] = {"subsets": rows, "mean": entry(difference, np.nanmean(boot, axis=1), case_means)}
    return {"metric": metric, "reference": reference, "cases": len(cases), "groups": n_groups,
            "resampled": group_word if group_of is not None else "case", "resamples": int(resamples),
            "seed": int(seed), "interval": 0.95, "strategies": out}

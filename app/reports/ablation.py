"""Ablation tables: one row per modality subset, one column per training strategy.

:func:`ablation_table` collects the subset reports that each strategy's evaluation wrote
(``subset_dice.json`` or ``subset_metrics.json``) into ``{metric: {strategy: {subset: value}}}``
plus, per strategy, the mean over subsets and the worst subset (the lowest value, or the highest
for an error such as MAE). :func:`write_ablation_report` writes it atomically as JSON, Markdown
and a PNG bar chart of the headline metric. matplotlib is imported only to draw the chart.
:func:`seed_table` combines the tables of the same ablation run at several seeds into means and
sample standard deviations, which :func:`write_seed_report` writes as JSON and Markdown.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from app.reports.paired import paired_differences
from app.reports.subset_report import (
    HD95_METRICS,
    LOWER_IS_BETTER,
    atomic_write_bytes,
    atomic_write_text,
    strict_json,
    subsets_with_unscored,
)

__all__ = [
    "LOWER_IS_BETTER", "ablation_table", "format_ablation_markdown", "write_ablation_report", "seed_table",
    "format_seed_markdown", "write_seed_report",
]


def _worst(values: Mapping[str, float], metric: str) -> tuple[str, float]:
    finite = {k: v for k, v in values.items() if v is not None and math.isfinite(v)}
    if not finite:
        return "", float("nan")
    pick = max if metric in LOWER_IS_BETTER else min
    name = pick(finite, key=finite.__getitem__)
    return name, finite[name]


def ablation_table(reports: Mapping[str, Mapping[str, Any]], metrics: Sequence[str],
                   reference: str | None = None) -> dict[str, Any]:
    """Gather per-strategy subset reports into per-metric tables.

    Args:
        reports: ``{strategy: report}`` where each report has ``subsets: {name: {metric: value}}``
            (the layout of :func:`app.reports.write_subset_report`).
        metrics: the metrics to tabulate; the first is the headline metric of the chart.
        reference: the strategy the others are compared with case by case (default ``plain``, else the first).

    Returns:
        ``{"metrics": [...], "subsets": [...], "strategies": [...], "tables": {metric: {strategy:
        {"subsets": {name: value}, "mean": float, "worst": {"name": str, "value": float}}}},
        "subsets_without_cases": [...]}``; the last lists the subsets the reports could not score (no
        held-out case has their sequences), which are in no table and no mean.

    Raises:
        ValueError: when a report lacks a metric or the strategies were evaluated on different subsets.

    The table also holds ``"paired"``: each strategy's headline metric against the reference's on the same
    held-out cases, per subset, with a 95% bootstrap interval over the cases
    (:func:`app.reports.paired.paired_differences`).
    """
    if not reports:
        raise ValueError("No strategy reports to tabulate.")
    subsets: list[str] | None = None
    tables: dict[str, dict[str, Any]] = {m: {} for m in metrics}
    unscored: list[str] = []
    for strategy, report in reports.items():
        rows = report["subsets"]
        unscored += [name for name in report.get("subsets_without_cases") or [] if name not in unscored]
        if subsets is None:
            subsets = list(rows)
        elif list(rows) != subsets:
            raise ValueError(f"Strategy {strategy!r} was evaluated on subsets {list(rows)}, the others on {subsets}.")
        for metric in metrics:
            missing = [name for name, row in rows.items() if metric not in row]
            if missing:
                raise ValueError(f"The report of {strategy!r} has no {metric!r} for {missing}: choose --metrics "
                                 f"among {sorted(next(iter(rows.values())))}.")
            # reports store a non-finite value as null
            values = {name: float("nan") if row[metric] is None else float(row[metric]) for name, row in rows.items()}
            worst_name, worst_value = _worst(values, metric)
            tables[metric][strategy] = {
                "subsets": values,
                # NaN when a subset is, as in the run's own mean_over_subsets
                "mean": math.fsum(values.values()) / len(values) if values else float("nan"),
                "worst": {"name": worst_name, "value": worst_value},
            }
    headline = metrics[0]
    return {"metrics": list(metrics), "subsets": subsets or [], "strategies": list(reports), "tables": tables,
            "subsets_without_cases": unscored,
            "paired": paired_differences(reports, headline, subsets or [], headline in LOWER_IS_BETTER, reference,
                                         **_resampling(reports))}


def _resampling(reports: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """How the paired comparison resamples: sentiment utterances (their rows hold ``pred`` and ``label``) by
    video, as utterances of one video are alike; segmentation cases one by one."""
    rows = next((r.get("per_case") for r in reports.values() if r.get("per_case")), None) or [{}]
    if "pred" not in rows[0]:
        return {}
    from app.data.mmsa import video_of

    return {"group_of": video_of, "group_word": "video"}


def format_ablation_markdown(table: Mapping[str, Any], title: str = "", digits: int = 3) -> str:
    """A summary (per strategy: the mean over subsets of each metric, the worst subset and the subset of
    all modalities, the last one, of the headline metric), then one table per metric: subsets x
    strategies with the mean and the worst subset."""
    strategies = table["strategies"]
    lines = [f"# {title}", ""] if title else []
    metrics, headline = table["metrics"], table["metrics"][0]
    full = table["subsets"][-1] if table["subsets"] else ""
    runs = table.get("runs", {})
    # iterations are unknown for runs trained by an earlier version without a checkpoint_last.pt
    its = {s: runs.get(s, {}).get("iterations") for s in strategies}
    show_its = any(v is not None for v in its.values())
    lines += ["## Summary: mean over subsets", "",
              f"| {table.get('column', 'strategy')} | " + " | ".join(metrics)
              + f" | worst subset ({headline}) | {full} ({headline}) |"
              + (" iterations |" if show_its else ""),
              "|---|" + "---|" * (len(metrics) + 2 + show_its)]
    for s in strategies:
        worst = table["tables"][headline][s]["worst"]
        worst_cell = _named(f"{worst['value']:.{digits}f}", worst["name"])
        lines.append(f"| {s} | " + " | ".join(f"{table['tables'][m][s]['mean']:.{digits}f}" for m in metrics)
                     + f" | {worst_cell} | "
                     f"{table['tables'][headline][s]['subsets'].get(full, float('nan')):.{digits}f} |"
                     + (f" {'' if its[s] is None else its[s]} |" if show_its else ""))
    lines.append("")
    if unscored := table.get("subsets_without_cases"):
        # as under the run's own table: a mean over fewer subsets must not pass for one over all of them
        lines += [f"No case to score for {len(unscored)} subset(s) ({', '.join(unscored)}): every mean over subsets "
                  f"here is over the {len(table['subsets'])} scored, and the summary's last column is "
                  f"{full}, not all modalities.", ""]
    lines += _paired_lines(table.get("paired") or {}, digits, table.get("column", "strategy"))
    lines += _metric_tables(table, lambda value: f"{value:.{digits}f}",
                            lambda worst: _named(f"{worst['value']:.{digits}f}", worst["name"]))
    return "\n".join(lines)


def _paired_lines(paired: Mapping[str, Any], digits: int, column: str = "strategy") -> list[str]:
    """The Markdown section of :func:`app.reports.paired.paired_differences`: a column per strategy, its
    difference from the reference with the 95% interval and the cases it scored better / worse on."""
    if "unavailable" in paired:  # said, so that its absence is not read as "no difference"
        return [f"No case-by-case comparison of {paired['metric']}: {paired['unavailable']}.", ""]
    if not paired.get("strategies"):
        return []
    metric, reference, n = paired["metric"], paired["reference"], paired["cases"]
    unit = paired.get("resampled", "case")
    case = "utterance" if unit == "video" else "case"  # the sentiment bundle's cases are utterances of videos
    drawn = "the cases" if unit == "case" else f"the {paired['groups']} {unit}s, each with all its {case}s"
    others = list(paired["strategies"])
    better = "lower" if metric in LOWER_IS_BETTER else "higher"

    def cell(e: Mapping[str, Any]) -> str:
        return (f"{e['difference']:+.{digits}f} [{e['low']:+.{digits}f}, {e['high']:+.{digits}f}] "
                f"{e['better']}/{e['worse']}")

    lines = [f"## Paired differences from {reference}: {metric}", "",
             f"Each {column}'s {metric} minus {reference}'s on the same {n} held-out {case}s ({better} is better), "
             f"with its 95% bootstrap interval ({paired['resamples']} resamples of {drawn}, seed {paired['seed']}) "
             f"and the number of {case}s scored better / worse than under {reference}. An interval that holds 0 "
             f"does not tell the two apart on these {case}s.", "",
             "| subset | " + " | ".join(f"{s} - {reference}" for s in others) + " |",
             "|---|" + "---|" * len(others)]
    names = list(next(iter(paired["strategies"].values()))["subsets"])
    for name in names:
        lines.append(f"| {name} | " + " | ".join(cell(paired["strategies"][s]["subsets"][name]) for s in others)
                     + " |")
    lines.append("| **mean over subsets** | " + " | ".join(f"**{cell(paired['strategies'][s]['mean'])}**"
                                                         for s in others) + " |")
    lines.append("")
    return lines


def _named(value: str, name: str) -> str:
    """A worst-subset cell: the value and, where there is one, its subset (none when every value is NaN, as
    the correlation of a model that predicts one constant, which printed an empty ``nan ()``)."""
    return f"{value} ({name})" if name else value


def _metric_tables(table: Mapping[str, Any], cell: Callable[[Any], str], worst: Callable[[Any], str]) -> list[str]:
    """The Markdown lines of one table per metric: subsets x strategies, then the mean over subsets and the
    worst subset. ``cell`` writes a subset's or the mean's entry, ``worst`` the worst subset's."""
    strategies = table["strategies"]
    lines: list[str] = []
    for metric in table["metrics"]:
        per = table["tables"][metric]
        lines += [f"## {_axis_label(metric)}", "", "| subset | " + " | ".join(strategies) + " |",
                  "|---|" + "---|" * len(strategies)]
        for name in table["subsets"]:
            lines.append(f"| {name} | " + " | ".join(cell(per[s]["subsets"][name]) for s in strategies) + " |")
        lines.append("| **mean over subsets** | " + " | ".join(f"**{cell(per[s]['mean'])}**" for s in strategies)
                     + " |")
        lines.append("| **worst subset** | " + " | ".join(worst(per[s]["worst"]) for s in strategies) + " |")
        lines.append("")
    return lines


def _axis_label(metric: str) -> str:
    """The chart's value axis: the metric, its unit where it has one, and which way is better."""
    better = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
    return f"{metric} (mm, {better})" if metric in HD95_METRICS else f"{metric} ({better})"


def _bar_chart_png(table: Mapping[str, Any], metric: str, title: str) -> bytes | None:
    fig = _bar_chart_figure(table, metric, title)
    if fig is None:
        return None
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _bar_chart_figure(table: Mapping[str, Any], metric: str, title: str) -> Any:
    """Bars of ``metric`` per subset and strategy, then each strategy's mean over subsets and worst subset (named
    in the legend); ``None`` without matplotlib. The subsets no held-out case could score stay on the axis,
    marked ``no case`` (the chart alone must not pass a mean over fewer subsets for one over all), and so does a
    value that is not a number (``n/a``), where an empty slot would read as 0."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: the ablation bar chart (PNG) is skipped.", stacklevel=4)
        return None
    strategies = table["strategies"]
    subsets, unscored = subsets_with_unscored(table["subsets"], table.get("subsets_without_cases"))
    groups = [*subsets, "mean over subsets", "worst subset"]  # the names of the Markdown rows
    per = table["tables"][metric]
    width = 0.8 / max(len(strategies), 1)
    fig = Figure(figsize=(max(8.0, 0.55 * len(groups) * max(len(strategies), 2) / 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, strategy in enumerate(strategies):
        values = [per[strategy]["subsets"].get(g, math.nan) for g in subsets]
        values += [per[strategy]["mean"], per[strategy]["worst"]["value"]]
        values = [math.nan if v is None else float(v) for v in values]
        xs = [g + (i - (len(strategies) - 1) / 2) * width for g in range(len(groups))]
        worst = per[strategy]["worst"]["name"]
        ax.bar(xs, values, width, label=f"{strategy} (worst: {worst})" if worst else strategy)
        for x, v, group in zip(xs, values, groups):
            if not math.isfinite(v) and group not in unscored:
                ax.text(x, 0, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color="dimgrey")
    for g, name in enumerate(groups):
        if name in unscored:
            ax.axvspan(g - 0.45, g + 0.45, color="lightgrey", alpha=0.5, lw=0)
            ax.text(g, 0, "no case", rotation=90, ha="center", va="bottom", fontsize=7, color="dimgrey")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(_axis_label(metric))
    ax.set_title(title or f"{metric} per modality subset")
    # beside the axes: inside them it covered the last subsets' bars
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def write_ablation_report(table: Mapping[str, Any], output_dir: str | Path, title: str = "",
                          stem: str = "ablation") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` (headline metric) into ``output_dir``.

    Returns the paths written; the PNG is skipped, with a warning, without matplotlib.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # drawn first (matplotlib is the slow part): a stop while drawing leaves the earlier report whole
    png = _bar_chart_png(table, table["metrics"][0], title)
    written = {
        "json": atomic_write_text(out / f"{stem}.json", strict_json(table)),
        "md": atomic_write_text(out / f"{stem}.md", format_ablation_markdown(table, title)),
    }
    if png is not None:
        written["png"] = atomic_write_bytes(out / f"{stem}.png", png)
    return written


def _spread(values: Sequence[float]) -> dict[str, Any]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    mean = sum(finite) / n if n else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1)) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "values": list(values)}


def seed_table(tables: Mapping[Any, Mapping[str, Any]]) -> dict[str, Any]:
    """Combine :func:`ablation_table` results of the same strategies at several seeds.

    Args:
        tables: ``{seed: ablation_table(...)}``, all with the same metrics and strategies. Their subsets
            may differ where a seed's held-out cases could not score some (``subsets_without_cases``).

    Returns:
        ``{"seeds": [...], "metrics", "subsets", "strategies", "tables": {metric: {strategy:
        {"subsets": {name: spread}, "mean": spread, "worst": spread}}}, "subsets_without_cases":
        {seed: [...]}}``, where a spread is ``{"mean", "std" (sample standard deviation; NaN for one
        seed), "values" (one per seed, None where that seed scored no case of the subset)}`` over
        the seeds that scored it. ``mean`` spreads the per-seed means over subsets and ``worst`` the
        per-seed worst-subset values, with the subset of each seed under ``"names"`` (it may differ
        between seeds).

    Raises:
        ValueError: when there is no table or the tables differ in metrics or strategies.
    """
    if not tables:
        raise ValueError("No ablation tables to combine.")
    seeds = list(tables)
    first = tables[seeds[0]]
    for seed in seeds[1:]:
        for key in ("metrics", "strategies"):
            if list(tables[seed][key]) != list(first[key]):
                raise ValueError(f"The table of seed {seed} has {key} {list(tables[seed][key])}, "
                                 f"seed {seeds[0]} has {list(first[key])}: combine runs of the same ablation.")
    # each seed holds out other cases: where those all lack a sequence, that seed scores fewer subsets.
    # The union keeps the order of the seed that scored the most (subsets come in one fixed order)
    subsets = list(max((tables[seed]["subsets"] for seed in seeds), key=len))
    subsets += [n for seed in seeds for n in tables[seed]["subsets"] if n not in subsets]
    unscored = {seed: [n for n in subsets if n not in tables[seed]["subsets"]] for seed in seeds}
    out: dict[str, Any] = {m: {} for m in first["metrics"]}
    for metric in first["metrics"]:
        for strategy in first["strategies"]:
            per = [tables[seed]["tables"][metric][strategy] for seed in seeds]
            out[metric][strategy] = {
                "subsets": {name: _spread([p["subsets"].get(name) for p in per]) for name in subsets},
                "mean": _spread([p["mean"] for p in per]),
                "worst": {**_spread([p["worst"]["value"] for p in per]), "names": [p["worst"]["name"] for p in per]},
            }
    return {"seeds": seeds, "metrics": list(first["metrics"]), "subsets": subsets,
            "strategies": list(first["strategies"]), "tables": out,
            "subsets_without_cases": {seed: names for seed, names in unscored.items() if names}}


def _pm(spread: Mapping[str, Any], digits: int) -> str:
    """``mean +/- sd``, and how many seeds it is over when some seeds have no value there (a subset their
    held-out cases could not score, or a NaN such as a constant model's correlation): a cell of one seed
    printed as a bare mean, like one where every seed agreed to the digit, and hid that a seed's NaN was left out."""
    values = spread["values"]
    n = sum(v is not None and math.isfinite(v) for v in values)
    if len(values) < 2 or not math.isfinite(spread["std"]):
        text = f"{spread['mean']:.{digits}f}"
    else:
        text = f"{spread['mean']:.{digits}f} +/- {spread['std']:.{digits}f}"
    return f"{text} ({n} of {len(values)} seeds)" if 0 < n < len(values) else text


def _names(names: Sequence[str], seeds: Sequence[Any]) -> str:
    """The worst subset over seeds: one name when every seed agrees, else each seed's (a seed with none, every
    value NaN, is left out)."""
    if len(set(names)) == 1:
        return names[0]
    return ", ".join(f"{n} on seed {seed}" for n, seed in zip(names, seeds) if n)


def format_seed_markdown(table: Mapping[str, Any], title: str = "", digits: int = 3) -> str:
    """One table per metric: subsets x strategies, each cell ``mean +/- sd`` over the seeds, then the
    mean over subsets and the worst subset (both taken per seed, then spread)."""
    lines = [f"# {title}", ""] if title else []
    lines += [f"Mean +/- sample standard deviation over seeds {', '.join(map(str, table['seeds']))}.", ""]
    if unscored := table.get("subsets_without_cases"):
        lines += ["Not every seed's held-out cases could score every subset: " + "; ".join(
            f"seed {seed}: no case for {', '.join(names)}" for seed, names in unscored.items())
            + ". Those cells spread the other seeds, and those seeds' means over subsets are over fewer subsets.", ""]
    lines += _metric_tables(table, lambda spread: _pm(spread, digits),
                            lambda worst: _named(_pm(worst, digits), _names(worst.get("names", []), table["seeds"])))
    return "\n".join(lines)


def write_seed_report(table: Mapping[str, Any], output_dir: str | Path, title: str = "",
                      stem: str = "ablation_seeds") -> dict[str, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` (:func:`format_seed_markdown`) into ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "json": atomic_write_text(out / f"{stem}.json", strict_json(table)),
        "md": atomic_write_text(out / f"{stem}.md", format_seed_markdown(table, title)),
    }

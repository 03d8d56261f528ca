"""Per-modality-subset report writers: JSON, CSV, Markdown and a PNG heatmap of an accumulator's
``aggregate()`` dict (Dice or sentiment). The four files are one set: they replace the previous set
together (:func:`app.atomic.replace_file_set`), the JSON last, so an interrupted run never leaves a
truncated file, nor a new file beside an older sibling: where ``<stem>.json`` is, the files beside it are
its own.

matplotlib is imported only when the heatmap is drawn, so training and inference never need it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app.atomic import atomic_write_bytes, atomic_write_text, replace_file_set

__all__ = [
    "write_subset_report", "format_table", "strict_json", "atomic_write_bytes", "atomic_write_text", "MEAN_ROW",
    "LOWER_IS_BETTER", "HD95_METRICS", "subsets_with_unscored",
]

#: Name of the summary row appended after the per-subset rows.
MEAN_ROW = "mean_over_subsets"
#: The segmentation report's HD95 columns (``app.metrics.hd95_key`` of WT, TC and ET), there only when the
#: evaluation ran with ``--hd95 true``.
HD95_METRICS: tuple[str, ...] = ("HD95_WT", "HD95_TC", "HD95_ET")
#: Metrics for which a lower value is better (their heatmap colours are reversed): errors and distances.
# a superset of app.metrics.sentiment_metric.LOWER_IS_BETTER, not imported from there: the reports import no torch
LOWER_IS_BETTER = frozenset({"MAE", *HD95_METRICS})
_COUNT_KEYS = ("n_cases", "n")


def _json_safe(obj: Any) -> Any:
    """Plain JSON types; non-finite floats become ``null`` so the file is strict JSON."""
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def strict_json(obj: Any) -> str:
    """``obj`` as strict JSON text (indented, with a final newline): a value that is not a number is
    ``null``, since jq, JavaScript and most JSON readers outside Python refuse ``NaN``."""
    return json.dumps(_json_safe(obj), indent=2, allow_nan=False) + "\n"


def _count_key(result: Mapping[str, Any], count_key: str | None) -> str | None:
    if count_key is not None:
        return count_key
    first = next(iter(result["subsets"].values()), {})
    return next((k for k in _COUNT_KEYS if k in first), None)


def _check_metrics(result: Mapping[str, Any], metrics: Sequence[str]) -> None:
    if not result.get("subsets"):
        raise ValueError("result has no subsets to report.")
    missing = {m for m in metrics if m not in result["mean_over_subsets"]}
    missing |= {m for row in result["subsets"].values() for m in metrics if m not in row}
    if missing:
        raise ValueError(f"Metrics {sorted(missing)} are not in the result; pass the result's own metric names.")


def _fmt(value: Any, digits: int) -> str:
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "nan"
        text = f"{value:.{digits}f}"
        # a tiny negative value would print as "-0.0000"
        return text[1:] if text.startswith("-") and float(text) == 0 else text
    return str(value)


def _rows(result: Mapping[str, Any], metrics: Sequence[str], count_key: str | None) -> tuple[list[str], list[list]]:
    """Header and rows (per subset, then the mean row with an empty count) shared by CSV and Markdown."""
    header = ["subset", *metrics] + ([count_key] if count_key else [])
    rows = [
        [name, *(row[m] for m in metrics)] + ([row.get(count_key, "")] if count_key else [])
        for name, row in result["subsets"].items()
    ]
    mean = result["mean_over_subsets"]
    rows.append([MEAN_ROW, *(mean[m] for m in metrics)] + ([""] if count_key else []))
    return header, rows


def _subset_position(names: Iterable[str]) -> Callable[[str], int]:
    """Sort key putting subset names in :func:`app.subsets.all_subsets` order (that of the JSON and
    Markdown tables), for the branch whose subsets they are; names of no known branch keep their order."""
    from app.subsets import BRATS_MODALITIES, MOSI_MODALITIES, all_subsets, subset_name

    names = list(names)
    for modalities in (BRATS_MODALITIES, MOSI_MODALITIES):
        order = {subset_name(s, modalities): i for i, s in enumerate(all_subsets(len(modalities)))}
        if all(name in order for name in names):
            return order.__getitem__
    keep = {name: i for i, name in enumerate(names)}
    return keep.__getitem__


def subsets_with_unscored(scored: Iterable[str], without_cases: Iterable[str] | None) -> tuple[list[str], list[str]]:
    """Every subset a figure shows, in :func:`app.subsets.all_subsets` order: the ``scored`` ones and those no case
    could score (``without_cases``, a report's ``subsets_without_cases``), which a figure keeps as marked rows or
    bars rather than dropping; returns ``(subsets, unscored)``."""
    scored = list(scored)
    unscored = [name for name in without_cases or [] if name not in scored]
    return sorted([*scored, *unscored], key=_subset_position([*scored, *unscored])), unscored


def _worst_line(result: Mapping[str, Any], digits: int) -> str | None:
    worst = result.get("worst_subset")
    if not worst:
        return None
    values = ", ".join(f"{k} = {_fmt(v, digits)}" for k, v in worst.items() if k != "name")
    return f"Worst subset: **{worst['name']}** ({values})"


def format_table(
    result: Mapping[str, Any],
    metrics: Sequence[str] = ("WT", "TC", "ET", "mean"),
    count_key: str | None = None,
    digits: int = 4,
) -> str:
    """Markdown table of ``result``: one row per subset, then the bold ``mean_over_subsets`` row, and
    a note naming the subsets without a case when there are any.

    Args:
        result: ``aggregate()`` dict of a :class:`~app.metrics.SubsetAccumulator`.
        metrics: metric columns, in order.
        count_key: column holding the number of cases/samples; ``None`` picks ``"n_cases"`` or
            ``"n"``, whichever the result has.
        digits: decimals of the metric values.

    Returns:
        The table, without a trailing newline.
    """
    _check_metrics(result, metrics)
    header, rows = _rows(result, metrics, _count_key(result, count_key))
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for row in rows:
        cells = [_fmt(v, digits) for v in row]
        if row[0] == MEAN_ROW:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    missing = list(result.get("subsets_without_cases") or [])
    if missing:
        lines += ["", f"No case to score for {len(missing)} subset(s) ({', '.join(missing)}): "
                      f"{MEAN_ROW} is over the {len(result['subsets'])} scored."]
    return "\n".join(lines)


def _heatmap_png(result: Mapping[str, Any], metrics: Sequence[str], title: str, digits: int,
                 count_key: str | None = None) -> bytes | None:
    """PNG bytes of :func:`_heatmap_figure`, or ``None`` when matplotlib is unavailable."""
    fig = _heatmap_figure(result, metrics, title, digits, count_key)
    if fig is None:
        return None
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _column_label(result: Mapping[str, Any], metric: str) -> str:
    """A heatmap column's heading: the metric, with its unit for a distance (the PNG has no note that says it)."""
    if metric in HD95_METRICS:
        return f"{metric}\n({(result.get('hd95') or {}).get('unit', 'mm')})"
    return metric


def _heatmap_figure(result: Mapping[str, Any], metrics: Sequence[str], title: str, digits: int,
                    count_key: str | None = None) -> Any:
    """A matplotlib ``Figure`` of the subsets x metrics heatmap, or ``None`` when matplotlib is unavailable.

    Rows are the subsets in :func:`app.subsets.all_subsets` order, those without a case included (grey,
    marked ``no case``, as the CSV lists them), then the mean row. A column of a higher-is-better score whose
    values all lie in [0, 1] (Dice, accuracies) is coloured on that absolute scale, shown by the colour bar;
    any other column (HD95, MAE, a negative correlation) is scaled on its own, best = high colour. When the
    subsets were scored on different numbers of cases (``count_key``: some cases lack a sequence), each row
    label gives its count, as the tables' ``n_cases`` column does.
    """
    # optional dependency, imported only here (the optional_import pattern, without importing monai,
    # so that summarising a JSON result needs neither torch nor matplotlib)
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: the subset report heatmap (PNG) is skipped.", stacklevel=4)
        return None

    subsets, unscored = subsets_with_unscored(result["subsets"], result.get("subsets_without_cases"))
    row_names = [*subsets, MEAN_ROW]
    nan_row = [math.nan] * len(metrics)
    values = np.array(
        [[float(result["subsets"][n][m]) for m in metrics] if n in result["subsets"] else nan_row for n in subsets]
        + [[float(result["mean_over_subsets"][m]) for m in metrics]],
        dtype=np.float64,
    )
    colours = np.full_like(values, 0.5)
    per_column = []
    for j, metric in enumerate(metrics):
        col = values[:, j]
        ok = np.isfinite(col)
        if metric not in LOWER_IS_BETTER and ok.any() and col[ok].min() >= 0.0 and col[ok].max() <= 1.0:
            # a score in [0, 1]: one absolute scale, so that a Dice of 0.06 is not coloured as good because
            # the other subsets' are 0.05 (the HD95 columns beside it used to put every column on its own scale)
            colours[:, j] = col
            continue
        per_column.append(metric)
        if ok.any() and np.ptp(col[ok]) > 0:
            colours[ok, j] = (col[ok] - col[ok].min()) / np.ptp(col[ok])
        if metric in LOWER_IS_BETTER:
            colours[:, j] = 1.0 - colours[:, j]
    colours = np.ma.masked_invalid(np.where(np.isfinite(values), colours, np.nan))

    # figure is created through the Agg canvas directly (not pyplot), so no global backend state
    fig = Figure(figsize=(2.0 + 1.1 * len(metrics), 1.2 + 0.35 * len(row_names)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps["RdYlGn"].with_extremes(bad="lightgrey")
    image = ax.imshow(colours, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            weight = "bold" if i == len(row_names) - 1 else "normal"
            # white text on the dark ends of the colour map, black elsewhere
            dark = not np.ma.is_masked(colours[i, j]) and not 0.15 <= colours[i, j] <= 0.85
            color = "white" if dark else "black"
            label = "no case" if row_names[i] in unscored else _fmt(values[i, j], digits)
            ax.text(j, i, label, ha="center", va="center", fontsize=8, fontweight=weight, color=color)
    ax.axhline(len(row_names) - 1.5, color="black", linewidth=1.5)
    ax.set_xticks(range(len(metrics)), labels=[_column_label(result, m) for m in metrics])
    counts = {n: result["subsets"][n].get(count_key) for n in result["subsets"]} if count_key else {}
    # a subset's mean over 2 cases beside others over 20 reads as equally sure: say so where the counts differ
    if len(set(counts.values())) > 1:
        labels = [f"{n} (n={counts[n]})" if n in counts else n for n in row_names]
    else:
        labels = row_names
    ax.set_yticks(range(len(row_names)), labels=labels, fontsize=8)
    ax.xaxis.tick_top()
    if len(per_column) == len(metrics):
        title = f"{title}\n(colours scaled per column)"
    elif per_column:
        title = f"{title}\n(colours of {', '.join(per_column)} scaled per column, green = better)"
    if len(per_column) < len(metrics):
        # the bar holds for the absolute-scale columns only: name them, as the per-column ones are named in the title
        absolute = ", ".join(m for m in metrics if m not in per_column)
        fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03, label=f"{absolute} (absolute 0-1 scale)")
    _fit_title(fig, ax, title, fontsize=10)
    return fig


def _fit_title(fig: Any, ax: Any, title: str, fontsize: float) -> None:
    """Set ``title`` over ``ax``, wrapped until it lies within the figure, and lay the figure out.

    The title is centred over the heatmap, not the figure, and a figure is only as wide as its columns: the
    title of a checkpoint with a long file name ran past both edges, cutting off its SHA-256, which names the
    model that was scored.
    """
    import textwrap

    renderer = fig.canvas.get_renderer()
    width = max(len(line) for line in title.splitlines())
    while True:
        text = "\n".join(textwrap.fill(line, width) for line in title.splitlines())
        artist = ax.set_title(text, fontsize=fontsize)
        fig.tight_layout()
        box = artist.get_window_extent(renderer)
        if (fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1) or width <= 16:
            return
        width = int(width * 0.85)


def write_subset_report(
    result: Mapping[str, Any],
    out_dir: str | os.PathLike,
    stem: str = "subset_dice",
    metrics: Sequence[str] = ("WT", "TC", "ET", "mean"),
    title: str | None = None,
    count_key: str | None = None,
    digits: int = 4,
    plot: bool = True,
) -> dict[str, Path]:
    """Write ``result`` as ``<stem>.json``, ``<stem>.csv``, ``<stem>.md`` and ``<stem>.png`` in ``out_dir``.

    - JSON: the whole ``result`` (non-finite floats as ``null``).
    - CSV: header ``subset, *metrics, <count_key>``; one row per scored subset, one with empty
      metrics and a count of 0 per subset without cases, then a ``mean_over_subsets`` row (over the
      scored subsets) with an empty count; floats at full precision.
    - Markdown: a title, :func:`format_table` and a line naming the worst subset.
    - PNG: heatmap of subsets x metrics with annotated values, a grey ``no case`` row per subset without
      cases and the mean row last. A higher-is-better column whose values are all in [0, 1] (Dice,
      accuracies) is coloured on that absolute scale (the colour bar); any other column (HD95, headed with
      its unit, or MAE) is scaled on its own, lower-is-better metrics reversed, and the title names those
      columns; where the subsets' case counts differ, each row label gives its count (``flair (n=4)``).
      Skipped when ``plot`` is False, and with a warning when matplotlib is not installed.

    The files replace those of an earlier report in ``out_dir`` as one set
    (:func:`app.atomic.replace_file_set`): all are written to temporary files first, so an error (a full
    disk) leaves the earlier set as it was; then the earlier set is removed, its JSON first, and the new
    files are renamed into place, the JSON last. A run killed in between leaves the files of one report
    without its JSON, never a JSON beside a CSV, Markdown or PNG of another run: a reader that finds
    ``<stem>.json`` finds its own siblings, and a set without it is incomplete. An earlier PNG goes too
    when none is drawn (``plot`` False, or no matplotlib). Works for the sentiment results too:
    ``metrics=SENTIMENT_METRICS`` with the count key ``"n"`` found automatically.

    Args:
        result: ``aggregate()`` dict of a :class:`~app.metrics.SubsetAccumulator`.
        out_dir: output directory, created if needed.
        stem: file name stem.
        metrics: metric columns, in order.
        title: Markdown heading and heatmap title; defaults to ``"Per-subset results: <stem>"``.
        count_key: see :func:`format_table`.
        digits: decimals in the Markdown table and heatmap annotations.
        plot: whether to draw the heatmap.

    Returns:
        ``{"json": path, "csv": path, "md": path[, "png": path]}``.

    Raises:
        OSError: a file could not be written (naming it and the fix); the earlier report is left whole.
    """
    _check_metrics(result, metrics)
    out_dir = Path(out_dir)
    title = title if title is not None else f"Per-subset results: {stem}"
    count_key = _count_key(result, count_key)
    # every file is made before any is written, so that an error (or a stop) while drawing the heatmap,
    # which takes longest, leaves the earlier report whole
    png = _heatmap_png(result, metrics, title, digits, count_key) if plot else None

    header, rows = _rows(result, metrics, count_key)
    # a subset no case could be scored on gets a row with empty metrics (and a count of 0), so that a
    # reader of the CSV alone sees that the mean row is over fewer subsets
    rows[-1:-1] = [[name, *([""] * len(metrics))] + ([0] if count_key else [])
                   for name in result.get("subsets_without_cases") or []]
    position = _subset_position(row[0] for row in rows[:-1])
    rows[:-1] = sorted(rows[:-1], key=lambda row: position(row[0]))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)

    md = [f"# {title}", "", format_table(result, metrics, count_key, digits), ""]
    worst = _worst_line(result, digits)
    if worst:
        md += [worst, ""]
    if hd95 := result.get("hd95"):  # the convention, where the table is read (a paper's reader asks for it)
        md += [f"HD95: {_fmt(float(hd95['percentile']), 0)}th percentile Hausdorff distance in {hd95['unit']} on each "
               f"case's grid; {_fmt(float(hd95['both_empty']), 2)} when prediction and reference are both empty, "
               f"{_fmt(float(hd95['one_empty']), 2)} (the BraTS penalty) when exactly one is; lower is better.", ""]

    files = {
        "json": strict_json(result).encode("utf-8"),
        "csv": buffer.getvalue().encode("utf-8"),
        "md": "\n".join(md).encode("utf-8"),
        "png": png,  # None: an earlier report's picture goes, it would show other values
    }
    # the JSON marks a whole set: it is removed first and written last
    replace_file_set({out_dir / f"{stem}.{ext}": data for ext, data in files.items()}, last=out_dir / f"{stem}.json")
    return {ext: out_dir / f"{stem}.{ext}" for ext in ("json", "csv", "md", "png") if files[ext] is not None}

"""``python -m app compare``: the ablation table of evaluation reports made apart, with the case-by-case
comparison of each model against the first.

``python -m app ablate`` trains and scores its strategies itself. Models trained apart (another seed, another
recipe, a colleague's checkpoint) are scored by the bundle's ``evaluate.yaml`` one at a time; this command
puts their reports side by side the same way: per subset and metric, the mean over subsets, the worst subset,
and each model's headline metric against the first one's on the same held-out cases with a 95% bootstrap
interval (:func:`app.reports.paired.paired_differences`). Nothing is trained or scored again.

    python -m app compare runs/plain_eval runs/gmd_eval --names plain,gmd --out runs/compare
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Sequence

from app.atomic import check_writable_folder
from app.reports.ablation import ablation_table, format_ablation_markdown, write_ablation_report

__all__ = ["REPORT_FILES", "REPORT_METRICS", "build_parser", "load_report", "main", "report_kind"]

#: The reports a bundle's evaluation writes.
REPORT_FILES: tuple[str, ...] = ("subset_dice.json", "subset_metrics.json")
#: The metrics tabulated by default for each kind of report (the first is compared case by case).
REPORT_METRICS: dict[str, tuple[str, ...]] = {
    "segmentation": ("mean", "WT", "TC", "ET"),
    "sentiment": ("Acc2", "MAE", "F1", "Acc7", "Corr"),
    "sentiment classification": ("Acc", "F1"),
}


def report_kind(report: dict[str, Any]) -> str:
    """``segmentation``, ``sentiment`` or ``sentiment classification``, from the columns of a report's subsets
    (a report may be named otherwise: ``bench/mosi_baselines.py`` writes ``ridge_valid.json``); ``unknown``
    for other columns."""
    columns = set(next(iter(report["subsets"].values()), {}) or {})
    for kind, metrics in REPORT_METRICS.items():
        if set(metrics) <= columns:
            return kind
    return "unknown"


def load_report(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """Read an evaluation report: a ``subset_dice.json`` or ``subset_metrics.json``, or the folder holding one.

    Returns:
        The file read and its contents.

    Raises:
        FileNotFoundError: nothing at ``path``, or a folder without a report.
        ValueError: a file that is not an evaluation report.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in REPORT_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{path} holds no {' or '.join(REPORT_FILES)}: give the --output_dir of an "
                                    "evaluation (evaluate.yaml), or the report file itself.")
        path = found[0]
    elif not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give an evaluation's report ({' or '.join(REPORT_FILES)}) "
                                "or the folder holding it.")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"Cannot read {path} as an evaluation report ({type(err).__name__}: {err}): give the "
                         f"{' or '.join(REPORT_FILES)} an evaluation wrote.") from None
    if (not isinstance(report, dict) or not isinstance(report.get("subsets"), dict) or not report["subsets"]
            or not all(isinstance(row, dict) for row in report["subsets"].values())):
        raise ValueError(f"{path} is not an evaluation report (no per-subset results): give the "
                         f"{' or '.join(REPORT_FILES)} an evaluation wrote.")
    return path, report


def _names(paths: Sequence[Path], names: str | None) -> list[str]:
    """The column names: ``--names``, else each report's folder (its path where two folders share a name)."""
    if names is not None:
        given = [n.strip() for n in names.split(",")]
        if len(given) != len(paths) or not all(given) or len(set(given)) != len(given):
            raise ValueError(f"--names {names!r} must give {len(paths)} different, non-empty names, one per report, "
                             "separated by commas.")
        return given
    folders = [p.parent.name or str(p.parent) for p in paths]
    return folders if len(set(folders)) == len(folders) else [str(p.parent) for p in paths]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", help="two or more evaluation reports (subset_dice.json, "
                        "subset_metrics.json) or the folders holding them; the first is the reference")
    parser.add_argument("--names", default=None, help="comma-separated column names, one per report (default: "
                        "each report's folder)")
    parser.add_argument("--metrics", default=None, help="comma-separated metrics, the first compared case by case "
                        "(default: mean,WT,TC,ET; sentiment: Acc2,MAE,F1,Acc7,Corr)")
    parser.add_argument("--out", default=None, help="folder for compare.json, compare.md and compare.png "
                        "(default: print the Markdown only)")
    parser.add_argument("--title", default="", help="the report's title")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m app compare``: print the Markdown report (and write it with ``--out``); returns 0."""
    args = build_parser().parse_args(argv)
    if len(args.reports) < 2:
        raise ValueError("compare needs two evaluation reports or more: give the reference's first.")
    if args.out is not None:  # before anything is read: a folder that cannot be written wastes nothing
        check_writable_folder(args.out, f"--out {args.out}")
    loaded = [load_report(p) for p in args.reports]
    kinds = {str(path): report_kind(report) for path, report in loaded}
    if len(set(kinds.values())) > 1:
        raise ValueError("The reports are of different kinds (" + ", ".join(f"{p}: {k}" for p, k in kinds.items())
                         + "): compare segmentation reports with each other, and sentiment reports of one task with "
                         "each other.")
    names = _names([path for path, _ in loaded], args.names)
    kind = next(iter(kinds.values()))
    if not args.metrics and kind == "unknown":
        raise ValueError(f"The columns of {loaded[0][0]} are not those of a bundle's report: name the ones to "
                         "compare with --metrics.")
    metrics = ([m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics
               else list(REPORT_METRICS[kind]))
    if not metrics:
        raise ValueError(f"--metrics {args.metrics!r} names no metric.")
    table = ablation_table(dict(zip(names, (report for _, report in loaded))), metrics, reference=names[0])
    table["reports"] = {name: str(path) for name, (path, _) in zip(names, loaded)}
    table["column"] = "model"
    title = args.title or f"Comparison of {len(names)} evaluations"
    if args.out is not None:
        write_ablation_report(table, args.out, title, stem="compare")
    print(format_ablation_markdown(table, title), flush=True)
    return 0

"""Compare training strategies of the mosi_gmd bundle with the dedicated ridge baselines, over seeds.

For each seed and strategy, runs the bundle's two documented commands through the runner of
``python -m app ablate`` (train with model selection on ``valid``, then evaluate the selected
``model.pt`` on ``--eval_split``, ``valid`` by default); the ridge baselines of
:mod:`bench.mosi_baselines` (penalty chosen on ``valid``) are deterministic. It writes, per seed, a
Markdown table of Acc-2 and MAE per subset, the mean over subsets and the worst subset (with the
late-fusion ridge as a reference row), plus the checks of the sentiment issue (GMD vs ridge on
every subset, GMD vs plain on the worst subset); then a summary over the seeds: the mean and
sample standard deviation of each cell (:func:`app.reports.ablation.seed_table`), and on how many
seeds GMD beats the ridge on each subset.

Usage::

    python bench/mosi_compare.py --data_path PKL --trust_pickle true --out_dir outputs/mosi_compare \
        [--strategies plain dropout gmd] [--seeds 0 1 2] [--max_epochs 25] [-- extra bundle overrides]

Regression only (the ridge regresses the sentiment score): bundle overrides (or a recipe) asking for ``--task
classification`` are refused before anything trains; ``python -m app ablate --checkpoint best`` compares
classification runs.

writes ``<out_dir>/compare.{md,json}``, each run under ``<out_dir>/seed_<s>/<strategy>/`` and the
runner's own spread over seeds of the strategies (``<out_dir>/ablation_seeds.{json,md}``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from typing import Any, Mapping, Sequence

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from app.ablation import run_ablation_seeds  # noqa: E402
from app.atomic import atomic_write_text  # noqa: E402
from app.reports.ablation import ablation_table, format_seed_markdown, seed_table  # noqa: E402
from app.data.mmsa import load_mmsa  # noqa: E402
from mosi_baselines import ridge_baselines  # noqa: E402

__all__ = ["comparison_table", "checks", "win_counts", "main"]

BUNDLE = REPO / "bundles" / "mosi_gmd"


def _task(args: Sequence[str]) -> str:
    """The ``task`` the bundle runs with: a ``--task VALUE`` / ``--task=VALUE`` override among ``args`` (the
    last wins), else the last override file of a ``--config_file`` that sets it (a recipe), else the bundle's."""
    task, recipes = None, None
    for i, arg in enumerate(args):
        for key in ("task", "config_file"):
            if arg == f"--{key}" and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(f"--{key}="):
                value = arg.split("=", 1)[1]
            else:
                continue
            task, recipes = (value, recipes) if key == "task" else (task, value)
    if task is None and recipes is not None:
        from app.bundle_args import config_files  # imports monai: only for a command that has a --config_file

        for name in config_files(recipes.strip()):
            if os.path.isfile(name):
                config = yaml.safe_load(Path(name).read_text()) or {}
                task = config.get("task", task) if isinstance(config, dict) else task
    train = yaml.safe_load((BUNDLE / "configs" / "train.yaml").read_text())
    return str(task if task is not None else train["task"]).strip("'\"")


def _worst(report: Mapping[str, Any]) -> dict[str, Any]:
    """Worst subset per metric; a null (non-finite) value counts as the worst."""
    rows = report["subsets"]

    def value(name: str, key: str, bad: float) -> float:
        v = rows[name][key]
        return bad if v is None or not math.isfinite(v) else v

    acc_name = min(rows, key=lambda n: value(n, "Acc2", -math.inf))
    mae_name = max(rows, key=lambda n: value(n, "MAE", math.inf))
    return {"Acc2": (acc_name, rows[acc_name]["Acc2"]), "MAE": (mae_name, rows[mae_name]["MAE"])}


def _num(value: float | None, bold: bool = False) -> str:
    """A table cell: 4 decimals, or ``n/a`` for a null (non-finite) metric."""
    text = "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"
    return f"**{text}**" if bold else text


def _beats(ours: float | None, ref: float | None, higher: bool) -> bool:
    """``ours`` strictly better than ``ref``; a null on either side is no win."""
    if ours is None or ref is None or not (math.isfinite(ours) and math.isfinite(ref)):
        return False
    return ours > ref if higher else ours < ref


def comparison_table(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: one row per subset, then the mean and the worst subset; Acc-2 and MAE per method."""
    methods = list(reports)
    header = "| subset | " + " | ".join(f"{m} Acc2 | {m} MAE" for m in methods) + " |"
    lines = [header, "|:---|" + "---:|" * (2 * len(methods))]
    names = list(next(iter(reports.values()))["subsets"])
    for name in names:
        cells = []
        for m in methods:
            row = reports[m]["subsets"][name]
            cells += [_num(row["Acc2"]), _num(row["MAE"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cells = []
    for m in methods:
        mean = reports[m]["mean_over_subsets"]
        cells += [_num(mean["Acc2"], bold=True), _num(mean["MAE"], bold=True)]
    lines.append("| **mean** | " + " | ".join(cells) + " |")
    cells = []
    for m in methods:
        worst = _worst(reports[m])
        cells += [f"{_num(worst['Acc2'][1])} ({worst['Acc2'][0]})", f"{_num(worst['MAE'][1])} ({worst['MAE'][0]})"]
    lines.append("| worst subset | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checks(reports: Mapping[str, Mapping[str, Any]], model: str = "gmd") -> list[str]:
    """The issue's acceptance checks, as lines of text with PASS/FAIL and the numbers."""
    out = []
    if model in reports and "ridge" in reports:
        ours, ridge = reports[model]["subsets"], reports["ridge"]["subsets"]
        for metric, higher in (("Acc2", True), ("MAE", False)):
            failed = [f"{n} ({_num(ours[n][metric])} vs {_num(ridge[n][metric])})" for n in ours
                      if not _beats(ours[n][metric], ridge[n][metric], higher)]
            status = "PASS" if not failed else "FAIL: " + ", ".join(failed)
            out.append(f"- {model} beats dedicated ridge in {metric} on every subset: {status}")
    if model in reports and "plain" in reports:
        ours, plain = _worst(reports[model]), _worst(reports["plain"])
        acc_ok = _beats(ours["Acc2"][1], plain["Acc2"][1], higher=True)
        mae_ok = _beats(ours["MAE"][1], plain["MAE"][1], higher=False)
        out.append(f"- {model} beats plain on the worst subset: Acc2 {_num(ours['Acc2'][1])} ({ours['Acc2'][0]}) vs "
                   f"{_num(plain['Acc2'][1])} ({plain['Acc2'][0]}): {'PASS' if acc_ok else 'FAIL'}; MAE "
                   f"{_num(ours['MAE'][1])} ({ours['MAE'][0]}) vs {_num(plain['MAE'][1])} ({plain['MAE'][0]}): "
                   f"{'PASS' if mae_ok else 'FAIL'}")
    return out


def win_counts(per_seed: Mapping[int, Mapping[str, Mapping[str, Any]]], model: str = "gmd",
               reference: str = "ridge") -> str:
    """Markdown: per subset, on how many seeds ``model`` beats ``reference`` strictly (Acc-2 higher,
    MAE lower). ``per_seed`` is ``{seed: {method: report}}``."""
    seeds = list(per_seed)
    names = list(per_seed[seeds[0]][model]["subsets"])
    lines = [f"| subset | {model} > {reference} Acc2 (seeds) | {model} < {reference} MAE (seeds) |", "|:---|---:|---:|"]
    for name in names:
        rows = [(per_seed[s][model]["subsets"][name], per_seed[s][reference]["subsets"][name]) for s in seeds]
        acc = sum(_beats(ours["Acc2"], ref["Acc2"], higher=True) for ours, ref in rows)
        mae = sum(_beats(ours["MAE"], ref["MAE"], higher=False) for ours, ref in rows)
        lines.append(f"| {name} | {acc}/{len(seeds)} | {mae}/{len(seeds)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--trust_pickle", default="false")
    parser.add_argument("--out_dir", default="outputs/mosi_compare")
    parser.add_argument("--strategies", nargs="+", default=["plain", "dropout", "gmd"])
    parser.add_argument("--eval_split", default="valid", help="split of the reported table (selection is on valid)")
    parser.add_argument("--max_epochs", type=int, default=None, help="override the bundle's max_epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (one run per seed and strategy)")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}.")
    out_dir = Path(args.out_dir)
    data_args = ["--data_path", str(Path(args.data_path).resolve()), "--trust_pickle", str(args.trust_pickle).lower()]
    try:
        task = _task(extra)
    except ValueError as err:  # a --config_file value that is not a list of files
        print(f"error: {err}", file=sys.stderr)
        return 2
    if task != "regression":
        # the ridge regresses the sentiment score and the tables are Acc-2 and MAE: a classification run
        # would train every strategy and seed, then stop on its Acc/F1 report with a KeyError
        print(f"error: bench/mosi_compare.py compares regression models with the ridge on Acc-2 and MAE, but the "
              f"bundle overrides (or a --config_file recipe) ask for --task {task}. For classification, compare the "
              "strategies with `python -m app ablate --bundle bundles/mosi_gmd --checkpoint best --task classification ...` "
              "(Acc and F1 per subset).", file=sys.stderr)
        return 2
    max_epochs = args.max_epochs or int(yaml.safe_load((BUNDLE / "configs" / "train.yaml").read_text())["max_epochs"])

    try:
        data = load_mmsa(args.data_path, trust_pickle=args.trust_pickle)
        ridge = ridge_baselines(data, select_split="valid", eval_splits=[s for s in [args.eval_split] if s != "valid"])
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    per_seed: dict[int, dict[str, Any]] = {}
    seconds: dict[int, dict[str, float]] = {}
    lines = [f"# Sentiment subsets on the {args.eval_split} split, seeds {', '.join(map(str, args.seeds))}", ""]
    # each seed and strategy: the bundle's train command (selection on valid), then its best checkpoint scored
    try:
        ablations = run_ablation_seeds(BUNDLE, args.strategies, out_dir, max_epochs, args.seeds, checkpoint="best",
                                       eval_split=args.eval_split, bundle_args=[*data_args, *extra])["per_seed"]
    except (RuntimeError, ValueError) as err:
        # the runner's refusals (an unknown strategy, a folder trained with other settings) and a failed
        # run already name the file and the fix: one line, as `python -m app ablate` prints them
        print(f"error: {err}", file=sys.stderr)
        return 2
    # the runner makes the folder once its checks pass: a bad file, split or strategy leaves nothing behind
    out_dir.mkdir(parents=True, exist_ok=True)
    for seed, ablation in ablations.items():
        reports = {s: json.loads(Path(run["report"]).read_text()) for s, run in ablation["runs"].items()}
        seconds[seed] = {s: run["train_seconds"] for s, run in ablation["runs"].items()
                         if run["train_seconds"] is not None}
        reports["ridge"] = ridge["results"][args.eval_split]
        reports["ridge_late"] = ridge["late"][args.eval_split]
        per_seed[seed] = reports
        lines += [f"## Seed {seed}", "", comparison_table(reports), "", *checks(reports), "",
                  "Training wall-clock (s, including validation each epoch): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in seconds[seed].items()), ""]
    if len(args.seeds) > 1:
        spread = seed_table({s: ablation_table(reports, ["Acc2", "MAE"]) for s, reports in per_seed.items()})
        summary = format_seed_markdown(spread, digits=4).replace("## ", "### ")
        lines += [f"## Over {len(args.seeds)} seeds", "", summary]
        if "gmd" in args.strategies:  # the wins are GMD's; a comparison of other strategies has none to count
            lines += ["### Strict wins over the dedicated ridge", "", win_counts(per_seed), ""]
    lines += ["ridge: one ridge per subset, penalty chosen on valid by MAE; ridge_late: the single-modality "
              "ridges mean-fused over each subset (the DS fusion rule applied to linear models).", ""]
    atomic_write_text(out_dir / "compare.md", "\n".join(lines))
    payload = {"reports": {str(k): v for k, v in per_seed.items()}, "train_seconds": {str(k): v for k, v in seconds.items()},
               "ridge_lambdas": ridge["lambdas"], "extra_overrides": extra, "eval_split": args.eval_split,
               "seeds": args.seeds}
    atomic_write_text(out_dir / "compare.json", json.dumps(payload, indent=2, allow_nan=True) + "\n")
    print("\n".join(lines))
    finite = all(r["mean_over_subsets"]["MAE"] is not None and math.isfinite(r["mean_over_subsets"]["MAE"])
                 for reports in per_seed.values() for r in reports.values())
    return 0 if finite else 1


if __name__ == "__main__":
    raise SystemExit(main())

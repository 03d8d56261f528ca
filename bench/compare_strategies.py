"""Equal-budget comparison of training strategies on the brats_gmd bundle.

Each strategy trains for the same wall-clock budget (``time_limit_minutes``) with the same seed,
data split and network, then its final model is evaluated on the held-out validation cases for
all 15 subsets. Writes ``comparison.{json,md}`` with WT/TC/ET/mean over subsets, the worst subset
and the all-four-sequences score.

    python bench/compare_strategies.py --dataset_dir ../shared/data/brats18_dev_2mm --minutes 6 \
        --strategies plain dropout gmd gmd_approx --out outputs/compare -- --patch_size "[64,64,64]"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "brats_gmd"
TRAIN = str(BUNDLE / "configs" / "train.yaml")
EVALUATE = str(BUNDLE / "configs" / "evaluate.yaml")
ALL_FOUR = "flair+t1+t1ce+t2"


def _bundle(configs: list[str], args: list[str], log: Path) -> None:
    config = configs[0] if len(configs) == 1 else str(configs)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config, "--bundle_root", str(BUNDLE), *args]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")


def _held_out_dir(run_dir: Path, target: Path) -> Path:
    """A folder of links to the validation cases of a run's datalist."""
    datalist = json.loads((run_dir / "datalist.json").read_text())
    target.mkdir(parents=True, exist_ok=True)
    for record in datalist["validation"]:
        folder = Path(record["label"]).parent
        link = target / folder.name
        if not link.exists():
            os.symlink(folder, link)
    return target


def summarise(report: dict) -> dict:
    mean = report["mean_over_subsets"]
    return {
        "WT": mean["WT"], "TC": mean["TC"], "ET": mean["ET"], "mean": mean["mean"],
        "worst_subset": report["worst_subset"]["name"], "worst": report["worst_subset"]["mean"],
        "all_four": report["subsets"].get(ALL_FOUR, {}).get("mean"),
        "n_cases": report["subsets"].get(ALL_FOUR, {}).get("n_cases"),
    }


def to_markdown(rows: dict[str, dict], minutes: float) -> str:
    lines = [
        f"Equal budget: {minutes:g} min of training per strategy; final model, held-out cases, hard Dice.",
        "",
        "| strategy | WT | TC | ET | mean over 15 subsets | worst subset | all four sequences | iterations |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['WT']:.3f} | {r['TC']:.3f} | {r['ET']:.3f} | {r['mean']:.3f} | "
            f"{r['worst']:.3f} ({r['worst_subset']}) | {r['all_four']:.3f} | {r.get('iterations', '?')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--out", default="outputs/compare")
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--strategies", nargs="+", default=["plain", "dropout", "gmd", "gmd_approx"],
                        help="names, optionally with GMD subsets as NAME:K, e.g. gmd:5")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    for spec in args.strategies:
        name, _, k = spec.partition(":")
        label = spec.replace(":", "_k")
        run_dir, eval_dir = out / label / "train", out / label / "eval"
        run_dir.mkdir(parents=True, exist_ok=True)
        start = time.time()
        train_args = ["--dataset_dir", args.dataset_dir, "--output_dir", str(run_dir), "--strategy", name,
                      "--max_epochs", "100000", "--time_limit_minutes", str(args.minutes), *extra]
        if k:
            train_args += ["--gmd_subsets", k]
        # a finished stage is reused, so an interrupted comparison can be re-run with the same command
        if not (run_dir / "models" / "model_final.pt").is_file():
            _bundle([TRAIN], train_args, out / label / "train.log")
        held_out = _held_out_dir(run_dir, out / "held_out")
        if not (eval_dir / "subset_dice.json").is_file():
            _bundle([TRAIN, EVALUATE], ["--dataset_dir", str(held_out), "--ckpt_path",
                                        str(run_dir / "models" / "model_final.pt"), "--output_dir", str(eval_dir),
                                        *extra], out / label / "eval.log")
        rows[label] = summarise(json.loads((eval_dir / "subset_dice.json").read_text()))
        log = (out / label / "train.log").read_text()
        its = [int(line.split("iteration ")[1].split(":")[0]) for line in log.splitlines() if "Time limit" in line]
        rows[label]["iterations"] = its[-1] if its else None
        rows[label]["wall_s"] = round(time.time() - start, 1)
        print(json.dumps({"strategy": label, **rows[label]}), flush=True)
        (out / "comparison.json").write_text(json.dumps(rows, indent=2))
        (out / "comparison.md").write_text(to_markdown(rows, args.minutes))
    print(to_markdown(rows, args.minutes))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Plots of GMD conflict diagnostics (paper fig. 3): gradient norms per subset and conflict rates."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

__all__ = ["load_diagnostics", "plot_conflicts", "main"]

DIAGNOSTICS_FILE = "gmd_diagnostics.jsonl"


def load_diagnostics(run_dir: str | os.PathLike) -> list[dict]:
    """Read ``gmd_diagnostics.jsonl`` of a training run.

    Raises:
        FileNotFoundError: naming the file and how to produce it.
    """
    path = Path(run_dir) / DIAGNOSTICS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: train with --strategy gmd (or gmd_approx) and --diagnostics_interval N > 0."
        )
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path} is empty: train for at least diagnostics_interval iterations.")
    return records


def plot_conflicts(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write ``gmd_norms.png`` and ``gmd_conflicts.png`` next to the diagnostics (or to ``out_dir``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = load_diagnostics(run_dir)
    out = Path(out_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    iters = [r["iteration"] for r in records]

    names: list[str] = []
    for r in records:
        names.extend(n for n in r["subsets"] if n not in names)
    fig, ax = plt.subplots(figsize=(9, 5))
    for name in names:
        xs = [r["iteration"] for r in records if name in r["subsets"]]
        ys = [r["norms"][r["subsets"].index(name)] for r in records if name in r["subsets"]]
        ax.plot(xs, ys, label=name, lw=1.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("gradient norm of the shared parameters")
    ax.set_yscale("log")
    ax.set_title("Per-subset gradient norms")
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    norms_png = out / "gmd_norms.png"
    fig.savefig(norms_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(iters, [r["conflicts_before"] / max(r["pairs"], 1) for r in records], label="before decoupling")
    ax.plot(iters, [r["conflicts_after"] / max(r["pairs"], 1) for r in records], label="after decoupling")
    ax.set_xlabel("iteration")
    ax.set_ylabel("fraction of conflicting subset pairs")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("Gradient conflicts between modality subsets")
    fig.tight_layout()
    conflicts_png = out / "gmd_conflicts.png"
    fig.savefig(conflicts_png, dpi=120)
    plt.close(fig)
    return [norms_png, conflicts_png]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app plot-conflicts", description=__doc__)
    parser.add_argument("run_dir", help="training output folder holding gmd_diagnostics.jsonl")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: run_dir)")
    args = parser.parse_args(argv)
    for path in plot_conflicts(args.run_dir, args.out):
        print(path)
    return 0

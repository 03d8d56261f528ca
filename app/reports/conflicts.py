"""Plots of a training run's strategy diagnostics.

- GMD (``gmd_diagnostics.jsonl``, paper fig. 3): gradient norms per subset and the fraction of
  conflicting subset pairs before and after decoupling -> ``gmd_norms.png``, ``gmd_conflicts.png``.
  Exact GMD's gradients are those of the shared parameters (as in the paper's figure); ``gmd_approx``
  decouples, and so records, the gradients w.r.t. the per-sequence trunk outputs, and its plots say so.
- CGGM (``cggm_diagnostics.jsonl``): the balance terms ``B_i`` and each modality probe's score and
  gradient cosine -> ``cggm_balance.png``, ``cggm_probes.png``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from pathlib import Path

from app.atomic import atomic_write_bytes, check_writable_folder

__all__ = ["load_diagnostics", "gradient_space", "plot_conflicts", "plot_cggm", "main"]

DIAGNOSTICS_FILE = "gmd_diagnostics.jsonl"
CGGM_DIAGNOSTICS_FILE = "cggm_diagnostics.jsonl"


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported here: only plotting needs it).

    Raises:
        ImportError: matplotlib is not installed (it is the optional ``plots`` extra), with the fix.
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plot-conflicts needs matplotlib, which is not installed: pip install matplotlib "
                          "(or brats-gmd[plots]).") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Render ``fig`` as PNG and write it atomically (:func:`app.atomic.atomic_write_bytes`), as every other
    report: ``savefig(path)`` wrote through a symbolic link planted under the plot's name in a shared
    folder (into the file it names), and left a cut file when the run was killed mid-write."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    _pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _out_folder(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None) -> Path:
    """The folder the plots go to, created; a file in its place or a folder that cannot be written is
    a ``ValueError`` naming it (``mkdir`` would end in a bare ``FileExistsError``)."""
    out = Path(out_dir or run_dir)
    check_writable_folder(out, f"plot folder {out}", file_fix="pass --out a folder for the plots")
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_diagnostics(run_dir: str | os.PathLike, file_name: str = DIAGNOSTICS_FILE) -> list[dict]:
    """Read a diagnostics file (default ``gmd_diagnostics.jsonl``) of a training run.

    A last record without its line end is left out: the training is still writing it (plotting a run
    in progress), or was killed while writing it, as :class:`app.engines.DiagnosticsHandler` expects.

    Raises:
        FileNotFoundError: naming the file and how to produce it.
        ValueError: the file holds no record, or a complete line that is not a JSON record.
    """
    path = Path(run_dir) / file_name
    if not path.is_file():
        strategy = "cggm" if file_name == CGGM_DIAGNOSTICS_FILE else "gmd (or gmd_approx)"
        raise FileNotFoundError(
            f"{path} not found: train with --strategy {strategy} and --diagnostics_interval N > 0, for at least N "
            "iterations (the first record is written at iteration N; a shorter run, such as one epoch of a few cases, "
            "writes none)."
        )
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()  # cut short: being written, or its writer was killed
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as err:
            raise ValueError(f"{path} line {number} is not a JSON record ({err}): the file is damaged; delete that "
                             "line, or train again with --diagnostics_interval N > 0.") from None
    if not records:
        raise ValueError(f"{path} is empty: train for at least diagnostics_interval iterations.")
    return records


def gradient_space(records: list[dict]) -> str:
    """What the GMD records' gradients are taken of: their ``gradient_space`` entry, or for records
    written without it, ``per-sequence trunk outputs`` for ``gmd_approx`` and ``shared parameters`` else."""
    first = records[0]
    if first.get("gradient_space"):
        return str(first["gradient_space"])
    return "per-sequence trunk outputs" if first.get("strategy") == "gmd_approx" else "shared parameters"


def _integer_ticks(ax) -> None:
    """Ticks at whole iterations only: a run of a few records was labelled 1.5, 2.5, ... iterations."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _subset_styles(names: list[str]) -> list[tuple[str, str]]:
    """A (colour, line style) per subset, no two alike: the line style says how many sequences the subset has
    (solid 1, dashed 2, dash-dot 3, dotted 4), the colour which subset of that size it is. matplotlib's
    default cycle has 10 colours, so 15 subsets drew ``flair`` and ``flair+t1+t1ce`` in the same blue and the
    legend could not tell them apart."""
    styles = ("-", "--", "-.", ":")
    seen: dict[int, int] = {}
    out = []
    for name in names:
        size = name.count("+")
        rank = seen.get(size, 0)
        seen[size] = rank + 1
        # at most 6 subsets of one size with 4 sequences (10 with 5): the 10 colours suffice
        out.append((f"C{rank % 10}", styles[size % len(styles)]))
    return out


def plot_conflicts(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write ``gmd_norms.png`` and ``gmd_conflicts.png`` next to the diagnostics (or to ``out_dir``).

    Raises:
        FileNotFoundError / ValueError: as :func:`load_diagnostics`; ``ValueError`` also for an
            ``out_dir`` that is a file or cannot be written.
    """
    plt = _pyplot()
    records = load_diagnostics(run_dir)
    out = _out_folder(run_dir, out_dir)
    iters = [r["iteration"] for r in records]
    space = gradient_space(records)

    names: list[str] = []
    for r in records:
        names.extend(n for n in r["subsets"] if n not in names)
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, (colour, style) in zip(names, _subset_styles(names)):
        xs = [r["iteration"] for r in records if name in r["subsets"]]
        ys = [r["norms"][r["subsets"].index(name)] for r in records if name in r["subsets"]]
        ax.plot(xs, ys, label=name, lw=1.2, color=colour, linestyle=style)
    ax.set_xlabel("iteration")
    _integer_ticks(ax)
    ax.set_ylabel(f"gradient norm w.r.t. the {space}")
    ax.set_yscale("log")
    ax.set_title(f"Per-subset gradient norms ({space})")
    ax.legend(fontsize=6, ncol=3)
    norms_png = _save(fig, out / "gmd_norms.png")

    fig, ax = plt.subplots(figsize=(9, 4))
    # a record of a single subset (--gmd_subsets 1) has no pair: its fraction is undefined, left as a gap
    # rather than drawn as "no conflict"
    ax.plot(iters, [r["conflicts_before"] / r["pairs"] if r["pairs"] else math.nan for r in records],
            label="before decoupling")
    ax.plot(iters, [r["conflicts_after"] / r["pairs"] if r["pairs"] else math.nan for r in records],
            label="after decoupling")
    if not any(r["pairs"] for r in records):
        ax.text(0.5, 0.5, "no pair of subsets in any record (one subset per iteration): nothing to decouple",
                transform=ax.transAxes, ha="center", va="center", color="dimgrey")
    ax.set_xlabel("iteration")
    _integer_ticks(ax)
    ax.set_ylabel("fraction of conflicting subset pairs")
    ax.set_ylim(-0.03, 1.03)  # a fraction of 0 (every conflict removed) or 1 drawn inside the axes, not on them
    ax.legend()
    ax.set_title(f"Gradient conflicts between modality subsets ({space})")
    conflicts_png = _save(fig, out / "gmd_conflicts.png")
    return [norms_png, conflicts_png]


def plot_cggm(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write ``cggm_balance.png`` (``B_i`` per modality) and ``cggm_probes.png`` (each probe's score
    and the cosine between the fusion head's and its gradient) from ``cggm_diagnostics.jsonl``."""
    plt = _pyplot()
    records = load_diagnostics(run_dir, CGGM_DIAGNOSTICS_FILE)
    out = _out_folder(run_dir, out_dir)
    names = records[0]["modalities"]

    def series(key: str, m: int) -> tuple[list[int], list[float]]:
        pts = [(r["iteration"], r[key][m]) for r in records if r["present"][m] and r[key][m] is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, ax = plt.subplots(figsize=(9, 4))
    for m, name in enumerate(names):
        ax.plot(*series("B", m), label=name, lw=1.2, marker=".")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("iteration")
    _integer_ticks(ax)
    ax.set_ylabel("balance term B (encoder gradient scale)")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_title("CGGM balance terms per modality")
    ax.legend(fontsize=8)
    balance_png = _save(fig, out / "cggm_balance.png")

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for m, name in enumerate(names):
        top.plot(*series("eps", m), label=name, lw=1.2)
        bottom.plot(*series("cos", m), label=name, lw=1.2)
    top.set_ylabel("probe score (accuracy, -MAE or Dice)")
    top.set_title("CGGM modality probes")
    top.legend(fontsize=8)
    bottom.set_ylabel("cos(fusion head grad, probe grad)")
    bottom.set_ylim(-1, 1)
    bottom.set_xlabel("iteration")
    _integer_ticks(bottom)
    probes_png = _save(fig, out / "cggm_probes.png")
    return [balance_png, probes_png]


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m app plot-conflicts``: print the PNGs written; returns 0, or 2 without matplotlib."""
    parser = argparse.ArgumentParser(prog="python -m app plot-conflicts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="training output folder holding gmd_ or cggm_diagnostics.jsonl")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: run_dir)")
    args = parser.parse_args(argv)
    try:  # before any file is read or written: matplotlib is an optional extra
        _pyplot()
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # a CGGM run has only CGGM diagnostics; anything else keeps the GMD plots and their errors
    cggm = (Path(args.run_dir) / CGGM_DIAGNOSTICS_FILE).is_file()
    gmd = (Path(args.run_dir) / DIAGNOSTICS_FILE).is_file()
    if not (gmd or cggm):  # name both: the GMD-only line told a CGGM run that was too short to train GMD
        raise FileNotFoundError(
            f"{Path(args.run_dir)} holds no {DIAGNOSTICS_FILE} or {CGGM_DIAGNOSTICS_FILE}: train with --strategy gmd "
            "(or gmd_approx, or cggm) and --diagnostics_interval N > 0, for at least N iterations (the first record "
            "is written at iteration N; a shorter run, such as one epoch of a few cases, writes none).")
    paths = (plot_cggm(args.run_dir, args.out) if cggm else []) + (
        plot_conflicts(args.run_dir, args.out) if gmd else [])
    for path in paths:
        print(path)
    return 0

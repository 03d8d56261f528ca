"""Shared pieces of the ablation tests: running ``python -m app ablate`` and checking its tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.data.phantoms import write_phantoms
from app.subsets import all_subsets, subset_name
from tests import warm
from tests.bundles.helpers import REPO, TINY


def ablate(*args: str) -> subprocess.CompletedProcess:
    return warm.run([sys.executable, "-m", "app", "ablate", *args], cwd=REPO, timeout=900)


def check_tables(out, strategies, modalities, headline):
    table = json.loads((out / "ablation.json").read_text())
    names = [subset_name(s, modalities) for s in all_subsets(len(modalities))]
    assert table["subsets"] == names and table["strategies"] == strategies
    for strategy in strategies:
        entry = table["tables"][headline][strategy]
        report = json.loads((out / strategy / "eval" / table["runs"][strategy]["report"].split("/")[-1]).read_text())
        values = [report["subsets"][n][headline] for n in names]
        assert entry["subsets"] == dict(zip(names, values))
        assert entry["worst"]["value"] == min(values)
    # the paired comparison, from the evaluations' per-case rows, gives the tables' own differences
    paired = table["paired"]
    assert paired["metric"] == headline
    if "strategies" in paired:
        for strategy in strategies[1:]:
            for name in names:
                got = paired["strategies"][strategy]["subsets"][name]
                assert got["difference"] == pytest.approx(table["tables"][headline][strategy]["subsets"][name]
                                                          - table["tables"][headline][strategies[0]]["subsets"][name])
                assert got["low"] <= got["high"]
    else:
        assert "held-out cases" in paired["unavailable"], paired
    md = (out / "ablation.md").read_text()
    assert md.count("| subset | " + " | ".join(strategies) + " |") == len(table["metrics"])
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    return table


def finished_plain_stage(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """An ablation of plain alone, finished on 5 phantoms: ``(data folder, output folder, its arguments)``."""
    data = tmp_path / "data"
    write_phantoms(data, cases=5, size=32, seed=0)
    out = tmp_path / "ablation"
    args = ["--bundle", "bundles/brats_gmd", "--max_epochs", "1", "--output_dir", str(out), "--dataset_dir",
            str(data), "--epoch_length", "1", *TINY]
    first = ablate("--strategies", "plain", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    return data, out, args


def copy_of(stage: tuple[Path, Path, list[str]], tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of ``stage``'s output folder in ``tmp_path`` (the ablation records paths inside it relative to it), on
    the same data: ``(output folder, its arguments)``."""
    import shutil

    _, out, args = stage
    copy = shutil.copytree(out, tmp_path / "ablation")
    return copy, [str(copy) if a == str(out) else a for a in args]

"""``python -m app plot-conflicts``: CGGM diagnostics plots, and which plots a run folder gets."""

from __future__ import annotations

import json

import pytest

from app.reports.conflicts import load_diagnostics, main, plot_cggm

pytest.importorskip("matplotlib")


def _cggm_records(n: int = 4) -> list[dict]:
    return [{"strategy": "cggm", "iteration": 10 * (i + 1), "modalities": ["text", "audio", "vision"],
             "present": [True, True, i % 2 == 0], "B": [1.2, -0.4 * i, 3.0], "eps": [-0.6, -1.4, -0.9],
             "delta": [0.1, 0.0, -0.1], "cos": [0.3, -0.2, 0.1 if i % 2 == 0 else None], "L_gm": 0.8,
             "head_losses": [0.6, 1.4, 0.9]} for i in range(n)]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_cggm_run_gets_balance_and_probe_plots(tmp_path, capsys):
    _write(tmp_path / "cggm_diagnostics.jsonl", _cggm_records())
    assert main([str(tmp_path), "--out", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[-1] for p in printed] == ["cggm_balance.png", "cggm_probes.png"]
    for name in ("cggm_balance.png", "cggm_probes.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "plots" / "gmd_norms.png").exists()


def test_missing_and_empty_diagnostics_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="--strategy cggm and --diagnostics_interval"):
        plot_cggm(tmp_path)
    # a gmd run shorter than its diagnostics interval writes no file: the line must not only say to train gmd
    with pytest.raises(FileNotFoundError, match=r"--strategy gmd .*for at least N iterations"):
        main([str(tmp_path)])
    (tmp_path / "cggm_diagnostics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_diagnostics(tmp_path, "cggm_diagnostics.jsonl")


def test_without_matplotlib_the_command_names_the_fix(tmp_path, monkeypatch, capsys):
    """matplotlib is the optional ``plots`` extra: without it ``python -m app plot-conflicts`` ended in a
    traceback; it now prints one line with the fix, exit status 2, and writes nothing."""
    import sys

    from app.__main__ import main as app_main

    _write(tmp_path / "cggm_diagnostics.jsonl", _cggm_records())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert app_main(["plot-conflicts", str(tmp_path), "--out", str(tmp_path / "plots")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "needs matplotlib" in lines[0] and "pip install matplotlib" in lines[0], lines
    assert not (tmp_path / "plots").exists()

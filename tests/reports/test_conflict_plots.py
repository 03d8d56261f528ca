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


def test_plots_replace_a_link_in_the_plot_folder_instead_of_writing_through_it(tmp_path, capsys):
    """In a folder others may write to, a symbolic link under a plot's name pointed the plot at another file
    (savefig follows links), which was overwritten; the plot now replaces the link, as the reports do."""
    _write(tmp_path / "cggm_diagnostics.jsonl", _cggm_records())
    victim = tmp_path / "notes.txt"
    victim.write_text("someone else's file")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "cggm_balance.png").symlink_to(victim)
    assert main([str(tmp_path), "--out", str(tmp_path / "plots")]) == 0
    assert victim.read_text() == "someone else's file"
    plot = tmp_path / "plots" / "cggm_balance.png"
    assert not plot.is_symlink() and plot.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["cggm_balance.png", "cggm_probes.png"]


def test_missing_and_empty_diagnostics_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="--strategy cggm and --diagnostics_interval"):
        plot_cggm(tmp_path)
    # a gmd or cggm run shorter than its diagnostics interval writes no file: the line must not only say to train
    # gmd, and must name the file a cggm run writes (it told a short cggm run to train gmd)
    with pytest.raises(FileNotFoundError, match=r"cggm_diagnostics\.jsonl: train with --strategy gmd .*cggm.*"
                                                r"for at least N iterations"):
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


def _gmd_records(strategy: str, n: int = 3) -> list[dict]:
    return [{"strategy": strategy, "iteration": 10 * (i + 1), "subsets": ["flair", "t1+t2"], "norms": [2.0, 0.5],
             "weights": [0.25, 0.75], "pairs": 1, "conflicts_before": i % 2, "conflicts_after": 0}
            for i in range(n)]


@pytest.mark.parametrize("name", ["gmd", "gmd_approx"])
def test_gmd_plots_name_the_space_their_gradients_live_in(name, tmp_path, monkeypatch):
    """gmd_approx decouples dL_j / d(per-sequence trunk outputs), not the shared parameters' gradients the
    paper's fig. 3 shows: its plots were labelled "gradient norm of the shared parameters" all the same, so
    its conflict counts read as those of exact GMD. The strategy now records its space and the plots name it."""
    from app.networks import DSUNet
    from app.reports import conflicts
    from app.strategies import build_strategy

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = DSUNet(features=(4, 8), out_channels=2)
    x, y = torch.randn(1, 4, 8, 8, 8), (torch.rand(1, 2, 8, 8, 8) > 0.5).float()
    diag = build_strategy(name, diagnostics_interval=1).step(
        model, x, torch.ones(1, 4, dtype=torch.bool), y, torch.nn.functional.binary_cross_entropy_with_logits,
        iteration=1).diagnostics
    space = "per-sequence trunk outputs" if name == "gmd_approx" else "shared parameters"
    assert diag["gradient_space"] == space

    labels = []

    def _labels(fig, path):
        labels.append((fig.axes[0].get_ylabel(), fig.axes[0].get_title()))
        return path

    monkeypatch.setattr(conflicts, "_save", _labels)
    # records written before the entry existed: the strategy's name decides
    for records in ([{**r, "gradient_space": space} for r in _gmd_records(name)], _gmd_records(name)):
        labels.clear()
        _write(tmp_path / "gmd_diagnostics.jsonl", records)
        conflicts.plot_conflicts(tmp_path)
        (norm_label, norm_title), (_, conflict_title) = labels
        assert norm_label == f"gradient norm w.r.t. the {space}"
        assert space in norm_title and space in conflict_title


def test_a_record_still_being_written_is_left_out_and_a_damaged_line_is_named(tmp_path):
    # a run in progress (or killed mid-write) ends in a record without its line end: plotting it used
    # to fail with a bare JSONDecodeError ("error: Unterminated string ..." from the command)
    records = _cggm_records(3)
    text = "".join(json.dumps(r) + "\n" for r in records)
    (tmp_path / "cggm_diagnostics.jsonl").write_text(text + json.dumps(records[0])[:25])
    assert [r["iteration"] for r in load_diagnostics(tmp_path, "cggm_diagnostics.jsonl")] == [10, 20, 30]
    assert len(plot_cggm(tmp_path)) == 2
    (tmp_path / "cggm_diagnostics.jsonl").write_text(json.dumps(records[0])[:25] + "\n" + text)
    with pytest.raises(ValueError, match=r"cggm_diagnostics.jsonl line 1 is not a JSON record .*delete that line"):
        load_diagnostics(tmp_path, "cggm_diagnostics.jsonl")


def test_a_plot_folder_that_is_a_file_is_refused_in_one_line(tmp_path, capsys):
    # plot-conflicts --out FILE ended in a FileExistsError traceback
    from app.__main__ import main as app_main

    _write(tmp_path / "cggm_diagnostics.jsonl", _cggm_records())
    taken = tmp_path / "plots.png"
    taken.write_bytes(b"mine")
    with pytest.raises(ValueError, match=r"plots.png is a file, not a folder: pass --out a folder for the plots"):
        plot_cggm(tmp_path, taken)
    assert app_main(["plot-conflicts", str(tmp_path), "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: plot folder ") and err.count("\n") == 1
    assert taken.read_bytes() == b"mine"


def test_the_norm_plot_gives_each_of_the_15_subsets_its_own_line_and_whole_iterations(tmp_path, monkeypatch):
    """matplotlib's default cycle has 10 colours: with all 15 subsets, ``flair`` and ``flair+t1+t1ce`` (and four
    other pairs) were drawn alike, so the legend could not say which line was which. And a run of a few records
    had its iteration axis ticked at 1.5, 2.5, ..."""
    from app.reports import conflicts
    from app.subsets import BRATS_MODALITIES, all_subsets, subset_name

    names = [subset_name(s, BRATS_MODALITIES) for s in all_subsets(4)]
    records = [{"strategy": "gmd", "iteration": i + 1, "subsets": names, "norms": [1.0 + j for j in range(15)],
                "pairs": 105, "conflicts_before": 3, "conflicts_after": 0} for i in range(3)]
    _write(tmp_path / "gmd_diagnostics.jsonl", records)
    figures = []
    monkeypatch.setattr(conflicts, "_save", lambda fig, path: figures.append(fig) or path)
    conflicts.plot_conflicts(tmp_path)
    norms = figures[0].axes[0]
    legend = norms.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == names
    looks = [(line.get_color(), line.get_linestyle()) for line in norms.get_lines()]
    assert len(set(looks)) == 15, looks
    for fig in figures:
        ticks = [t for t in fig.axes[0].get_xticks() if 1 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    # no conflict left after decoupling (0) is a line above the x axis, not hidden on it
    low, high = figures[1].axes[0].get_ylim()
    assert low < 0 and high > 1


def test_records_without_a_pair_of_subsets_are_not_drawn_as_no_conflict(tmp_path, monkeypatch):
    """With one subset per iteration (``--gmd_subsets 1``) a record has 0 pairs: its conflict fraction was drawn
    as 0 (``max(pairs, 1)``), a line of "no conflict" where there is nothing to compare."""
    from app.reports import conflicts

    records = [{"strategy": "gmd", "iteration": i + 1, "subsets": ["flair"], "norms": [1.0], "pairs": 0,
                "conflicts_before": 0, "conflicts_after": 0} for i in range(3)]
    records.append({**records[0], "iteration": 4, "subsets": ["flair", "t1"], "norms": [1.0, 2.0], "pairs": 1,
                    "conflicts_before": 1})
    _write(tmp_path / "gmd_diagnostics.jsonl", records)
    figures = []
    monkeypatch.setattr(conflicts, "_save", lambda fig, path: figures.append(fig) or path)
    conflicts.plot_conflicts(tmp_path)
    before, after = figures[1].axes[0].get_lines()
    assert [str(v) for v in before.get_ydata()] == ["nan", "nan", "nan", "1.0"]
    assert [str(v) for v in after.get_ydata()] == ["nan", "nan", "nan", "0.0"]

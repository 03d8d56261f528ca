"""Report files (JSON, CSV, Markdown, PNG) for Dice and sentiment results, and atomic writes."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest

from app.reports import MEAN_ROW, atomic_write_bytes, atomic_write_text, format_table, write_subset_report
from app.subsets import BRATS_MODALITIES, MOSI_MODALITIES, all_subsets, subset_name

DICE_METRICS = ("WT", "TC", "ET", "mean")
SENTIMENT_METRICS = ("Acc2", "Acc2_has0", "F1", "Acc7", "MAE", "Corr")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _dice_result() -> dict:
    """A hand-made aggregate() dict for all 15 subsets; the worst subset is t1."""
    names = [subset_name(s, BRATS_MODALITIES) for s in all_subsets(4)]
    subsets = {}
    for j, name in enumerate(names):
        wt, tc, et = 0.5 + 0.02 * j, 0.4 + 0.02 * j, 0.3 + 0.02 * j
        if name == "t1":
            wt, tc, et = 0.1, 0.1, 0.1
        subsets[name] = {"WT": wt, "TC": tc, "ET": et, "mean": (wt + tc + et) / 3, "n_cases": 3}
    mean = {k: sum(s[k] for s in subsets.values()) / len(subsets) for k in DICE_METRICS}
    per_case = [{"case": "c0", "subset": n, "WT": s["WT"], "TC": s["TC"], "ET": s["ET"]} for n, s in subsets.items()]
    return {
        "subsets": subsets,
        "mean_over_subsets": mean,
        "worst_subset": {"name": "t1", "mean": subsets["t1"]["mean"]},
        "per_case": per_case,
    }


def _sentiment_result() -> dict:
    names = [subset_name(s, MOSI_MODALITIES) for s in all_subsets(3)]
    subsets = {
        name: {"Acc2": 0.7 + 0.01 * j, "Acc2_has0": 0.68, "F1": 0.7, "Acc7": 0.3, "MAE": 1.0 - 0.05 * j,
               "Corr": 0.6, "n": 10}
        for j, name in enumerate(names)
    }  # fmt: skip
    subsets["vision"]["Corr"] = float("nan")
    mean = {k: sum(s[k] for s in subsets.values()) / len(subsets) for k in SENTIMENT_METRICS}
    return {"subsets": subsets, "mean_over_subsets": mean, "worst_subset": {"name": "text", "Acc2": 0.7}}


def test_dice_report_files(tmp_path: Path):
    result = _dice_result()
    paths = write_subset_report(result, tmp_path / "reports", title="Validation Dice")
    assert set(paths) == {"json", "csv", "md", "png"}
    assert all(p.parent == tmp_path / "reports" and p.stem == "subset_dice" for p in paths.values())

    assert json.loads(paths["json"].read_text()) == result

    with open(paths["csv"], newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["subset", *DICE_METRICS, "n_cases"]
    body = rows[1:]
    assert len(body) == 15 + 1
    assert [r[0] for r in body[:-1]] == list(result["subsets"])
    assert float(body[0][1]) == result["subsets"]["flair"]["WT"]  # full precision
    assert body[0][-1] == "3"
    assert body[-1][0] == MEAN_ROW and body[-1][-1] == ""
    assert float(body[-1][4]) == pytest.approx(result["mean_over_subsets"]["mean"])

    md = paths["md"].read_text()
    assert md.startswith("# Validation Dice\n")
    assert "Worst subset: **t1** (mean = 0.1000)" in md
    assert "| **mean_over_subsets** |" in md
    assert "| flair+t1+t1ce+t2 | 0.7800 | 0.6800 | 0.5800 | 0.6800 | 3 |" in md

    assert paths["png"].read_bytes()[:8] == PNG_MAGIC
    # nothing but the four reports: temporary files were renamed away
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == sorted(p.name for p in paths.values())


def test_sentiment_report_files(tmp_path: Path):
    result = _sentiment_result()
    paths = write_subset_report(result, tmp_path, stem="subset_sentiment", metrics=SENTIMENT_METRICS)
    with open(paths["csv"], newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["subset", *SENTIMENT_METRICS, "n"]
    assert len(rows) - 1 == 7 + 1
    loaded = json.loads(paths["json"].read_text())  # strict JSON: NaN is written as null
    assert loaded["subsets"]["vision"]["Corr"] is None
    assert math.isnan(result["subsets"]["vision"]["Corr"])  # the input is not modified
    md = paths["md"].read_text()
    assert "Worst subset: **text** (Acc2 = 0.7000)" in md
    assert "| vision | 0.7200 | 0.6800 | 0.7000 | 0.3000 | 0.9000 | nan | 10 |" in md
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC


def test_format_table():
    result = _dice_result()
    table = format_table(result)
    lines = table.splitlines()
    assert len(lines) == 2 + 15 + 1
    assert lines[0] == "| subset | WT | TC | ET | mean | n_cases |"
    assert lines[2].startswith("| flair | 0.5000 |")
    # WT: (sum_j (0.5 + 0.02 j) - 0.52 + 0.1) / 15 = (7.5 + 2.1 - 0.42) / 15 = 0.612; TC (6 + 2.1 - 0.32) / 15,
    # ET (4.5 + 2.1 - 0.22) / 15; mean of the three
    assert lines[-1] == "| **mean_over_subsets** | **0.6120** | **0.5187** | **0.4253** | **0.5187** |  |"
    assert format_table(result, ("ET",), digits=2).splitlines()[2] == "| flair | 0.30 | 3 |"
    with pytest.raises(ValueError, match="not in the result"):
        format_table(result, ("Acc2",))


def test_plot_can_be_disabled(tmp_path: Path):
    paths = write_subset_report(_dice_result(), tmp_path, stem="x", plot=False)
    assert set(paths) == {"json", "csv", "md"} and not (tmp_path / "x.png").exists()


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path):
    target = tmp_path / "report.json"
    atomic_write_text(target, "old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # fails while writing the temporary file
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.json"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


def test_csv_lists_the_subsets_without_cases_with_empty_metrics(tmp_path: Path):
    """The Markdown names them in a note; the CSV alone must show that the mean covers fewer subsets."""
    result = _dice_result()
    for name in ("t1ce", "flair+t1ce"):
        del result["subsets"][name]
    result["subsets_without_cases"] = ["t1ce", "flair+t1ce"]
    paths = write_subset_report(result, tmp_path, plot=False)
    with open(paths["csv"], newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert len(rows) == 13 + 2 + 1 and rows[-1][0] == MEAN_ROW
    # in subset order, as in the JSON and the Markdown table, so that two sites' CSVs line up row by row
    assert [row[0] for row in rows[:-1]] == list(_dice_result()["subsets"])
    assert rows[2] == ["t1ce", "", "", "", "", "0"] and rows[5] == ["flair+t1ce", "", "", "", "", "0"]
    assert "No case to score for 2 subset(s) (t1ce, flair+t1ce)" in paths["md"].read_text()


def _two_subsets(**values) -> dict:
    """A result of subsets a and b whose metrics (and mean row) are ``values[metric] = (a, b, mean)``."""
    return {"subsets": {name: {m: v[i] for m, v in values.items()} for i, name in enumerate(("a", "b"))},
            "mean_over_subsets": {m: v[2] for m, v in values.items()}}


def test_numpy_numbers_are_written_as_plain_json(tmp_path: Path):
    """Metrics computed with numpy give np.float32 / np.int64, which the json module refuses."""
    import numpy as np

    result = _two_subsets(WT=(np.float32(0.5), np.float32(0.25), np.float64(0.375)), n_cases=(np.int64(2),) * 3)
    paths = write_subset_report(result, tmp_path, metrics=("WT",), plot=False)
    loaded = json.loads(paths["json"].read_text())
    assert loaded["subsets"] == {"a": {"WT": 0.5, "n_cases": 2}, "b": {"WT": 0.25, "n_cases": 2}}
    assert "| b | 0.2500 | 2 |" in paths["md"].read_text()


def test_a_tiny_negative_value_prints_without_a_sign():
    table = format_table(_two_subsets(Corr=(-1e-7, -0.25, 0.0)), ("Corr",))
    assert "| a | 0.0000 |" in table and "| b | -0.2500 |" in table


def test_a_metric_missing_from_one_subset_is_named():
    result = _two_subsets(WT=(0.5, 0.25, 0.375))
    del result["subsets"]["b"]["WT"]
    with pytest.raises(ValueError, match=r"Metrics \['WT'\] are not in the result"):
        format_table(result, ("WT",))


def test_the_markdown_file_uses_the_digits_asked_for(tmp_path: Path):
    paths = write_subset_report(_two_subsets(WT=(0.5, 0.25, 0.375)), tmp_path, metrics=("WT",), digits=2, plot=False)
    assert "| b | 0.25 |" in paths["md"].read_text() and "| **mean_over_subsets** | **0.38** |" in paths["md"].read_text()


def test_heatmap_colours_put_the_best_value_of_every_column_high(tmp_path: Path, monkeypatch):
    """Per-column scaling (Corr is negative, MAE lower is better): best = 1, worst = 0."""
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    shown = []
    real = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda self, x, *a, **k: (shown.append(x), real(self, x, *a, **k))[1])
    # b is better in both: Corr 0.4 > -0.2, MAE 0.5 < 1.0; the mean row lies halfway
    write_subset_report(_two_subsets(Corr=(-0.2, 0.4, 0.1), MAE=(1.0, 0.5, 0.75)), tmp_path, metrics=("Corr", "MAE"))
    (colours,) = shown
    assert colours.ravel().tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0, 0.5, 0.5])


def _drawn_figures(monkeypatch) -> list:
    """The figures the report saves, kept for their axes and texts."""
    from matplotlib.figure import Figure

    figures = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), real(self, *a, **k))[1])
    return figures


def test_heatmap_keeps_the_dice_on_its_absolute_scale_beside_hd95_and_names_the_unit(tmp_path: Path, monkeypatch):
    """With --hd95 true every column was scaled on its own, so a Dice of 0.06 among Dice of 0.05 was dark
    green, as good as the PNG can show; and the HD95 columns gave no unit (the Markdown's note is not in the
    PNG). The Dice columns keep the absolute [0, 1] scale (with its colour bar), the HD95 ones say mm."""
    pytest.importorskip("matplotlib")
    result = _two_subsets(WT=(0.05, 0.06, 0.055), HD95_WT=(90.0, 100.0, 95.0))
    result["hd95"] = {"percentile": 95, "unit": "mm", "both_empty": 0.0, "one_empty": 373.13}
    figures = _drawn_figures(monkeypatch)
    write_subset_report(result, tmp_path, metrics=("WT", "HD95_WT"))
    (fig,) = figures
    ax = fig.axes[0]
    colours = ax.get_images()[0].get_array()
    assert colours[:, 0].tolist() == pytest.approx([0.05, 0.06, 0.055])  # the Dice as it is, not 0 / 1 / 0.5
    assert colours[:, 1].tolist() == pytest.approx([1.0, 0.0, 0.5])  # HD95: lower is better, on its own scale
    assert [t.get_text() for t in ax.get_xticklabels()] == ["WT", "HD95_WT\n(mm)"]
    assert "HD95_WT scaled per column" in ax.get_title() and len(fig.axes) == 2  # the colour bar of the Dice
    assert fig.axes[1].get_ylabel() == "WT (absolute 0-1 scale)"  # the bar says which columns it holds for


def test_heatmap_shows_the_subsets_without_cases_as_such(tmp_path: Path, monkeypatch):
    """A run whose cases all lack T1ce drew 7 rows and a mean row, nothing saying that 8 subsets are not in
    that mean: the PNG, read alone (a figure in a paper), passed for the whole report. They are rows now, in
    subset order as in the CSV, grey and marked "no case", not 0."""
    pytest.importorskip("matplotlib")
    result = _dice_result()
    missing = [name for name in result["subsets"] if "t1ce" in name]
    for name in missing:
        del result["subsets"][name]
    result["subsets_without_cases"] = missing
    figures = _drawn_figures(monkeypatch)
    write_subset_report(result, tmp_path)
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [*_dice_result()["subsets"], MEAN_ROW]
    row = [t.get_text() for t in ax.texts if t.get_position()[1] == 2]  # t1ce, the third row
    assert row == ["no case"] * 4
    assert all(bool(m) for m in ax.get_images()[0].get_array().mask[2])  # grey (masked), not a colour of 0


def test_a_long_heatmap_title_is_wrapped_inside_the_picture(tmp_path: Path, monkeypatch):
    """The title names the scored checkpoint and its SHA-256; with a long file name it ran past both edges of the
    four-column figure, and the SHA-256 was cut off. It is wrapped, every word kept, within the figure."""
    pytest.importorskip("matplotlib")
    title = "Per-subset results: subset_dice of brats_gmd_site2_seed0_epoch100_model_final.pt (sha256 17a246eb73eb)"
    figures = _drawn_figures(monkeypatch)
    write_subset_report(_dice_result(), tmp_path, title=title)
    (fig,) = figures
    text = fig.axes[0].title
    box = text.get_window_extent(fig.canvas.get_renderer())
    assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1, (box, fig.bbox)
    assert text.get_text().split() == title.split()
    assert f"# {title}" in (tmp_path / "subset_dice.md").read_text()  # the Markdown keeps it on one line


def test_heatmap_rows_give_their_case_counts_where_they_differ(tmp_path: Path, monkeypatch):
    """Half the cases lack T1ce: its subsets' means are over 2 cases, the others' over 4, which the tables' n_cases
    column shows and the PNG did not. Its row labels give the counts then, and only then."""
    pytest.importorskip("matplotlib")
    result = _dice_result()
    for name, row in result["subsets"].items():
        row["n_cases"] = 2 if "t1ce" in name else 4
    figures = _drawn_figures(monkeypatch)
    write_subset_report(result, tmp_path)
    labels = [t.get_text() for t in figures[0].axes[0].get_yticklabels()]
    assert labels[:4] == ["flair (n=4)", "t1 (n=4)", "t1ce (n=2)", "t2 (n=4)"] and labels[-1] == MEAN_ROW
    write_subset_report(_dice_result(), tmp_path)  # 3 cases everywhere: the names alone
    assert [t.get_text() for t in figures[1].axes[0].get_yticklabels()] == [*_dice_result()["subsets"], MEAN_ROW]


def test_the_reports_and_the_key_metric_agree_on_which_metrics_are_better_lower():
    """The reports keep their own copy (they import no torch): it must not drift from the key metric's, and its
    only other entries are the segmentation report's distances."""
    from app.metrics.sentiment_metric import LOWER_IS_BETTER as key_metric
    from app.metrics.subset_metrics import BRATS_REGIONS, hd95_key
    from app.reports.subset_report import LOWER_IS_BETTER as reports

    assert key_metric <= reports
    assert reports - key_metric == {hd95_key(r) for r in BRATS_REGIONS}


def test_sentiment_csv_keeps_subset_order_with_a_subset_without_utterances(tmp_path: Path):
    names = ["text", "audio", "vision", "text+audio", "text+vision", "audio+vision", "text+audio+vision"]
    scored = [n for n in names if n != "audio"]
    result = {"subsets": {n: {"MAE": 0.5, "n": 4} for n in scored}, "mean_over_subsets": {"MAE": 0.5},
              "subsets_without_cases": ["audio"]}
    paths = write_subset_report(result, tmp_path, metrics=["MAE"], plot=False)
    with open(paths["csv"], newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert [row[0] for row in rows] == [*names, MEAN_ROW] and rows[1] == ["audio", "", "0"]


def test_a_run_stopped_while_drawing_the_heatmap_keeps_the_earlier_report_whole(tmp_path: Path, monkeypatch):
    """The heatmap (matplotlib) takes longest: drawn after the tables, a stop (SIGTERM, Ctrl-C) or kill
    while drawing it left the new JSON, CSV and Markdown beside the earlier report's picture."""
    import app.reports.subset_report as subset_report

    out = tmp_path / "reports"
    write_subset_report(_dice_result(), out, title="Checkpoint A")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    newer = _dice_result()
    newer["subsets"]["t1"]["WT"] = 0.9

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(subset_report, "_heatmap_png", stopped)
    with pytest.raises(KeyboardInterrupt):
        write_subset_report(newer, out, title="Checkpoint B")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _written(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("killed_at", [1, 2, 3, 4])
def test_a_run_killed_between_its_files_leaves_no_json_beside_another_runs_files(tmp_path: Path, monkeypatch,
                                                                                  killed_at: int):
    """The files were replaced one by one, the JSON first: a run killed after it (a job's time limit, Ctrl-C)
    left the new JSON beside the CSV, Markdown and PNG of the evaluation before it, and a reader trusting the
    JSON read another checkpoint's table and picture. Where the JSON is, its siblings must be its own."""
    import app.atomic

    newer = _dice_result()
    newer["subsets"]["t1"]["WT"] = 0.9
    expected = _written(write_subset_report(newer, tmp_path / "whole", title="Checkpoint B")["json"].parent)
    out = tmp_path / "reports"
    write_subset_report(_dice_result(), out, title="Checkpoint A")
    renames = []
    real_replace = os.replace

    def killed(src, dst):
        renames.append(dst)
        if len(renames) == killed_at:
            raise KeyboardInterrupt  # the stop lands between two files of the set
        real_replace(src, dst)

    monkeypatch.setattr(app.atomic.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_subset_report(newer, out, title="Checkpoint B")
    monkeypatch.setattr(app.atomic.os, "replace", real_replace)
    left = _written(out)
    assert "subset_dice.json" not in left, sorted(left)  # visibly incomplete
    assert all(data == expected[name] for name, data in left.items()), sorted(left)  # and of one run only
    write_subset_report(newer, out, title="Checkpoint B")  # the next run writes the whole set
    assert _written(out) == expected


def test_a_full_disk_while_writing_the_set_keeps_the_earlier_report_whole(tmp_path: Path, monkeypatch):
    """A full disk at the third file left the new JSON and CSV beside the earlier Markdown and PNG."""
    import errno

    import app.atomic

    out = tmp_path / "reports"
    write_subset_report(_dice_result(), out, title="Checkpoint A")
    before = _written(out)
    newer = _dice_result()
    newer["subsets"]["t1"]["WT"] = 0.9
    writes = []
    real_write = app.atomic._RecordingFile.write

    def full_disk(self, data):
        writes.append(len(data))
        if len(writes) == 3:
            self.error = OSError(errno.ENOSPC, "No space left on device")
            raise self.error
        return real_write(self, data)

    monkeypatch.setattr(app.atomic._RecordingFile, "write", full_disk)
    with pytest.raises(OSError, match="No space left on device.*free space"):
        write_subset_report(newer, out, title="Checkpoint B")
    assert _written(out) == before  # no temporary left either


def test_a_report_without_a_picture_removes_the_earlier_picture(tmp_path: Path):
    """Without a heatmap (plot off, or no matplotlib) the earlier report's PNG stayed beside the new tables."""
    write_subset_report(_dice_result(), tmp_path, title="Checkpoint A")
    paths = write_subset_report(_dice_result(), tmp_path, title="Checkpoint B", plot=False)
    assert set(paths) == {"json", "csv", "md"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["subset_dice.csv", "subset_dice.json", "subset_dice.md"]

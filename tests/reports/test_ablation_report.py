"""Ablation tables: per-subset values, mean, worst subset (direction-aware), and the written files."""

from __future__ import annotations

import json
import math

import pytest

from app.reports.ablation import (
    ablation_table, format_ablation_markdown, format_seed_markdown, seed_table, write_ablation_report,
    write_seed_report,
)


def _report(values: dict[str, dict[str, float]]) -> dict:
    return {"subsets": values}


REPORTS = {
    "plain": _report({"text": {"Acc2": 0.8, "MAE": 0.9}, "audio": {"Acc2": 0.5, "MAE": 1.4},
                      "text+audio": {"Acc2": 0.7, "MAE": 1.0}}),
    "gmd": _report({"text": {"Acc2": 0.85, "MAE": 0.8}, "audio": {"Acc2": 0.6, "MAE": 1.3},
                    "text+audio": {"Acc2": 0.9, "MAE": 0.7}}),
}


def test_mean_and_worst_by_hand():
    table = ablation_table(REPORTS, ["Acc2", "MAE"])
    assert table["subsets"] == ["text", "audio", "text+audio"]
    assert table["strategies"] == ["plain", "gmd"]
    plain_acc = table["tables"]["Acc2"]["plain"]
    assert plain_acc["mean"] == pytest.approx((0.8 + 0.5 + 0.7) / 3)
    assert plain_acc["worst"] == {"name": "audio", "value": 0.5}
    # MAE: lower is better, so the worst subset is the largest error
    gmd_mae = table["tables"]["MAE"]["gmd"]
    assert gmd_mae["mean"] == pytest.approx((0.8 + 1.3 + 0.7) / 3)
    assert gmd_mae["worst"] == {"name": "audio", "value": 1.3}


def test_nan_subset_makes_the_mean_nan_as_in_the_run_report_and_is_left_out_of_worst():
    # a run's report stores a non-finite value as null
    for nan in (float("nan"), None):
        reports = {"a": _report({"x": {"m": nan}, "y": {"m": 0.4}, "z": {"m": 0.6}})}
        entry = ablation_table(reports, ["m"])["tables"]["m"]["a"]
        assert math.isnan(entry["mean"]) and math.isnan(entry["subsets"]["x"])
        assert entry["worst"] == {"name": "y", "value": 0.4}


def test_mismatched_subsets_and_missing_metric_are_refused():
    with pytest.raises(ValueError, match="subsets"):
        ablation_table({"a": _report({"x": {"m": 1.0}}), "b": _report({"y": {"m": 1.0}})}, ["m"])
    with pytest.raises(ValueError, match="--metrics"):
        ablation_table({"a": _report({"x": {"m": 1.0}})}, ["Dice"])
    with pytest.raises(ValueError, match="No strategy"):
        ablation_table({}, ["m"])


def test_markdown_has_one_table_per_metric_with_mean_and_worst_rows():
    md = format_ablation_markdown(ablation_table(REPORTS, ["Acc2", "MAE"]), title="t")
    assert md.count("| subset | plain | gmd |") == 2
    # summary: means, worst subset and the all-modalities subset (the last) of the headline metric
    assert "| gmd | 0.783 | 0.933 | 0.600 (audio) | 0.900 |\n" in md and "iterations" not in md
    with_runs = {**ablation_table(REPORTS, ["Acc2"]), "runs": {"plain": {"iterations": 12}, "gmd": {}}}
    assert "| plain | 0.667 | 0.500 (audio) | 0.700 | 12 |" in format_ablation_markdown(with_runs)
    assert "## MAE (lower is better)" in md and "## Acc2 (higher is better)" in md
    assert "| audio | 0.500 | 0.600 |" in md
    assert "| **worst subset** | 0.500 (audio) | 0.600 (audio) |" in md


def test_write_report_files(tmp_path):
    pytest.importorskip("matplotlib")
    written = write_ablation_report(ablation_table(REPORTS, ["Acc2", "MAE"]), tmp_path, "t")
    assert set(written) == {"json", "md", "png"}
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "ablation.json").read_text())
    assert math.isclose(data["tables"]["Acc2"]["gmd"]["mean"], (0.85 + 0.6 + 0.9) / 3)


def _shifted(delta: float) -> dict:
    return {k: _report({n: {m: v + delta for m, v in row.items()} for n, row in r["subsets"].items()})
            for k, r in REPORTS.items()}


def test_seed_table_mean_and_sample_deviation_by_hand(tmp_path):
    per_seed = {0: ablation_table(REPORTS, ["Acc2", "MAE"]), 1: ablation_table(_shifted(0.1), ["Acc2", "MAE"])}
    table = seed_table(per_seed)
    assert table["seeds"] == [0, 1] and table["subsets"] == ["text", "audio", "text+audio"]
    text = table["tables"]["Acc2"]["plain"]["subsets"]["text"]
    # values 0.8 and 0.9: mean 0.85, sample sd sqrt(2 * 0.05^2 / 1) = 0.0707
    assert text["values"] == [0.8, pytest.approx(0.9)]
    assert text["mean"] == pytest.approx(0.85) and text["std"] == pytest.approx(math.sqrt(2) * 0.05)
    # the mean over subsets and the worst subset are taken per seed, then spread
    assert table["tables"]["Acc2"]["gmd"]["mean"]["values"] == [pytest.approx(2.35 / 3), pytest.approx(2.65 / 3)]
    assert table["tables"]["MAE"]["plain"]["worst"]["values"] == [1.4, pytest.approx(1.5)]
    md = format_seed_markdown(table, "t")
    assert "| text | 0.850 +/- 0.071 | 0.900 +/- 0.071 |" in md
    assert "| **worst subset** | 0.550 +/- 0.071 (audio) | 0.650 +/- 0.071 (audio) |" in md
    assert table["tables"]["MAE"]["plain"]["worst"]["names"] == ["audio", "audio"]
    # seeds that disagree on the worst subset each name theirs
    per_seed[1]["tables"]["Acc2"]["gmd"]["worst"]["name"] = "text"
    assert "0.650 +/- 0.071 (audio on seed 0, text on seed 1)" in format_seed_markdown(seed_table(per_seed))
    written = write_seed_report(table, tmp_path)
    assert json.loads(written["json"].read_text())["tables"]["Acc2"]["plain"]["subsets"]["text"]["mean"] == \
        pytest.approx(0.85)


def test_seed_table_one_seed_has_no_deviation_and_mismatches_are_refused():
    one = seed_table({3: ablation_table(REPORTS, ["Acc2"])})
    assert math.isnan(one["tables"]["Acc2"]["gmd"]["subsets"]["audio"]["std"])
    assert "| audio | 0.500 | 0.600 |" in format_seed_markdown(one)
    with pytest.raises(ValueError, match="strategies"):
        seed_table({0: ablation_table(REPORTS, ["Acc2"]), 1: ablation_table({"plain": REPORTS["plain"]}, ["Acc2"])})
    with pytest.raises(ValueError, match="No ablation"):
        seed_table({})


def test_subsets_that_no_case_could_score_are_named_under_the_summary():
    """Held-out cases all lacking one sequence: the runs' reports name the subsets they could not score,
    but ablation.md gave its means over the rest with no note, as if over every subset."""
    reports = {s: {**r, "subsets_without_cases": ["video", "text+video"]} for s, r in REPORTS.items()}
    table = ablation_table(reports, ["Acc2"])
    assert table["subsets_without_cases"] == ["video", "text+video"]
    md = format_ablation_markdown(table)
    assert ("No case to score for 2 subset(s) (video, text+video): every mean over subsets here is over the 3 "
            "scored, and the summary's last column is text+audio, not all modalities.") in md
    assert "No case to score" not in format_ablation_markdown(ablation_table(REPORTS, ["Acc2"]))
    assert ablation_table(REPORTS, ["Acc2"])["subsets_without_cases"] == []


def test_seeds_whose_held_out_cases_score_other_subsets_still_combine():
    """Each seed holds out other cases; where one seed's all lack a sequence it scores fewer subsets, and
    the multi-seed ablation, every seed trained, stopped at the end with 'combine runs of the same ablation'."""
    fewer = {s: {"subsets": {k: v for k, v in r["subsets"].items() if k != "audio"},
                 "subsets_without_cases": ["audio"]} for s, r in REPORTS.items()}
    table = seed_table({0: ablation_table(REPORTS, ["Acc2"]), 1: ablation_table(fewer, ["Acc2"]),
                        2: ablation_table(REPORTS, ["Acc2"])})
    assert table["subsets"] == ["text", "audio", "text+audio"]
    audio = table["tables"]["Acc2"]["gmd"]["subsets"]["audio"]
    assert audio["values"] == [0.6, None, 0.6] and audio["mean"] == pytest.approx(0.6) and audio["std"] == 0.0
    text = table["tables"]["Acc2"]["gmd"]["subsets"]["text"]
    assert text["values"] == [0.85, 0.85, 0.85]
    assert table["subsets_without_cases"] == {1: ["audio"]}
    md = format_seed_markdown(table)
    assert "seed 1: no case for audio" in md and "| audio | 0.500 +/- 0.000 (2 of 3 seeds) | 0.600 +/- 0.000 (2 of 3 seeds) |" in md
    assert "subsets_without_cases" in json.dumps(table)


def _strict(text: str) -> dict:
    """``json.loads`` that refuses NaN and Infinity, as jq, JavaScript and R's JSON readers do."""
    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_written_tables_are_strict_json_with_null_for_what_is_not_a_number(tmp_path):
    """One seed has no standard deviation and a subset with a NaN metric has a NaN mean: both files held
    the bare token NaN, which readers outside Python refuse, while each run's own report writes null."""
    one_seed = seed_table({0: ablation_table(REPORTS, ["Acc2"])})
    data = _strict(write_seed_report(one_seed, tmp_path)["json"].read_text())
    assert data["tables"]["Acc2"]["gmd"]["subsets"]["audio"] == {"mean": 0.6, "std": None, "values": [0.6]}
    nan_subset = {"a": _report({"x": {"m": float("nan")}, "y": {"m": 0.4}})}
    data = _strict(write_ablation_report(ablation_table(nan_subset, ["m"]), tmp_path / "abl")["json"].read_text())
    assert data["tables"]["m"]["a"]["mean"] is None and data["tables"]["m"]["a"]["subsets"] == {"x": None, "y": 0.4}
    assert data["tables"]["m"]["a"]["worst"] == {"name": "y", "value": 0.4}


def test_a_run_stopped_while_drawing_the_chart_keeps_the_earlier_report_whole(tmp_path, monkeypatch):
    """The bar chart (matplotlib) was drawn after the JSON and Markdown were replaced: a stop while
    drawing it left the new tables beside the earlier ablation's chart."""
    import app.reports.ablation as ablation

    write_ablation_report(ablation_table(REPORTS, ["Acc2", "MAE"]), tmp_path, "first")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ablation, "_bar_chart_png", stopped)
    with pytest.raises(KeyboardInterrupt):
        write_ablation_report(ablation_table(_shifted(0.01), ["Acc2", "MAE"]), tmp_path, "second")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def _drawn_figures(monkeypatch) -> list:
    """The figures the report saves, kept for their axes and texts."""
    from matplotlib.figure import Figure

    figures = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), real(self, *a, **k))[1])
    return figures


def test_the_chart_keeps_unscored_subsets_and_missing_values_visible_and_says_which_way_is_better(tmp_path,
                                                                                                   monkeypatch):
    """The bar chart left out the subsets no held-out case could score (its mean bar passed for one over all
    subsets), drew a value that is not a number as an empty slot (read as 0), labelled its axis with the bare
    metric (an HD95 chart gave neither mm nor that lower is better) and put the legend over the last bars."""
    pytest.importorskip("matplotlib")
    hd95 = {"flair": {"HD95_WT": 9.0}, "t1": {"HD95_WT": float("nan")}, "flair+t1": {"HD95_WT": 4.0}}
    report = {"subsets": hd95, "subsets_without_cases": ["t1ce", "flair+t1ce"]}
    table = ablation_table({"plain": report, "gmd": report}, ["HD95_WT"])
    figures = _drawn_figures(monkeypatch)
    write_ablation_report(table, tmp_path)
    (fig,) = figures
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["flair", "t1", "t1ce", "flair+t1", "flair+t1ce", "mean over subsets",
                                                      "worst subset"]
    texts = [(round(t.get_position()[0]), t.get_text()) for t in ax.texts]
    assert texts.count((2, "no case")) == 1 and texts.count((4, "no case")) == 1
    # t1, and the mean over subsets that holds it (NaN, as in the run's report), for each strategy
    assert sorted(x for x, text in texts if text == "n/a") == [1, 1, 5, 5]
    assert ax.get_ylabel() == "HD95_WT (mm, lower is better)"
    assert "## HD95_WT (mm, lower is better)" in (tmp_path / "ablation.md").read_text()  # as the README says
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["plain (worst: flair)", "gmd (worst: flair)"]
    legend_box = ax.get_legend().get_window_extent(fig.canvas.get_renderer())
    assert legend_box.x0 >= ax.get_window_extent(fig.canvas.get_renderer()).x1  # beside the bars, not over them


def test_a_value_that_is_not_a_number_is_shown_as_such_in_the_markdown_tables():
    """A sentiment model that predicts one constant has a NaN correlation in every subset: its worst-subset cell
    read ``nan ()``; and across seeds, a cell where one seed's NaN was left out printed as a bare mean of the
    other seed, as if every seed agreed."""
    nan = float("nan")
    collapsed = {"plain": _report({"text": {"Corr": nan}, "audio": {"Corr": nan}}),
                 "gmd": _report({"text": {"Corr": 0.5}, "audio": {"Corr": 0.2}})}
    trained = {"plain": _report({"text": {"Corr": 0.1}, "audio": {"Corr": 0.3}}),
               "gmd": _report({"text": {"Corr": 0.5}, "audio": {"Corr": 0.2}})}
    md = format_ablation_markdown(ablation_table(collapsed, ["Corr"]))
    assert "| plain | nan | nan | nan |" in md and "| **worst subset** | nan | 0.200 (audio) |" in md
    seeds = format_seed_markdown(seed_table({0: ablation_table(collapsed, ["Corr"]),
                                             1: ablation_table(trained, ["Corr"])}))
    assert "| text | 0.100 (1 of 2 seeds) | 0.500 +/- 0.000 |" in seeds
    assert "| **worst subset** | 0.100 (1 of 2 seeds) (text on seed 1) | 0.200 +/- 0.000 (audio) |" in seeds

"""Paired comparison of strategies on the same cases, checked against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.reports.ablation import ablation_table, format_ablation_markdown
from app.reports.paired import case_value, paired_differences


def _report(values: dict[str, dict[str, float]]) -> dict:
    """A segmentation report of ``{subset: {case: WT}}`` (TC and ET equal to WT), its subset means computed."""
    per_case = [{"case": c, "subset": s, "WT": v, "TC": v, "ET": v} for s, cases in values.items()
                for c, v in sorted(cases.items())]
    subsets = {s: {r: float(np.mean(list(cases.values()))) for r in ("WT", "TC", "ET", "mean")}
               for s, cases in values.items()}
    return {"subsets": subsets, "per_case": per_case}


def test_differences_counts_and_the_interval_of_two_cases_by_hand():
    # two cases: a resample draws (a, a), (a, b), (b, a) or (b, b), so the mean difference is 0.1, 0.2 or 0.3,
    # 0.1 and 0.3 each with probability 1/4: the 95% interval is [0.1, 0.3] up to resampling noise
    plain = _report({"flair": {"a": 0.5, "b": 0.6}, "t1": {"a": 0.2, "b": 0.4}})
    gmd = _report({"flair": {"a": 0.6, "b": 0.9}, "t1": {"a": 0.1, "b": 0.4}})
    got = paired_differences({"gmd": gmd, "plain": plain}, "mean", ["flair", "t1"])
    assert got["reference"] == "plain" and got["cases"] == 2 and list(got["strategies"]) == ["gmd"]
    flair = got["strategies"]["gmd"]["subsets"]["flair"]
    assert flair["difference"] == pytest.approx(0.2)
    assert (flair["low"], flair["high"]) == (pytest.approx(0.1), pytest.approx(0.3))
    assert (flair["better"], flair["worse"], flair["n"]) == (2, 0, 2)
    t1 = got["strategies"]["gmd"]["subsets"]["t1"]  # a: -0.1, b: a tie
    assert t1["difference"] == pytest.approx(-0.05) and (t1["better"], t1["worse"]) == (0, 1)
    # the mean over subsets: (0.2 - 0.05) / 2; case a's own mean changes by 0, case b's by +0.15
    mean = got["strategies"]["gmd"]["mean"]
    assert mean["difference"] == pytest.approx(0.075) and (mean["better"], mean["worse"]) == (1, 0)
    assert mean["low"] <= mean["difference"] <= mean["high"]
    # for an error (HD95, MAE) a lower value is the better one
    flipped = paired_differences({"gmd": gmd, "plain": plain}, "mean", ["flair", "t1"], lower_is_better=True)
    assert (flipped["strategies"]["gmd"]["subsets"]["flair"]["better"],
            flipped["strategies"]["gmd"]["subsets"]["flair"]["worse"]) == (0, 2)
    # seeded: the same report twice
    assert paired_differences({"gmd": gmd, "plain": plain}, "mean", ["flair", "t1"]) == got


def test_a_case_missing_a_sequence_counts_only_in_the_subsets_it_has():
    plain = _report({"flair": {"a": 0.5, "b": 0.5, "c": 0.5}, "t1": {"a": 0.5, "b": 0.5}})
    gmd = _report({"flair": {"a": 0.5, "b": 0.5, "c": 0.8}, "t1": {"a": 0.6, "b": 0.6}})
    got = paired_differences({"plain": plain, "gmd": gmd}, "WT", ["flair", "t1"])["strategies"]["gmd"]
    assert got["subsets"]["flair"]["difference"] == pytest.approx(0.1) and got["subsets"]["flair"]["n"] == 3
    assert got["subsets"]["t1"]["difference"] == pytest.approx(0.1) and got["subsets"]["t1"]["n"] == 2


def test_cases_of_one_group_are_resampled_together():
    # two videos: v1 holds a, b (each +0.2), v2 holds c (0). Drawn by video, a resample's difference is the mean of
    # its cases: both videos drawn give 0.4/3, only v1 0.2, only v2 0, so the interval spans [0, 0.2]; a and b can
    # never be drawn apart, so a resample never gives a mean like 0.1 (a and c) that drawing cases alone allows
    plain = _report({"flair": {"v1_a": 0.5, "v1_b": 0.5, "v2_c": 0.5}})
    gmd = _report({"flair": {"v1_a": 0.7, "v1_b": 0.7, "v2_c": 0.5}})
    got = paired_differences({"plain": plain, "gmd": gmd}, "WT", ["flair"], group_of=lambda c: c.split("_")[0],
                             group_word="video", resamples=400)
    assert got["groups"] == 2 and got["resampled"] == "video" and got["cases"] == 3
    flair = got["strategies"]["gmd"]["subsets"]["flair"]
    assert (flair["low"], flair["high"]) == (pytest.approx(0.0), pytest.approx(0.2))
    by_case = paired_differences({"plain": plain, "gmd": gmd}, "WT", ["flair"], resamples=400)
    assert by_case["groups"] == 3 and by_case["resampled"] == "case"
    # one group holds every case: no interval can be drawn
    one = paired_differences({"plain": plain, "gmd": gmd}, "WT", ["flair"], group_of=lambda c: "v",
                             group_word="video")
    assert one["unavailable"] == "a comparison needs two held-out videos or more"


def test_what_cannot_be_compared_says_why():
    plain = _report({"flair": {"a": 0.5, "b": 0.6}})
    assert "two strategies" in paired_differences({"plain": plain}, "mean", ["flair"])["unavailable"]
    other_cases = _report({"flair": {"a": 0.5, "c": 0.6}})
    assert "same cases" in paired_differences({"plain": plain, "gmd": other_cases}, "mean", ["flair"])["unavailable"]
    # a report whose subset figure is not the mean of its rows (another convention) is not misread
    odd = _report({"flair": {"a": 0.5, "b": 0.6}})
    odd["subsets"]["flair"]["mean"] = 0.9
    assert "per-case mean" in paired_differences({"plain": plain, "gmd": odd}, "mean", ["flair"])["unavailable"]
    # an earlier version's report without rows
    assert "unavailable" in paired_differences({"plain": plain, "gmd": {"subsets": plain["subsets"]}}, "mean",
                                               ["flair"])
    assert case_value({"case": "a", "subset": "text", "pred": 1.0, "label": 2.0}, "Corr") is None


def test_the_sentiment_metrics_per_utterance_reproduce_the_accumulators_figures():
    from app.metrics.sentiment import SubsetSentimentAccumulator

    rng = np.random.default_rng(0)
    labels = np.round(rng.uniform(-3, 3, 40), 1)
    labels[:5] = 0.0  # Acc2 leaves these out, Acc2_has0 counts them negative
    reports = {}
    for name, noise in (("plain", 1.0), ("gmd", 0.5)):
        acc = SubsetSentimentAccumulator()
        for subset in range(7):
            acc.update([f"u{i}" for i in range(40)], subset, labels + rng.normal(0, noise, 40), labels)
        reports[name] = acc.aggregate()
    subsets = list(reports["plain"]["subsets"])
    for metric, lower in (("MAE", True), ("Acc2", False), ("Acc2_has0", False), ("Acc7", False)):
        got = paired_differences(reports, metric, subsets, lower_is_better=lower)
        assert "unavailable" not in got, metric  # the per-utterance values give the accumulator's figures
        text = got["strategies"]["gmd"]["subsets"]["text"]
        assert text["difference"] == pytest.approx(reports["gmd"]["subsets"]["text"][metric]
                                                   - reports["plain"]["subsets"]["text"][metric])
        assert text["n"] == (35 if metric == "Acc2" else 40)
    # classification: the accuracy is a mean over utterances of class ids, F1 is not
    from app.metrics.sentiment_metric import SubsetClassificationAccumulator

    classes = {}
    for name in ("plain", "gmd"):
        acc = SubsetClassificationAccumulator()
        for subset in range(7):
            acc.update([f"u{i}" for i in range(40)], subset, rng.integers(0, 4, 40), rng.integers(0, 4, 40))
        classes[name] = acc.aggregate()
    assert "strategies" in paired_differences(classes, "Acc", list(classes["plain"]["subsets"]))
    assert "unavailable" in paired_differences(reports, "F1", subsets)
    assert math.isnan(case_value({"pred": 1.0, "label": 0.0}, "Acc2"))
    # in an ablation table, utterances are resampled by video (the ids here name 40 videos of one utterance)
    table = ablation_table(reports, ["Acc2", "MAE"])
    assert table["paired"]["resampled"] == "video" and table["paired"]["groups"] == 40
    assert "2000 resamples of the 40 videos, each with all its utterances" in format_ablation_markdown(table)


def test_the_ablation_report_shows_the_paired_differences_of_its_headline_metric():
    plain = _report({"flair": {"a": 0.5, "b": 0.6}, "t1": {"a": 0.2, "b": 0.4}})
    gmd = _report({"flair": {"a": 0.6, "b": 0.9}, "t1": {"a": 0.1, "b": 0.4}})
    table = ablation_table({"plain": plain, "gmd": gmd}, ["mean", "WT"])
    assert table["paired"]["metric"] == "mean" and list(table["paired"]["strategies"]) == ["gmd"]
    md = format_ablation_markdown(table)
    assert "## Paired differences from plain: mean" in md
    assert "| flair | +0.200 [+0.100, +0.300] 2/0 |" in md
    assert "| **mean over subsets** | **+0.075 [" in md

"""MMSA-style sentiment metrics against hand-computed values, and the 7-subset accumulator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from app.metrics import SENTIMENT_METRICS, SubsetSentimentAccumulator, sentiment_metrics, weighted_f1

PREDS = [3.8, 0.7, 1.6, 0.2, -0.3]
LABELS = [3.0, 0.5, 1.0, -2.0, 0.0]


def test_sentiment_metrics_by_hand():
    m = sentiment_metrics(PREDS, LABELS)
    assert list(m) == [*SENTIMENT_METRICS, "n"]
    assert m["n"] == 5
    # Acc2 (non-zero labels: first four). truth > 0: T T T F; preds > 0: T T T T -> 3/4
    assert m["Acc2"] == pytest.approx(0.75)
    # F1 on the same four: class T: TP 3, FP 1, FN 0 -> 6/7, support 3; class F: TP 0 -> 0, support 1
    # weighted: (3 * 6/7 + 1 * 0) / 4 = 9/14
    assert m["F1"] == pytest.approx(9 / 14)
    # Acc2_has0 (all five, 0 is negative). truth > 0: T T T F F; preds > 0: T T T T F -> 4/5
    assert m["Acc2_has0"] == pytest.approx(0.8)
    # Acc7: clip then round half to even. preds 3.8->3, 0.7->1, 1.6->2, 0.2->0, -0.3->0;
    # labels 3->3, 0.5->0 (half to even), 1->1, -2->-2, 0->0. Matches: first and last -> 2/5
    assert m["Acc7"] == pytest.approx(0.4)
    # MAE on unclipped values: (0.8 + 0.2 + 0.6 + 2.2 + 0.3) / 5 = 0.82
    assert m["MAE"] == pytest.approx(0.82)
    # Pearson: means 1.2 and 0.5; deviations p (2.6, -0.5, 0.4, -1, -1.5), y (2.5, 0, 0.5, -2.5, -0.5)
    # sum(dp*dy) = 9.95, sum(dp^2) = 10.42, sum(dy^2) = 13
    assert m["Corr"] == pytest.approx(9.95 / math.sqrt(10.42 * 13.0))


def test_sentiment_metrics_accepts_tensors_of_any_shape():
    m = sentiment_metrics(torch.tensor(PREDS)[:, None], np.array(LABELS))
    assert m == pytest.approx(sentiment_metrics(PREDS, LABELS), rel=1e-6)


def test_corr_is_zero_when_one_side_is_constant():
    assert sentiment_metrics([1.0, 1.0, 1.0], [0.5, -1.0, 2.0])["Corr"] == 0.0
    assert sentiment_metrics([0.5, -1.0, 2.0], [2.0, 2.0, 2.0])["Corr"] == 0.0


def test_all_zero_labels_make_non_zero_metrics_nan():
    m = sentiment_metrics([0.3, -0.2], [0.0, 0.0])
    assert math.isnan(m["Acc2"]) and math.isnan(m["F1"])
    assert m["Acc2_has0"] == 0.5  # both labels negative: -0.2 matches, 0.3 does not


def test_a_prediction_of_exactly_zero_is_negative():
    """Both binary accuracies compare preds > 0 (not >= 0): PREDS and LABELS have no 0 prediction."""
    m = sentiment_metrics([0.0, 0.0, 1.0], [-1.0, -2.0, 0.0])
    # Acc2 on the two non-zero labels: truth F F, preds F F -> 1; with >= 0 it would be T T -> 0
    assert m["Acc2"] == 1.0 and m["F1"] == 1.0
    # Acc2_has0: truth F F F (0 is negative), preds F F T -> 2/3
    assert m["Acc2_has0"] == pytest.approx(2 / 3)


def test_sentiment_metrics_validation():
    with pytest.raises(ValueError, match="sizes differ"):
        sentiment_metrics([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        sentiment_metrics([], [])


def test_weighted_f1_by_hand():
    # truth 0 0 1 1 1, preds 0 1 1 1 0: class 0 TP 1 FP 1 FN 1 -> 1/2 (support 2);
    # class 1 TP 2 FP 1 FN 1 -> 2/3 (support 3); weighted (2 * 1/2 + 3 * 2/3) / 5 = 0.6
    assert weighted_f1(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0])) == pytest.approx(0.6)
    # a class only in the predictions has weight 0: class T F1 = 2/(2+0+1) = 2/3, all support on T
    assert weighted_f1(np.array([True, True]), np.array([True, False])) == pytest.approx(2 / 3)
    assert weighted_f1(np.array([1, 0, 1]), np.array([1, 0, 1])) == 1.0


def test_subset_sentiment_accumulator():
    acc = SubsetSentimentAccumulator()
    assert acc.subset_names == [
        "text", "audio", "vision", "text+audio", "text+vision", "audio+vision", "text+audio+vision"
    ]  # fmt: skip
    ids = [f"s{i}" for i in range(5)]
    good = torch.tensor(LABELS, dtype=torch.float64)[:, None].repeat(1, 7)  # perfect for every subset...
    good[:, 1] = torch.tensor(PREDS, dtype=torch.float64)  # ...except audio
    acc.update_from_preds(ids, good, LABELS)
    result = acc.aggregate()
    assert set(result) == {"subsets", "mean_over_subsets", "worst_subset", "subsets_without_cases", "per_case"}
    assert list(result["subsets"]) == acc.subset_names
    # every utterance's prediction under every subset, by subset then id
    assert len(result["per_case"]) == 7 * 5
    audio = [row for row in result["per_case"] if row["subset"] == "audio"]
    assert audio == [{"case": f"s{i}", "subset": "audio", "pred": pytest.approx(PREDS[i]), "label": LABELS[i]}
                     for i in range(5)]
    assert [row["subset"] for row in result["per_case"]][::5] == acc.subset_names
    assert result["subsets"]["audio"] == pytest.approx(sentiment_metrics(PREDS, LABELS))
    assert result["subsets"]["text"] == pytest.approx(sentiment_metrics(LABELS, LABELS))
    assert result["subsets"]["text"]["Acc2"] == 1.0 and result["subsets"]["text"]["MAE"] == 0.0
    assert result["worst_subset"] == {"name": "audio", "Acc2": pytest.approx(0.75)}
    assert result["mean_over_subsets"]["Acc2"] == pytest.approx((6 * 1.0 + 0.75) / 7)
    assert result["mean_over_subsets"]["MAE"] == pytest.approx(0.82 / 7)
    assert set(result["mean_over_subsets"]) == set(SENTIMENT_METRICS)

    # per-sample updates, in another order and split over two "ranks", give the same result
    ranks = [SubsetSentimentAccumulator(), SubsetSentimentAccumulator()]
    for i in reversed(range(5)):
        for j in range(7):
            ranks[i % 2].update_case(ids[i], j, good[i, j].item(), LABELS[i])
    ranks[0].merge(ranks[1].state_dict())
    assert ranks[0].aggregate() == result


def test_subset_sentiment_accumulator_partial_and_mapping():
    acc = SubsetSentimentAccumulator()
    acc.update_from_preds(["a", "b", "c"], {6: torch.tensor([[1.0], [-1.0], [2.0]])}, torch.tensor([1.5, -0.5, 2.0]))
    result = acc.aggregate()
    assert list(result["subsets"]) == ["text+audio+vision"]
    assert result["subsets"]["text+audio+vision"]["n"] == 3
    with pytest.raises(ValueError, match="sizes differ"):
        acc.update(["a"], 0, [1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="subset_preds"):
        acc.update_from_preds(["a"], torch.zeros(1, 6), [1.0])


def test_worst_subset_skips_a_subset_whose_acc2_is_undefined():
    # text: both labels 0, Acc2 NaN; audio: labels +1, -1, preds both positive, Acc2 1/2;
    # vision: both right, Acc2 1. The worst defined subset is audio, even though text comes first
    acc = SubsetSentimentAccumulator()
    acc.update(["a", "b"], 0, [1.0, -1.0], [0.0, 0.0])
    acc.update(["a", "b"], 1, [1.0, 1.0], [1.0, -1.0])
    acc.update(["a", "b"], 2, [1.0, -1.0], [1.0, -1.0])
    result = acc.aggregate()
    assert math.isnan(result["subsets"]["text"]["Acc2"])
    assert result["worst_subset"] == {"name": "audio", "Acc2": 0.5}


def test_a_subset_without_samples_is_named_in_the_words_of_the_branch(caplog):
    from app.metrics.sentiment import SubsetSentimentAccumulator

    acc = SubsetSentimentAccumulator()
    acc.update(["u0", "u1"], 0, [1.0, -1.0], [2.0, -2.0])  # text alone; no utterance scored on the other 6
    with caplog.at_level("WARNING"):
        result = acc.aggregate()
    assert list(result["subsets"]) == ["text"] and len(result["subsets_without_cases"]) == 6
    assert "6 of the 7 subsets have no utterance to score" in caplog.text
    assert "Add utterances that have those modalities" in caplog.text

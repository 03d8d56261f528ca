"""Sentiment evaluator, 7-subset key metric (hand-computed values) and the report handler."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from ignite.engine import Engine
from torch.utils.data import DataLoader, Subset

from app.data import MMSADataset, make_synthetic_mmsa
from app.engines import SentimentReportHandler, SentimentSubsetEvaluator
from app.metrics import SubsetClassificationAccumulator, SubsetSentimentScore
from app.networks import DSTransformer, PromptedDSTransformer
from app.subsets import subset_masks

NAMES = ["text", "audio", "vision", "text+audio", "text+vision", "audio+vision", "text+audio+vision"]


def _output(preds_per_subset: list[list[float]], labels: list[float], valid=None) -> dict:
    preds = torch.tensor(preds_per_subset, dtype=torch.float32).T.unsqueeze(-1)  # [B, 7, 1]
    out = {"case": [f"c{i}" for i in range(len(labels))], "label": torch.tensor(labels)[:, None], "subset_preds": preds}
    if valid is not None:
        out["subset_valid"] = torch.tensor(valid)
    return out


def test_key_metric_by_hand():
    labels = [2.0, -1.0, 0.0, 1.0]
    # subset 0 (text) perfect, every other subset predicts 0.5 for all
    preds = [labels] + [[0.5] * 4] * 6
    metric = SubsetSentimentScore(key="MAE")
    metric.update(_output(preds, labels))
    value = metric.compute()
    result = metric.last_result
    assert list(result["subsets"]) == NAMES
    text = result["subsets"]["text"]
    assert text["MAE"] == 0.0 and text["Acc2"] == 1.0 and text["Acc7"] == 1.0 and text["n"] == 4
    assert text["Corr"] == pytest.approx(1.0)
    other = result["subsets"]["audio"]
    # |2-.5| + |-1-.5| + |0-.5| + |1-.5| = 1.5 + 1.5 + .5 + .5 = 4 -> 1.0
    assert other["MAE"] == pytest.approx(1.0)
    # non-zero labels 2, -1, 1 -> predicted positive: 2 of 3 right; has0: the 0 label is negative,
    # so it is wrong too -> 2 of 4
    assert other["Acc2"] == pytest.approx(2 / 3) and other["Acc2_has0"] == pytest.approx(0.5)
    # weighted F1 over {pos: support 2, F1 = 2*2/(2*2+1) = 0.8; neg: support 1, F1 = 0} -> 1.6 / 3
    assert other["F1"] == pytest.approx(1.6 / 3)
    # constant predictions: correlation defined as 0
    assert other["Corr"] == 0.0
    assert value == pytest.approx(-(0.0 + 6 * 1.0) / 7)
    assert result["worst_subset"]["name"] == "audio"
    acc = SubsetSentimentScore(key="Acc2")
    acc.update(_output(preds, labels))
    assert acc.compute() == pytest.approx((1.0 + 6 * 2 / 3) / 7)


def test_key_metric_subset_valid_and_errors():
    labels = [1.0, -1.0]
    valid = [[True] * 7, [True, False, True, False, True, False, False]]
    metric = SubsetSentimentScore()
    metric.update(_output([[1.0, -1.0]] * 7, labels, valid))
    metric.compute()
    counts = {name: row["n"] for name, row in metric.last_result["subsets"].items()}
    assert counts == {"text": 2, "audio": 1, "vision": 2, "text+audio": 1, "text+vision": 2, "audio+vision": 1,
                      "text+audio+vision": 1}
    with pytest.raises(ValueError, match="subset_preds"):
        metric.update({"case": ["a"], "label": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a regression metric"):
        SubsetSentimentScore(key="Dice")
    assert SubsetSentimentScore().key == "MAE" and SubsetSentimentScore(task="classification").key == "Acc"


def test_classification_metric_by_hand():
    logits = torch.zeros(4, 7, 3)
    logits[:, :, 0] = 1.0  # every subset predicts class 0
    logits[:, 0] = torch.eye(3)[[0, 1, 2, 2]]  # text predicts 0, 1, 2, 2
    metric = SubsetSentimentScore(key="Acc", task="classification")
    metric.update({"case": list("abcd"), "label": torch.tensor([0, 1, 2, 1]), "subset_preds": logits})
    value = metric.compute()
    text, audio = metric.last_result["subsets"]["text"], metric.last_result["subsets"]["audio"]
    assert text["Acc"] == 0.75 and audio["Acc"] == 0.25
    # text F1: class0 1.0 (w 1), class1 2/3 (w 2), class2 2/3 (w 1) -> (1 + 4/3 + 2/3) / 4 = 0.75
    assert text["F1"] == pytest.approx(0.75)
    assert value == pytest.approx((0.75 + 6 * 0.25) / 7)
    assert isinstance(metric._accumulator, SubsetClassificationAccumulator)


def test_evaluator_scores_all_subsets_from_one_pass_and_writes_report(tmp_path):
    data = make_synthetic_mmsa({"valid": 10}, layout="unaligned", dims=(6, 5, 4), seq_len=4)
    ds = MMSADataset(data, "valid")
    torch.manual_seed(0)
    net = DSTransformer(in_features=(6, 5, 4), hidden=16, num_heads=2, fusion="confidence")
    net.set_input_statistics(ds.statistics())
    metric = SubsetSentimentScore()
    evaluator = SentimentSubsetEvaluator(device=torch.device("cpu"), val_data_loader=DataLoader(ds, batch_size=4),
                                         network=net, key_val_metric={"val_score": metric})
    SentimentReportHandler(metric, tmp_path, print_table=False).attach(evaluator)
    evaluator.run()
    out = evaluator.state.output
    assert out["subset_preds"].shape == (2, 7, 1) and out["subset_valid"].all()
    # every subset's predictions equal a direct forward with only that subset's modalities
    batch = next(iter(DataLoader(ds, batch_size=10)))
    net.eval()
    report = json.loads((tmp_path / "subset_metrics.json").read_text())
    with torch.no_grad():
        for name, sub in zip(NAMES, subset_masks(3)):
            pred = net(batch["image"], batch["modality_mask"] & sub)
            mae = float((pred[:, 0] - batch["label"][:, 0]).abs().mean())
            assert math.isclose(report["subsets"][name]["MAE"], mae, rel_tol=1e-5)
            assert report["subsets"][name]["n"] == 10
        # the reported prediction (last batch: samples 8, 9) is the one from all of each sample's modalities
        assert torch.allclose(out["pred"], net(batch["image"], batch["modality_mask"])[8:], atol=1e-6)
    assert set(report) == {"subsets", "mean_over_subsets", "worst_subset", "subsets_without_cases", "per_case"}
    assert evaluator.state.metrics["val_score"] == pytest.approx(-report["mean_over_subsets"]["MAE"])
    for ext in ("csv", "md", "png"):
        assert (tmp_path / f"subset_metrics.{ext}").stat().st_size > 0
    assert "Acc2_has0" in (tmp_path / "subset_metrics.csv").read_text().splitlines()[0]


def test_report_handler_ignores_missing_result_and_can_skip_the_plot(tmp_path):
    class Result:
        last_result = None

    engine = Engine(lambda e, b: None)
    SentimentReportHandler(Result(), tmp_path)(engine)
    assert not list(tmp_path.iterdir())
    metric = SubsetSentimentScore()
    metric.update(_output([[1.0, -1.0]] * 7, [1.0, -2.0]))
    metric.compute()
    SentimentReportHandler(metric, tmp_path, plot=False)(engine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["subset_metrics.csv", "subset_metrics.json", "subset_metrics.md"]


@pytest.mark.parametrize("predicts_missing", [False, True])
def test_evaluator_refuses_non_finite_outputs_of_a_sample_and_names_it(predicts_missing):
    """A NaN would count as a negative prediction in Acc-2 and hide in the table."""
    data = make_synthetic_mmsa({"valid": 6}, layout="unaligned", dims=(6, 5, 4), seq_len=4)
    data["valid"]["vision_lengths"][:2] = 0  # samples 0 and 1 lack vision
    ds = MMSADataset(data, "valid")
    torch.manual_seed(0)
    cls = PromptedDSTransformer if predicts_missing else DSTransformer
    net = cls(in_features=(6, 5, 4), hidden=16, num_heads=2)
    net.set_input_statistics(ds.statistics())

    def evaluate(samples: list[int]) -> SubsetSentimentScore:
        metric = SubsetSentimentScore()
        loader = DataLoader(Subset(ds, samples), batch_size=len(samples))
        SentimentSubsetEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=net,
                                 key_val_metric={"val_score": metric}).run()
        return metric

    healthy = evaluate([0, 1]).last_result["subsets"]
    with torch.no_grad():
        net.encoders[2].proj.weight[0, 0] = float("nan")  # a broken vision encoder
    if not predicts_missing:
        # the samples without vision are still scored on their subsets: the broken encoder is not read for them
        result = evaluate([0, 1]).last_result["subsets"]
        assert result["text+audio"]["n"] == 2 and result["text+audio"]["MAE"] == healthy["text+audio"]["MAE"]
    which = "vision, text+vision, audio+vision, text+audio+vision" if predicts_missing else "vision"
    with pytest.raises(ValueError, match=rf"^Sample validvid0_2: the network gave NaN or infinite outputs for "
                                         rf"{re.escape(which)}, so it cannot be scored"):
        evaluate(list(range(6)))


def test_check_finite_predictions_reads_only_present_outputs_and_any_non_finite_value():
    """An absent modality's output is never read (it may be anything, e.g. the NaN mean of an empty sequence);
    an infinite value, or one NaN among a present output's classes, spoils the sample as a NaN does."""
    from app.engines.sentiment import check_finite_predictions

    values = torch.zeros(3, 2, 2)  # [B, K, C]
    present = torch.tensor([[1, 0], [1, 1], [1, 1]])
    values[0, 1] = float("nan")  # absent: not read
    check_finite_predictions(values, present, ["a", "b", "c"], ["text", "audio"])
    for value in (float("inf"), float("-inf"), float("nan")):
        spoiled = values.clone()
        spoiled[2, 1, 1] = value  # one class of a present output
        with pytest.raises(ValueError, match=r"^Sample c: the network gave NaN or infinite outputs for audio, so"):
            check_finite_predictions(spoiled, present, ["a", "b", "c"], ["text", "audio"])

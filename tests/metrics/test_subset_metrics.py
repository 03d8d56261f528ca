"""Per-subset Dice accumulation, aggregation, merging and the scalar ignite metric."""

from __future__ import annotations

import json

import pytest
import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError

from app.metrics import SubsetDiceAccumulator, SubsetMeanDice, hard_dice
from app.subsets import BRATS_MODALITIES, all_subsets, subset_name

# Written out so that a change of the subset order or naming (which would silently reorder
# every report) fails here.
EXPECTED_NAMES = [
    "flair", "t1", "t1ce", "t2",
    "flair+t1", "flair+t1ce", "flair+t2", "t1+t1ce", "t1+t2", "t1ce+t2",
    "flair+t1+t1ce", "flair+t1+t2", "flair+t1ce+t2", "t1+t1ce+t2",
    "flair+t1+t1ce+t2",
]  # fmt: skip
FLAIR, ALL = 0, 14


def _two_by_two() -> SubsetDiceAccumulator:
    acc = SubsetDiceAccumulator()
    # float64 like hard_dice's output, so the values are exactly those written here
    acc.update(["a", "b"], FLAIR, torch.tensor([[0.2, 0.4, 0.6], [0.4, 0.6, 0.8]], dtype=torch.float64))
    acc.update_case("a", ALL, [0.8, 0.8, 0.8])
    acc.update_case("b", ALL, torch.tensor([1.0, 0.6, 0.9], dtype=torch.float64))
    return acc


def test_subset_names_and_order_are_stable():
    acc = SubsetDiceAccumulator()
    assert acc.subset_names == EXPECTED_NAMES
    assert acc.subset_names == [subset_name(s, BRATS_MODALITIES) for s in all_subsets(4)]
    assert acc.subset_names[FLAIR] == "flair" and acc.subset_names[ALL] == "flair+t1+t1ce+t2"


def test_aggregate_by_hand():
    result = _two_by_two().aggregate()
    assert set(result) == {"subsets", "mean_over_subsets", "worst_subset", "per_case", "subsets_without_cases"}
    # subsets without cases are omitted; present ones keep all_subsets order
    assert list(result["subsets"]) == ["flair", "flair+t1+t1ce+t2"]
    flair = result["subsets"]["flair"]
    # WT (0.2 + 0.4) / 2, TC (0.4 + 0.6) / 2, ET (0.6 + 0.8) / 2, mean of the three
    assert flair == pytest.approx({"WT": 0.3, "TC": 0.5, "ET": 0.7, "mean": 0.5, "n_cases": 2})
    assert list(flair) == ["WT", "TC", "ET", "mean", "n_cases"]
    assert isinstance(flair["n_cases"], int)
    full = result["subsets"]["flair+t1+t1ce+t2"]
    # WT (0.8 + 1.0) / 2, TC (0.8 + 0.6) / 2, ET (0.8 + 0.9) / 2, mean (0.9 + 0.7 + 0.85) / 3
    assert full == pytest.approx({"WT": 0.9, "TC": 0.7, "ET": 0.85, "mean": 2.45 / 3, "n_cases": 2})
    # unweighted mean over the two evaluated subsets
    expected_mean = {"WT": 0.6, "TC": 0.6, "ET": 0.775, "mean": (0.5 + 2.45 / 3) / 2}
    assert result["mean_over_subsets"] == pytest.approx(expected_mean)
    assert result["worst_subset"] == {"name": "flair", "mean": pytest.approx(0.5)}
    assert result["per_case"] == [
        {"case": "a", "subset": "flair", "WT": 0.2, "TC": 0.4, "ET": 0.6},
        {"case": "b", "subset": "flair", "WT": 0.4, "TC": 0.6, "ET": 0.8},
        {"case": "a", "subset": "flair+t1+t1ce+t2", "WT": 0.8, "TC": 0.8, "ET": 0.8},
        {"case": "b", "subset": "flair+t1+t1ce+t2", "WT": 1.0, "TC": 0.6, "ET": 0.9},
    ]
    json.dumps(result)  # plain JSON types only


def test_mean_over_subsets_is_unweighted_by_case_count():
    """Each subset counts once in mean_over_subsets, whatever its number of cases."""
    # _two_by_two has two cases per subset, where a case-weighted mean gives the same number
    acc = SubsetDiceAccumulator()
    acc.update(["a", "b", "c"], FLAIR, [[0.0, 0.3, 0.6], [0.3, 0.3, 0.3], [0.6, 0.3, 0.0]])
    acc.update_case("a", ALL, [0.9, 0.9, 0.9])
    result = acc.aggregate()
    # flair: WT 0.3, TC 0.3, ET 0.3, mean 0.3 (3 cases); all: 0.9 (1 case)
    # unweighted (0.3 + 0.9) / 2 = 0.6; weighted by cases it would be (3 * 0.3 + 0.9) / 4 = 0.45
    assert result["mean_over_subsets"] == pytest.approx({"WT": 0.6, "TC": 0.6, "ET": 0.6, "mean": 0.6})
    assert result["subsets"]["flair"]["n_cases"] == 3 and result["subsets"]["flair+t1+t1ce+t2"]["n_cases"] == 1


def test_aggregate_does_not_depend_on_update_order():
    acc = SubsetDiceAccumulator()
    acc.update_case("b", ALL, [1.0, 0.6, 0.9])
    acc.update_case("a", ALL, [0.8, 0.8, 0.8])
    acc.update(["b", "a"], FLAIR, [[0.4, 0.6, 0.8], [0.2, 0.4, 0.6]])
    assert json.dumps(acc.aggregate()) == json.dumps(_two_by_two().aggregate())


def test_worst_subset_tie_goes_to_earlier_subset():
    acc = SubsetDiceAccumulator()
    for j in (5, 2, 9):
        acc.update_case("a", j, [0.5, 0.5, 0.5])
    assert acc.aggregate()["worst_subset"]["name"] == EXPECTED_NAMES[2]


def test_duplicate_case_is_counted_and_warned():
    acc = SubsetDiceAccumulator()
    acc.update_case("a", FLAIR, [0.0, 0.0, 0.0])
    acc.update_case("a", ALL, [0.0, 0.0, 0.0])  # same case, other subset: fine
    with pytest.warns(UserWarning, match="scored twice"):
        acc.update_case("a", FLAIR, [1.0, 1.0, 1.0])  # e.g. non-unique ids: no row is lost
    assert len(acc) == 3
    assert acc.aggregate()["subsets"]["flair"]["n_cases"] == 2
    assert acc.aggregate()["subsets"]["flair"]["mean"] == 0.5


def test_reset_and_empty_aggregate():
    acc = _two_by_two()
    acc.reset()
    assert len(acc) == 0
    with pytest.raises(ValueError, match="no rows"):
        acc.aggregate()


def test_merge_equals_single_accumulator():
    g = torch.Generator().manual_seed(0)
    dice = torch.rand(6, 15, 3, generator=g)
    cases = [f"case{i}" for i in range(6)]
    single = SubsetDiceAccumulator()
    ranks = [SubsetDiceAccumulator(), SubsetDiceAccumulator()]
    for i, case in enumerate(cases):
        for j in range(15):
            single.update_case(case, j, dice[i, j])
            ranks[i % 2].update_case(case, j, dice[i, j])
    merged = SubsetDiceAccumulator()
    merged.merge(ranks[0])
    # states travel between ranks as plain objects (here through JSON)
    merged.merge(json.loads(json.dumps(ranks[1].state_dict())))
    assert merged.aggregate() == single.aggregate()
    restored = SubsetDiceAccumulator()
    restored.load_state_dict(single.state_dict())
    assert restored.aggregate() == single.aggregate()
    with pytest.raises(ValueError, match="Cannot merge"):
        SubsetDiceAccumulator(modalities=("t1", "t2")).merge(single)


def test_input_validation():
    acc = SubsetDiceAccumulator()
    # -1 must not wrap round to the last subset (all four sequences)
    for bad in (15, -1):
        with pytest.raises(IndexError, match="out of range for 15 subsets"):
            acc.update_case("a", bad, [1.0, 1.0, 1.0])
    assert len(acc) == 0
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        acc.update(["a"], 0, torch.ones(1, 2))
    with pytest.raises(ValueError, match="case ids"):
        acc.update(["a", "b"], 0, torch.ones(1, 3))
    with pytest.raises(TypeError):
        acc.update("ab", 0, torch.ones(2, 3))
    with pytest.raises(ValueError, match="valid"):
        acc.update(["a", "b"], 0, torch.ones(2, 3), valid=[True])
    with pytest.raises(ValueError, match="subset_dice"):
        acc.update_from_subset_dice(["a"], torch.ones(1, 7, 3))
    with pytest.raises(ValueError, match="mean"):
        SubsetDiceAccumulator(regions=("WT", "mean"))


def test_valid_mask_leaves_cases_out_of_subsets():
    dice = torch.rand(2, 15, 3, dtype=torch.float64)
    valid = torch.ones(2, 15, dtype=torch.bool)
    valid[1, FLAIR] = False  # case b lacks flair: not scored on flair
    acc = SubsetDiceAccumulator()
    acc.update_from_subset_dice(["a", "b"], dice, valid)
    result = acc.aggregate()
    assert result["subsets"]["flair"]["n_cases"] == 1
    assert result["subsets"]["flair"]["WT"] == dice[0, FLAIR, 0].item()
    assert result["subsets"]["t1"]["n_cases"] == 2
    assert len(result["per_case"]) == 2 * 15 - 1
    # the logits path takes the same mask
    logits, label = _random_batch(4)
    from_logits = SubsetDiceAccumulator()
    from_logits.update_from_logits(["a", "b"], logits, label, valid=valid)
    assert from_logits.aggregate()["subsets"]["flair"]["n_cases"] == 1
    assert result["subsets_without_cases"] == []


def test_subsets_without_cases_are_named_in_the_result_and_the_table(caplog):
    """No case has T1ce: the 8 subsets with t1ce are left out of the mean, and the result says which."""
    from app.reports.subset_report import format_table
    from app.subsets import BRATS_MODALITIES, all_subsets, subset_name

    names = [subset_name(s, BRATS_MODALITIES) for s in all_subsets(4)]
    dice = torch.rand(1, 15, 3, dtype=torch.float64)
    valid = torch.tensor([["t1ce" not in n for n in names]])
    acc = SubsetDiceAccumulator()
    acc.update_from_subset_dice(["a"], dice, valid)
    with caplog.at_level("WARNING"):
        result = acc.aggregate()
    missing = [n for n in names if "t1ce" in n]
    assert result["subsets_without_cases"] == missing and len(missing) == 8 and len(result["subsets"]) == 7
    expected = sum(dice[0, j, :].mean().item() for j, n in enumerate(names) if "t1ce" not in n) / 7
    assert result["mean_over_subsets"]["mean"] == pytest.approx(expected)
    assert "8 of the 15 subsets have no case to score" in caplog.text
    assert format_table(result).splitlines()[-1] == (
        f"No case to score for 8 subset(s) ({', '.join(missing)}): mean_over_subsets is over the 7 scored.")


def test_subsets_without_cases_are_warned_about_once_per_training(caplog):
    """A training's validation scores the same cases every epoch: the warning that no case can score the T1ce
    subsets came at every validation (100 times in a 100-epoch run). It comes again when those subsets change."""
    import logging

    from app.subsets import BRATS_MODALITIES, all_subsets, subset_name

    names = [subset_name(s, BRATS_MODALITIES) for s in all_subsets(4)]
    metric = SubsetMeanDice()

    def validate(lacking: str) -> None:
        metric.reset()  # as at every validation
        metric.accumulator.update_from_subset_dice(["a"], torch.rand(1, 15, 3, dtype=torch.float64),
                                                   torch.tensor([[lacking not in n.split("+") for n in names]]))
        metric.compute()
        assert len(metric.last_result["subsets_without_cases"]) == 8

    with caplog.at_level(logging.WARNING, logger="app.metrics.subset_metrics"):
        for _ in range(3):
            validate("t1ce")
        assert caplog.text.count("8 of the 15 subsets have no case to score (t1ce, ") == 1
        validate("t2")
        assert caplog.text.count("8 of the 15 subsets have no case to score (t2, ") == 1
        validate("t1ce")  # changed again: said again
        assert caplog.text.count("8 of the 15 subsets have no case to score (t1ce, ") == 2


def _random_batch(seed: int, b: int = 2, s: int = 15):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, s, 3, 6, 6, 6, generator=g)
    label = torch.rand(b, 3, 6, 6, 6, generator=g) > 0.5
    label[0, 2] = False  # an empty ET
    return logits, label


def test_update_from_logits_tensor_and_mapping_agree():
    logits, label = _random_batch(0)
    from_tensor = SubsetDiceAccumulator()
    from_tensor.update_from_logits(["a", "b"], logits, label)
    from_mapping = SubsetDiceAccumulator()
    from_mapping.update_from_logits(["a", "b"], {j: logits[:, j] for j in range(15)}, label)
    assert from_tensor.aggregate() == from_mapping.aggregate()
    result = from_tensor.aggregate()
    assert list(result["subsets"]) == EXPECTED_NAMES
    expected = hard_dice(logits[:, 3] > 0, label)
    assert result["subsets"]["t2"]["ET"] == pytest.approx(expected[:, 2].mean().item())
    with pytest.raises(ValueError, match="subset_logits"):
        from_tensor.update_from_logits(["a", "b"], logits[:, :7], label)


def test_subset_mean_dice_ignite_metric():
    batches = [_random_batch(1), _random_batch(2)]
    data = [
        {"subset_logits": logits, "label": label, "case": [f"c{k}a", f"c{k}b"]}
        for k, (logits, label) in enumerate(batches)
    ]
    evaluator = Engine(lambda engine, batch: batch)
    metric = SubsetMeanDice()
    metric.attach(evaluator, "subset_mean_dice")
    state = evaluator.run(data)

    reference = SubsetDiceAccumulator()
    for batch in data:
        reference.update_from_logits(batch["case"], batch["subset_logits"], batch["label"])
    expected = reference.aggregate()
    value = state.metrics["subset_mean_dice"]
    assert isinstance(value, float)
    assert value == expected["mean_over_subsets"]["mean"]
    assert metric.last_result == expected
    assert len(metric.last_result["subsets"]) == 15 and len(metric.last_result["per_case"]) == 4 * 15

    # a second run starts from scratch (reset on EPOCH_STARTED)
    state = evaluator.run(data[:1])
    first = SubsetDiceAccumulator()
    first.update_from_logits(data[0]["case"], data[0]["subset_logits"], data[0]["label"])
    assert state.metrics["subset_mean_dice"] == first.aggregate()["mean_over_subsets"]["mean"]


def test_subset_mean_dice_from_precomputed_dice():
    """The evaluator's format: per-subset hard Dice [B, S, 3], validity [B, S] and case ids."""
    g = torch.Generator().manual_seed(5)
    data = []
    for k in range(3):
        valid = torch.rand(2, 15, generator=g) > 0.2
        data.append({"subset_dice": torch.rand(2, 15, 3, generator=g, dtype=torch.float64),
                     "subset_valid": valid, "case": [f"c{k}a", f"c{k}b"], "pred": None})  # fmt: skip
    evaluator = Engine(lambda engine, batch: batch)
    metric = SubsetMeanDice()
    metric.attach(evaluator, "val_mean_dice")
    state = evaluator.run(data)
    reference = SubsetDiceAccumulator()
    for batch in data:
        reference.update_from_subset_dice(batch["case"], batch["subset_dice"], batch["subset_valid"])
    assert state.metrics["val_mean_dice"] == reference.aggregate()["mean_over_subsets"]["mean"]
    assert metric.last_result == reference.aggregate()


def test_subset_mean_dice_direct_use():
    metric = SubsetMeanDice()
    with pytest.raises(NotComputableError):
        metric.compute()
    logits, label = _random_batch(3)
    # the sentiment metric's error for the same bad output (a ValueError: one error line in a bundle run)
    with pytest.raises(ValueError, match=r"needs 'case', .* in the output, got tuple\.$"):
        metric.update((logits, label, ["x", "y"]))
    with pytest.raises(ValueError, match=r"needs 'case', .* in the output, got \['label'\]\.$"):
        metric.update({"label": label})
    with pytest.raises(ValueError, match="subset_dice"):
        metric.update({"subset_logits": logits, "case": ["x", "y"]})  # no label
    metric.update({"subset_logits": logits, "label": label, "case": ["x", "y"]})
    value = metric.compute()
    # every case in every subset: the mean of hard Dice over subsets, cases and regions, computed
    # here without the accumulator (a range check would pass for any constant in [0, 1])
    expected = torch.stack([hard_dice(logits[:, j] > 0, label) for j in range(15)]).mean().item()
    assert value == pytest.approx(expected, abs=1e-12)
    assert metric.last_result["mean_over_subsets"]["mean"] == value


def test_subset_mean_dice_uses_its_threshold_and_the_validity_of_logits():
    """SubsetMeanDice(threshold=0.8) on logits: the threshold and subset_valid reach the Dice."""
    # logit 1.0 is probability 0.731: foreground at 0.5, background at 0.8; the target is all tumour
    logits = torch.ones(1, 15, 3, 2)
    logits[:, FLAIR] = 10.0  # foreground at any threshold: would score 1 if the invalid subset counted
    label = torch.ones(1, 3, 2, dtype=torch.bool)
    valid = torch.ones(1, 15, dtype=torch.bool)
    valid[0, FLAIR] = False
    metric = SubsetMeanDice(threshold=0.8)
    metric.update({"subset_logits": logits, "label": label, "subset_valid": valid, "case": ["x"]})
    # 14 valid subsets, each with an empty prediction against a full target: Dice 0 for every region
    # (threshold ignored -> 1.0; validity ignored -> 1/15)
    assert metric.compute() == 0.0
    assert metric.last_result["subsets_without_cases"] == ["flair"]
    assert len(metric.last_result["subsets"]) == 14
    # and the default threshold 0.5 makes the same logits a perfect prediction
    default = SubsetMeanDice()
    default.update({"subset_logits": logits, "label": label, "subset_valid": valid, "case": ["x"]})
    assert default.compute() == 1.0


def test_rows_of_every_metric_are_read_as_flat_float64_vectors():
    """The one reader of metric inputs (Dice rows, validity flags, sentiment predictions and labels)."""
    import numpy as np

    from app.metrics.subset_metrics import _as_1d

    grad = torch.tensor([[0.25], [0.5]], dtype=torch.float32, requires_grad=True)
    for values in (grad, np.array([[0.25], [0.5]], dtype=np.float16), [0.25, 0.5], (True, False)):
        out = _as_1d(values)
        assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (2,)
    assert _as_1d(grad).tolist() == [0.25, 0.5]
    assert _as_1d((True, False)).tolist() == [1.0, 0.0]

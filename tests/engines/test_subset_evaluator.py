"""The segmentation evaluator: sliding-window outputs per case, whatever the window batching, and the
subsets each case is scored on."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.inferers import SlidingWindowInferer

from app.engines import SubsetEvaluator
from app.metrics import SubsetMeanDice
from app.networks import DSUNet


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return DSUNet(features=(4, 8, 16)).eval()


def _outputs(net, inputs, mask, sw_batch_size):
    inferer = SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=sw_batch_size, overlap=0.5, mode="gaussian")
    evaluator = SubsetEvaluator(device=torch.device("cpu"), val_data_loader=[], network=net, inferer=inferer)
    with torch.no_grad():
        return evaluator.per_modality_outputs(inputs, mask)


def test_windows_batched_together_all_see_their_case_mask(net):
    torch.manual_seed(1)
    inputs = torch.randn(2, 4, 16, 16, 12)  # 27 windows of 8^3 per case
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    one = _outputs(net, inputs, mask, sw_batch_size=1)
    assert one.shape == (2, 4, 3, 16, 16, 12)
    # every window of a present modality was decoded: no voxel is left at the blend of zeros
    assert (one[0, [0, 2, 3]] != 0).all() and (one[1, 1] != 0).all()
    assert (one[0, 1] == 0).all() and (one[1, [0, 2, 3]] == 0).all()
    for sw in (2, 5):
        assert torch.allclose(_outputs(net, inputs, mask, sw_batch_size=sw), one, atol=1e-5)
    # the same as scoring each case on its own
    assert torch.allclose(_outputs(net, inputs[1:], mask[1:], sw_batch_size=4), one[1:], atol=1e-5)


def test_mask_rows_must_match_the_batch(net):
    with pytest.raises(ValueError, match=r"one row per image"):
        net.per_modality(torch.randn(2, 4, 8, 8, 8), torch.ones(1, 4, dtype=torch.bool))


def test_a_case_without_t1_is_left_out_of_every_subset_with_t1_only(net):
    """n_cases of the validation report: N - 1 for the 8 subsets containing t1, N for the other 7."""
    torch.manual_seed(2)
    cases = ["a", "b", "no_t1"]
    masks = [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 1, 1]]
    data = [{"image": torch.randn(1, 4, 8, 8, 8), "label": (torch.rand(1, 3, 8, 8, 8) > 0.5).float(),
             "modality_mask": torch.tensor([m], dtype=torch.bool), "case": [c]} for c, m in zip(cases, masks)]
    metric = SubsetMeanDice()
    inferer = SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=1)
    evaluator = SubsetEvaluator(device=torch.device("cpu"), val_data_loader=data, network=net, inferer=inferer,
                                key_val_metric={"val_mean_dice": metric})
    evaluator.run()
    subsets = metric.last_result["subsets"]
    assert len(subsets) == 15
    assert {name: row["n_cases"] for name, row in subsets.items()} == {
        name: 2 if "t1" in name.split("+") else 3 for name in subsets
    }
    assert sum("t1" in name.split("+") for name in subsets) == 8
    # the case is scored on every subset it has, and on none it lacks
    scored = {row["subset"] for row in metric.last_result["per_case"] if row["case"] == "no_t1"}
    assert scored == {name for name in subsets if "t1" not in name.split("+")}
    # the reported prediction of the last case fuses the sequences it has, not the zeros standing for t1
    net.eval()
    with torch.no_grad():
        expected = net(data[-1]["image"], data[-1]["modality_mask"])
    assert torch.allclose(evaluator.state.output["pred"], expected, atol=1e-5)


def test_each_subset_is_scored_on_its_own_fused_prediction(net):
    """subset_dice[:, j] is the hard Dice of net(image, subset j's mask) > 0, written out by hand here."""
    from app.subsets import subset_masks

    torch.manual_seed(3)
    image = torch.randn(1, 4, 8, 8, 8)
    label = torch.rand(1, 3, 8, 8, 8) > 0.5
    data = [{"image": image, "label": label.float(), "modality_mask": torch.ones(1, 4, dtype=torch.bool),
             "case": ["a"]}]
    inferer = SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=1)  # one window: no blending
    evaluator = SubsetEvaluator(device=torch.device("cpu"), val_data_loader=data, network=net, inferer=inferer)
    evaluator.run()
    got = evaluator.state.output["subset_dice"][0]
    assert got.shape == (15, 3) and evaluator.state.output["subset_valid"].all()
    # the last case's volumes (on the GPU in training) are not held until the next validation
    assert evaluator.state.batch is None
    expected = []
    for mask in subset_masks(4):
        with torch.no_grad():
            pred = net(image, mask[None])[0] > 0
        expected.append([2 * int((p & t).sum()) / (int(p.sum()) + int(t.sum())) for p, t in zip(pred, label[0])])
    expected = torch.tensor(expected, dtype=torch.float64)
    assert len({tuple(row) for row in expected.tolist()}) > 5  # the subsets' predictions differ
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-12)


def test_all_15_subsets_come_from_one_run_of_each_encoder_and_of_the_trunk(net):
    """Each sequence's encoder sees only its own sequence and fusion is a mean of the per-sequence outputs,
    so the 15 subsets' predictions are masked means of one set of outputs: validation runs every encoder,
    and the shared trunk, once per window batch, not once per subset that holds its sequence (8 of 15)."""
    calls = {"trunk": 0, **{m: 0 for m in range(4)}}

    def counter(key):
        return lambda *_: calls.__setitem__(key, calls[key] + 1)

    hooks = [enc.register_forward_hook(counter(m)) for m, enc in enumerate(net.encoders)]
    hooks.append(net.trunk.register_forward_hook(counter("trunk")))
    data = [{"image": torch.randn(1, 4, 16, 16, 12), "label": (torch.rand(1, 3, 16, 16, 12) > 0.5).float(),
             "modality_mask": torch.ones(1, 4, dtype=torch.bool), "case": ["a"]}]
    inferer = SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=27)  # 27 windows, one network call
    evaluator = SubsetEvaluator(device=torch.device("cpu"), val_data_loader=data, network=net, inferer=inferer)
    try:
        evaluator.run()
    finally:
        for hook in hooks:
            hook.remove()
    assert evaluator.state.output["subset_dice"].shape == (1, 15, 3)
    assert calls == {"trunk": 1, 0: 1, 1: 1, 2: 1, 3: 1}


def test_tumour_the_foreground_crop_removed_counts_as_missed(net):
    """Reference tumour where every sequence is 0 lies outside the crop of the evaluation preprocessing. It
    dropped out of the Dice silently, so the case scored higher than the label maps inference writes (which
    label nothing there); the counts RegionVoxelsd takes before the crop add it back as missed voxels."""
    from monai.transforms import Compose, CropForegroundd

    from app.data import RegionVoxelsd
    from app.subsets import subset_masks

    torch.manual_seed(4)
    image = torch.zeros(4, 12, 12, 12)
    image[:, 2:10, 2:10, 2:10] = torch.rand(4, 8, 8, 8) + 0.1  # the head
    label = torch.zeros(3, 12, 12, 12)
    label[:, 3:8, 3:8, 3:8] = (torch.rand(3, 5, 5, 5) > 0.3).float()
    label[0, 0, 0, 0:3] = 1  # 3 WT voxels outside the head, where no sequence has signal
    sample = Compose([RegionVoxelsd(keys="label"), CropForegroundd(keys=["image", "label"], source_key="image")])(
        {"image": image, "label": label})
    assert sample["label_voxels"].tolist() == label.flatten(1).sum(1).long().tolist()
    assert int(sample["label"][0].sum()) == int(label[0].sum()) - 3
    data = [{"image": sample["image"][None], "label": sample["label"][None],
             "label_voxels": sample["label_voxels"][None], "modality_mask": torch.ones(1, 4, dtype=torch.bool),
             "case": ["a"]}]
    inferer = SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=1)
    evaluator = SubsetEvaluator(device=torch.device("cpu"), val_data_loader=data, network=net, inferer=inferer)
    evaluator.run()
    got = evaluator.state.output["subset_dice"][0]
    cropped = sample["label"].bool()
    expected = []
    for mask in subset_masks(4):
        with torch.no_grad():
            pred = net(sample["image"][None], mask[None])[0] > 0
        # prediction and reference over the whole volume: the prediction is empty outside the crop
        expected.append([2 * int((p & t).sum()) / (int(p.sum()) + int(full.sum()))
                         for p, t, full in zip(pred, cropped, label.bool())])
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_nan_outputs_of_a_present_sequence_are_refused_naming_the_case(net):
    """A NaN logit thresholds to "no tumour": scored, it would pass for an empty prediction."""
    import copy

    broken = copy.deepcopy(net)
    with torch.no_grad():
        for p in broken.encoders[1].parameters():  # t1's encoder only
            p.fill_(float("nan"))
    torch.manual_seed(4)
    data = [{"image": torch.randn(1, 4, 8, 8, 8), "label": torch.zeros(1, 3, 8, 8, 8),
             "modality_mask": torch.tensor([m], dtype=torch.bool), "case": [c]}
            for c, m in (("no_t1", [1, 0, 1, 1]), ("with_t1", [1, 1, 1, 1]))]
    inferer = SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=1)
    evaluator = SubsetEvaluator(device=torch.device("cpu"), val_data_loader=data[:1], network=broken,
                                inferer=inferer, key_val_metric={"val_mean_dice": SubsetMeanDice()})
    evaluator.run()  # the broken encoder is not run for a case without t1
    assert evaluator.state.output["subset_valid"].sum() == 7
    evaluator = SubsetEvaluator(device=torch.device("cpu"), val_data_loader=data, network=broken,
                                inferer=inferer, key_val_metric={"val_mean_dice": SubsetMeanDice()})
    with pytest.raises(ValueError, match=r"^Case with_t1: the network gave 1536 NaN or infinite value\(s\)"):
        evaluator.run()


def test_hd95_of_each_subset_is_in_mm_on_the_label_grid_and_only_when_asked(net):
    """With hd95=True the evaluator adds subset_hd95: each subset's masks (those of its Dice) measured by MONAI's
    95th-percentile Hausdorff distance on the 2 x 1 x 3 mm grid of the label's affine, BraTS rule when empty."""
    from monai.data import MetaTensor
    from monai.metrics import compute_hausdorff_distance

    from app.subsets import subset_masks

    torch.manual_seed(5)
    image = torch.randn(1, 4, 8, 8, 8)
    label = torch.zeros(1, 3, 8, 8, 8)
    label[0, 0, 2:6, 2:6, 2:6] = 1
    label[0, 1, 3:5, 3:5, 3:5] = 1  # ET (channel 2) empty
    affine = torch.diag(torch.tensor([-2.0, 1.0, 3.0, 1.0]))[None]
    data = [{"image": image, "label": MetaTensor(label, affine=affine),
             "modality_mask": torch.ones(1, 4, dtype=torch.bool), "case": ["a"]}]
    inferer = SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=1)
    plain = SubsetEvaluator(device=torch.device("cpu"), val_data_loader=data, network=net, inferer=inferer)
    plain.run()
    assert "subset_hd95" not in plain.state.output
    # the 15 subsets' searches on 3 threads: the values of MONAI one at a time on the whole volumes, to the last bit
    evaluator = SubsetEvaluator(device=torch.device("cpu"), val_data_loader=data, network=net, inferer=inferer,
                                hd95="true", hd95_workers=3)
    evaluator.run()
    got = evaluator.state.output["subset_hd95"][0]
    torch.testing.assert_close(evaluator.state.output["subset_dice"], plain.state.output["subset_dice"])
    expected = []
    for mask in subset_masks(4):
        with torch.no_grad():
            pred = net(image, mask[None])[0] > 0
        row = []
        for p, t in zip(pred, label[0].bool()):
            if p.any() and t.any():
                row.append(float(compute_hausdorff_distance(p[None, None], t[None, None], include_background=True,
                                                            percentile=95, spacing=[2.0, 1.0, 3.0])))
            else:
                row.append(373.13 if p.any() or t.any() else 0.0)
        expected.append(row)
    assert len({v for row in expected for v in row}) > 3  # distances, not only the empty-mask values
    assert torch.equal(got.double(), torch.tensor(expected, dtype=torch.float64)), (got.tolist(), expected)


def test_hd95_counts_reference_tumour_the_foreground_crop_removed(net):
    """A region whose reference lies outside the crop (``label_voxels`` above the voxels kept) is not empty: its HD95
    is the BraTS penalty whatever the subset predicts, as its Dice is that of a missed region, never the 0 mm of two
    empty masks."""
    from monai.data import MetaTensor

    torch.manual_seed(5)
    image = torch.randn(1, 4, 8, 8, 8)
    label = torch.zeros(1, 3, 8, 8, 8)
    label[0, 0, 2:6, 2:6, 2:6] = 1
    label[0, 1, 3:5, 3:5, 3:5] = 1  # ET (channel 2): no voxel inside the crop, 5 outside it
    kept = label.flatten(2).sum(2).long()
    data = [{"image": image, "label": MetaTensor(label, affine=torch.eye(4)[None]),
             "label_voxels": kept + torch.tensor([[0, 0, 5]]), "modality_mask": torch.ones(1, 4, dtype=torch.bool),
             "case": ["a"]}]
    inferer = SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=1)
    with torch.no_grad():  # the ET logits pushed down: every subset predicts no ET, as a model that missed it
        net_without_et = copy.deepcopy(net)
        last = [m for m in net_without_et.modules() if isinstance(m, torch.nn.Conv3d)][-1]
        last.bias[2] = -1e4
    evaluator = SubsetEvaluator(device=torch.device("cpu"), val_data_loader=data, network=net_without_et,
                                inferer=inferer, hd95=True)
    evaluator.run()
    assert (evaluator.state.output["subset_dice"][0, :, 2] == 0).all()  # missed: Dice 0, not the 1 of empty masks
    assert evaluator.state.output["subset_hd95"][0, :, 2].tolist() == [373.13] * 15


def _evaluate_logged(net, caplog, report=None, **kwargs) -> tuple[SubsetEvaluator, list[str]]:
    """Run an evaluator with a StatsHandler as the bundles attach it (and ``report(metric)``'s handler where given);
    returns the engine's log lines."""
    import logging

    from monai.handlers import StatsHandler

    torch.manual_seed(3)
    data = [{"image": torch.randn(1, 4, 8, 8, 8), "label": (torch.rand(1, 3, 8, 8, 8) > 0.5).float(),
             "modality_mask": torch.ones(1, 4, dtype=torch.bool), "case": ["a"]}]
    caplog.set_level(logging.INFO)  # what StatsHandler(name=None) sets the root logger to; put back after the test
    metric = SubsetMeanDice()
    handlers = [StatsHandler(name=None, iteration_log=False)] + ([report(metric)] if report else [])
    evaluator = SubsetEvaluator(device=torch.device("cpu"), val_data_loader=data, network=net,
                                inferer=SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=1),
                                key_val_metric={"val_mean_dice": metric}, val_handlers=handlers, **kwargs)
    caplog.set_level(logging.INFO, logger=evaluator.logger.name)
    caplog.clear()
    evaluator.run()
    return evaluator, [r.getMessage() for r in caplog.records if r.name == evaluator.logger.name]


def test_a_training_validation_leaves_a_later_evaluation_its_best_metric_line(net, caplog, tmp_path):
    """A training's validation drops MONAI's 'Got new best metric' line through a filter on its logger, which every
    evaluator of the process shares: it stayed, so a later evaluator in the same process lost the line too (and
    test_evaluating_one_checkpoint_logs_no_best_metric_selection failed after such a test)."""
    from app.engines import SubsetReportHandler

    _, lines = _evaluate_logged(net, caplog, report=lambda metric: SubsetReportHandler(metric, tmp_path,
                                                                                      during_training=True))
    assert not any(line.startswith("Got new best metric") for line in lines), lines  # dropped there
    _, lines = _evaluate_logged(net, caplog)
    assert any(line.startswith("Got new best metric of val_mean_dice") for line in lines), lines


def test_evaluating_one_checkpoint_logs_no_best_metric_selection(net, caplog):
    """evaluate.yaml scores one checkpoint: MONAI's 'Got new best metric' and 'Key metric: ... best value ... at
    epoch' lines told of a model selection that does not happen there; the score itself is still logged."""
    evaluator, lines = _evaluate_logged(net, caplog, select_best="false")
    assert not any("best" in line.lower() for line in lines), lines
    assert any(line.startswith("Epoch[1] Metrics -- val_mean_dice: ") for line in lines), lines
    assert evaluator.state.metrics["val_mean_dice"] >= 0 and evaluator.state.best_metric_epoch == -1
    # training's validation keeps tracking the best epoch (model.pt is the best on validation)
    evaluator, lines = _evaluate_logged(net, caplog)
    assert any(line.startswith("Got new best metric of val_mean_dice") for line in lines), lines
    assert evaluator.state.best_metric_epoch == 1


def test_an_evaluation_does_not_log_that_it_resumes(net, caplog):
    """ignite took every run of a MONAI engine for a resumption ('Engine run resuming from iteration 0, epoch 0
    ...'): a plain evaluation, and each validation of a training, read as if something were continued."""
    _, lines = _evaluate_logged(net, caplog, select_best=False)
    assert lines and not any("resuming" in line for line in lines), lines
    assert any(line.startswith("Engine run finished") for line in lines), lines


@pytest.mark.parametrize("bundle", ["brats_gmd", "mosi_gmd"])
def test_the_evaluate_configs_score_one_checkpoint_without_selecting(bundle):
    from monai.bundle import ConfigParser

    from tests.bundles.helpers import REPO

    configs = REPO / "bundles" / bundle / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.yaml"), str(configs / "evaluate.yaml")])
    assert parser.get("validate#evaluator#select_best") is False
    assert ConfigParser.load_config_file(str(configs / "train.yaml"))["validate"]["evaluator"].get("select_best") is None


@pytest.mark.usefixtures("process_state_restored")  # the bundle's StatsHandler sets the root logger to INFO
@pytest.mark.parametrize("bundle", ["brats_gmd", "mosi_gmd"])
def test_an_evaluation_logs_its_score_once(bundle):
    """The StatsHandler's 'Epoch[1] Metrics -- val_mean_dice: ...' repeated the score of the report's own line
    ('Evaluation: mean Dice over 15 subsets ...'; the sentiment table's mean row); it still logs what ends a run."""
    from monai.bundle import ConfigParser
    from monai.handlers import StatsHandler

    from tests.bundles.helpers import REPO

    configs = REPO / "bundles" / bundle / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.yaml"), str(configs / "evaluate.yaml")])
    handlers = parser["validate#handlers"]
    stats = [i for i, h in enumerate(handlers) if h["_target_"] == "StatsHandler"]
    assert len(stats) == 1
    handler = parser.get_parsed_content(f"validate#handlers#{stats[0]}")
    assert isinstance(handler, StatsHandler) and handler.epoch_log is False and handler.iteration_log is False
    # training's validation too: its report line says the best so far (test below)
    parser = ConfigParser()
    parser.read_config(str(configs / "train.yaml"))
    handlers = parser["validate#handlers"]
    stats = [i for i, h in enumerate(handlers) if h["_target_"] == "StatsHandler"]
    assert parser.get_parsed_content(f"validate#handlers#{stats[0]}").epoch_log is False
    assert any(h["_target_"].endswith("ReportHandler") and h.get("during_training") for h in handlers)


def test_a_training_validation_says_once_whether_it_is_the_best_so_far(net, caplog, tmp_path):
    """A training's validation logged MONAI's 'Got new best metric of val_mean_dice: 0.066837046...', the
    StatsHandler's 'Epoch[E] Metrics' and 'Key metric: ... best value ... at epoch' beside the report's own line;
    that line now ends with the best so far, and the three are gone."""
    import logging

    from monai.handlers import StatsHandler

    from app.engines import SubsetReportHandler

    torch.manual_seed(3)
    data = [{"image": torch.randn(1, 4, 8, 8, 8), "label": (torch.rand(1, 3, 8, 8, 8) > 0.5).float(),
             "modality_mask": torch.ones(1, 4, dtype=torch.bool), "case": ["a"]}]
    metric = SubsetMeanDice()
    caplog.set_level(logging.INFO)  # before StatsHandler(name=None) sets the root logger to it: put back after the test
    evaluator = SubsetEvaluator(device=torch.device("cpu"), val_data_loader=data, network=net,
                                inferer=SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=1),
                                key_val_metric={"val_mean_dice": metric},
                                val_handlers=[StatsHandler(name=None, iteration_log=False, epoch_log=False),
                                              SubsetReportHandler(metric, tmp_path, during_training=True)])
    lines = []
    for epoch in (1, 2):  # the same weights: epoch 2 is no better than epoch 1
        caplog.clear()
        evaluator.run(global_epoch=epoch)
        lines.append([r.getMessage() for r in caplog.records])
    score = evaluator.state.best_metric
    first = [line for line in lines[0] if line.startswith("Validation after epoch 1: mean Dice over 15 subsets")]
    assert len(first) == 1 and first[0].endswith("; the best val_mean_dice so far: kept as models/model.pt."), lines
    second = [line for line in lines[1] if line.startswith("Validation after epoch 2: ")]
    assert len(second) == 1 and second[0].endswith(
        f"; the best val_mean_dice is still {score:.4f}, after epoch 1 (models/model.pt)."), lines
    assert not any("best metric" in line or "best value" in line or "Metrics --" in line for line in sum(lines, []))

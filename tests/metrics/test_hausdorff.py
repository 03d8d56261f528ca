"""HD95 in mm with the BraTS empty-mask rule: hand-computed distances on tiny volumes, spacing, the
per-subset accumulator and the evaluator's voxel size."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.metrics import compute_hausdorff_distance

from app.engines import SubsetEvaluator
from app.metrics import (
    BRATS_HD95_PENALTY, DEFAULT_HD95_WORKERS, HD95Scorer, SubsetDiceAccumulator, SubsetMeanDice, affine_spacing,
    check_hd95, check_hd95_workers, hd95, hd95_from_logits,
)
from tests.bundles.helpers import BRATS_DEV


def _cube(shape, start, side=3) -> torch.Tensor:
    """[1, 1, *shape] mask holding one solid cube of ``side`` voxels with its first voxel at ``start``."""
    m = torch.zeros(1, 1, *shape, dtype=torch.bool)
    m[(0, 0, *(slice(s, s + side) for s in start))] = True
    return m


@pytest.mark.parametrize("axis, expected", [(0, 10.0), (1, 5.0), (2, 15.0)])
def test_two_cubes_offset_along_one_axis_are_the_offset_in_mm_of_that_axis(axis, expected):
    # 3-voxel cubes 5 voxels apart: each surface voxel's nearest surface voxel of the other cube lies straight
    # across, 3, 4 or 5 voxels away (9, 8 and 9 of the 26 surface voxels); the 95th percentile (position
    # 0.95 * 25 = 23.75 of the sorted 26) falls among the 5-voxel ones, in both directions: 5 voxels, in mm
    # the voxel size of the offset axis (2 x 1 x 3 mm), so an axis read as another would give 5, 10 or 15
    start_b = [1, 1, 1]
    start_b[axis] += 5
    a, b = _cube((10, 10, 10), (1, 1, 1)), _cube((10, 10, 10), start_b)
    value = hd95(a, b, [2.0, 1.0, 3.0])
    assert value.dtype == torch.float64 and value.shape == (1, 1)
    assert value.item() == pytest.approx(expected, abs=1e-5)
    assert hd95(b, a, [2.0, 1.0, 3.0]).item() == pytest.approx(expected, abs=1e-5)  # symmetric
    assert hd95(a, b, [1.0, 1.0, 1.0]).item() == pytest.approx(5.0, abs=1e-5)  # voxels at 1 mm


def test_the_95th_percentile_interpolates_between_surface_distances():
    # reference: a one-voxel-thick 10 x 10 plate at x = 0 (every voxel is surface); prediction: the plate plus a
    # line of 20 voxels at x = 2..21 above its middle. Reference -> prediction: 100 zeros. Prediction ->
    # reference: 100 zeros and x * 2 mm for x = 2..21; of the 120 sorted values the 95th percentile is at
    # position 0.95 * 119 = 113.05, between the 14th and 15th line voxels (x = 15 and 16): 30 + 0.05 * 2 mm.
    ref = torch.zeros(1, 1, 24, 10, 10, dtype=torch.bool)
    ref[0, 0, 0] = True
    pred = ref.clone()
    pred[0, 0, 2:22, 5, 5] = True
    assert hd95(pred, ref, [2.0, 1.0, 1.0]).item() == pytest.approx(30.1, abs=1e-4)
    # the full Hausdorff distance is the farthest line voxel, 21 * 2 mm: the 95th percentile is not the maximum
    full = compute_hausdorff_distance(pred, ref, include_background=True, spacing=[2.0, 1.0, 1.0])
    assert full.item() == pytest.approx(42.0)


def test_both_empty_is_zero_and_exactly_one_empty_is_the_brats_penalty():
    empty = torch.zeros(1, 1, 6, 6, 6, dtype=torch.bool)
    cube = _cube((6, 6, 6), (1, 1, 1))
    assert hd95(empty, empty, [1.0, 1.0, 1.0]).item() == 0.0
    assert hd95(cube, empty, [1.0, 1.0, 1.0]).item() == BRATS_HD95_PENALTY == 373.13
    assert hd95(empty, cube, [1.0, 1.0, 1.0]).item() == 373.13
    assert hd95(empty, cube, [1.0, 1.0, 1.0], empty_penalty=100.0).item() == 100.0
    # the BraTS value is the diagonal of its 240 x 240 x 155 grid at 1 mm
    assert BRATS_HD95_PENALTY == pytest.approx(math.sqrt(240**2 + 240**2 + 155**2), abs=0.005)
    # MONAI alone gives NaN there, which its mean would leave out: a missed region must count instead
    with pytest.warns(UserWarning, match="all 0"):
        assert math.isnan(compute_hausdorff_distance(empty, cube, include_background=True, percentile=95).item())


def test_every_case_and_channel_follows_its_own_rule_and_spacing():
    empty = torch.zeros(1, 1, 12, 12, 12, dtype=torch.bool)
    a, b = _cube((12, 12, 12), (1, 1, 1)), _cube((12, 12, 12), (6, 1, 1))
    pred = torch.cat([torch.cat([a, a, empty], dim=1), torch.cat([a, empty, a], dim=1)])  # [2, 3, ...]
    target = torch.cat([torch.cat([b, b, empty], dim=1), torch.cat([b, empty, empty], dim=1)])
    got = hd95(pred, target, [[2.0, 1.0, 1.0], [0.5, 1.0, 1.0]])
    assert got.flatten().tolist() == pytest.approx([10.0, 10.0, 0.0, 2.5, 0.0, 373.13], abs=1e-5)
    assert torch.isfinite(got).all()


def test_reference_outside_the_crop_makes_the_region_non_empty():
    empty = torch.zeros(1, 2, 6, 6, 6, dtype=torch.bool)
    cube = _cube((6, 6, 6), (1, 1, 1)).expand(1, 2, 6, 6, 6)
    missed = torch.tensor([[4, 0]])
    # an empty prediction missed that tumour; a prediction beside a reference left empty by the crop cannot be
    # measured against it: both score the penalty, where without the count they would be 0 and the penalty
    assert hd95(empty, empty, [1, 1, 1], missed=missed).tolist() == [[373.13, 0.0]]
    assert hd95(cube, empty, [1, 1, 1], missed=missed).tolist() == [[373.13, 373.13]]
    assert hd95(cube, cube, [1, 1, 1], missed=missed).tolist() == [[0.0, 0.0]]


def test_from_logits_scores_the_dice_masks():
    a, b = _cube((10, 10, 10), (1, 1, 1)), _cube((10, 10, 10), (1, 1, 6))
    logits = torch.where(a, 2.0, -2.0)
    assert hd95_from_logits(logits, b, [1.0, 1.0, 3.0]).item() == pytest.approx(15.0, abs=1e-5)
    with pytest.raises(ValueError, match="threshold"):
        hd95_from_logits(logits, b, [1.0, 1.0, 1.0], threshold=1.0)


def test_from_logits_thresholds_as_the_dice_does():
    # the masks are sigmoid(logits) > threshold, compared in logit space as dice_from_logits does: a voxel at
    # exactly 0.5 is not foreground, and a higher threshold drops the voxels below it
    from app.metrics.dice import dice_from_logits

    a, b = _cube((10, 10, 10), (1, 1, 1)), _cube((10, 10, 10), (6, 1, 1))
    logits = torch.where(a, 1.0, -4.0)  # sigmoid(1) = 0.73
    logits[0, 0, 1:4, 7:10, 7:10] = 0.0  # a second cube at exactly 0.5, which would move the HD95 to 9.27 mm
    assert hd95_from_logits(logits, b, [1.0, 1.0, 1.0]).item() == pytest.approx(5.0, abs=1e-5)
    # above 0.73 nothing is predicted: the penalty, where the Dice is 0
    assert hd95_from_logits(logits, b, [1.0, 1.0, 1.0], threshold=0.8).item() == 373.13
    assert dice_from_logits(logits, b, threshold=0.8).item() == 0.0
    # the key metric passes its threshold on
    metric = SubsetMeanDice(hd95=True, threshold=0.8)
    metric.update({"case": ["c1"], "subset_logits": {0: logits.expand(1, 3, 10, 10, 10)},
                   "label": b.expand(1, 3, 10, 10, 10).float(), "spacing": [[1.0, 1.0, 1.0]]})
    metric.compute()
    assert metric.last_result["subsets"]["flair"]["HD95_WT"] == 373.13


@pytest.mark.parametrize("spacing, message", [([1.0, 1.0], r"\[3\] or \[B, 3\]"), ([1.0, 0.0, 1.0], "positive"),
                                              ([1.0, float("nan"), 1.0], "positive")])
def test_a_spacing_that_does_not_fit_is_refused(spacing, message):
    cube = _cube((6, 6, 6), (1, 1, 1))
    with pytest.raises(ValueError, match=message):
        hd95(cube, cube, spacing)


def test_affine_spacing_is_the_column_length_of_a_rotated_anisotropic_affine():
    # array axis 0 runs along world y at 2 mm (flipped), axis 1 along z at 1.5 mm, axis 2 along x at 3 mm
    affine = np.array([[0, 0, 3, 10], [-2, 0, 0, 5], [0, 1.5, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    assert affine_spacing(affine).tolist() == pytest.approx([2.0, 1.5, 3.0])
    assert affine_spacing(torch.as_tensor(affine)[None].repeat(2, 1, 1)).shape == (2, 3)


def test_the_evaluator_reads_each_case_s_voxel_size_from_the_label_affine():
    affine = torch.stack([torch.diag(torch.tensor([1.0, 1.0, 3.0, 1.0])), torch.diag(torch.tensor([-2.0, 2, 2, 1]))])
    label = MetaTensor(torch.zeros(2, 3, 4, 4, 4), affine=affine)
    assert SubsetEvaluator.voxel_spacing(label, ["a", "b"]).tolist() == [[1.0, 1.0, 3.0], [2.0, 2.0, 2.0]]
    with pytest.raises(ValueError, match="Case a: the label has no affine"):
        SubsetEvaluator.voxel_spacing(torch.zeros(2, 3, 4, 4, 4), ["a", "b"])


def test_check_hd95_reads_the_flag():
    assert check_hd95("true") is True and check_hd95(False) is False
    with pytest.raises(ValueError, match="hd95"):
        check_hd95("maybe")


def _accumulator_rows() -> SubsetDiceAccumulator:
    acc = SubsetDiceAccumulator(hd95=True)
    acc.update(["c1", "c2"], 0, [[1.0, 0.5, 0.0], [0.5, 0.5, 1.0]], hd95=[[2.0, 4.0, 373.13], [6.0, 8.0, 0.0]])
    acc.update_case("c1", 14, [0.8, 0.6, 0.4], hd95_row=[1.0, 2.0, 3.0])
    return acc


def test_the_accumulator_reports_hd95_beside_the_unchanged_dice():
    result = _accumulator_rows().aggregate()
    flair = result["subsets"]["flair"]
    assert flair["WT"] == 0.75 and flair["mean"] == pytest.approx((0.75 + 0.5 + 0.5) / 3)  # Dice only
    assert (flair["HD95_WT"], flair["HD95_TC"], flair["HD95_ET"]) == (4.0, 6.0, pytest.approx(186.565))
    assert flair["n_cases"] == 2
    assert result["mean_over_subsets"]["HD95_WT"] == pytest.approx((4.0 + 1.0) / 2)
    assert result["mean_over_subsets"]["mean"] == pytest.approx((flair["mean"] + 0.6) / 2)
    assert result["per_case"][0] == {"case": "c1", "subset": "flair", "WT": 1.0, "TC": 0.5, "ET": 0.0,
                                     "HD95_WT": 2.0, "HD95_TC": 4.0, "HD95_ET": 373.13}
    assert result["hd95"]["one_empty"] == 373.13 and result["hd95"]["both_empty"] == 0.0
    assert result["worst_subset"] == {"name": "flair", "mean": flair["mean"]}
    # without HD95 the report is as it was: no new key anywhere
    plain = SubsetDiceAccumulator()
    plain.update(["c1"], 0, [[1.0, 0.5, 0.0]])
    off = plain.aggregate()
    assert set(off["subsets"]["flair"]) == {"WT", "TC", "ET", "mean", "n_cases"} and "hd95" not in off
    assert set(off["per_case"][0]) == {"case", "subset", "WT", "TC", "ET"}


def test_the_accumulator_needs_hd95_exactly_when_it_records_it():
    with pytest.raises(ValueError, match="needs the HD95"):
        SubsetDiceAccumulator(hd95=True).update(["c1"], 0, [[1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="build it with hd95=True"):
        SubsetDiceAccumulator().update(["c1"], 0, [[1.0, 1.0, 1.0]], hd95=[[0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"HD95 is in millimetres: pass the evaluated grid.s voxel size as spacing"):
        SubsetDiceAccumulator(hd95=True).update_from_logits(["c1"], {0: torch.zeros(1, 3, 4, 4, 4)},
                                                            torch.zeros(1, 3, 4, 4, 4))


def test_the_key_metric_gathers_hd95_rows_and_stays_the_mean_dice():
    metric = SubsetMeanDice(hd95="true")
    dice = torch.full((1, 15, 3), 0.5, dtype=torch.float64)
    hd = torch.full((1, 15, 3), 7.0, dtype=torch.float64)
    metric.update({"case": ["c1"], "subset_dice": dice, "subset_hd95": hd})
    assert metric.compute() == 0.5
    assert metric.last_result["mean_over_subsets"]["HD95_ET"] == 7.0
    merged = metric._new_accumulator()
    merged.merge(metric.accumulator.state_dict())  # the rows every rank gathers keep their HD95
    assert merged.aggregate()["subsets"]["t2"]["HD95_TC"] == 7.0
    with pytest.raises(ValueError, match="subset_hd95"):
        SubsetMeanDice(hd95=True).update({"case": ["c1"], "subset_dice": dice})
    # from logits, with the voxel size in the output
    logits = torch.where(_cube((10, 10, 10), (1, 1, 1)), 3.0, -3.0).expand(1, 3, 10, 10, 10)
    label = _cube((10, 10, 10), (6, 1, 1)).expand(1, 3, 10, 10, 10).float()
    metric = SubsetMeanDice(hd95=True)
    metric.update({"case": ["c1"], "subset_logits": {0: logits}, "label": label, "spacing": [[2.0, 1.0, 1.0]]})
    metric.compute()
    assert metric.last_result["subsets"]["flair"]["HD95_WT"] == pytest.approx(10.0, abs=1e-5)


def test_hd95_without_scipy_is_refused_naming_the_fix(monkeypatch):
    # MONAI imports scipy only at the first distance: the evaluation would stop there, after reading every case
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real(name, *a))
    with pytest.raises(ValueError, match=r"--hd95 true needs scipy.*pip install scipy.*leave --hd95 false"):
        check_hd95("true")
    assert check_hd95("false") is False  # off: nothing to compute, nothing needed


def _write_case(root, seg, affine) -> None:
    """A BraTS 2018-named case on ``affine``'s grid: four distinct sequences positive on a box (0 around it, so
    the foreground crop removes a margin) and the label map ``seg``."""
    import nibabel as nib

    folder = root / "Case_001"
    folder.mkdir(parents=True)
    head = np.zeros(seg.shape, np.float32)
    head[3:27, 4:36, 2:22] = np.random.default_rng(0).random((24, 32, 20), dtype=np.float32) + 1.0
    for i, name in enumerate(("flair", "t1", "t1ce", "t2", "seg")):
        data = seg if name == "seg" else head * (1.0 + 0.1 * i)
        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        nib.save(img, str(folder / f"Case_001_{name}.nii.gz"))


def test_the_evaluated_grid_measures_as_the_file_grid_after_reorientation_and_crop(tmp_path):
    # a file whose array axes run along world z (2.5 mm, flipped), x (0.8 mm) and y (1.7 mm, flipped): the bundle's
    # preprocessing reorders them to RAS and crops the margin; the HD95 on that grid, with the voxel size the
    # evaluator reads from the label, is MONAI's distance of the same masks on the file's own grid
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    from app.data import discover_cases
    from tests.bundles.helpers import TRAIN

    affine = np.zeros((4, 4))
    affine[2, 0], affine[0, 1], affine[1, 2], affine[3, 3] = -2.5, 0.8, -1.7, 1.0
    affine[:3, 3] = [5.0, 7.0, 9.0]
    ref, pred = np.zeros((30, 40, 24), np.uint8), np.zeros((30, 40, 24), np.uint8)
    ref[8:16, 10:20, 6:12], ref[10:14, 12:18, 7:10], ref[11:13, 13:16, 8:9] = 2, 4, 1
    pred[10:19, 8:22, 5:14], pred[12:15, 13:19, 8:12], pred[12:14, 14:16, 9:10] = 2, 4, 1
    parser = ConfigParser()
    parser.read_config(TRAIN)
    prep = Compose(parser.get_parsed_content("preprocessing"))
    labels = []
    for name, seg in (("ref", ref), ("pred", pred)):
        _write_case(tmp_path / name, seg, affine)
        labels.append(prep(discover_cases(tmp_path / name)[0])["label"][None])
    label, predicted = labels
    assert label.shape[2:] == (32, 20, 24)  # reoriented (x, y, z) and cropped
    spacing = SubsetEvaluator.voxel_spacing(label, ["Case_001"])
    assert spacing.tolist() == [pytest.approx([0.8, 1.7, 2.5])]
    expected = []
    for p, t in zip(*(np.stack([s > 0, (s == 1) | (s == 4), s == 4]) for s in (pred, ref))):
        expected.append(compute_hausdorff_distance(torch.from_numpy(p)[None, None], torch.from_numpy(t)[None, None],
                                                   include_background=True, percentile=95, spacing=[2.5, 0.8, 1.7]))
    assert len({round(float(v), 3) for v in expected}) > 1
    assert hd95(predicted, label, spacing)[0].tolist() == pytest.approx([float(v) for v in expected], abs=1e-4)


def _monai_hd95(pred: torch.Tensor, target: torch.Tensor, spacing) -> float:
    """MONAI's HD95 of one pair of whole (uncropped) non-empty masks ``[*spatial]``: the value the evaluation
    must reproduce to the last bit."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # monai 1.6.1's own deprecated argument
        value = compute_hausdorff_distance(pred[None, None], target[None, None], include_background=True,
                                           percentile=95, spacing=[float(v) for v in spacing])
    return float(value.reshape(-1)[0])


def _expected(preds: torch.Tensor, target: torch.Tensor, spacing: torch.Tensor, missed=None) -> torch.Tensor:
    """The BraTS rule around MONAI on the whole volumes, one case and channel at a time (the old evaluation)."""
    out = torch.empty(target.shape[:2], dtype=torch.float64)
    for b in range(target.shape[0]):
        for c in range(target.shape[1]):
            p, t = preds[b, c].bool(), target[b, c].bool()
            if p.any() and t.any():
                out[b, c] = _monai_hd95(p, t, spacing[b])
            elif p.any() or t.any() or (missed is not None and missed[b, c] > 0):
                out[b, c] = BRATS_HD95_PENALTY
            else:
                out[b, c] = 0.0
    return out


def _blobs(generator: torch.Generator, shape, batch=2, channels=3) -> torch.Tensor:
    """Random ragged masks: some fill the array to its edges, some are sparse specks, a few are empty."""
    density = torch.rand((batch, channels, 1, 1, 1), generator=generator)
    masks = torch.rand((batch, channels, *shape), generator=generator) < density
    masks[0, 1] = False
    return masks


def test_the_scorer_equals_monai_on_the_whole_volumes_to_the_last_bit():
    # the scorer hands MONAI the masks cut to their union's box; MONAI crops the whole volume to that box itself,
    # so the two must agree exactly, on masks touching the array's faces (the crop's margin is then padding) and
    # on anisotropic, non-integer voxel sizes (where measuring in another frame would round differently)
    g = torch.Generator().manual_seed(7)
    for trial in range(40):
        shape = tuple(int(n) for n in torch.randint(2, 12, (3,), generator=g))
        target, pred = _blobs(g, shape), _blobs(g, shape)
        spacing = torch.rand((2, 3), generator=g, dtype=torch.float64) * 2.5 + 0.3
        missed = torch.tensor([[0, 3, 0], [1, 0, 0]])
        expected = _expected(pred, target, spacing, missed)
        got = hd95(pred, target, spacing, missed=missed, workers=1 + trial % 3)
        assert torch.equal(got, expected), (trial, shape, got.tolist(), expected.tolist())


def test_a_box_touching_the_array_s_faces_scores_as_monai_does():
    # one voxel wide masks along every face and corner: a crop without MONAI's one-voxel margin of background
    # would make every voxel of them a surface voxel of another shape
    target = torch.zeros(1, 1, 7, 6, 5, dtype=torch.bool)
    target[0, 0, :, :2, :] = True
    pred = torch.zeros_like(target)
    pred[0, 0, 3:, :, 3:] = True
    spacing = [0.9375, 0.9375, 3.3]
    assert hd95(pred, target, spacing).item() == _monai_hd95(pred[0, 0], target[0, 0], spacing)


def test_identical_masks_are_searched_once_and_every_prediction_keeps_its_values_in_order():
    g = torch.Generator().manual_seed(3)
    target = _blobs(g, (9, 8, 7))
    first, second = _blobs(g, (9, 8, 7)), _blobs(g, (9, 8, 7))
    spacing = torch.tensor([[1.0, 1.0, 3.0], [0.7, 1.3, 2.2]], dtype=torch.float64)
    scorer = HD95Scorer(target, spacing, workers=3)
    # the second subset repeats the first: its searches are the first's; an empty prediction is not a search
    positions = [scorer.add(p) for p in (first, second, first.clone(), torch.zeros_like(first))]
    assert positions == [0, 1, 2, 3]
    both = (first.flatten(2).any(2) & target.flatten(2).any(2)).sum() + (second.flatten(2).any(2)
                                                                         & target.flatten(2).any(2)).sum()
    assert scorer.searches == int(both)
    values = scorer.compute()
    assert torch.equal(values[0], _expected(first, target, spacing)) and torch.equal(values[0], values[2])
    assert torch.equal(values[1], _expected(second, target, spacing))
    assert torch.equal(values[3], _expected(torch.zeros_like(first), target, spacing))


def test_the_number_of_workers_does_not_change_a_value():
    g = torch.Generator().manual_seed(11)
    target = _blobs(g, (10, 9, 8), batch=1)
    preds = [_blobs(g, (10, 9, 8), batch=1) for _ in range(15)]
    results = []
    for workers in (1, 2, 4, 16):
        scorer = HD95Scorer(target, [1.2, 0.8, 2.5], workers=workers)
        for p in preds:
            scorer.add(p)
        results.append(scorer.compute())
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    assert torch.equal(results[0][5], _expected(preds[5], target, torch.tensor([[1.2, 0.8, 2.5]])))


@pytest.mark.skipif(not BRATS_DEV.is_dir(), reason=f"real BraTS data not found at {BRATS_DEV}")
def test_a_real_case_scores_as_monai_on_the_whole_volume():
    nib = pytest.importorskip("nibabel")
    case = sorted(p for p in BRATS_DEV.iterdir() if p.is_dir())[0]
    img = nib.load(next(case.glob("*_seg.nii*")))
    seg = torch.from_numpy(np.asarray(img.dataobj).astype(np.int16))
    target = torch.stack([seg > 0, (seg == 1) | (seg == 4), seg == 4])[None]
    # near misses of the case's own tumour, on its 1 mm grid and on an anisotropic one
    preds = [torch.roll(target, shifts=s, dims=(2, 3, 4)) for s in ((2, 2, 2), (1, -3, 2))]
    for spacing in (affine_spacing(img.affine)[None], torch.tensor([[0.9375, 0.9375, 3.3]], dtype=torch.float64)):
        scorer = HD95Scorer(target, spacing, workers=2)
        for p in preds:
            scorer.add(p)
        for p, got in zip(preds, scorer.compute()):
            assert torch.equal(got, _expected(p, target, spacing))


@pytest.mark.parametrize("value", [0, -1, 1.5, "many", True, "2.5"])
def test_hd95_workers_must_be_a_whole_number_of_threads(value):
    with pytest.raises(ValueError, match=r"--hd95_workers .* must be a whole number >= 1.*--hd95_workers 4"):
        check_hd95_workers(value)
    with pytest.raises(ValueError, match="--hd95_workers"):
        check_hd95(True, value)  # checked with --hd95, before any case is read
    with pytest.raises(ValueError, match="--hd95_workers"):
        SubsetEvaluator(hd95=True, hd95_workers=value)  # refused before anything else is built


def test_hd95_workers_defaults_to_a_few_threads_within_the_usable_cores():
    assert check_hd95_workers(3) == 3 and check_hd95_workers("8") == 8 and check_hd95_workers(2.0) == 2
    assert 1 <= check_hd95_workers(None) <= DEFAULT_HD95_WORKERS


def test_the_same_masks_on_two_grids_are_two_searches():
    # two cases of a batch with the same masks but different voxel sizes: a repeat only if the grid repeats too
    a, b = _cube((10, 10, 10), (1, 1, 1)), _cube((10, 10, 10), (1, 1, 6))
    spacing = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 3.0]], dtype=torch.float64)
    scorer = HD95Scorer(torch.cat([b, b]), spacing)
    scorer.add(torch.cat([a, a]))
    assert scorer.searches == 2
    assert scorer.compute()[0].tolist() == [[5.0], [15.0]]

"""Integration: the brats_gmd bundle trains with every strategy and evaluates on 32^3 phantoms."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from app.data.phantoms import write_phantoms
from app.subsets import all_subsets
from tests import warm
from tests.bundles.helpers import (BRATS, EVALUATE, REPO, TINY, TRAIN, error_messages, refused_line,
                                   run_bundle, run_setting_checks)

N_CASES = 5


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_phantoms(root, cases=N_CASES, size=32, seed=0)
    return root


#: the log of the ``trained`` run
_TRAIN_LOG: dict[str, str] = {}


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_plain")
    proc = run_bundle([TRAIN], "--dataset_dir", str(phantoms), "--output_dir", str(out), "--max_epochs", "1",
                      "--strategy", "plain", *TINY)
    _TRAIN_LOG["plain"] = proc.stdout + proc.stderr
    return out


def _check_training_outputs(out):
    assert (out / "models" / "model.pt").is_file()
    assert (out / "models" / "model_final.pt").is_file()
    datalist = json.loads((out / "datalist.json").read_text())
    assert len(datalist["training"]) + len(datalist["validation"]) == N_CASES
    report = json.loads((out / "validation" / "subset_dice.json").read_text())
    assert len(report["subsets"]) == 15


def test_train_plain_writes_models_datalist_and_validation_report(trained, phantoms):
    _check_training_outputs(trained)
    # the voxel size of the training data travels with the weights (inference's --spacing auto)
    import nibabel as nib

    zooms = nib.load(next(phantoms.glob("*/*_flair.nii.gz"))).header.get_zooms()[:3]
    for name in ("model.pt", "model_final.pt"):
        state = torch.load(trained / "models" / name, map_location="cpu", weights_only=True)
        assert state["training_spacing"].tolist() == pytest.approx(list(zooms)), name


@pytest.mark.parametrize("strategy", ["dropout", "gmd", "gmd_approx"])
def test_train_other_strategies(strategy, phantoms, tmp_path):
    # exact GMD runs one trunk VJP per subset: 4 sampled subsets and 2 iterations keep this test quick
    extra = ["--gmd_subsets", "4", "--epoch_length", "2"] if strategy == "gmd" else []
    run_bundle([TRAIN], "--dataset_dir", str(phantoms), "--output_dir", str(tmp_path), "--max_epochs", "1",
               "--strategy", strategy, "--diagnostics_interval", "1", *extra, *TINY)
    _check_training_outputs(tmp_path)
    diagnostics = tmp_path / "gmd_diagnostics.jsonl"
    if strategy.startswith("gmd"):
        rows = [json.loads(line) for line in diagnostics.read_text().splitlines()]
        n_subsets = 4 if strategy == "gmd" else 15
        assert rows and len(rows[0]["subsets"]) == n_subsets and rows[0]["strategy"] == strategy
        plot = subprocess.run([sys.executable, "-m", "app", "plot-conflicts", str(tmp_path)], cwd=REPO,
                              capture_output=True, text=True)
        assert plot.returncode == 0, plot.stderr
        for name in ("gmd_norms.png", "gmd_conflicts.png"):
            assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    else:
        assert not diagnostics.exists()


def test_evaluate_every_labelled_case(trained, phantoms, tmp_path):
    proc = run_bundle([TRAIN, EVALUATE], "--dataset_dir", str(phantoms), "--ckpt_path",
                      str(trained / "models" / "model.pt"), "--output_dir", str(tmp_path), *TINY)
    report = json.loads((tmp_path / "subset_dice.json").read_text())
    names = list(report["subsets"])
    assert names[0] == "flair" and names[-1] == "flair+t1+t1ce+t2" and len(names) == len(all_subsets(4))
    assert all(row["n_cases"] == N_CASES for row in report["subsets"].values())
    assert all(0.0 <= row[r] <= 1.0 for row in report["subsets"].values() for r in ("WT", "TC", "ET", "mean"))
    assert report["worst_subset"]["name"] in names
    assert len(report["per_case"]) == 15 * N_CASES
    for ext in ("csv", "md", "png"):
        assert (tmp_path / f"subset_dice.{ext}").is_file()
    assert "mean_over_subsets" in proc.stdout
    ckpt = trained / "models" / "model.pt"  # the report names the model it scored
    assert report["checkpoint"] == {"path": str(ckpt), "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest()}
    # the scores themselves, recomputed without the evaluator: a range check would pass for any constant
    # Dice, or for every subset scored with all four sequences
    expected = _reference_dice(ckpt, phantoms, subsets=(0, 3, 14))
    got = {(r["case"], r["subset"]): [r["WT"], r["TC"], r["ET"]] for r in report["per_case"]}
    for key, dice in expected.items():
        assert got[key] == pytest.approx(dice, abs=2e-3), key
    assert len({tuple(got[(case, "flair")]) for case, _ in expected}) == N_CASES  # scores differ between cases
    # the aggregates are the plain means of those rows
    for name, row in report["subsets"].items():
        rows = [v for (_, subset), v in got.items() if subset == name]
        means = [sum(col) / len(rows) for col in zip(*rows)]
        assert [row["WT"], row["TC"], row["ET"]] == pytest.approx(means, abs=1e-12)
        assert row["mean"] == pytest.approx(sum(means) / 3, abs=1e-12)
    assert report["mean_over_subsets"]["mean"] == pytest.approx(
        sum(row["mean"] for row in report["subsets"].values()) / 15, abs=1e-12)
    assert report["worst_subset"]["name"] == min(report["subsets"], key=lambda n: report["subsets"][n]["mean"])


def test_an_evaluation_names_the_model_it_loaded_when_training_replaces_the_file(trained, phantoms, tmp_path):
    """Evaluating a running training's models/model.pt: training replaces the file at each better
    validation, and the report used to hash the file once scoring had ended, naming a model it never scored."""
    import os

    from tests.reliability.helpers import run_in_process

    ckpt = tmp_path / "models" / "model.pt"
    ckpt.parent.mkdir()
    scored = (trained / "models" / "model.pt").read_bytes()
    ckpt.write_bytes(scored)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    newer = tmp_path / "newer.pt"
    torch.save({k: v + 1.0 if v.is_floating_point() else v for k, v in state.items()}, newer)

    def training_saves_a_better_model(parser):  # after the weights are loaded, before the report
        os.replace(newer, ckpt)

    out = tmp_path / "eval"
    run_in_process([TRAIN, EVALUATE], training_saves_a_better_model, dataset_dir=str(phantoms), ckpt_path=str(ckpt),
                   output_dir=str(out), patch_size=[32, 32, 32], features=[8, 16, 32, 64], num_workers=0)
    report = json.loads((out / "subset_dice.json").read_text())
    assert report["checkpoint"] == {"path": str(ckpt), "sha256": hashlib.sha256(scored).hexdigest()}
    assert hashlib.sha256(scored).hexdigest()[:12] in (out / "subset_dice.md").read_text()


def _dice(pred, label, spacing):
    """Dice 2|P & T| / (|P| + |T|) per region, written out here."""
    dice = []
    for p, t in zip(pred, label):
        total = int(p.sum()) + int(t.sum())
        dice.append(1.0 if total == 0 else 2 * int((p & t).sum()) / total)
    return dice


def _reference_dice(ckpt, root, subsets, score=_dice):
    """``{(case, subset name): [WT, TC, ET]}``: train.yaml's preprocessing, the fused forward pass of
    each subset through a Gaussian sliding window (patch 32 fitted to the crop, overlap 0.5), sigmoid > 0.5 and
    ``score(pred, label, spacing)`` of the masks (default: Dice), ``spacing`` the crop's voxel size."""
    from monai.inferers import sliding_window_inference
    from monai.transforms import Compose, CropForegroundd, NormalizeIntensityd, Orientationd

    from app.data import LoadCased, discover_cases
    from app.engines.utils import fit_roi
    from app.networks import DSUNet
    from app.subsets import BRATS_MODALITIES, subset_masks, subset_name

    net = DSUNet(features=(8, 16, 32, 64))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    net.load_state_dict({k: v for k, v in state.items() if k in net.state_dict()})
    net.eval()
    prep = Compose([LoadCased(), Orientationd(keys=["image", "label"], axcodes="RAS"),
                    CropForegroundd(keys=["image", "label"], source_key="image"),
                    NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)])
    masks, out = subset_masks(4), {}
    for record in discover_cases(root, require_label=True):
        data = prep(record)
        image, label = torch.as_tensor(data["image"])[None], torch.as_tensor(data["label"]).bool()
        roi = fit_roi((32, 32, 32), image.shape[2:], net.divisor)  # the evaluator's window for a smaller crop
        for j in subsets:
            mask = masks[j][None]
            with torch.no_grad():
                logits = sliding_window_inference(image, roi, 2, lambda w: net(w, mask.expand(len(w), -1)),
                                                  overlap=0.5, mode="gaussian")[0]
            spacing = [float(v) for v in torch.linalg.vector_norm(torch.as_tensor(data["label"].affine)[:3, :3], dim=0)]
            out[(record["case"], subset_name(all_subsets(4)[j], BRATS_MODALITIES))] = score(logits > 0, label, spacing)
    return out


def _brats_hd95(pred, label, spacing):
    """HD95 per region from MONAI's own function, with the BraTS rule for empty masks (0 mm both, 373.13 mm one)."""
    from monai.metrics import compute_hausdorff_distance

    out = []
    for p, t in zip(pred, label):
        if p.any() and t.any():
            out.append(float(compute_hausdorff_distance(p[None, None], t[None, None], include_background=True,
                                                        percentile=95, spacing=spacing)))
        else:
            out.append(373.13 if p.any() or t.any() else 0.0)
    return out


def test_evaluate_with_hd95_adds_it_in_mm_beside_the_same_dice(trained, phantoms, tmp_path):
    """--hd95 true: HD95_WT/TC/ET in mm on each case's anisotropic grid, per case, per subset and over subsets,
    in the JSON, CSV and Markdown; the Dice, the existing keys and the worst subset as without it."""
    import nibabel as nib

    zooms = (1.5, 1.0, 2.0)  # the phantoms' 1 mm grid stretched, so that an axis read as another would show
    data = tmp_path / "anisotropic"
    for src in phantoms.rglob("*.nii.gz"):
        img = nib.load(src)
        affine = img.affine.copy()
        affine[:3, :3] *= np.asarray(zooms)
        dst = data / src.relative_to(phantoms)
        dst.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), dst)
    ckpt = str(trained / "models" / "model.pt")
    run_bundle([TRAIN, EVALUATE], "--dataset_dir", str(data), "--ckpt_path", ckpt, "--output_dir",
               str(tmp_path / "off"), *TINY)
    proc = run_bundle([TRAIN, EVALUATE], "--dataset_dir", str(data), "--ckpt_path", ckpt, "--output_dir",
                      str(tmp_path / "on"), "--hd95", "true", *TINY)
    off = json.loads((tmp_path / "off" / "subset_dice.json").read_text())
    on = json.loads((tmp_path / "on" / "subset_dice.json").read_text())
    keys = ("HD95_WT", "HD95_TC", "HD95_ET")
    assert "hd95" not in off and not any(k in row for row in off["subsets"].values() for k in keys)
    assert on["hd95"] == {"percentile": 95.0, "unit": "mm", "both_empty": 0.0, "one_empty": 373.13,
                          "keys": dict(zip(("WT", "TC", "ET"), keys))}
    for name, row in off["subsets"].items():  # every existing value unchanged, the HD95 added
        assert {k: on["subsets"][name][k] for k in row} == row
        assert all(0.0 <= on["subsets"][name][k] <= 373.13 for k in keys)
    assert {k: on["mean_over_subsets"][k] for k in off["mean_over_subsets"]} == off["mean_over_subsets"]
    assert on["worst_subset"] == off["worst_subset"]
    assert [{k: r[k] for k in ("case", "subset", "WT", "TC", "ET")} for r in on["per_case"]] == off["per_case"]
    # the distances themselves, recomputed from the masks and the 1.5 x 1 x 2 mm grid
    got = {(r["case"], r["subset"]): [r[k] for k in keys] for r in on["per_case"]}
    expected = _reference_dice(trained / "models" / "model.pt", data, subsets=(0, 14), score=_brats_hd95)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-3), key
    for name, row in on["subsets"].items():
        rows = [v for (_, subset), v in got.items() if subset == name]
        assert [row[k] for k in keys] == pytest.approx([sum(col) / len(rows) for col in zip(*rows)], abs=1e-9)
    assert on["mean_over_subsets"]["HD95_WT"] == pytest.approx(
        sum(row["HD95_WT"] for row in on["subsets"].values()) / 15, abs=1e-9)
    header = (tmp_path / "on" / "subset_dice.csv").read_text().splitlines()[0]
    assert header == "subset,WT,TC,ET,mean,HD95_WT,HD95_TC,HD95_ET,n_cases"
    assert (tmp_path / "off" / "subset_dice.csv").read_text().splitlines()[0] == "subset,WT,TC,ET,mean,n_cases"
    markdown = (tmp_path / "on" / "subset_dice.md").read_text()
    assert "| HD95_WT | HD95_TC | HD95_ET |" in markdown and "373.13 (the BraTS penalty)" in markdown
    assert "HD95_ET" in proc.stdout  # the printed table too


@pytest.mark.parametrize("configs, value, message", [
    ([TRAIN, EVALUATE], "maybe", "hd95"),
    ([TRAIN], "true", "is a setting of .*evaluate.yaml"),  # training's validation reports Dice only
], ids=["not-a-bool", "training"])
def test_a_bad_hd95_flag_is_one_line_before_any_case_is_read(trained, phantoms, tmp_path, configs, value, message):
    out = tmp_path / "out"
    line = refused_line(configs, "--dataset_dir", str(phantoms), "--ckpt_path", str(trained / "models" / "model.pt"),
                        "--output_dir", str(out), "--hd95", value, *TINY, output_dir=out)
    assert line.startswith("error: ") and re.search(message, line), line


def test_a_bad_hd95_workers_count_is_one_line_before_any_case_is_read(trained, phantoms, tmp_path):
    out = tmp_path / "out"
    line = refused_line([TRAIN, EVALUATE], "--dataset_dir", str(phantoms), "--ckpt_path",
                        str(trained / "models" / "model.pt"), "--output_dir", str(out), "--hd95", "true",
                        "--hd95_workers", "0", *TINY, output_dir=out)
    assert line == ("error: --hd95_workers 0 must be a whole number >= 1 (threads searching HD95 distances at once; "
                    "the values do not depend on it), e.g. --hd95_workers 4."), line


def test_a_training_logs_its_data_progress_and_why_it_ended_and_tensorboard_has_its_learning_rate(trained):
    """The log named neither the split nor the device, gave no learning rate, time per iteration, time left or
    worst subset, and ended as every run ended; TensorBoard had the loss and the key metric only."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = _TRAIN_LOG["plain"]
    datalist = json.loads((trained / "datalist.json").read_text())
    n_train, n_val = len(datalist["training"]), len(datalist["validation"])
    assert f"Data: {n_train} training and {n_val} validation case(s); every case's files hold all 4 sequences." in log
    assert "Run: strategy plain, seed 0, " in log and "; device cpu; torch " in log
    assert re.search(r"Epoch 1/1 done \(iteration (\d+) of \1\): train_loss mean [\d.]+, learning rate 0.0003, "
                     r"[\d.]+ s per iteration; \d:\d\d:\d\d trained, about 0:00:00 left\.", log), log
    worst = json.loads((trained / "validation" / "subset_dice.json").read_text())["worst_subset"]
    assert "Validation after epoch 1: mean Dice over 15 subsets " in log
    assert (f"worst subset {worst['name']} {worst['mean']:.4f}; the best val_mean_dice so far: kept as "
            "models/model.pt.") in log
    # the one line says it: MONAI's own lines of the same score are gone
    assert "Got new best metric" not in log and "Epoch[1] Metrics" not in log and "best value" not in log
    assert re.search(r"Training finished: all 1 epoch\(s\) trained \(\d+ iterations\), in \d:\d\d:\d\d; best "
                     r"val_mean_dice [\d.]+ at epoch 1\.", log), log
    events = EventAccumulator(str(trained / "tensorboard"))
    events.Reload()
    assert {"train_loss", "val_mean_dice", "learning_rate", "seconds_per_iteration", "train_loss_epoch", "val_WT",
            "val_TC", "val_ET", "val_worst_subset_dice"} <= set(events.Tags()["scalars"])
    assert events.Scalars("val_worst_subset_dice")[0].value == pytest.approx(worst["mean"])


def test_time_limit_stops_cleanly_and_still_writes_final_model(phantoms, tmp_path):
    proc = run_bundle([TRAIN], "--dataset_dir", str(phantoms), "--output_dir", str(tmp_path), "--max_epochs", "50",
                      "--strategy", "plain", "--time_limit_minutes", "0.0001", *TINY)
    # a 6 ms budget is spent by the first iteration: training stops there, mid-way through epoch 1 of 50
    ckpt = torch.load(tmp_path / "models" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert ckpt["max_epochs"] == 50 and ckpt["epoch_length"] > 1
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 1)
    assert "Time limit of 0.0001 min reached at epoch 1, iteration 1: stopping." in proc.stdout + proc.stderr
    # the last line says why the run ended: not every epoch trained
    assert "Training finished: the time limit of 0.0001 min was reached at epoch 1 of 50, iteration 1, in " \
        in proc.stdout + proc.stderr
    assert (tmp_path / "models" / "model_final.pt").is_file()
    # the handler validated the last weights before stopping: no epoch ended, so nothing else did
    assert (tmp_path / "models" / "model.pt").is_file()
    report = json.loads((tmp_path / "validation" / "subset_dice.json").read_text())
    assert len(report["subsets"]) == 15


def test_checkpoint_from_other_network_gets_clear_error(trained, phantoms, tmp_path):
    with pytest.raises(AssertionError, match="different network configuration"):
        run_bundle([TRAIN, EVALUATE], "--dataset_dir", str(phantoms), "--ckpt_path",
                   str(trained / "models" / "model.pt"), "--output_dir", str(tmp_path),
                   "--patch_size", "[32,32,32]", "--features", "[4,8,16,32]")
    assert not (tmp_path / "subset_dice.json").exists()


def test_an_output_dir_that_cannot_hold_the_report_is_refused_before_any_case_is_scored(phantoms, tmp_path):
    """A file where the output folder should be: evaluation scored every case, then stopped with a
    traceback when it wrote subset_dice.json (and training when it wrote datalist.json)."""
    from app.networks import DSUNet

    ckpt = tmp_path / "model.pt"
    torch.save(DSUNet(features=(8, 16, 32, 64)).state_dict(), ckpt)
    taken = tmp_path / "E"
    taken.write_text("a file, not a folder")
    runs = {"evaluation": ([TRAIN, EVALUATE], "--ckpt_path", str(ckpt)), "training": ([TRAIN], "--max_epochs", "1")}
    for what, (configs, *extra) in runs.items():
        with pytest.raises(AssertionError, match="failed") as failed:
            run_bundle(configs, "--dataset_dir", str(phantoms), "--output_dir", str(taken / "sub"), *extra, *TINY)
        output = str(failed.value).split("failed (1):", 1)[1]  # the run's stdout and stderr
        assert "Traceback" not in output, what
        assert f"error: --output_dir {taken / 'sub'}: {taken} is a file, not a folder" in output, what
        assert "SubsetEvaluator" not in output and "cache_rate" not in output, what  # nothing was read or scored
        assert taken.read_text() == "a file, not a folder"


def test_bad_patch_size_names_the_fix(phantoms, tmp_path):
    with pytest.raises(AssertionError, match="multiples of 8") as failed:
        run_bundle([TRAIN], "--dataset_dir", str(phantoms), "--output_dir", str(tmp_path), "--max_epochs", "1",
                   "--patch_size", "[30,32,32]", "--features", "[8,16,32,64]")
    # the message is the run's one error line, not the middle of MONAI's config-evaluation traceback
    stderr = str(failed.value).split("failed (1):", 1)[1]
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("error: patch_size"), stderr


def test_a_patch_of_one_voxel_at_the_deepest_level_is_refused_before_any_output(phantoms, tmp_path):
    """--patch_size "[8,8,8]" with features [8,16,32,64] is a multiple of the divisor, so it passed the check,
    and training ended in a torch traceback at its first step, after datalist.json, models/ and tensorboard/
    were written: the deepest level held one voxel, which instance normalisation refuses."""
    out = tmp_path / "out"
    last = refused_line([TRAIN], "--dataset_dir", str(phantoms), "--output_dir", str(out), "--max_epochs", "1",
                        "--strategy", "plain", *TINY, "--patch_size", "[8,8,8]", output_dir=out)
    assert last.startswith("error: patch_size [8, 8, 8] leaves a single voxel at the network's deepest level"), last
    assert last.endswith('use e.g. --patch_size "[16, 16, 16]".'), last


def test_metadata_has_no_key_that_monai_renames():
    # MONAI 1.6 reads optional_packages_version as the deprecated name of required_packages_version,
    # so the optional list replaced the required one
    from monai.bundle import ConfigParser

    for bundle in ("brats_gmd", "mosi_gmd"):
        parser = ConfigParser()
        parser.read_meta(str(REPO / "bundles" / bundle / "configs" / "metadata.json"))
        assert {"pytorch-ignite", "fire"} <= set(parser.get("_meta_#required_packages_version")), bundle


def test_metadata_verifies_offline():
    proc = warm.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file",
         str(BRATS / "configs" / "metadata.json"), "--filepath", str(REPO / "bundles" / "meta_schema.json")],
        cwd=REPO, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "verified with no error" in proc.stdout + proc.stderr


def test_metadata_declares_sizes_the_network_takes():
    """network_data_format declared one fixed 96^3 shape, while the network (and its TorchScript export, which
    inference runs on whole foreground crops) takes multiples of 2 ** (len(features) - 1) larger than it along one
    axis: the shapes a consumer derives from the metadata, as monai.bundle verify_net_in_out does, are such
    multiples from the smallest one the network takes, and the network takes each of them."""
    from monai.bundle import ConfigParser
    from monai.bundle.scripts import _get_fake_spatial_shape

    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.read_meta(str(BRATS / "configs" / "metadata.json"))
    net = parser.get_parsed_content("network_def").eval()
    fmt = "_meta_#network_data_format"
    for key in (f"{fmt}#inputs#image#spatial_shape", f"{fmt}#outputs#pred#spatial_shape"):
        declared = parser.get(key)
        assert [_get_fake_spatial_shape(declared, n=n) for n in (1, 2, 3)] == [(2 * net.divisor * n,) * 3
                                                                               for n in (1, 2, 3)]
    shape = _get_fake_spatial_shape(parser.get(f"{fmt}#inputs#image#spatial_shape"), n=1)
    channels = parser.get(f"{fmt}#inputs#image#num_channels")
    with torch.no_grad():
        out = net(torch.rand(1, channels, *shape))
        assert tuple(out.shape) == (1, parser.get(f"{fmt}#outputs#pred#num_channels"), *shape)
        with pytest.raises(ValueError, match="single voxel at the deepest level"):  # one size smaller
            net(torch.rand(1, channels, *[net.divisor] * 3))


def test_preprocessing_builds_without_deprecation_warnings():
    """Orientationd without ``labels`` printed MONAI's FutureWarning about its changed default on every
    training and evaluation run; the bundle's own transforms must not warn."""
    import warnings

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(TRAIN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parser.get_parsed_content("preprocessing")
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not deprecations, deprecations


def test_demo_override_builds_the_demo_network():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([TRAIN, str(REPO / "bundles" / "brats_gmd" / "configs" / "demo.yaml")])
    assert parser["strategy"] == "gmd_approx" and parser["time_limit_minutes"] == 4
    network = parser.get_parsed_content("network_def")
    assert network.features == (8, 16, 32, 64)
    assert all(s % network.divisor == 0 for s in parser["patch_size"])


def test_train_cggm_two_iterations_writes_its_diagnostics(phantoms, tmp_path):
    run_bundle([TRAIN], "--dataset_dir", str(phantoms), "--output_dir", str(tmp_path), "--max_epochs", "1",
               "--epoch_length", "2", "--strategy", "cggm", "--diagnostics_interval", "1", "--cggm_rho", "1.3",
               *TINY)
    _check_training_outputs(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "cggm_diagnostics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2] and rows[0]["modalities"] == ["flair", "t1", "t1ce", "t2"]
    assert all(0.0 <= e <= 1.0 for e in rows[0]["eps"]) and rows[0]["delta"] == rows[0]["eps"]  # Dice; eps(0) = 0
    assert sum(rows[0]["B"]) == pytest.approx(1.3 * 3)  # sum_i B_i = rho (M - 1) whenever sum_k delta_k != 0
    assert not (tmp_path / "gmd_diagnostics.jsonl").exists()


def test_the_readme_recipe_trains_the_example_strategy_and_a_resume_with_another_aux_weight_is_refused(
        phantoms, tmp_path):
    """README, "A strategy of your own": its recipe (examples/my_recipe.yaml, shown there as it is) trains the
    worked example examples/my_strategies.py as written, and the resume check covers the example's own option."""
    recipe = REPO / "examples" / "my_recipe.yaml"
    shown = [b for b in re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), re.S)
             if "my_strategies.UnimodalAux" in b]
    assert shown == [recipe.read_text()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "examples"),
                                                                      os.environ.get("PYTHONPATH")]))}
    args = ["--dataset_dir", str(phantoms), "--output_dir", str(tmp_path), "--max_epochs", "1", "--epoch_length", "2",
            *TINY]
    proc = run_bundle([TRAIN, str(recipe)], *args, env=env)
    assert "Run: strategy unimodal_aux (my_strategies.UnimodalAux), seed 0," in proc.stderr + proc.stdout
    _check_training_outputs(tmp_path)
    checkpoint = tmp_path / "models" / "checkpoint_last.pt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert (state["strategy_config"], state["iteration"]) == ("UnimodalAux(seed=0, aux_weight=0.5)", 2)
    before = checkpoint.read_bytes()
    last = refused_line([TRAIN, str(recipe)], *args, "--resume", "true", "--strategy_def#aux_weight", "0.25", env=env)
    assert last.startswith(f"error: {checkpoint} was written by a run training with UnimodalAux(seed=0, "
                           "aux_weight=0.5), this run trains with UnimodalAux(seed=0, aux_weight=0.25): resume with "
                           "--strategy_def#aux_weight 0.5, or start a new run"), last
    assert checkpoint.read_bytes() == before


def test_evaluate_stops_at_a_bad_case_before_scoring_with_one_line(trained, phantoms, tmp_path):
    """A bad label among the cases was found mid-evaluation and printed four tracebacks before the error."""
    # the last case: read after the others are scored
    data, seg = tmp_path / "data", _copy_with_et_as_3(phantoms, tmp_path / "data", -1)
    with pytest.raises(AssertionError) as failed:
        run_bundle([TRAIN, EVALUATE], "--dataset_dir", str(data), "--ckpt_path", str(trained / "models" / "model.pt"),
                   "--output_dir", str(tmp_path / "eval"), "--cache_rate", "0", *TINY)
    stderr = str(failed.value).split("failed (1):", 1)[1]
    assert "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith(f"error: Label {seg} contains values [3]"), stderr
    assert not (tmp_path / "eval").exists()  # the folder it made (taking its lock) and left empty is removed


@pytest.mark.parametrize("cache_rate", ["auto", "0"])
def test_training_on_a_bad_case_leaves_no_output(phantoms, tmp_path, cache_rate):
    """The split was written before the cases were read: a bad file left a datalist.json behind (and with
    cache_rate 0, a traceback mid-training). The output folder the run made for itself (taking its lock) is
    removed with its new parents; it used to stay behind, empty."""
    data, seg = tmp_path / "data", _copy_with_et_as_3(phantoms, tmp_path / "data", 0)
    out = tmp_path / "runs" / "out"
    with pytest.raises(AssertionError) as failed:
        run_bundle([TRAIN], "--dataset_dir", str(data), "--output_dir", str(out), "--max_epochs", "1",
                   "--strategy", "plain", "--cache_rate", cache_rate, *TINY)
    stderr = str(failed.value).split("failed (1):", 1)[1]
    assert "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith(f"error: Label {seg} contains values [3]"), stderr
    assert not (tmp_path / "runs").exists(), sorted((tmp_path / "runs").rglob("*"))


def test_a_strategy_the_network_cannot_train_stops_before_any_output(phantoms, tmp_path):
    """``--strategy predict`` (sentiment only) was refused only once the trainer was built, after the
    cases were read and datalist.json, models/ and tensorboard/ were written into the output folder."""
    out = tmp_path / "out"
    last = refused_line([TRAIN], "--dataset_dir", str(phantoms), "--output_dir", str(out), "--max_epochs", "1",
                        "--strategy", "predict", *TINY, output_dir=out)
    assert last.startswith("error: Strategy 'predict' needs a network") and "For BraTS, choose" in last, last


@pytest.mark.parametrize("flag, value, message", [
    ("--amp", "yes", "error: --amp must be true or false, got 'yes'"),
    ("--progress_bar", "on", "error: --progress_bar must be true or false, got 'on'"),
    ("--resume", "yes", "error: --resume must be true, false or auto, got 'yes'"),
    ("--resume", "true", "error: No training checkpoint at "),
    # MONAI refused a weight of the wrong length only at the first training step, with a traceback
    ("--loss#weight", "[2.0]", 'error: --loss#weight [2.0] has 1 value(s), the network predicts 3 channels: give one '
                               'value per channel, e.g. --loss#weight "[1.0,1.0,1.0]"'),
])
def test_a_bad_flag_or_a_resume_without_checkpoint_stops_before_any_output(phantoms, tmp_path, flag, value, message):
    """``--amp``, ``--progress_bar`` and ``--resume`` were read only when the trainer was built, and
    ``--resume true`` found no checkpoint only when it started: each was refused after every case had been
    read and datalist.json, models/ and tensorboard/ written into a folder that held no run.

    Each is checked in this process, among the steps a run takes before it reads a case; one bundle run shows
    such a refusal end to end (one line, exit status 1, nothing written)."""
    from fire.parser import DefaultParseValue as _literal  # as the command line gives it

    out = tmp_path / "out"
    setting = flag[2:].split("#")[0]
    with pytest.raises(Exception) as err:
        run_setting_checks([TRAIN], setting, output_dir=str(out), **{flag[2:]: _literal(value)})
    assert any(m.startswith(message[len("error: "):]) for m in error_messages(err.value)), error_messages(err.value)
    assert not out.exists()
    if flag == "--amp":
        last = refused_line([TRAIN], "--dataset_dir", str(phantoms), "--output_dir", str(out), "--max_epochs", "1",
                            "--strategy", "plain", flag, value, *TINY, output_dir=out)
        assert last.startswith(message), last


def test_an_evaluation_with_a_seed_that_is_no_whole_number_is_one_line(trained, tmp_path):
    """--seed abc reached set_determinism, which stopped the evaluation with a traceback (training refused it)."""
    out = tmp_path / "eval"
    last = refused_line([TRAIN, EVALUATE], "--eval_datalist", str(trained / "datalist.json"), "--ckpt_path",
                        str(trained / "models" / "model.pt"), "--output_dir", str(out), "--seed", "abc", *TINY,
                        output_dir=out)
    assert last == "error: --seed 'abc' must be a whole number >= 0, e.g. --seed 1."


def _single_process_torchrun(configs: list, monkeypatch) -> list:
    """For the multi-GPU config (more than one config file): the environment torchrun --nproc_per_node 1 gives
    its one process, and the gloo backend option; nothing for the single-process config."""
    if len(configs) == 1:
        return []
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    return ["--dist_backend", "gloo"]


@pytest.mark.parametrize("modalities", ["['flair','t1ce']", "['t1','flair','t1ce','t2']"])
@pytest.mark.parametrize("configs", [[TRAIN], [TRAIN, str(BRATS / "configs" / "multi_gpu_train.yaml")]],
                         ids=["train", "multi_gpu"])
def test_a_network_of_other_sequences_than_the_data_is_refused_before_any_output(phantoms, tmp_path, configs, modalities,
                                                                                 monkeypatch):
    """--network_def#modalities "['flair','t1ce']" stopped at the first step (image [B, 4, ...] for 2 encoders)
    after datalist.json and models/ were written; the four names in another order trained silently, each
    encoder on the channel of another sequence than its name."""
    names = modalities.strip("[]").replace(",", ", ")
    message = (f"network_def#modalities [{names}] must be the sequences the cases are loaded with, in their order: "
               "['flair', 't1', 't1ce', 't2']. Leave --network_def#modalities out; to train without a sequence, leave "
               "its files out of the cases (a case may lack sequences).")
    if len(configs) == 1 or modalities.startswith("['flair'"):  # in this process, before a case is read
        from fire.parser import DefaultParseValue as _literal  # as the command line gives it

        with pytest.raises(Exception) as err:
            run_setting_checks(configs, "network_def", **{"network_def#modalities": _literal(modalities)})
        assert message in error_messages(err.value), error_messages(err.value)
        return
    out = tmp_path / "out"  # a whole run, on every rank: one line, exit status 1, nothing written
    gloo = _single_process_torchrun(configs, monkeypatch)
    last = refused_line(configs, "--dataset_dir", str(phantoms), "--output_dir", str(out), "--max_epochs", "1",
                        "--strategy", "plain", "--network_def#modalities", modalities, *gloo, *TINY, output_dir=out)
    assert last.removeprefix("[rank0]: ") == f"error: {message}"


@pytest.mark.parametrize("configs, setting, value, message", [
    ([TRAIN], "--loss#lambda_ce", "-1", "error: --loss#lambda_ce -1 must be a number >= 0 (the weight of the cross-entropy "
                                        "term), e.g. --loss#lambda_ce 1.0."),
    ([TRAIN], "--loss#reduction", "none", "error: --loss#reduction 'none' must be mean or sum"),
    ([TRAIN], "--loss#weight", "[high]", "error: loss weight ['high'] is not numbers"),
    ([TRAIN, str(BRATS / "configs" / "multi_gpu_train.yaml")], "--loss#lambda_dice", "-0.5",
     "error: --loss#lambda_dice -0.5 must be a number >= 0"),
], ids=["lambda", "reduction", "weight", "multi_gpu"])
def test_a_bad_loss_setting_is_one_line_before_any_output(phantoms, tmp_path, configs, setting, value, message,
                                                           monkeypatch):
    """The loss was built with the trainer: a bad setting stopped the run with MONAI's 'Failed to instantiate
    component' traceback after every case had been read and datalist.json written."""
    if len(configs) == 1:  # checked in this process, among the steps a run takes before it reads a case
        from fire.parser import DefaultParseValue as _literal  # as the command line gives it

        with pytest.raises(Exception) as err:
            run_setting_checks(configs, "loss", **{setting[2:]: _literal(value)})
        assert any(m.startswith(message[len("error: "):]) for m in error_messages(err.value)), \
            error_messages(err.value)
        return
    out = tmp_path / "out"  # a whole run, on every rank: one line, exit status 1, nothing written
    gloo = _single_process_torchrun(configs, monkeypatch)
    last = refused_line(configs, "--dataset_dir", str(phantoms), "--output_dir", str(out), "--max_epochs", "1",
                        "--strategy", "plain", setting, value, *gloo, *TINY, output_dir=out)
    assert last.removeprefix("[rank0]: ").startswith(message), last


@pytest.mark.parametrize("configs", [[TRAIN], [TRAIN, EVALUATE]], ids=["train", "evaluate"])
@pytest.mark.parametrize("device, message", [
    ("gpu", "error: --device 'gpu' is not a device ("),
    ("auto", "error: --device auto is not a setting of this config"),
] + ([] if torch.cuda.is_available() else [("cuda", "error: --device cuda was asked for but CUDA is not available")]))
def test_a_device_the_machine_lacks_is_one_line_before_any_output(phantoms, trained, tmp_path, configs, device, message):
    """``--device cuda`` on a machine without CUDA, or a typo (``--device gpu``), ended in a torch traceback
    when the network was moved there, after training had written datalist.json. ``--device auto``, which only
    inference takes, is refused as no setting of these configs by a whole run; the others are checked in this
    process, among the steps a run takes before it reads a case."""
    out = tmp_path / "out"
    if device != "auto":
        with pytest.raises(Exception) as err:
            run_setting_checks(configs, "device", device=device)
        assert any(m.startswith(message[len("error: "):]) for m in error_messages(err.value)), \
            error_messages(err.value)
        return
    last = refused_line(configs, "--dataset_dir", str(phantoms), "--output_dir", str(out), "--max_epochs", "1",
                        "--ckpt_path", str(trained / "models" / "model.pt"), "--device", device, *TINY, output_dir=out)
    assert last.startswith(message), last


@pytest.mark.parametrize("args, message", [
    (["--patch_size", "32", "--features", "[8,16,32,64]"],
     'error: patch_size [32] must have 3 entries that are multiples of 8 (2 ** (len(features) - 1)): use e.g. '
     '--patch_size "[32, 32, 32]".'),
    (["--patch_size", "[32,32,32]", "--features", "16"], "error: --features 16 must list two or more positive widths"),
])
def test_a_single_number_for_a_list_setting_names_the_fix(args, message):
    """``--patch_size 32`` (as infer's ``--patch-size 32 32 32`` reads) and ``--features 16`` ended in a
    TypeError traceback ('int' object is not iterable) instead of the line that gives the list syntax (checked in
    this process, among the steps a run takes before it reads a case)."""
    from fire.parser import DefaultParseValue as _literal  # as the command line gives it

    settings = {args[0][2:]: _literal(args[1]), args[2][2:]: _literal(args[3])}
    with pytest.raises(Exception) as err:
        run_setting_checks([TRAIN], "patch_size", **settings)
    assert any(m.startswith(message[len("error: "):]) for m in error_messages(err.value)), error_messages(err.value)


@pytest.mark.parametrize("flag, value, message", [
    ("--epoch_length", "0", "error: --epoch_length 0 must be a whole number >= 1, e.g. --epoch_length 1."),
    ("--num_samples", "0", "error: --num_samples 0 must be a whole number >= 1, e.g. --num_samples 1."),
    ("--sw_overlap", "1", "error: --sw_overlap 1 must be a number >= 0 and < 1, e.g. --sw_overlap 0.5."),
    ("--seed", "abc", "error: --seed 'abc' must be a whole number >= 0, e.g. --seed 1."),
    ("--weight_decay", "-1", "error: --weight_decay -1 must be a number >= 0, e.g. --weight_decay 0.01."),
])
def test_an_impossible_count_or_overlap_stops_before_any_output(phantoms, tmp_path, flag, value, message):
    """``--epoch_length 0`` ended the run at once with exit status 0 and no model.pt; ``--num_samples 0`` and
    ``--sw_overlap 1`` ended in a traceback once training ran, after datalist.json, models/ and tensorboard/
    were written; ``--seed abc`` in a traceback.

    Each setting's check runs in this process, among the steps a run takes before it reads a case; one bundle run
    shows such a refusal end to end (one line, exit status 1, nothing written)."""
    from fire.parser import DefaultParseValue as _literal  # as the command line gives it

    setting = flag[2:]
    assert run_setting_checks([TRAIN], setting) > 0  # the default passes
    with pytest.raises(Exception) as err:
        run_setting_checks([TRAIN], setting, **{setting: _literal(value)})
    assert message[len("error: "):] in error_messages(err.value), error_messages(err.value)
    if flag == "--epoch_length":
        out = tmp_path / "out"
        last = refused_line([TRAIN], "--dataset_dir", str(phantoms), "--output_dir", str(out), "--max_epochs", "1",
                            "--strategy", "plain", flag, value, *TINY, output_dir=out)
        assert last == message, last


MULTI_GPU = str(BRATS / "configs" / "multi_gpu_train.yaml")


@pytest.mark.parametrize("configs, setting, value, message", [
    pytest.param(configs, setting, value, message, id=f"{configs[-1].rsplit('/', 1)[-1]}-{setting}={value}")
    for configs in ([TRAIN], [TRAIN, MULTI_GPU], [TRAIN, EVALUATE])
    for setting, value, message in [
        # trained a whole epoch, then stopped in a traceback at the first validation, leaving datalist.json behind
        ("sw_batch_size", 0, "--sw_batch_size 0 must be a whole number >= 1, e.g. --sw_batch_size 1."),
        ("sw_batch_size", -1, "--sw_batch_size -1 must be a whole number >= 1, e.g. --sw_batch_size 1."),
        # the DataLoader's traceback
        ("num_workers", -1, "--num_workers -1 must be a whole number >= 0, e.g. --num_workers 1."),
        # trained with no time limit at all; a word stopped in a traceback after the output folder was made
        ("time_limit_minutes", -5, "--time_limit_minutes -5 must be a number >= 0, e.g. --time_limit_minutes 0.01."),
        ("time_limit_minutes", "abc",
         "--time_limit_minutes 'abc' must be a number >= 0, e.g. --time_limit_minutes 0.01."),
    ] if not (configs[-1] == EVALUATE and setting == "time_limit_minutes")   # evaluation has no time limit
])
def test_a_window_batch_worker_count_or_time_budget_out_of_range_is_refused_before_any_case(configs, setting, value,
                                                                                            message):
    assert run_setting_checks(configs, setting) > 0  # the defaults pass
    with pytest.raises(Exception) as err:
        run_setting_checks(configs, setting, **{setting: value})
    assert message in error_messages(err.value), error_messages(err.value)


def test_no_time_limit_passes_as_zero_or_null():
    for value in (0, None, 30.5):
        assert run_setting_checks([TRAIN], "time_limit_minutes", time_limit_minutes=value) == 1


def test_evaluation_follows_deterministic_false_as_training_does():
    """evaluate.yaml replaced train.yaml's initialize without its set_cudnn step: --deterministic false was
    accepted and ignored, evaluation kept the deterministic cuDNN kernels set_determinism forces."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(ConfigParser.load_config_files([TRAIN, EVALUATE]))
    parser["deterministic"] = False
    steps = parser.get("initialize")
    order = [i for i, step in enumerate(steps) if "set_determinism" in step or "set_cudnn(@deterministic)" in step]
    assert len(order) == 2 and "set_determinism" in steps[order[0]]  # cuDNN settings after the seeding
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        for i in order:
            parser.get_parsed_content(f"initialize#{i}")
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


def _copy_with_et_as_3(phantoms, data, index: int):
    """Copy the phantoms to ``data`` and give case ``index``'s label 3 for enhancing tumour (a BraTS 2023 value
    under 2018 names, which the brats2018 convention refuses); return that label's path."""
    import shutil

    import nibabel as nib
    import numpy as np

    shutil.copytree(phantoms, data)
    seg = sorted(data.glob("*/*_seg.nii.gz"))[index]
    img = nib.load(str(seg))
    values = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(np.where(values == 4, 3, values).astype(np.uint8), img.affine), str(seg))
    return seg


def _stderr_while_held(out, configs, *args: str) -> str:
    """The stderr of a bundle run that fails while another process (this test) holds ``out``'s folder lock, as a
    running training or evaluation does (the kernel releases it when that process dies)."""
    import fcntl
    import os

    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(AssertionError) as failed:
            run_bundle(configs, *args)
    finally:
        os.close(fd)
    return str(failed.value).split("failed (1):", 1)[1]


@pytest.mark.skipif(sys.platform == "win32", reason="folder locks (flock) are POSIX")
def test_a_second_training_on_the_same_output_dir_stops_before_writing(phantoms, tmp_path):
    """A job started twice on one output folder: while the first training holds it, the second stops
    with one line and leaves the first's files as they were (both used to train, writing one
    datalist.json, checkpoint_last.pt and model.pt in turn)."""

    out = tmp_path / "out"
    (out / "models").mkdir(parents=True)
    (out / "datalist.json").write_text('{"training": [], "validation": []}\n')  # the first run's files
    (out / "models" / "checkpoint_last.pt").write_bytes(b"first run")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    stderr = _stderr_while_held(out, [TRAIN], "--dataset_dir", str(phantoms), "--output_dir", str(out),
                                "--max_epochs", "1", "--strategy", "plain", "--cache_rate", "0", *TINY)
    assert "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (
        f"error: --output_dir {out} is in use by another run that is still writing into it (a job started twice?): "
        "wait for it to end, or pass another --output_dir.")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.skipif(sys.platform == "win32", reason="folder locks (flock) are POSIX")
def test_a_second_evaluation_into_the_same_output_dir_stops_before_reading_a_case(trained, phantoms, tmp_path):
    """A job started twice, or two checkpoints scored into one folder by mistake: both evaluations wrote
    subset_dice.*, so the folder could hold the JSON of one beside the CSV and PNG of the other. While the
    first holds the folder, the second stops with one line, before it reads a case (the bad label below is
    never reached), and leaves the first's files as they were; the folder is free again once it ends."""
    data, seg = tmp_path / "data", _copy_with_et_as_3(phantoms, tmp_path / "data", 0)
    out = tmp_path / "eval"
    out.mkdir()
    (out / "subset_dice.json").write_text("{}\n")  # the first evaluation's report
    args = ["--ckpt_path", str(trained / "models" / "model.pt"), "--output_dir", str(out), "--cache_rate", "0", *TINY]
    stderr = _stderr_while_held(out, [TRAIN, EVALUATE], "--dataset_dir", str(data), *args)
    assert "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (
        f"error: --output_dir {out} is in use by another run that is still writing into it (a job started twice?): "
        "wait for it to end, or pass another --output_dir.")
    assert [p.name for p in out.iterdir()] == ["subset_dice.json"] and (out / "subset_dice.json").read_text() == "{}\n"
    run_bundle([TRAIN, EVALUATE], "--dataset_dir", str(phantoms), *args)  # once the first has ended
    assert sorted(p.name for p in out.iterdir()) == [f"subset_dice.{ext}" for ext in ("csv", "json", "md", "png")]


@pytest.mark.usefixtures("process_state_restored")  # the bundle's StatsHandler sets the root logger to INFO
@pytest.mark.parametrize("bundle", ["brats_gmd", "mosi_gmd"])
@pytest.mark.parametrize("progress_bar, iteration_lines", [("true", False), ("false", True), (True, False), ("0", True)])
def test_the_progress_bar_replaces_the_per_iteration_log_lines(bundle, progress_bar, iteration_lines):
    """With --progress_bar true (the demo's recipe) each iteration's loss was logged beside the bar, which showed it
    too: the log lines broke the bar into fragments in front of their timestamps. The epoch lines stay."""
    from monai.bundle import ConfigParser
    from monai.handlers import StatsHandler

    from app.engines import ProgressBarHandler

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "train.yaml"))
    parser["progress_bar"] = progress_bar
    stats = [i for i, h in enumerate(parser["train"]["handlers"]) if h["_target_"] == "StatsHandler"]
    assert len(stats) == 1
    handler = parser.get_parsed_content(f"train#handlers#{stats[0]}")
    assert isinstance(handler, StatsHandler) and handler.iteration_log is iteration_lines and handler.epoch_log is True
    bars = [i for i, h in enumerate(parser["train"]["handlers"]) if h["_target_"] == "app.engines.ProgressBarHandler"]
    assert isinstance(parser.get_parsed_content(f"train#handlers#{bars[0]}"), ProgressBarHandler)

"""``python -m app infer``: outputs on the input grid, labels, probabilities, summary, subsets, layouts."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose, CropForegroundd, NormalizeIntensityd, Orientationd
from monai.transforms.utils import generate_spatial_bounding_box
from nibabel.orientations import apply_orientation, io_orientation

from app.data import LoadCased
from app.networks import DSUNet
from app.subsets import BRATS_MODALITIES
from tests.inference.conftest import FEATURES, REPO, assert_same_grid, load, needs_simpleitk


def test_all_sequences_on_input_grid_with_summary_and_probabilities(case, random_ckpt, infer, tmp_path):
    out, prob, summary = tmp_path / "o" / "seg.nii.gz", tmp_path / "o" / "prob.nii.gz", tmp_path / "o" / "s.json"
    rc, stdout, err = infer("--bundle", "bundles/brats_gmd", "--ckpt", random_ckpt, *[f"--{s}={case[s]}" for s in case],
                            "--out", out, "--probabilities", prob, "--summary", summary,
                            "--patch-size", "16", "16", "16")
    assert rc == 0, err
    assert "Wrote" in stdout
    assert_same_grid(out, case["flair"])
    assert_same_grid(prob, case["flair"])
    img = load(out)
    assert img.get_data_dtype() == np.uint8
    labels = np.asarray(img.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 4}
    p = np.asarray(load(prob).dataobj)
    assert p.shape == (*labels.shape, 3) and p.dtype == np.float32 and 0.0 <= p.min() and p.max() <= 1.0
    # nested priority ET > TC > WT of the thresholded regions
    np.testing.assert_array_equal(labels == 4, p[..., 2] > 0.5)
    np.testing.assert_array_equal(labels == 1, (p[..., 1] > 0.5) & ~(p[..., 2] > 0.5))
    np.testing.assert_array_equal(labels > 0, (p > 0.5).any(-1))
    s = json.loads(summary.read_text())
    assert s["sequences_used"] == list(BRATS_MODALITIES) and s["sequences_missing"] == []
    voxel_ml = abs(np.linalg.det(img.affine[:3, :3])) / 1000
    assert s["voxel_volume_ml"] == voxel_ml
    assert s["volumes_ml"]["WT"] == round(np.count_nonzero(labels) * voxel_ml, 4)
    assert s["volumes_ml"]["ET"] == round(np.count_nonzero(labels == 4) * voxel_ml, 4)
    assert s["volumes_ml"]["TC"] == round(np.count_nonzero((labels == 1) | (labels == 4)) * voxel_ml, 4)
    # the sub-regions too (2018 values: 1 necrosis, 2 oedema); each is non-empty for this network
    assert s["volumes_ml"]["NCR"] == round(np.count_nonzero(labels == 1) * voxel_ml, 4) > 0
    assert s["volumes_ml"]["ED"] == round(np.count_nonzero(labels == 2) * voxel_ml, 4) > 0
    assert {"read_s", "preprocess_s", "network_s", "postprocess_s", "write_s", "total_s"} <= set(s["timing_s"])
    assert s["network"]["features"] == FEATURES and s["inference"]["roi_size"] == [16, 16, 16]
    # provenance: absolute inputs and the model's digest, whatever the files are called later
    assert all(os.path.isabs(v) for v in s["inputs"].values()) and os.path.isabs(s["network"]["checkpoint"])
    assert s["network"]["checkpoint_sha256"] == hashlib.sha256(Path(random_ckpt).read_bytes()).hexdigest()
    assert sorted(p.name for p in out.parent.iterdir()) == ["prob.nii.gz", "s.json", "seg.nii.gz"]  # no temp files


def test_subset_matches_training_preprocessing_and_network(case, random_ckpt, infer, tmp_path):
    """FLAIR + T2 only: the probabilities equal DSUNet.forward with mask [1, 0, 0, 1] on train.yaml's preprocessing."""
    prob = tmp_path / "prob.nii.gz"
    rc, _, err = infer("--ckpt", random_ckpt, "--flair", case["flair"], "--t2", case["t2"],
                       "--out", tmp_path / "s.nii.gz", "--probabilities", prob, "--summary", tmp_path / "s.json",
                       "--patch-size", "32", "32", "32", "--device", "cpu")  # the reference runs on CPU in fp32
    assert rc == 0, err
    assert json.loads((tmp_path / "s.json").read_text())["sequences_used"] == ["flair", "t2"]

    record = {"case": "c", "images": {"flair": case["flair"], "t2": case["t2"]}}
    data = Compose([
        LoadCased(load_label=False),
        Orientationd(keys="image", axcodes="RAS"),
        CropForegroundd(keys="image", source_key="image"),
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
    ])(record)
    image = torch.as_tensor(data["image"])
    assert data["modality_mask"].tolist() == [True, False, False, True]
    # the steps above are the bundle's own preprocessing (train.yaml), which the network was trained on
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "brats_gmd" / "configs" / "train.yaml"))
    bundle_sample = record
    for transform in parser.get_parsed_content("preprocessing", instantiate=True):
        bundle_sample = transform(bundle_sample)
    np.testing.assert_array_equal(np.asarray(bundle_sample["image"]), image.numpy())
    # pad to multiples of the divisor (8) the way sliding_window_inference pads: half before, rest after
    extra = [-(-s // 8) * 8 - s for s in image.shape[1:]]
    pads = [(0, 0)] + [(e // 2, e - e // 2) for e in extra]
    padded = torch.nn.functional.pad(image, [p for pair in reversed(pads[1:]) for p in pair])
    net = DSUNet(features=FEATURES)
    net.load_state_dict(torch.load(random_ckpt, weights_only=True))
    with torch.inference_mode():
        expected = torch.sigmoid(net.eval()(padded[None], data["modality_mask"][None]))[0]
    sl = tuple(slice(lo, lo + s) for (lo, _), s in zip(pads[1:], image.shape[1:]))
    expected = expected[(slice(None), *sl)].numpy()

    ref = load(case["flair"])
    got = np.asarray(load(prob).dataobj)
    ornt = io_orientation(ref.affine)
    got_ras = np.moveaxis(apply_orientation(got, ornt), -1, 0)  # [3, RAS...]
    ras_flair = apply_orientation(np.asarray(ref.dataobj, dtype=np.float32), ornt)
    ras_t2 = apply_orientation(np.asarray(load(case["t2"]).dataobj, dtype=np.float32), ornt)
    start, end = generate_spatial_bounding_box(np.stack([ras_flair, ras_t2]))
    box = (slice(None), slice(start[0], end[0]), slice(start[1], end[1]), slice(start[2], end[2]))
    head = ((ras_flair != 0) | (ras_t2 != 0))[box[1:]]
    assert 0 < head.mean() < 1  # the phantom's head does not fill its crop
    np.testing.assert_allclose(got_ras[box], expected * head, atol=2e-5)
    outside = np.ones(got_ras.shape[1:], dtype=bool)
    outside[box[1:]] = False
    assert np.all(got_ras[:, outside] == 0)  # background outside the crop
    summary = json.loads((tmp_path / "s.json").read_text())["inference"]
    assert summary["head_mask"] is True
    voxel_ml = abs(np.linalg.det(ref.affine[:3, :3])) / 1000
    # whole tumour as the labels count it: nested priority makes a voxel with ET or TC > 0.5 tumour too
    removed = (expected > 0.5).any(axis=0) & ~head
    assert removed.sum() > ((expected[0] > 0.5) & ~head).sum()  # this network has such voxels outside the head
    assert summary["wt_removed_outside_head_ml"] == pytest.approx(removed.sum() * voxel_ml,
                                                                  abs=1e-3)

    # --no-head-mask: the raw network output, outside the head too
    rc, _, err = infer("--ckpt", random_ckpt, "--flair", case["flair"], "--t2", case["t2"],
                       "--out", tmp_path / "raw.nii.gz", "--probabilities", prob, "--patch-size", "32", "32", "32",
                       "--no-head-mask")
    assert rc == 0, err
    raw = np.moveaxis(apply_orientation(np.asarray(load(prob).dataobj), ornt), -1, 0)
    np.testing.assert_allclose(raw[box], expected, atol=2e-5)


def test_head_mask_keeps_negative_voxels_inside_the_head(case, random_ckpt, infer, tmp_path):
    # z-scored exports are negative inside the brain: only voxels 0 in every given sequence are outside
    img = load(case["flair"])
    data = np.asarray(img.dataobj, dtype=np.float32)
    c = [s // 2 for s in data.shape]
    block = (slice(c[0] - 3, c[0] + 3), slice(c[1] - 3, c[1] + 3), slice(c[2] - 3, c[2] + 3))
    data[block] = -5.0
    flair = tmp_path / "flair_negative.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), str(flair))
    probs = {}
    for name, extra in (("masked", []), ("raw", ["--no-head-mask"])):
        out, prob = tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_prob.nii.gz"
        rc, _, err = infer("--ckpt", random_ckpt, "--flair", flair, "--out", out, "--probabilities", prob,
                           "--patch-size", "32", "32", "32", *extra)
        assert rc == 0, err
        probs[name] = np.asarray(load(prob).dataobj)
    assert probs["raw"][block].min() > 0  # the network's sigmoid is never exactly 0
    np.testing.assert_array_equal(probs["masked"][block], probs["raw"][block])
    assert np.all(probs["masked"][data == 0] == 0)


def test_labels_2023_and_input_aliases(case, random_ckpt, infer, tmp_path):
    """--labels 2023 writes ET as 3, the same segmentation otherwise, and reports the same volumes."""
    base, new = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    assert infer("--ckpt", random_ckpt, "--flair", case["flair"], "--t1ce", case["t1ce"], "--out", base,
                 "--summary", tmp_path / "a.json")[0] == 0
    rc, _, err = infer("--ckpt", random_ckpt, "--input", f"T2F={case['flair']}", "--input", f"t1c={case['t1ce']}",
                       "--out", new, "--labels", "2023", "--summary", tmp_path / "b.json")
    assert rc == 0, err
    a, b = np.asarray(load(base).dataobj), np.asarray(load(new).dataobj)
    assert set(np.unique(b)) <= {0, 1, 2, 3}
    expected = a.copy()
    expected[a == 4] = 3
    np.testing.assert_array_equal(b, expected)
    # the volumes are of regions, not of label values: counting the 2018 values in a 2023 map loses ET
    vols_a = json.loads((tmp_path / "a.json").read_text())["volumes_ml"]
    vols_b = json.loads((tmp_path / "b.json").read_text())["volumes_ml"]
    assert vols_b == vols_a and vols_a["ET"] > 0


def test_volumes_stored_as_xyz1_are_read_as_3d(case, random_ckpt, infer, tmp_path):
    # some converters write a 3D volume as X*Y*Z*1; it is the same image
    base, out = tmp_path / "base.nii.gz", tmp_path / "xyz1.nii.gz"
    assert infer("--ckpt", random_ckpt, "--flair", case["flair"], "--t2", case["t2"], "--out", base)[0] == 0
    args = []
    for seq in ("flair", "t2"):
        img = load(case[seq])
        path = tmp_path / f"{seq}_xyz1.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., None], img.affine, img.header), str(path))
        assert load(path).shape[3:] == (1,)
        args += [f"--{seq}", path]
    rc, _, err = infer("--ckpt", random_ckpt, *args, "--out", out)
    assert rc == 0, err
    assert load(out).shape == load(case["flair"]).shape  # written as 3D, like the image it was read as
    assert_same_grid(out, case["flair"])
    np.testing.assert_array_equal(np.asarray(load(out).dataobj), np.asarray(load(base).dataobj))


def test_nifti2_reference_gives_nifti2_outputs_on_its_grid(case, random_ckpt, infer, tmp_path):
    """A NIfTI-2 scan (some converters write it) gets NIfTI-2 outputs with its header geometry,
    and the same labels as the NIfTI-1 scan; converting to NIfTI-1 printed nibabel's
    'sizeof_hdr should be 348' on stderr for every output of a successful run."""
    base, out, prob = tmp_path / "base.nii.gz", tmp_path / "n2.nii.gz", tmp_path / "n2_prob.nii.gz"
    assert infer("--ckpt", random_ckpt, "--flair", case["flair"], "--t2", case["t2"], "--out", base)[0] == 0
    img = load(case["flair"])
    n2 = nib.Nifti2Image(np.asarray(img.dataobj), img.affine)
    n2.header.set_qform(img.affine, code=1)
    n2.header.set_sform(img.affine, code=2)
    flair2 = tmp_path / "flair_nifti2.nii.gz"
    nib.save(n2, str(flair2))
    rc, _, err = infer("--ckpt", random_ckpt, "--flair", flair2, "--t2", case["t2"], "--out", out,
                       "--probabilities", prob, "--quiet")
    assert rc == 0 and err == "", err
    for path in (out, prob):
        assert isinstance(load(path), nib.Nifti2Image)
        assert_same_grid(path, flair2)
    np.testing.assert_array_equal(np.asarray(load(out).dataobj), np.asarray(load(base).dataobj))


def test_case_dir_in_brats2018_and_brats2023_layouts(case, random_ckpt, infer, tmp_path):
    explicit = tmp_path / "explicit.nii.gz"
    assert infer("--ckpt", random_ckpt, *[f"--{s}={case[s]}" for s in ("flair", "t1ce")], "--out", explicit)[0] == 0
    d18 = tmp_path / "c18"
    d18.mkdir()
    d23 = tmp_path / "c23"
    d23.mkdir()
    for seq, new in (("flair", "t2f"), ("t1ce", "t1c")):
        shutil.copy(case[seq], d18 / f"X_{seq}.nii.gz")
        shutil.copy(case[seq], d23 / f"X-{new}.nii.gz")
    labels_2018 = np.asarray(load(explicit).dataobj)
    assert 4 in labels_2018
    labels_2023 = np.where(labels_2018 == 4, 3, labels_2018)
    # --labels auto (the default) writes the values the files' naming comes with, as training reads them
    for folder, expected, convention in ((d18, labels_2018, "brats2018"), (d23, labels_2023, "brats2023")):
        out = tmp_path / f"{folder.name}.nii.gz"
        rc, _, err = infer("--ckpt", random_ckpt, "--case-dir", folder, "--out", out, "--summary", tmp_path / "s.json")
        assert rc == 0, err
        np.testing.assert_array_equal(np.asarray(load(out).dataobj), expected)
        summary = json.loads((tmp_path / "s.json").read_text())
        assert summary["sequences_used"] == ["flair", "t1ce"] and summary["label_convention"] == convention
    # an explicit --labels wins over the names
    out = tmp_path / "c23_2018.nii.gz"
    assert infer("--ckpt", random_ckpt, "--case-dir", d23, "--out", out, "--labels", "2018")[0] == 0
    np.testing.assert_array_equal(np.asarray(load(out).dataobj), labels_2018)
    # files given one by one: 2023 values only when every file carries a 2023 name
    out = tmp_path / "files.nii.gz"
    assert infer("--ckpt", random_ckpt, "--flair", d23 / "X-t2f.nii.gz", "--t1ce", d23 / "X-t1c.nii.gz",
                 "--out", out)[0] == 0
    np.testing.assert_array_equal(np.asarray(load(out).dataobj), labels_2023)
    assert infer("--ckpt", random_ckpt, "--flair", d23 / "X-t2f.nii.gz", "--t1ce", d18 / "X_t1ce.nii.gz",
                 "--out", out)[0] == 0
    np.testing.assert_array_equal(np.asarray(load(out).dataobj), labels_2018)


def test_spacing_resamples_and_returns_to_input_grid(case, random_ckpt, infer, tmp_path):
    out, summary = tmp_path / "seg.nii.gz", tmp_path / "s.json"
    rc, _, err = infer("--ckpt", random_ckpt, "--flair", case["flair"], "--out", out, "--summary", summary,
                       "--spacing", "2")
    assert rc == 0, err
    assert_same_grid(out, case["flair"])
    s = json.loads(summary.read_text())
    assert s["inference"]["work_shape"] == [16, 16, 16] and s["inference"]["work_spacing_mm"] == [2.0, 2.0, 2.0]


class _ZeroLogits(torch.nn.Module):
    """Three channels of zero logits for any input: the working grid is all these tests look at."""

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return image[:, :3] * 0.0


@pytest.mark.parametrize("stored_spacing", [1.0 - 6e-8, 1.0 + 6e-8])
def test_working_grid_does_not_depend_on_header_float_noise(stored_spacing):
    from app.inference.io import CaseInputs, Volume
    from app.inference.pipeline import Segmenter

    # 31 slices of 1 mm at 2 mm is 15.5 slices: a tie that float noise in the header used to break
    # either way, so one scan stored by two converters was segmented on two grids
    data = np.zeros((32, 32, 31), dtype=np.float32)
    data[4:28, 4:28, 3:28] = 1.0
    segmenter = Segmenter(_ZeroLogits(), divisor=8, spacing=2.0)
    shapes = []
    for spacing in (1.0, stored_spacing):
        volume = Volume("flair", "flair.nii.gz", data, np.diag([1.0, 1.0, spacing, 1.0]))
        shapes.append(segmenter.predict(CaseInputs({"flair": volume}, "flair")).details["work_shape"])
    assert shapes[0] == shapes[1] == [16, 16, 16]


def test_auto_spacing_uses_the_models_training_spacing(case, infer, tmp_path):
    net = DSUNet(features=FEATURES)
    runs = {}
    for name, spacing, args in (("auto_2mm", [2, 2, 2], []), ("native", [2, 2, 2], ["--spacing", "native"]),
                                ("explicit", [2, 2, 2], ["--spacing", "2"]), ("close", [1.05, 0.95, 1.0], []),
                                ("unknown", None, [])):
        net.set_training_spacing(spacing)
        ckpt = tmp_path / f"{name}.pt"
        torch.save(net.state_dict(), ckpt)
        out, summary = tmp_path / f"{name}.nii.gz", tmp_path / f"{name}.json"
        rc, stdout, err = infer("--ckpt", ckpt, "--flair", case["flair"], "--out", out, "--summary", summary, *args)
        assert rc == 0, err
        assert_same_grid(out, case["flair"])
        assert ("run at 2x2x2 mm, the model's training spacing" in stdout) == (name == "auto_2mm"), stdout
        runs[name] = (json.loads(summary.read_text())["inference"], np.asarray(load(out).dataobj))
    # the phantom is 1 mm: a 2 mm model gets it at 2 mm, as if --spacing 2 had been given
    assert runs["auto_2mm"][0]["spacing"] == "auto" and runs["auto_2mm"][0]["training_spacing_mm"] == [2.0] * 3
    assert runs["auto_2mm"][0]["work_spacing_mm"] == runs["explicit"][0]["work_spacing_mm"] == [2.0] * 3
    np.testing.assert_array_equal(runs["auto_2mm"][1], runs["explicit"][1])
    # native, within 10% of the training spacing, or a model that did not record it: no resampling
    for name in ("native", "close", "unknown"):
        assert runs[name][0]["work_spacing_mm"] == [1.0] * 3, name
    assert runs["unknown"][0]["training_spacing_mm"] is None
    rc, _, err = infer("--ckpt", tmp_path / "native.pt", "--flair", case["flair"], "--out", tmp_path / "x.nii.gz",
                       "--spacing", "fine")
    assert rc == 2 and "--spacing takes auto, native, or 1 or 3 positive numbers in mm (e.g. --spacing 1 1 1); got 'fine'" in err


def test_training_spacing_survives_export_and_older_checkpoints_load(tmp_path):
    from app.inference.model import export_torchscript, load_network

    net = DSUNet(features=FEATURES)
    net.set_training_spacing([2.0, 2.0, 3.0])
    export_torchscript(net, tmp_path / "m.ts")
    assert load_network(tmp_path / "m.ts")[1]["training_spacing"] == [2.0, 2.0, 3.0]
    older = {k: v for k, v in net.state_dict().items() if k != "training_spacing"}  # written before it existed
    torch.save(older, tmp_path / "old.pt")
    network, settings = load_network(tmp_path / "old.pt")
    assert settings["training_spacing"] is None
    fresh = DSUNet(features=FEATURES)
    fresh.load_state_dict(older)  # strict, through the network's own hook
    assert fresh.training_spacing.tolist() == [0.0, 0.0, 0.0]
    del older["trunk." + next(k for k in net.trunk.state_dict())]
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict(older)  # any other missing tensor is still an error


def test_exported_torchscript_gives_the_same_result(case, random_ckpt, infer, tmp_path, capsys):
    from app.inference.export import main as export_main

    ts = tmp_path / "model.ts"
    assert export_main(["--ckpt", random_ckpt, "--out", str(ts)]) == 0
    results = {}
    for name, ckpt in (("pt", random_ckpt), ("ts", ts)):
        out, prob = tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_prob.nii.gz"
        rc, _, err = infer("--ckpt", ckpt, "--flair", case["flair"], "--t1", case["t1"], "--t2", case["t2"],
                           "--out", out, "--probabilities", prob, "--patch-size", "16", "16", "16")
        assert rc == 0, err
        results[name] = (np.asarray(load(out).dataobj), np.asarray(load(prob).dataobj))
    np.testing.assert_array_equal(results["pt"][0], results["ts"][0])
    np.testing.assert_array_equal(results["pt"][1], results["ts"][1])
    # a TorchScript model ignores nothing silently: wrong --features is an error
    rc, _, err = infer("--ckpt", ts, "--flair", case["flair"], "--out", tmp_path / "x.nii.gz", "--features", "8", "16")
    assert rc == 2 and "features" in err and not (tmp_path / "x.nii.gz").exists()


def test_a_torchscript_model_under_another_name_than_ts_is_never_run(case, random_ckpt, infer, tmp_path, monkeypatch):
    """A checkpoint (``model.pt``) is data, loaded with ``weights_only=True``; a TorchScript model is a program.
    A TorchScript archive a collaborator sends as ``model.pt`` used to be run because of what it held: it is
    refused before it is loaded, and runs only once renamed to ``.ts``."""
    from app.inference.export import main as export_main

    ts = tmp_path / "model.ts"
    assert export_main(["--ckpt", random_ckpt, "--out", str(ts)]) == 0
    disguised = tmp_path / "model.pt"
    shutil.copy(ts, disguised)
    loaded = []
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loaded.append(a) or real_load(*a, **k))
    out = tmp_path / "seg.nii.gz"
    rc, _, err = infer("--ckpt", disguised, "--flair", case["flair"], "--out", out)
    assert rc == 2 and err.count("\n") == 1 and not out.exists() and loaded == []
    assert f"{disguised} is a TorchScript model" in err and "rename it to end in .ts" in err
    rc, _, err = infer("--ckpt", ts, "--flair", case["flair"], "--out", out, "--patch-size", "32", "32", "32")
    assert rc == 0 and out.exists() and len(loaded) == 1, err


@needs_simpleitk
def test_dicom_series_input(case, random_ckpt, infer, tmp_path):
    """A folder holding a DICOM series reads onto the same grid as the NIfTI it was made from."""
    import SimpleITK as sitk

    def write_series(nifti: str, folder: Path) -> None:
        folder.mkdir()
        img = sitk.Cast(sitk.ReadImage(nifti), sitk.sitkInt16)
        direction = img.GetDirection()
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        tags = {"0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": "1.2.826.0.1.3680043.2.1125.1.2",
                "0008|0060": "MR", "0020|0037": "\\".join(f"{v:.10f}" for v in (*direction[0::3], *direction[1::3]))}
        for k in range(img.GetDepth()):
            sl = img[:, :, k]
            for tag, value in tags.items():
                sl.SetMetaData(tag, value)
            sl.SetMetaData("0020|0032", "\\".join(f"{v:.10f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))))
            sl.SetMetaData("0020|0013", str(k + 1))
            writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
            writer.Execute(sl)

    write_series(case["t2"], tmp_path / "t2_dicom")
    ref_out, dcm_out = tmp_path / "nifti.nii.gz", tmp_path / "dicom.nii.gz"
    assert infer("--ckpt", random_ckpt, "--flair", case["flair"], "--t2", case["t2"], "--out", ref_out)[0] == 0
    rc, _, err = infer("--ckpt", random_ckpt, "--flair", case["flair"], "--t2", tmp_path / "t2_dicom", "--out", dcm_out)
    assert rc == 0, err
    np.testing.assert_array_equal(np.asarray(load(dcm_out).dataobj), np.asarray(load(ref_out).dataobj))

    # DICOM as the reference grid: the output carries the series geometry as scanner coordinates
    only = tmp_path / "only.nii.gz"
    rc, _, err = infer("--ckpt", random_ckpt, "--t2", tmp_path / "t2_dicom", "--out", only)
    assert rc == 0, err
    out = load(only)
    np.testing.assert_allclose(out.affine, load(case["t2"]).affine, atol=1e-5)
    assert out.shape == load(case["t2"]).shape
    assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 1


def test_resample_to_aligns_other_grids(case, random_ckpt, infer, tmp_path):
    """T2 stored on another grid: an error by default, resampled onto FLAIR with --resample-to flair."""
    t2 = load(case["t2"])
    # same anatomy on a larger grid: one zero slice before the first axis, the origin moved back one
    # voxel. (An axis-reversed copy is the same grid in another voxel order, reordered without
    # --resample-to, so it no longer exercises this path.) The voxel centres of FLAIR's grid are
    # voxel centres of this one, so resampling is exact.
    padded_t2 = tmp_path / "t2_padded.nii.gz"
    shift = np.eye(4)
    shift[0, 3] = -1
    padded = np.concatenate([np.zeros((1, *t2.shape[1:]), dtype=t2.get_data_dtype()), np.asarray(t2.dataobj)])
    nib.save(nib.Nifti1Image(padded, t2.affine @ shift), padded_t2)
    base, out = tmp_path / "base_prob.nii.gz", tmp_path / "seg.nii.gz"
    assert infer("--ckpt", random_ckpt, "--flair", case["flair"], "--t2", case["t2"], "--out", tmp_path / "b.nii.gz",
                 "--probabilities", base)[0] == 0
    rc, _, err = infer("--ckpt", random_ckpt, "--flair", case["flair"], "--t2", padded_t2, "--out", out)
    assert rc == 2 and "different grids" in err and "--resample-to" in err and "t2_padded.nii.gz" in err
    assert not out.exists()
    prob = tmp_path / "prob.nii.gz"
    rc, _, err = infer("--ckpt", random_ckpt, "--flair", case["flair"], "--t2", padded_t2, "--out", out,
                       "--resample-to", "flair", "--probabilities", prob, "--summary", tmp_path / "s.json")
    assert rc == 0, err
    assert_same_grid(out, case["flair"])
    np.testing.assert_allclose(np.asarray(load(prob).dataobj), np.asarray(load(base).dataobj), atol=1e-4)
    assert json.loads((tmp_path / "s.json").read_text())["resampled_to_reference"] == ["t2"]


def test_resample_to_says_when_the_fields_of_view_cover_different_parts_of_the_head(case, random_ckpt, infer, tmp_path):
    """A FLAIR slab beside a whole-head T1ce: on the slab's grid the label map and the volumes leave out the
    tumour beyond it, and on the T1ce's grid FLAIR reads 0 outside the slab. Both went unsaid."""
    flair = load(case["flair"])
    slab = tmp_path / "flair_slab.nii.gz"
    shift = np.eye(4)
    shift[2, 3] = 12  # slices 12 to 19 of 32: a quarter of the volume
    nib.save(nib.Nifti1Image(np.asarray(flair.dataobj)[:, :, 12:20], flair.affine @ shift), slab)
    notes = {}
    for reference in ("flair", "t1ce"):
        summary = tmp_path / f"{reference}.json"
        rc, stdout, err = infer("--ckpt", random_ckpt, "--flair", slab, "--t1ce", case["t1ce"], "--resample-to",
                                reference, "--out", tmp_path / f"{reference}.nii.gz", "--summary", summary)
        assert rc == 0, err
        s = json.loads(summary.read_text())
        notes[reference] = [n for n in s["notes"] if n.startswith("WARNING")]
        assert all(f"; {n}" in stdout for n in notes[reference])
        (seq, coverage), = s["resampling_coverage"].items()
        assert seq == ({"flair", "t1ce"} - {reference}).pop()
        outside, uncovered = coverage["head_outside_reference"], coverage["reference_head_outside"]
        if reference == "flair":  # the T1ce's head beyond the slab is in no output
            assert outside > 0.5 and uncovered == 0.0
            assert notes[reference] == [f"WARNING: {outside:.0%} of t1ce's head lies outside the flair grid, which the "
                                        "label map and the volumes do not cover"]
        else:  # the slab lies inside the T1ce's grid, and covers part of its head
            assert outside == 0.0 and uncovered > 0.5
            assert notes[reference] == [f"WARNING: flair covers {1 - uncovered:.0%} of the head on the t1ce grid and "
                                        "reads 0 elsewhere"]
    # grids that cover the same head say nothing: the T1ce on a grid one (empty) slice larger
    t1ce = load(case["t1ce"])
    larger = tmp_path / "t1ce_larger.nii.gz"
    shift = np.eye(4)
    shift[0, 3] = -1
    nib.save(nib.Nifti1Image(np.pad(np.asarray(t1ce.dataobj), ((1, 0), (0, 0), (0, 0))), t1ce.affine @ shift), larger)
    rc, stdout, err = infer("--ckpt", random_ckpt, "--flair", case["flair"], "--t1ce", larger, "--resample-to", "t1ce",
                            "--out", tmp_path / "whole.nii.gz", "--summary", tmp_path / "whole.json")
    assert rc == 0 and "WARNING" not in stdout, err
    coverage = json.loads((tmp_path / "whole.json").read_text())["resampling_coverage"]
    assert coverage == {"flair": {"reference_head_outside": 0.0, "head_outside_reference": 0.0}}


def test_window_choice():
    """Default: the whole crop as one window, unless larger than max_window_voxels; explicit sizes win."""
    from app.inference.pipeline import Segmenter

    crop = (127, 168, 147)  # foreground box of a BraTS 2018 case
    assert Segmenter(torch.nn.Identity(), divisor=16).roi_size(crop) == [128, 176, 160]
    assert Segmenter(torch.nn.Identity(), divisor=16, max_window_voxels=100**3).roi_size(crop) == [96, 96, 96]
    assert Segmenter(torch.nn.Identity(), divisor=16, patch_size=(0, 96, 0)).roi_size(crop) == [128, 96, 160]
    assert Segmenter(torch.nn.Identity(), divisor=16, patch_size=(96, 96, 96)).roi_size((20, 30, 40)) == [32, 32, 48]
    with pytest.raises(ValueError, match="multiples of 16"):
        Segmenter(torch.nn.Identity(), divisor=16, patch_size=(100, 96, 96))
    with pytest.raises(ValueError, match=r"--patch-size 0 96 0 \(python -m app infer\)"):
        Segmenter(torch.nn.Identity(), divisor=16, patch_size=(0, 100, 0))
    with pytest.raises(ValueError, match=r"--patch-size 96 96 16 "):
        Segmenter(torch.nn.Identity(), divisor=16, patch_size=(96, 96))


def test_spacing_setting_as_the_bundle_passes_it():
    """Bundle overrides arrive as scalars or strings: read them as numbers, or name the setting."""
    from app.inference.pipeline import Segmenter

    for given, expected in ((1.5, [1.5] * 3), ("2", [2.0] * 3), ("1 1 3", [1.0, 1.0, 3.0]), ("1,1,3", [1.0, 1.0, 3.0]),
                            ([2, 2, 4], [2.0, 2.0, 4.0]), ("Native", None), ("auto", None),
                            (torch.tensor([1.0, 1.0, 3.0]), [1.0, 1.0, 3.0]), ([torch.tensor(2.0)] * 3, [2.0] * 3),
                            (np.int64(2), [2.0] * 3), (np.array([1, 1, 3]), [1.0, 1.0, 3.0])):
        assert Segmenter(torch.nn.Identity(), divisor=16, spacing=given).spacing == expected, given
    for bad in ("fine", "1.5 2", 0, "-1", [1, 2]):
        with pytest.raises(ValueError, match=r'^spacing takes auto, native, or 1 or 3 positive numbers in mm \(e.g. --spacing "\[1, 1, 1\]" on the bundle'
                                             r" command line\)"):
            Segmenter(torch.nn.Identity(), divisor=16, spacing=bad)


def test_resampling_that_leaves_no_head_names_the_spacing_options(tmp_path, infer):
    net = DSUNet(features=FEATURES)
    net.set_training_spacing([8, 8, 8])
    torch.save(net.state_dict(), tmp_path / "m.pt")
    data = np.zeros((16, 16, 16), dtype=np.float32)
    data[8, 8, 8], data[8, 8, 9] = 100.0, 90.0  # two bright voxels: gone after trilinear resampling to 8 mm
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "flair.nii.gz"))
    rc, _, err = infer("--ckpt", tmp_path / "m.pt", "--flair", tmp_path / "flair.nii.gz", "--out", tmp_path / "o.nii.gz")
    assert rc == 2 and "flair.nii.gz" in err and "the model's training spacing, --spacing auto" in err, err
    assert "pass --spacing native, or a finer --spacing in mm" in err and not (tmp_path / "o.nii.gz").exists()


def test_a_training_spacing_that_would_not_fit_in_memory_is_refused_before_resampling(case, infer, tmp_path,
                                                                                      monkeypatch):
    """The training spacing comes from the checkpoint, a file from elsewhere: one recording 0.25 mm makes this
    1 mm scan 64 times larger (0.05 mm: 8000 times). The run resampled it and took memory until an allocation
    failed, then advised smaller windows; it is refused first, naming the spacing and the fix."""
    net = DSUNet(features=FEATURES)
    net.training_spacing.copy_(torch.tensor([0.25, 0.25, 0.25]))
    ckpt = tmp_path / "fine.pt"
    torch.save(net.state_dict(), ckpt)
    monkeypatch.setattr("app.inference.pipeline.available_memory", lambda: 50 * 2**20, raising=False)
    resampled = []
    real_interpolate = torch.nn.functional.interpolate
    monkeypatch.setattr(torch.nn.functional, "interpolate", lambda *a, **k: resampled.append(k.get("size")) or
                        real_interpolate(*a, **k))
    out = tmp_path / "seg.nii.gz"
    rc, _, err = infer("--ckpt", ckpt, "--flair", case["flair"], "--out", out)
    assert rc == 2 and err.count("\n") == 1 and not out.exists() and resampled == [], err
    assert err.startswith(f"error: {case['flair']}: resampling to [0.25, 0.25, 0.25] mm (the model's training spacing, "
                          "--spacing auto) would make this scan 128x128x128 voxels (about 0.1 GiB to segment)")
    assert "pass --spacing native" in err and err.rstrip().endswith("may be damaged).")
    # a spacing the user gave says nothing about the model: the message does not suspect it
    rc, _, err = infer("--ckpt", ckpt, "--flair", case["flair"], "--out", out, "--spacing", "0.25")
    assert rc == 2 and err.count("\n") == 1 and not out.exists() and resampled == [], err
    assert "(--spacing) would make this scan 128x128x128 voxels" in err and "damaged" not in err, err
    assert err.rstrip().endswith("pass --spacing native, or a coarser --spacing in mm."), err


def test_a_spacing_too_coarse_for_the_network_names_the_fix(case, random_ckpt, infer, tmp_path):
    """At 100 mm a head is a few voxels: the network cannot run on it, and the error says why."""
    rc, _, err = infer("--ckpt", random_ckpt, "--flair", case["flair"], "--out", tmp_path / "o.nii.gz",
                       "--spacing", "100")
    assert rc == 2 and "at [100.0, 100.0, 100.0] mm (--spacing) the head is only 1x1x1 voxels" in err, err
    assert "pass a finer --spacing in mm, or --spacing native" in err and not (tmp_path / "o.nii.gz").exists()


def test_bad_patch_size_error_gives_a_fix_that_runs(case, random_ckpt, infer, tmp_path):
    rc, _, err = infer("--ckpt", random_ckpt, "--flair", case["flair"], "--patch-size", "20", "0", "0",
                       "--out", tmp_path / "a.nii.gz")
    assert rc == 2 and "--patch-size 16 0 0 (python -m app infer)" in err, err
    rc, _, err = infer("--ckpt", random_ckpt, "--flair", case["flair"], "--patch-size", "16", "0", "0",
                       "--out", tmp_path / "a.nii.gz")
    assert rc == 0, err


def test_network_widths_are_read_from_legacy_format_checkpoints(tmp_path):
    from app.inference.model import checkpoint_features

    net = DSUNet(features=(4, 8, 16))
    for name, zipped in (("new.pt", True), ("legacy.pt", False)):
        torch.save(net.state_dict(), tmp_path / name, _use_new_zipfile_serialization=zipped)
        assert checkpoint_features(tmp_path / name) == [4, 8, 16], name


def test_case_dir_rerun_with_its_output_beside_the_msd_scan(case, random_ckpt, infer, tmp_path):
    # the label map written into imagesTs by the first run is not a second case on the rerun
    from tests.inference.test_bad_inputs import _msd_task

    msd = _msd_task(case, tmp_path / "Task01")
    out = msd / "imagesTs" / "BRATS_001_pred.nii.gz"
    for _ in range(2):
        rc, _, err = infer("--ckpt", random_ckpt, "--case-dir", msd, "--out", out, "--probabilities",
                           msd / "imagesTs" / "BRATS_001_prob.nii.gz")
        assert rc == 0, err
    assert sorted(p.name for p in (msd / "imagesTs").iterdir()) == [
        "BRATS_001.nii.gz", "BRATS_001_pred.nii.gz", "BRATS_001_prob.nii.gz"]


@pytest.mark.parametrize("name", ["Phantom_000_pred_seg.nii.gz", "Phantom_000_pred-seg.nii.gz"])
def test_case_dir_rerun_with_a_label_map_named_as_a_brats_label_beside_the_scans(case, random_ckpt, infer, tmp_path,
                                                                                  name):
    """A label map written beside BraTS scans under a name that ends as a BraTS label does
    (``<case>_pred_seg.nii.gz``) was read on the rerun as the label of a case 'Phantom_000_pred' without
    images, and the rerun stopped with 'has a label … but no image sequence'."""
    folder = Path(case["flair"]).parent
    out = folder / name
    for _ in range(2):
        rc, _, err = infer("--ckpt", random_ckpt, "--case-dir", folder, "--out", out)
        assert rc == 0, err
    # training and batch discovery of the folder see the one case, too
    from app.data import discover_cases

    assert [rec["case"] for rec in discover_cases(folder.parent)] == ["Phantom_000"]


def test_an_output_edited_by_hand_is_never_replaced(case, random_ckpt, infer, tmp_path):
    # a viewer that saves a corrected label map keeps its header, description included
    out, prob = tmp_path / "seg.nii.gz", tmp_path / "prob.nii.gz"
    args = ("--ckpt", random_ckpt, "--flair", case["flair"], "--out", out, "--probabilities", prob)
    assert infer(*args)[0] == 0
    assert infer(*args)[0] == 0  # its own unedited outputs are replaced
    img = load(out)
    edited = np.zeros(img.shape, dtype=np.uint8)
    edited[10:14, 10:14, 10:14] = 2
    nib.save(nib.Nifti1Image(edited, img.affine, header=img.header), out)
    assert bytes(load(out).header["descrip"]).startswith(b"brats_gmd labels")
    rc, _, err = infer(*args)
    assert rc == 2 and "--out" in err and "not written by this product" in err
    np.testing.assert_array_equal(np.asarray(load(out).dataobj), edited)


def test_case_dir_of_an_msd_task_writes_the_label_values_of_its_dataset_json(case, random_ckpt, infer, tmp_path):
    """MSD Task01 numbers its labels 1 oedema, 2 non-enhancing, 3 enhancing: --labels auto writes those, so
    the output reads as the dataset's own labels; BraTS 2018 values (1 necrosis, 2 oedema, 4) would swap
    necrosis and oedema for such a user."""
    from tests.inference.test_bad_inputs import _msd_task

    msd = _msd_task(case, tmp_path / "Task01")
    brats = tmp_path / "brats.nii.gz"
    assert infer("--ckpt", random_ckpt, *[f"--{s}={case[s]}" for s in ("flair", "t1", "t1ce", "t2")],
                 "--out", brats)[0] == 0
    labels_2018 = np.asarray(load(brats).dataobj)
    assert {1, 2, 4} <= set(np.unique(labels_2018).tolist())
    out, summary = tmp_path / "msd.nii.gz", tmp_path / "msd.json"
    rc, stdout, err = infer("--ckpt", random_ckpt, "--case-dir", msd, "--out", out, "--summary", summary)
    assert rc == 0, err
    expected = np.select([labels_2018 == 1, labels_2018 == 2, labels_2018 == 4], [2, 1, 3], 0)
    np.testing.assert_array_equal(np.asarray(load(out).dataobj), expected)
    s = json.loads(summary.read_text())
    assert s["label_convention"] == "dataset.json" and s["labels"] == {"ncr": 2, "ed": 1, "et": 3}
    assert "labels of dataset.json: necrosis 2, oedema 1, enhancing 3" in stdout
    # the volumes are of the regions, whatever values they are written with
    brats_summary = tmp_path / "brats.json"
    infer("--ckpt", random_ckpt, *[f"--{s}={case[s]}" for s in ("flair", "t1", "t1ce", "t2")],
          "--out", brats, "--summary", brats_summary)
    assert s["volumes_ml"] == json.loads(brats_summary.read_text())["volumes_ml"]
    # an explicit --labels sets the values
    assert infer("--ckpt", random_ckpt, "--case-dir", msd, "--out", out, "--labels", "2018")[0] == 0
    np.testing.assert_array_equal(np.asarray(load(out).dataobj), labels_2018)


@pytest.mark.parametrize("value", ["300", "-3"])
def test_dataset_json_label_values_beyond_a_label_map_are_refused_before_the_network_runs(case, random_ckpt, infer,
                                                                                          tmp_path, monkeypatch, value):
    """A dataset.json (from elsewhere) numbering a tumour part 300: the case was segmented, and only writing the
    uint8 map stopped with 'Label values [2, 1, 300] do not fit uint8.', naming neither the file nor the fix. A
    negative value does not fit either (it would wrap to another label)."""
    from app.inference.pipeline import Segmenter
    from tests.inference.test_bad_inputs import _msd_task

    msd = _msd_task(case, tmp_path / "Task01")
    (msd / "dataset.json").write_text((msd / "dataset.json").read_text().replace('"3": "enhancing', f'"{value}": "enhancing'))
    ran = []
    monkeypatch.setattr(Segmenter, "predict", lambda *a, **k: ran.append(1))
    out = tmp_path / "seg.nii.gz"
    rc, _, err = infer("--ckpt", random_ckpt, "--case-dir", msd, "--out", out)
    assert rc == 2 and err.count("\n") == 1 and not out.exists() and ran == []
    assert err.startswith(f"error: {msd / 'dataset.json'} gives the tumour parts the label values ") and value in err
    assert "pass --labels 2018" in err


def test_input_intensity_scaling_is_not_applied_to_the_labels(case, random_ckpt, infer, tmp_path):
    """A scan stored as int16 with scl_slope/scl_inter (how many converters store float intensities):
    the label map copies its header, but must not carry the scaling, or a viewer reads label 1 as 0.37."""
    img = load(case["flair"])
    scaled = nib.Nifti1Image(np.asarray(img.dataobj).astype(np.int16), img.affine)
    scaled.header["scl_slope"], scaled.header["scl_inter"] = 0.37, 0.0  # background stays 0
    flair = tmp_path / "flair_scaled.nii.gz"
    nib.save(scaled, str(flair))
    assert float(load(flair).dataobj.slope) == pytest.approx(0.37)  # the case this test is about
    base, out = tmp_path / "base.nii.gz", tmp_path / "scaled.nii.gz"
    for src, dst in ((case["flair"], base), (flair, out)):
        rc, _, err = infer("--ckpt", random_ckpt, "--flair", src, "--out", dst, "--patch-size", "32", "32", "32")
        assert rc == 0, err
    seg = load(out)
    labels = seg.get_fdata()
    assert set(np.unique(labels)) == {0.0, 1.0, 2.0, 4.0}  # each label value, unscaled
    np.testing.assert_array_equal(labels, load(base).get_fdata())  # z-scoring ignores the scaling


@pytest.mark.parametrize("image_class", [nib.Nifti1Image, nib.Nifti2Image])
def test_outputs_carry_no_identifying_field_of_the_scan_header(case, random_ckpt, infer, tmp_path, image_class):
    """A scan converted from DICOM may carry the patient's identity in its header's free-text fields and in
    an extension (dcmstack keeps the whole DICOM header there). The label and probability maps copy the
    scan's geometry, and used to copy these too."""
    img = load(case["flair"])
    scan = image_class(np.asarray(img.dataobj), img.affine)
    identity = {"aux_file": b"MRN-12345678", "intent_name": b"DOE^JOHN", "descrip": b"DOE^JOHN 19700101"}
    if "db_name" in scan.header:  # NIfTI-1 only
        identity["db_name"] = b"ACC-987654"
    for key, value in identity.items():
        scan.header[key] = value
    scan.header.extensions.append(nib.nifti1.Nifti1Extension(0, b'{"PatientName": "DOE^JOHN", "PatientID": "MRN-12345678"}'))
    # a statistic's intent and its parameters: meaningless for a label map, and not the scan's to pass on
    scan.header["intent_code"], scan.header["intent_p1"], scan.header["intent_p3"] = 3, 12345678.0, 19700101.0
    flair = tmp_path / "flair_from_dicom.nii.gz"
    nib.save(scan, str(flair))
    assert load(flair).header.extensions  # the case this test is about
    out, prob = tmp_path / "seg.nii.gz", tmp_path / "prob.nii.gz"
    rc, _, err = infer("--ckpt", random_ckpt, "--flair", flair, "--out", out, "--probabilities", prob,
                       "--patch-size", "32", "32", "32")
    assert rc == 0, err
    for path in (out, prob):
        raw = nib.load(str(path))
        assert isinstance(raw, image_class) and not raw.header.extensions
        assert all(bytes(raw.header[key]).strip(b"\0") == b"" for key in identity if key != "descrip")
        assert bytes(raw.header["descrip"]).startswith(b"brats_gmd ")
        assert int(raw.header["intent_code"]) == 0
        assert [float(raw.header[f"intent_p{i}"]) for i in (1, 2, 3)] == [0.0, 0.0, 0.0]
        content = gzip.decompress(path.read_bytes())  # nowhere in the file, whatever field or extension it hid in
        assert b"DOE^JOHN" not in content and b"MRN-12345678" not in content and b"ACC-987654" not in content
    assert_same_grid(out, flair)


def test_negative_voxels_do_not_widen_the_foreground_crop(case, random_ckpt, infer, tmp_path):
    """Training crops to voxels > 0 (CropForegroundd); a negative slab beyond the head (a z-scored
    export's background) must not move inference's crop, or the windows see other context."""
    img = load(case["flair"])
    data = np.asarray(img.dataobj, dtype=np.float32)
    assert not data[0].any()  # the phantom's first slice is background
    data[0] = -5.0
    flair = tmp_path / "flair_negative_slab.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), str(flair))
    boxes = []
    for name, src in (("base", case["flair"]), ("slab", flair)):
        rc, _, err = infer("--ckpt", random_ckpt, "--flair", src, "--out", tmp_path / f"{name}.nii.gz",
                           "--summary", tmp_path / f"{name}.json", "--patch-size", "32", "32", "32")
        assert rc == 0, err
        boxes.append(json.loads((tmp_path / f"{name}.json").read_text())["inference"]["crop_box"])
    assert boxes[1] == boxes[0] and boxes[0] != [[0, 32], [0, 32], [0, 32]]


def test_an_empty_checkpoint_path_says_so(case, infer, tmp_path):
    """--ckpt "$MODEL" with MODEL unset used to print 'Checkpoint  not found', naming no file."""
    out = tmp_path / "out"
    out.mkdir()
    rc, _, err = infer("--ckpt", "", "--flair", case["flair"], "--out", out / "seg.nii.gz")
    assert rc == 2 and err.count("\n") == 1 and "checkpoint path is empty" in err, err
    assert not list(out.iterdir())


def test_a_checkpoint_folder_or_pipe_is_named_as_such_not_as_missing(case, infer, tmp_path):
    """``--ckpt O/models`` (the folder) or a named pipe under the model's name: 'Checkpoint F not found' named a
    path that exists; the line now says what is there."""
    import os

    out = tmp_path / "out"
    out.mkdir()
    models = tmp_path / "models"
    models.mkdir()
    rc, _, err = infer("--ckpt", models, "--flair", case["flair"], "--out", out / "seg.nii.gz")
    assert rc == 2 and err.count("\n") == 1 and f"Checkpoint {models} is a folder, not a model file: give" in err, err
    os.mkfifo(models / "model.pt")
    rc, _, err = infer("--ckpt", models / "model.pt", "--flair", case["flair"], "--out", out / "seg.nii.gz")
    assert rc == 2 and err.count("\n") == 1 and "is a named pipe, not a model file" in err, err
    assert not list(out.iterdir())


def test_a_scan_with_a_mixed_case_extension_is_read(case, random_ckpt, infer, tmp_path):
    """``--flair scan.Nii.gz`` was refused as 'does not exist: check the path': nibabel looked for scan.nii.gz."""
    flair = Path(case["flair"])
    mixed = flair.with_name(flair.name.replace(".nii.gz", ".Nii.Gz"))
    flair.rename(mixed)
    rc, _, err = infer("--ckpt", random_ckpt, "--flair", mixed, "--out", tmp_path / "seg.nii.gz")
    assert rc == 0, err
    assert load(tmp_path / "seg.nii.gz").shape == load(case["t1"]).shape


def test_an_installed_package_without_the_bundle_uses_the_shipped_train_yaml_values(monkeypatch, tmp_path):
    """A package installed with pip install --no-deps . (or from a wheel) holds no bundles/: inference and export
    without --bundle then take the values built into the package, which must be those of the shipped train.yaml,
    or an installed copy would segment with other windows than the checkout."""
    import app.inference.model as model

    shipped = model.bundle_defaults(REPO / "bundles" / "brats_gmd")
    monkeypatch.setattr(model, "DEFAULT_BUNDLE", tmp_path / "site-packages" / "bundles" / "brats_gmd")
    assert model.bundle_defaults(None) == shipped == model.DEFAULT_SETTINGS


def test_a_scan_that_does_not_look_skull_stripped_is_said(case, random_ckpt, infer, tmp_path):
    """A raw scan (noise or tissue around the brain) is out of the model's domain: its whole background
    enters the normalisation and the head mask. The label map is still written, with a warning."""
    import json

    rc, stdout, err = infer("--ckpt", random_ckpt, "--flair", case["flair"], "--t2", case["t2"],
                            "--out", tmp_path / "clean.nii.gz", "--summary", tmp_path / "clean.json",
                            "--patch-size", "32", "32", "32")
    assert rc == 0, err
    assert "skull-stripped" not in stdout
    clean = json.loads((tmp_path / "clean.json").read_text())["inference"]["border_nonzero_fraction"]
    assert set(clean) == {"flair", "t2"} and max(clean.values()) <= 0.5
    img = load(case["t2"])
    data = np.asarray(img.dataobj, dtype=np.float32)
    noisy = data + np.random.default_rng(0).uniform(1.0, 20.0, data.shape).astype(np.float32)  # scanner noise
    t2 = tmp_path / "t2_raw.nii.gz"
    nib.save(nib.Nifti1Image(noisy, img.affine), str(t2))
    rc, stdout, err = infer("--ckpt", random_ckpt, "--flair", case["flair"], "--t2", t2,
                            "--out", tmp_path / "raw.nii.gz", "--summary", tmp_path / "raw.json",
                            "--patch-size", "32", "32", "32")
    assert rc == 0, err
    assert "WARNING: t2 not 0 on most of the volume's border: the scan does not look skull-stripped" in stdout
    raw = json.loads((tmp_path / "raw.json").read_text())["inference"]["border_nonzero_fraction"]
    assert raw["t2"] == 1.0 and raw["flair"] == clean["flair"]
    assert (tmp_path / "raw.nii.gz").is_file()


def test_a_result_from_fewer_sequences_says_so_in_every_output(case, random_ckpt, infer, tmp_path):
    """A label map from FLAIR alone reads like one from all four sequences (same values, volumes in mL): the
    printed line, the summary and the label map's own header name the sequences used and missing, and the
    summary records the releases that made it."""
    from app import __version__

    out, prob, summary = tmp_path / "seg.nii.gz", tmp_path / "prob.nii.gz", tmp_path / "s.json"
    rc, stdout, err = infer("--ckpt", random_ckpt, "--flair", case["flair"], "--out", out, "--probabilities", prob,
                            "--summary", summary, "--patch-size", "32", "32", "32")
    assert rc == 0, err
    s = json.loads(summary.read_text())
    missing = "t1, t1ce, t2 not given"
    contrast = "without t1ce: enhancing tumour (ET) and tumour core (TC) estimated without a contrast scan"
    assert s["notes"][:2] == [missing, contrast]
    assert f"; {missing}; {contrast}" in stdout
    assert bytes(load(out).header["descrip"]).startswith(b"brats_gmd labels brats2018 flair crc32=")
    assert bytes(load(prob).header["descrip"]).startswith(b"brats_gmd WT,TC,ET probabilities flair crc32=")
    metadata = json.loads((REPO / "bundles" / "brats_gmd" / "configs" / "metadata.json").read_text())
    assert s["network"]["bundle_version"] == metadata["version"] and s["host"]["brats_gmd"] == __version__
    # with T1ce the contrast note goes; the summary lists what is missing, and no note does when nothing is
    rc, stdout, err = infer("--ckpt", random_ckpt, *[f"--{q}={case[q]}" for q in case], "--out", out,
                            "--summary", summary, "--patch-size", "32", "32", "32")
    assert rc == 0, err
    s = json.loads(summary.read_text())
    assert not any("not given" in n or "t1ce" in n for n in s["notes"]) and "not given" not in stdout
    assert bytes(load(out).header["descrip"]).startswith(b"brats_gmd labels brats2018 flair+t1+t1ce+t2 crc32=")


def test_border_nonzero_fraction_by_hand():
    from app.inference.pipeline import border_nonzero_fraction

    volume = torch.zeros(4, 5, 6)
    assert border_nonzero_fraction(volume) == 0.0
    volume[0] = 1.0  # one face of 5 x 6 = 30 voxels; the border holds 4*5*6 - 2*3*4 = 96 voxels
    # the faces overlap at edges; count over the six face slices as taken: 2*30 + 2*24 + 2*20 = 148 entries, of
    # which face x=0 (30), and the x=0 rows of the four other faces (6 + 6 + 5 + 5) are 1
    assert border_nonzero_fraction(volume) == round(52 / 148, 4)
    assert border_nonzero_fraction(torch.ones(3, 3, 3)) == 1.0


def test_the_summary_records_the_autocast_dtype(case, random_ckpt, infer, tmp_path, monkeypatch):
    """amp_dtype says what --amp ran in: null on CPU, float16 on a GPU without native bf16, where amp_bf16 is false
    (it read true on a V100, which ran fp16)."""
    import app.inference.pipeline as pipeline

    def summary(name: str) -> dict:
        rc, _, err = infer("--ckpt", random_ckpt, "--flair", case["flair"], "--out", tmp_path / f"{name}.nii.gz",
                           "--summary", tmp_path / f"{name}.json")
        assert rc == 0, err
        return json.loads((tmp_path / f"{name}.json").read_text())["inference"]

    cpu = summary("cpu")
    assert (cpu["amp_dtype"], cpu["amp_bf16"]) == (None, False)
    # as amp_dtype answers for a V100 (the CPU run ignores the autocast)
    from contextlib import nullcontext

    autocasts = []
    monkeypatch.setattr(torch, "autocast", lambda device_type, dtype: autocasts.append((device_type, dtype))
                        or nullcontext())
    monkeypatch.setattr(pipeline, "amp_dtype", lambda device, enabled, training=False: torch.float16)
    v100 = summary("v100")
    assert (v100["amp_dtype"], v100["amp_bf16"]) == ("float16", False)
    assert autocasts and set(autocasts) == {("cuda", torch.float16)}  # the network ran under that autocast
    monkeypatch.setattr(pipeline, "amp_dtype", lambda device, enabled, training=False: torch.bfloat16)
    a100 = summary("a100")
    assert (a100["amp_dtype"], a100["amp_bf16"]) == ("bfloat16", True)


@pytest.mark.parametrize("command, argv, hint", [
    ("app.inference.cli", ["--ckpt", "m.pt", "--out", "o", "--flair-file", "f.nii.gz"], "sequences are given with --flair"),
    ("app.inference.cli", ["--out", "o"], None),
    ("app.inference.export", ["--ckpt"], None),
    ("app.inference.batch", ["--bogus", "x"], None),
])
def test_a_usage_error_of_an_inference_command_is_one_line_with_the_fix(command, argv, hint, capsys):
    import importlib

    assert importlib.import_module(command).main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    assert captured.err.endswith("run with --help for usage.\n")
    assert (hint in captured.err) if hint else "sequences are given" not in captured.err

"""Batch inference through the bundle (configs/inference.yaml), the Docker entrypoint module, and
TorchScript export through ``monai.bundle ckpt_export``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from app.inference.batch import main as batch_main
from tests.inference.conftest import REPO, assert_same_grid, load
from tests import warm
from tests.bundles.helpers import repo_env

BUNDLE = REPO / "bundles" / "brats_gmd"


def _bundle(*args: str) -> subprocess.CompletedProcess:
    return warm.run([sys.executable, "-m", "monai.bundle", *args], cwd=REPO, timeout=600,
                    env=repo_env(OMP_NUM_THREADS="1"))


def _mixed_cases(phantom_root: Path, root: Path) -> dict[str, list[str]]:
    """Four cases in three layouts with different sequence subsets; returns {case: expected sequences}."""
    shutil.copytree(phantom_root / "Phantom_000", root / "Phantom_000")  # all four + seg (ignored)
    (root / "Phantom_001").mkdir(parents=True)
    for seq in ("flair", "t2"):
        shutil.copy(phantom_root / "Phantom_001" / f"Phantom_001_{seq}.nii.gz", root / "Phantom_001")
    (root / "new" / "Y").mkdir(parents=True)  # BraTS 2023 names, T1ce only
    shutil.copy(phantom_root / "Phantom_002" / "Phantom_002_t1ce.nii.gz", root / "new" / "Y" / "Y-t1c.nii.gz")
    msd = root / "Task01"  # MSD: one 4D file per case, channels described by dataset.json
    (msd / "imagesTs").mkdir(parents=True)
    ref = load(phantom_root / "Phantom_002" / "Phantom_002_flair.nii.gz")
    data = np.stack([np.asarray(load(phantom_root / "Phantom_002" / f"Phantom_002_{s}.nii.gz").dataobj)
                     for s in ("flair", "t1", "t1ce", "t2")], axis=-1)
    nib.save(nib.Nifti1Image(data, ref.affine), msd / "imagesTs" / "BRATS_900.nii.gz")
    (msd / "dataset.json").write_text(json.dumps({
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
    }))
    return {"Phantom_000": ["flair", "t1", "t1ce", "t2"], "Phantom_001": ["flair", "t2"], "Y": ["t1ce"],
            "BRATS_900": ["flair", "t1", "t1ce", "t2"]}


def test_bundle_batch_runs_every_case_with_its_sequences(phantom_root, random_ckpt, infer, tmp_path):
    expected = _mixed_cases(phantom_root, tmp_path / "in")
    out = tmp_path / "out"
    proc = _bundle("run", "--config_file", str(BUNDLE / "configs" / "inference.yaml"), "--bundle_root", str(BUNDLE),
                   "--ckpt_path", random_ckpt, "--input_dir", str(tmp_path / "in"), "--output_dir", str(out),
                   "--labels", "2023", "--device", "cpu", "--probabilities", "true")  # fire passes "true" as a string
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "inference_summary.json").read_text())
    assert report["cases"] == 4 and report["failed"] == 0
    for case, seqs in expected.items():
        summary = json.loads((out / f"{case}.json").read_text())
        assert summary["sequences_used"] == seqs, case
        labels = np.asarray(load(out / f"{case}.nii.gz").dataobj)
        assert set(np.unique(labels)) <= {0, 1, 2, 3}
        assert load(out / f"{case}_prob.nii.gz").shape == (*labels.shape, 3)
    assert_same_grid(out / "Phantom_001.nii.gz", phantom_root / "Phantom_001" / "Phantom_001_flair.nii.gz")
    assert_same_grid(out / "Y.nii.gz", tmp_path / "in" / "new" / "Y" / "Y-t1c.nii.gz")
    msd_out = load(out / "BRATS_900.nii.gz")
    assert msd_out.shape == (32, 32, 32)
    msd_in = load(tmp_path / "in" / "Task01" / "imagesTs" / "BRATS_900.nii.gz")
    np.testing.assert_array_equal(msd_out.affine, msd_in.affine)
    # each case segmented as infer segments its files alone: the 4D MSD case (channels from dataset.json)
    # as the four files it was built from, and the FLAIR+T2 case with those two sequences
    for case, name, seqs in (("BRATS_900", "Phantom_002", ("flair", "t1", "t1ce", "t2")),
                             ("Phantom_001", "Phantom_001", ("flair", "t2"))):
        files = [a for seq in seqs for a in (f"--{seq}", phantom_root / name / f"{name}_{seq}.nii.gz")]
        rc, _, err = infer("--ckpt", random_ckpt, *files, "--labels", "2023", "--device", "cpu",
                           "--out", tmp_path / f"{case}_infer.nii.gz", "--probabilities", tmp_path / f"{case}_p.nii.gz")
        assert rc == 0, err
        np.testing.assert_array_equal(np.asarray(load(out / f"{case}.nii.gz").dataobj),
                                      np.asarray(load(tmp_path / f"{case}_infer.nii.gz").dataobj))
        np.testing.assert_allclose(np.asarray(load(out / f"{case}_prob.nii.gz").dataobj),
                                   np.asarray(load(tmp_path / f"{case}_p.nii.gz").dataobj), atol=1e-6)


def test_entrypoint_reports_a_bad_case_and_segments_the_others(phantom_root, random_ckpt, tmp_path, capsys):
    root = tmp_path / "in"
    shutil.copytree(phantom_root / "Phantom_000", root / "Good")
    for f in (root / "Good").iterdir():
        f.rename(f.with_name(f.name.replace("Phantom_000", "Good")))
    (root / "Bad").mkdir()
    (root / "Bad" / "Bad_flair.nii.gz").write_bytes(b"broken")
    out = tmp_path / "out"
    rc = batch_main(["--input-dir", str(root), "--output-dir", str(out), "--ckpt", random_ckpt, "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "case Bad:" in err and "Bad_flair.nii.gz" in err
    assert (out / "Good.nii.gz").is_file() and (out / "Good.json").is_file()
    assert not (out / "Bad.nii.gz").exists() and not (out / "Bad.json").exists()
    report = json.loads((out / "inference_summary.json").read_text())
    assert {r["case"]: r["status"] for r in report["results"]} == {"Bad": "error", "Good": "ok"}
    assert sorted(p.name for p in out.iterdir()) == ["Good.json", "Good.nii.gz", "inference_summary.json"]


def test_monai_ckpt_export_serves_infer_with_the_same_result(case, random_ckpt, infer, tmp_path):
    ts = tmp_path / "model.ts"
    proc = _bundle("ckpt_export", "--net_id", "export_network", "--config_file",
                   str(BUNDLE / "configs" / "inference.yaml"), "--bundle_root", str(BUNDLE), "--ckpt_file", random_ckpt,
                   "--ckpt_path", random_ckpt, "--filepath", str(ts))
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = {}
    for name, ckpt in (("pt", random_ckpt), ("ts", ts)):
        prob = tmp_path / f"{name}.nii.gz"
        rc, _, err = infer("--ckpt", ckpt, "--t1", case["t1"], "--t1ce", case["t1ce"],
                           "--out", tmp_path / f"{name}_l.nii.gz", "--probabilities", prob)
        assert rc == 0, err
        outs[name] = np.asarray(load(prob).dataobj)
    np.testing.assert_array_equal(outs["pt"], outs["ts"])


def test_monai_ckpt_export_with_its_ckpt_file_alone_exports_that_checkpoint(random_ckpt, tmp_path):
    # MONAI's ckpt_export does not pass --ckpt_file to the config: the export network read its widths from
    # ckpt_path (<bundle_root>/models/model.pt), so the documented MONAI command stopped with a traceback
    ts = tmp_path / "model.ts"
    proc = _bundle("ckpt_export", "--net_id", "export_network", "--config_file",
                   str(BUNDLE / "configs" / "inference.yaml"), "--bundle_root", str(BUNDLE), "--ckpt_file", random_ckpt,
                   "--filepath", str(ts))
    assert proc.returncode == 0, proc.stderr[-3000:]
    import torch

    model = torch.jit.load(str(ts))
    state = torch.load(random_ckpt, weights_only=True)
    assert list(model.features) == [8, 16, 32, 64]
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_monai_verify_net_in_out_runs_on_the_network_that_ckpt_export_exports(random_ckpt):
    # the model zoo checks one (net_id, config) pair with both verify_net_in_out and ckpt_export: train.yaml's
    # network_def cannot be scripted, and the export network required a modality mask that verify_net_in_out,
    # which passes the metadata's image alone, does not give
    proc = _bundle("verify_net_in_out", "export_network", "--meta_file", str(BUNDLE / "configs" / "metadata.json"),
                   "--config_file", str(BUNDLE / "configs" / "inference.yaml"), "--bundle_root", str(BUNDLE),
                   "--ckpt_path", random_ckpt, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data shape of network is verified with no error" in proc.stderr + proc.stdout


def test_bundle_batch_exits_2_with_one_line_per_bad_case(phantom_root, random_ckpt, tmp_path):
    root = tmp_path / "in"
    shutil.copytree(phantom_root / "Phantom_000", root / "Phantom_000")
    (root / "Bad").mkdir()
    (root / "Bad" / "Bad_flair.nii.gz").write_bytes(b"broken")
    args = ["run", "--config_file", str(BUNDLE / "configs" / "inference.yaml"), "--bundle_root", str(BUNDLE),
            "--ckpt_path", random_ckpt, "--device", "cpu", "--output_dir", str(tmp_path / "out")]
    proc = _bundle(*args, "--input_dir", str(root))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "case Bad:" in proc.stderr and "Bad_flair.nii.gz" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "out" / "Phantom_000.nii.gz").is_file()  # the other cases are segmented
    # a bad setting stops the batch before any case, and the earlier run's outputs stay
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    proc = _bundle(*args, "--input_dir", str(root), "--labels", "2022")  # fire passes it as the number 2022
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "--labels '2022' is not a label convention" in errors[0], proc.stderr[-3000:]
    assert "case " not in proc.stderr and "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    # a misspelt setting would keep the default (2018 label values): refused before the checkpoint is read
    proc = _bundle(*args, "--input_dir", str(root), "--label", "2023")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "did you mean --labels?" in errors[0], proc.stderr[-3000:]
    assert "case " not in proc.stderr and "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    proc = _bundle(*args, "--input_dir", str(tmp_path / "missing"))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "missing" in errors[0] and "Traceback" not in proc.stderr
    # a corrupt checkpoint: one line naming it, before any case is read or written
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    args[args.index("--ckpt_path") + 1] = str(bad)
    args[args.index("--output_dir") + 1] = str(tmp_path / "out_bad")
    proc = _bundle(*args, "--input_dir", str(root))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and str(bad) in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out_bad").exists()

"""Batch inference (``app.inference.batch``): a problem of one case, found while discovering or while
reading it, fails that case only; a rerun leaves only its own results in the output folder."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import app.inference.batch as batch_module
from app.inference.batch import BatchError, run_batch
from app.inference.batch import main as batch_main
from app.inference.pipeline import load_segmenter
from tests.inference.conftest import load


@pytest.fixture(scope="module")
def segmenter(random_ckpt):
    return load_segmenter(random_ckpt, device="cpu")


def _copy_case(phantom_root: Path, dst: Path, name: str, seqs=("flair", "t1", "t1ce", "t2")) -> Path:
    """Phantom case 0 under another name, with the given sequences only."""
    (dst / name).mkdir(parents=True)
    for seq in seqs:
        shutil.copy(phantom_root / "Phantom_000" / f"Phantom_000_{seq}.nii.gz", dst / name / f"{name}_{seq}.nii.gz")
    return dst / name


def _report(out: Path) -> dict[str, dict]:
    report = json.loads((out / "inference_summary.json").read_text())
    return {r["case"]: r for r in report["results"]}


def test_discovery_problem_of_one_case_fails_that_case_only(phantom_root, random_ckpt, tmp_path, capsys):
    root = tmp_path / "in"
    _copy_case(phantom_root, root, "Good", seqs=("flair", "t2"))
    dup = _copy_case(phantom_root, root, "Dup", seqs=("flair",))
    shutil.copy(dup / "Dup_flair.nii.gz", dup / "Dup_flair.nii")  # two files of one sequence
    (root / "Orphan").mkdir()
    shutil.copy(phantom_root / "Phantom_000" / "Phantom_000_seg.nii.gz", root / "Orphan" / "Orphan_seg.nii.gz")
    nnunet = root / "Dataset001"  # nnU-Net v2: one good case, one with a channel dataset.json does not list
    (nnunet / "imagesTs").mkdir(parents=True)
    (nnunet / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "FLAIR", "1": "T2"},
        "labels": {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3},
    }))
    for case in ("nn_ok", "nn_extra"):
        for idx, seq in enumerate(("flair", "t2")):
            shutil.copy(phantom_root / "Phantom_001" / f"Phantom_001_{seq}.nii.gz",
                        nnunet / "imagesTs" / f"{case}_{idx:04d}.nii.gz")
    shutil.copy(nnunet / "imagesTs" / "nn_extra_0001.nii.gz", nnunet / "imagesTs" / "nn_extra_0002.nii.gz")
    out = tmp_path / "out"

    rc = batch_main(["--input-dir", str(root), "--output-dir", str(out), "--ckpt", random_ckpt, "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    report = _report(out)
    assert {c: r["status"] for c, r in report.items()} == {
        "Dup": "error", "Good": "ok", "Orphan": "error", "nn_extra": "error", "nn_ok": "ok"}
    assert "two 'flair' files" in report["Dup"]["error"] and "case Dup: Case 'Dup' has two 'flair' files" in err
    assert "no image sequence" in report["Orphan"]["error"] and "case Orphan:" in err
    assert "channel 0002 is not listed" in report["nn_extra"]["error"] and "case nn_extra:" in err
    assert sorted(p.name for p in out.iterdir()) == [
        "Good.json", "Good.nii.gz", "inference_summary.json", "nn_ok.json", "nn_ok.nii.gz"]


def test_problems_of_the_whole_input_still_stop_the_batch(phantom_root, segmenter, tmp_path):
    root = tmp_path / "in"
    _copy_case(phantom_root, root, "Good", seqs=("flair",))
    (root / "Task01").mkdir()
    (root / "Task01" / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"Task01/dataset\.json"):
        run_batch(segmenter, root, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No cases found"):
        run_batch(segmenter, tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_bad_setting_stops_the_batch_before_any_case(phantom_root, random_ckpt, tmp_path, monkeypatch, capsys):
    """BRATS_LABELS=2022 (how the Docker image sets --labels; argparse does not check a default) ends
    the batch at start-up with one line: checked per case, every case failed and its clean-up removed
    the earlier run's outputs."""
    root = tmp_path / "in"
    _copy_case(phantom_root, root, "P1", seqs=("flair",))
    out = tmp_path / "out"
    argv = ["--input-dir", str(root), "--output-dir", str(out), "--ckpt", random_ckpt, "--device", "cpu"]
    assert batch_main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    for setting, value in (("BRATS_LABELS", "2022"), ("BRATS_LABELS", "brats2019")):
        monkeypatch.setenv(setting, value)
        assert batch_main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"BRATS_LABELS '{value}' is not a label convention" in lines[0] and "case" not in lines[0], lines
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(ValueError, match="--resample-to 'dwi' is not a sequence name"):  # checked the same way
        run_batch(None, root, out, resample_to="dwi")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_json_outputs_never_replace_a_file_the_product_did_not_write(phantom_root, random_ckpt, tmp_path, capsys):
    """A user's file under a case's JSON name fails that case (as an image there does); one under
    inference_summary.json, written after the last case, stops the batch before the first."""
    root = tmp_path / "in"
    for name in ("P1", "P2"):
        _copy_case(phantom_root, root, name, seqs=("flair",))
    out = tmp_path / "out"
    argv = ["--input-dir", str(root), "--output-dir", str(out), "--ckpt", random_ckpt, "--device", "cpu"]
    assert batch_main(argv) == 0
    (out / "P1.json").write_text('{"note": "the user\'s"}\n')
    capsys.readouterr()
    assert batch_main(argv) == 2
    err = capsys.readouterr().err
    assert f"case P1: Output {out / 'P1.json'} already exists and was not written by this product" in err, err
    assert (out / "P1.json").read_text() == '{"note": "the user\'s"}\n'
    assert sorted(p.name for p in out.iterdir()) == ["P1.json", "P2.json", "P2.nii.gz", "inference_summary.json"]
    assert _report(out)["P1"]["status"] == "error" and _report(out)["P2"]["status"] == "ok"

    (out / "P1.json").unlink()
    (out / "inference_summary.json").write_text('{"note": "the user\'s"}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert batch_main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "inference_summary.json already exists and was not written by this product" in lines[0]
    assert "choose another output folder" in lines[0] and "case" not in lines[0], lines
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_rerun_removes_the_outputs_it_does_not_write_again(phantom_root, segmenter, tmp_path):
    root = tmp_path / "in"
    case = _copy_case(phantom_root, root, "P1", seqs=("flair", "t2"))
    _copy_case(phantom_root, root, "P2", seqs=("t1",))
    out = tmp_path / "out"
    run_batch(segmenter, root, out, probabilities=True)
    assert {p.name for p in out.iterdir()} >= {"P1.nii.gz", "P1.json", "P1_prob.nii.gz", "P2_prob.nii.gz"}
    others = ["notes.txt", "P1_prob.nii", "P1_seg.nii.gz", "P3.nii.gz", "P1.nii.gz.bak", ".P1.xyz.tmp.json"]
    for name in others:  # not this product's outputs of a case of this run: never touched
        (out / name).write_text(name)
    (out / ".P1_prob.0123abcd.tmp.nii.gz").write_bytes(b"left by a killed write")

    run_batch(segmenter, root, out, probabilities=False)  # --probabilities dropped
    names = {p.name for p in out.iterdir()}
    assert names == {"P1.nii.gz", "P1.json", "P2.nii.gz", "P2.json", "inference_summary.json", *others}

    (case / "P1_flair.nii.gz").write_bytes(b"garbage")  # the case now fails
    with pytest.raises(BatchError, match="P1"):
        run_batch(segmenter, root, out)
    names = {p.name for p in out.iterdir()}
    assert names == {"P2.nii.gz", "P2.json", "inference_summary.json", *others}
    assert all((out / n).read_text() == n for n in others)
    assert _report(out)["P1"]["status"] == "error"


def test_stale_output_cleanup_never_removes_an_input(phantom_root, segmenter, tmp_path):
    """An output folder that holds scans (here MSD imagesTs, <case>.nii.gz) keeps them when a case fails."""
    task = tmp_path / "Task01"
    (task / "imagesTs").mkdir(parents=True)
    (task / "dataset.json").write_text(json.dumps({
        "modality": {"0": "FLAIR", "1": "T2"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
    }))
    ref = load(phantom_root / "Phantom_002" / "Phantom_002_flair.nii.gz")
    data = np.stack([np.asarray(load(phantom_root / "Phantom_002" / f"Phantom_002_{s}.nii.gz").dataobj)
                     for s in ("flair", "t2")], axis=-1)
    scan = task / "imagesTs" / "BRATS_900.nii.gz"
    nib.save(nib.Nifti1Image(data, ref.affine), scan)
    before = scan.read_bytes()
    results = run_batch(segmenter, task, task / "imagesTs", raise_on_error=False)
    assert results[0]["status"] == "error" and "is also an input" in results[0]["error"]
    assert scan.read_bytes() == before


def test_all_zero_channel_of_a_4d_file_is_reported_missing(phantom_root, segmenter, tmp_path, capsys):
    """MSD 4D files cannot leave a sequence out: a zero channel is a missing sequence, in the case's JSON."""
    task = tmp_path / "Task01"
    (task / "imagesTs").mkdir(parents=True)
    (task / "dataset.json").write_text(json.dumps({
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
    }))
    ref = load(phantom_root / "Phantom_002" / "Phantom_002_flair.nii.gz")
    data = np.stack([np.asarray(load(phantom_root / "Phantom_002" / f"Phantom_002_{s}.nii.gz").dataobj)
                     for s in ("flair", "t1", "t1ce", "t2")], axis=-1)
    data[..., 1] = 0  # T1 not acquired
    nib.save(nib.Nifti1Image(data, ref.affine), task / "imagesTs" / "BRATS_900.nii.gz")
    out = tmp_path / "out"
    (result,) = run_batch(segmenter, task, out)
    summary = json.loads((out / "BRATS_900.json").read_text())
    assert result["status"] == "ok"
    assert summary["sequences_used"] == ["flair", "t1ce", "t2"] and summary["sequences_missing"] == ["t1"]
    assert summary["empty_channels"] == ["t1"]
    # written with the dataset.json's label values (--labels auto), as its own labels would be
    assert summary["label_convention"] == "dataset.json" and summary["labels"] == {"ncr": 2, "ed": 1, "et": 3}
    assert set(np.unique(np.asarray(load(out / "BRATS_900.nii.gz").dataobj)).tolist()) <= {0, 1, 2, 3}
    assert "t1 channel all zero: missing" in capsys.readouterr().out


def test_the_batch_report_says_which_sequences_each_result_lacks(phantom_root, segmenter, tmp_path):
    """inference_summary.json is what a reader of a whole batch opens: a case segmented from FLAIR alone lists
    its missing sequences and the notes its printed line gave, which went to a log only."""
    cases = tmp_path / "cases"
    _copy_case(phantom_root, cases, "P1", seqs=("flair",))
    _copy_case(phantom_root, cases, "P2")
    out = tmp_path / "out"
    run_batch(segmenter, cases, out)
    report = _report(out)
    assert report["P1"]["sequences_missing"] == ["t1", "t1ce", "t2"]
    assert report["P1"]["notes"][:2] == ["t1, t1ce, t2 not given", "without t1ce: enhancing tumour (ET) and tumour "
                                         "core (TC) estimated without a contrast scan"]
    assert report["P1"]["notes"] == json.loads((out / "P1.json").read_text())["notes"]
    assert report["P2"]["sequences_missing"] == [] and not any("t1ce" in n for n in report["P2"]["notes"])


def test_stale_output_cleanup_keeps_files_it_did_not_write(tmp_path):
    """Only this product's own outputs under a case's output names are removed; a user's scan or note stays."""
    from app.inference.batch import _remove_stale_outputs

    affine, data = np.eye(4), np.zeros((4, 4, 4), np.uint8)
    scan = nib.Nifti1Image(data, affine)
    ours = nib.Nifti1Image(data, affine)
    ours.header["descrip"] = b"brats_gmd WT,TC,ET probabilities"
    nib.save(scan, tmp_path / "X.nii.gz")  # e.g. an MSD scan named <case>.nii.gz
    nib.save(ours, tmp_path / "X_prob.nii.gz")
    (tmp_path / "X.json").write_text(json.dumps({"note": "the user's"}))
    (tmp_path / "Y.json").write_text(json.dumps({"case": "Y", "output": "Y.nii.gz"}))
    (tmp_path / "Y.nii.gz").write_bytes(b"not a NIfTI image")
    _remove_stale_outputs(tmp_path, "X", (), {}, set())
    _remove_stale_outputs(tmp_path, "Y", (), {}, set())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X.json", "X.nii.gz", "Y.nii.gz"]


def test_a_stopped_batch_says_which_cases_it_did_not_reach(phantom_root, random_ckpt, tmp_path, monkeypatch, capsys):
    """SIGTERM during the second of three cases: the first is kept, no partial file is left, and
    inference_summary.json lists the other two as stopped."""
    import os
    import signal

    import app.inference.pipeline as pipeline
    from app.atomic import run_interruptible

    root = tmp_path / "in"
    for case in ("Phantom_000", "Phantom_001", "Phantom_002"):
        shutil.copytree(phantom_root / case, root / case)
    real, calls = pipeline.sliding_window_inference, []

    def network(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "sliding_window_inference", network)
    out = tmp_path / "out"
    rc = run_interruptible(lambda: batch_main(["--input-dir", str(root), "--output-dir", str(out), "--ckpt",
                                               random_ckpt, "--device", "cpu"]))
    assert rc == 143 and "stopped by SIGTERM" in capsys.readouterr().err
    report = json.loads((out / "inference_summary.json").read_text())
    assert report["stopped"] is True and report["failed"] == 0
    assert [(r["case"], r["status"]) for r in report["results"]] == [
        ("Phantom_000", "ok"), ("Phantom_001", "stopped"), ("Phantom_002", "stopped")]
    assert sorted(p.name for p in out.iterdir()) == ["Phantom_000.json", "Phantom_000.nii.gz", "inference_summary.json"]


def test_cases_whose_outputs_share_a_name_both_fail(phantom_root, random_ckpt, tmp_path, capsys, monkeypatch):
    # with --probabilities, case P1 writes P1_prob.nii.gz, the label map of case P1_prob: neither may replace
    # the other's file
    root = tmp_path / "in"
    _copy_case(phantom_root, root, "P1", seqs=("flair",))
    _copy_case(phantom_root, root, "P1_prob", seqs=("t2",))
    _copy_case(phantom_root, root, "Other", seqs=("flair",))
    out = tmp_path / "out"

    rc = batch_main(["--input-dir", str(root), "--output-dir", str(out), "--ckpt", random_ckpt, "--device", "cpu",
                     "--probabilities"])
    err = capsys.readouterr().err
    assert rc == 2
    report = _report(out)
    assert {c: r["status"] for c, r in report.items()} == {"Other": "ok", "P1": "error", "P1_prob": "error"}
    assert "P1_prob.nii.gz would also be written for case 'P1_prob'" in report["P1"]["error"]
    assert "case P1_prob:" in err
    assert sorted(p.name for p in out.iterdir()) == [
        "Other.json", "Other.nii.gz", "Other_prob.nii.gz", "inference_summary.json"]

    # without --probabilities the names differ, and both cases run
    assert batch_main(["--input-dir", str(root), "--output-dir", str(out), "--ckpt", random_ckpt,
                       "--device", "cpu"]) == 0
    assert nib.load(out / "P1_prob.nii.gz").header["descrip"].tobytes().startswith(b"brats_gmd labels")

    # on a disk that does not tell upper from lower case (macOS, Windows, their folders in Docker), P1.nii.gz and
    # p1.nii.gz are one file
    _copy_case(phantom_root, root, "p1", seqs=("t2",))
    monkeypatch.setattr(batch_module, "_ignores_case", lambda folder: True)
    assert batch_main(["--input-dir", str(root), "--output-dir", str(out), "--ckpt", random_ckpt,
                       "--device", "cpu"]) == 2
    report = _report(out)
    assert {c: r["status"] for c, r in report.items()} == {"Other": "ok", "P1": "error", "P1_prob": "ok",
                                                           "p1": "error"}
    assert ("P1.nii.gz would also be written for case 'p1' (the disk of the output folder does not tell upper from "
            "lower case)") in report["P1"]["error"]


def test_output_collisions_ignore_case_only_where_the_disk_does(tmp_path):
    from app.inference.batch import _ignores_case, _output_collisions

    assert _output_collisions({"Case1", "case1", "Other"}, probabilities=False) == {}
    errors = _output_collisions({"Case1", "case1", "Other", "INFERENCE_SUMMARY"}, probabilities=False,
                                ignore_case=True)
    assert set(errors) == {"Case1", "case1", "INFERENCE_SUMMARY"}
    assert errors["case1"].startswith("Its output case1.nii.gz would also be written for case 'Case1' (the disk")
    # this test's disk tells case apart; the probe leaves nothing behind, also for a folder not made yet
    assert _ignores_case(tmp_path / "not" / "made") is False
    assert list(tmp_path.iterdir()) == []


def test_rerun_into_an_nnunet_images_folder_ignores_its_own_outputs(phantom_root, segmenter, tmp_path):
    # the first run writes <case>.nii.gz beside <case>_0000.nii.gz; the rerun must not take it for a misnamed scan
    images = tmp_path / "Dataset001" / "imagesTs"
    images.mkdir(parents=True)
    (images.parent / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "FLAIR", "1": "T2"},
        "labels": {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3},
    }))
    for idx, seq in enumerate(("flair", "t2")):
        shutil.copy(phantom_root / "Phantom_000" / f"Phantom_000_{seq}.nii.gz", images / f"pat1_{idx:04d}.nii.gz")
    for _ in range(2):
        results = run_batch(segmenter, tmp_path, images, probabilities=True)
        assert [(r["case"], r["status"]) for r in results] == [("pat1", "ok")]
    assert sorted(p.name for p in images.iterdir()) == [
        "inference_summary.json", "pat1.json", "pat1.nii.gz", "pat1_0000.nii.gz", "pat1_0001.nii.gz",
        "pat1_prob.nii.gz"]


def test_an_output_corrected_by_hand_survives_reruns(phantom_root, segmenter, tmp_path):
    # a label map corrected in a viewer keeps the product's header description: neither a rerun nor the
    # clean-up after the case fails may replace or remove it
    root = tmp_path / "in"
    case = _copy_case(phantom_root, root, "P1", seqs=("flair",))
    out = tmp_path / "out"
    run_batch(segmenter, root, out)
    img = load(out / "P1.nii.gz")
    corrected = np.zeros(img.shape, dtype=np.uint8)
    corrected[8:12, 8:12, 8:12] = 1
    nib.save(nib.Nifti1Image(corrected, img.affine, header=img.header), out / "P1.nii.gz")

    with pytest.raises(BatchError, match="not written by this product"):
        run_batch(segmenter, root, out)
    (case / "P1_flair.nii.gz").write_bytes(b"garbage")  # the case now fails
    with pytest.raises(BatchError, match="P1"):
        run_batch(segmenter, root, out)
    np.testing.assert_array_equal(np.asarray(load(out / "P1.nii.gz").dataobj), corrected)


def _as_before_the_checksum(path: Path) -> None:
    """Rewrite the output image at ``path`` as a release before 0.5.0 wrote it: its description without ``crc32=``."""
    img = load(path)
    header = img.header.copy()
    header["descrip"] = bytes(img.header["descrip"]).split(b" crc32=")[0].rsplit(b" ", 1)[0]  # 'brats_gmd labels brats2018'
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine, header=header), path)


def test_an_output_of_a_release_before_the_checksum_is_replaced_only_where_its_summary_still_holds(
        phantom_root, segmenter, tmp_path):
    """Releases before 0.5.0 recorded no checksum of the voxels, and such a label map counted as the product's
    whatever its voxels: a rerun replaced, and the clean-up after a failed case removed, one corrected by hand.
    Its summary beside it records its volumes: where they still hold, it is replaced as before."""
    from app.inference.pipeline import written_by_product

    root = tmp_path / "in"
    case = _copy_case(phantom_root, root, "P1", seqs=("flair",))
    out = tmp_path / "out"
    run_batch(segmenter, root, out, probabilities=True)
    for name in ("P1.nii.gz", "P1_prob.nii.gz"):
        _as_before_the_checksum(out / name)
    assert bytes(load(out / "P1.nii.gz").header["descrip"]).rstrip(b"\0") == b"brats_gmd labels brats2018"
    assert written_by_product(out / "P1.nii.gz") and written_by_product(out / "P1_prob.nii.gz")
    run_batch(segmenter, root, out, probabilities=True)  # unedited: replaced
    assert b"crc32=" in bytes(load(out / "P1.nii.gz").header["descrip"])

    _as_before_the_checksum(out / "P1.nii.gz")
    img = load(out / "P1.nii.gz")
    corrected = np.asarray(img.dataobj).copy()
    block = corrected[8:10, 8:10, 8:10]
    corrected[8:10, 8:10, 8:10] = np.where(block == 2, 1, 2)  # 8 voxels corrected in a viewer, which keeps the header
    nib.save(nib.Nifti1Image(corrected, img.affine, header=img.header), out / "P1.nii.gz")
    assert not written_by_product(out / "P1.nii.gz")
    with pytest.raises(BatchError, match="not written by this product.*a label map of a release before 0.5.0"):
        run_batch(segmenter, root, out, probabilities=True)
    (case / "P1_flair.nii.gz").write_bytes(b"garbage")  # the case now fails: the clean-up keeps it too
    with pytest.raises(BatchError, match="P1"):
        run_batch(segmenter, root, out, probabilities=True)
    np.testing.assert_array_equal(np.asarray(load(out / "P1.nii.gz").dataobj), corrected)
    # nor is one without its summary taken for the product's
    shutil.copy(out / "P1.nii.gz", tmp_path / "alone.nii.gz")
    assert not written_by_product(tmp_path / "alone.nii.gz")


def _fail_second_case(monkeypatch, error: BaseException) -> None:
    """The network raises ``error`` on the second case of a batch (the first and third run)."""
    import app.inference.pipeline as pipeline

    real, calls = pipeline.sliding_window_inference, []

    def network(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "sliding_window_inference", network)


def test_a_case_that_runs_out_of_memory_fails_alone(phantom_root, random_ckpt, tmp_path, monkeypatch, capsys):
    """A case too large for the device's memory (PyTorch's CPU allocator message) fails with one line
    naming its file and the fix; the cases after it are still segmented, and an earlier run's label
    map of that case does not stay behind as if it were this run's."""
    root, out = tmp_path / "in", tmp_path / "out"
    for case in ("Phantom_000", "Phantom_001", "Phantom_002"):
        shutil.copytree(phantom_root / case, root / case)
    assert batch_main(["--input-dir", str(root), "--output-dir", str(out), "--ckpt", random_ckpt,
                       "--device", "cpu"]) == 0
    _fail_second_case(monkeypatch, RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 210567168 bytes. Error code 12 (Cannot allocate memory)"))
    capsys.readouterr()
    rc = batch_main(["--input-dir", str(root), "--output-dir", str(out), "--ckpt", random_ckpt, "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    line = next(x for x in err.splitlines() if x.startswith("error: case Phantom_001:"))
    assert "Phantom_001_flair.nii.gz: not enough memory on cpu" in line and "allocating 200.8 MiB failed" in line
    assert "--patch-size 96 96 96" in line
    report = _report(out)
    assert [report[c]["status"] for c in sorted(report)] == ["ok", "error", "ok"]
    assert sorted(p.name for p in out.iterdir()) == [
        "Phantom_000.json", "Phantom_000.nii.gz", "Phantom_002.json", "Phantom_002.nii.gz", "inference_summary.json"]


def test_an_unexpected_error_still_reports_where_the_batch_stopped(phantom_root, segmenter, tmp_path, monkeypatch):
    """An error no check foresaw (here a bug in the network call) stops the batch and is raised, but
    inference_summary.json is rewritten: the case it stopped in is an error, the cases after it are
    stopped, instead of the previous run's report (all ok) standing beside this run's outputs."""
    root, out = tmp_path / "in", tmp_path / "out"
    for case in ("Phantom_000", "Phantom_001", "Phantom_002"):
        shutil.copytree(phantom_root / case, root / case)
    run_batch(segmenter, root, out)
    assert {r["status"] for r in _report(out).values()} == {"ok"}
    _fail_second_case(monkeypatch, RuntimeError("shape mismatch in the network"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_batch(segmenter, root, out)
    report = json.loads((out / "inference_summary.json").read_text())
    assert report["stopped"] is True and report["failed"] == 1
    assert [(r["case"], r["status"]) for r in report["results"]] == [
        ("Phantom_000", "ok"), ("Phantom_001", "error"), ("Phantom_002", "stopped")]
    assert report["results"][1]["error"] == "RuntimeError: shape mismatch in the network"
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


def test_each_case_gets_the_label_values_its_file_names_come_with(phantom_root, segmenter, tmp_path):
    """--labels auto (the default): a BraTS 2023-named case gets enhancing tumour 3, as its own labels
    and training read it (BraTS 2024 keeps these names, and there 4 is resection cavity); a BraTS
    2018-named case in the same batch gets 4. An explicit --labels sets every case."""
    root = tmp_path / "in"
    _copy_case(phantom_root, root, "Old", seqs=("flair", "t1ce"))
    (root / "New").mkdir()
    for seq, name in (("flair", "t2f"), ("t1ce", "t1c")):
        shutil.copy(phantom_root / "Phantom_000" / f"Phantom_000_{seq}.nii.gz", root / "New" / f"New-{name}.nii.gz")
    run_batch(segmenter, root, tmp_path / "auto")
    old, new = (np.asarray(load(tmp_path / "auto" / f"{c}.nii.gz").dataobj) for c in ("Old", "New"))
    assert 4 in old and 3 not in old
    np.testing.assert_array_equal(new, np.where(old == 4, 3, old))
    assert {c: r["label_convention"] for c, r in _report(tmp_path / "auto").items()} == {
        "Old": "brats2018", "New": "brats2023"}
    run_batch(segmenter, root, tmp_path / "fixed", labels="2018")
    np.testing.assert_array_equal(np.asarray(load(tmp_path / "fixed" / "New.nii.gz").dataobj), old)


@pytest.mark.parametrize("variable", ["BRATS_INPUT", "BRATS_OUTPUT"])
def test_an_empty_folder_setting_is_refused_instead_of_meaning_the_current_folder(
    phantom_root, random_ckpt, tmp_path, monkeypatch, capsys, variable
):
    """BRATS_INPUT= or BRATS_OUTPUT= (an unset shell variable passed on to Docker) used to be read as the
    current folder: every case under it was segmented, or the results were written among its files."""
    _copy_case(phantom_root, tmp_path / "in", "P1", seqs=("flair",))
    cwd = tmp_path / "cwd"
    _copy_case(phantom_root, cwd, "Other", seqs=("flair",))
    before = sorted(p.relative_to(cwd) for p in cwd.rglob("*"))
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("BRATS_INPUT", str(tmp_path / "in"))
    monkeypatch.setenv("BRATS_OUTPUT", str(tmp_path / "out"))
    monkeypatch.setenv(variable, "")
    assert batch_main(["--ckpt", random_ckpt, "--device", "cpu"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    option = "--input-dir" if variable == "BRATS_INPUT" else "--output-dir"
    assert len(lines) == 1 and f"{option} is empty" in lines[0] and f"{variable} set to ''" in lines[0], lines
    assert sorted(p.relative_to(cwd) for p in cwd.rglob("*")) == before
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="--input-dir is empty"):  # input_dir: null in a bundle override
        run_batch(None, None, tmp_path / "out")


def test_a_full_disk_keeps_the_earlier_results_and_names_the_file(phantom_root, random_ckpt, tmp_path, monkeypatch,
                                                                  capsys):
    """A rerun that finds the output disk full (here: adding --probabilities) stops at the first case with one
    line naming the file it could not write and the fix, and keeps the label maps and summaries the
    earlier run wrote: the disk failed, not the cases, and the earlier results were complete. It used to
    segment every later case only to fail it the same way, one error line each."""
    import errno

    import app.inference.pipeline as pipeline

    root, out = tmp_path / "in", tmp_path / "out"
    for case in ("Phantom_000", "Phantom_001"):
        shutil.copytree(phantom_root / case, root / case)
    args = ["--input-dir", str(root), "--output-dir", str(out), "--ckpt", random_ckpt, "--device", "cpu"]
    assert batch_main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "inference_summary.json"}
    real_save = nib.save

    def full_disk(img, path):
        if "_prob." in Path(path).name:  # the label map fits, the 4D probabilities do not
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(img, path)

    monkeypatch.setattr(pipeline.nib, "save", full_disk)
    capsys.readouterr()
    segmented = []
    real_segment = pipeline.segment_case
    monkeypatch.setattr(pipeline, "segment_case", lambda *a, **k: (segmented.append(k["case"]), real_segment(*a, **k))[1])
    assert batch_main([*args, "--probabilities"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: case Phantom_000: ")
    assert f"Cannot write {out / 'Phantom_000_prob.nii.gz'} (No space left on device): free space" in line
    assert "[Errno" not in line and "earlier run wrote for this case, if any, are kept" in line
    assert line.endswith("The batch stopped at this case, as the 1 case(s) after it would fail the same way "
                         "(inference_summary.json lists them as stopped): run it again once the disk can take the outputs.")
    assert segmented == ["Phantom_000"]  # the later case was not segmented in vain
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "inference_summary.json"} == before
    assert {c: r["status"] for c, r in _report(out).items()} == {"Phantom_000": "error", "Phantom_001": "stopped"}


_KILLED_IN_SECOND_CASE = """
import os, signal, sys
import app.inference.pipeline as pipeline
from app.inference.batch import main

real, calls = pipeline.sliding_window_inference, []

def network(*args, **kwargs):  # the OOM killer, or a scheduler's kill -9, in the second case
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)

pipeline.sliding_window_inference = network
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_batch_leaves_a_report_that_says_so(phantom_root, random_ckpt, tmp_path):
    """SIGKILL (no handler runs) in the second case of a rerun: inference_summary.json is this run's,
    not the previous run's "all ok, not stopped"; the rerun after the kill finishes the job and its
    report is complete again."""
    import signal
    import subprocess

    from tests.bundles.helpers import repo_env
    from tests.inference.conftest import REPO

    root, out = tmp_path / "in", tmp_path / "out"
    for case in ("Phantom_000", "Phantom_001", "Phantom_002"):
        shutil.copytree(phantom_root / case, root / case)
    args = ["--input-dir", str(root), "--output-dir", str(out), "--ckpt", random_ckpt, "--device", "cpu"]
    assert batch_main(args) == 0
    proc = subprocess.run([sys.executable, "-c", _KILLED_IN_SECOND_CASE, *args, "--probabilities"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=repo_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    report = json.loads((out / "inference_summary.json").read_text())
    assert report["stopped"] is True and report["failed"] == 0
    assert [(r["case"], r["status"]) for r in report["results"]] == [
        ("Phantom_000", "ok"), ("Phantom_001", "stopped"), ("Phantom_002", "stopped")]
    assert report["results"][0]["output"] == str(out / "Phantom_000.nii.gz")
    assert (out / "Phantom_000_prob.nii.gz").is_file()

    assert batch_main([*args, "--probabilities"]) == 0  # the rerun after the kill
    report = json.loads((out / "inference_summary.json").read_text())
    assert report["stopped"] is False and {r["status"] for r in report["results"]} == {"ok"}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"Phantom_00{i}{s}" for i in range(3) for s in (".json", ".nii.gz", "_prob.nii.gz")]
        + ["inference_summary.json"])


@pytest.mark.skipif(sys.platform == "win32", reason="folder locks (flock) are POSIX")
def test_a_second_batch_on_the_same_output_folder_stops_before_touching_it(phantom_root, random_ckpt, tmp_path,
                                                                          capsys):
    """A job started twice on one output folder: while the first batch holds the folder, the second
    stops with one line and exit status 2, and leaves the first's outputs and report as they were
    (it used to run too, each removing the other's files and mixing the two runs' results)."""
    import fcntl
    import os

    root, out = tmp_path / "in", tmp_path / "out"
    for case in ("Phantom_000", "Phantom_001"):
        shutil.copytree(phantom_root / case, root / case)
    args = ["--input-dir", str(root), "--output-dir", str(out), "--ckpt", random_ckpt, "--device", "cpu"]
    assert batch_main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    fd = os.open(out, os.O_RDONLY)  # what a running batch holds (released by the kernel when it dies)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert batch_main([*args, "--probabilities"]) == 2
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    assert err == (f"error: --output-dir {out} is in use by another batch that is still running (a job started "
                   "twice?): wait for it to finish, or choose another --output-dir.\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert batch_main([*args, "--probabilities"]) == 0  # the folder is free again once the first batch ended


def test_batch_bookkeeping_does_not_grow_with_the_cases_before_each_case(phantom_root, segmenter, tmp_path,
                                                                        monkeypatch):
    """A PACS export of thousands of cases: each case's clean-up listed the whole output folder (which
    grows by two or three files per case) four times, and each rewrite of inference_summary.json
    encoded every case's entry again, so the batch's own bookkeeping grew with the square of its
    cases. The folder is now listed once per batch and each entry encoded once; the report is the
    same text as before."""
    import os

    import app.inference.batch as batch

    root, out = tmp_path / "in", tmp_path / "out"
    cases = ["P 1", "P.2", "3", "Pä_4", "P5"]  # a space, a dot, numeric-only and unicode ids too
    for name in cases:
        _copy_case(phantom_root, root, name, seqs=("flair",))
    out.mkdir()
    (out / ".P5.0123abcd-999999999.tmp.nii.gz").write_bytes(b"left by a killed write")
    (out / ".P5.json.bak").write_text("the user's")

    listed, encoded = [], []
    real_scandir, real_dumps = os.scandir, json.dumps

    def scandir(path="."):
        if Path(path).resolve() == out.resolve():
            listed.append(path)
        return real_scandir(path)

    def dumps(obj, *args, **kwargs):  # the case entries one call encodes
        if isinstance(obj, dict):
            encoded.extend(r["case"] for r in obj.get("results", [obj] if "case" in obj else []))
        return real_dumps(obj, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(batch.json, "dumps", dumps)
    results = run_batch(segmenter, root, out, probabilities=True)
    monkeypatch.undo()

    assert [r["status"] for r in results] == ["ok"] * len(cases)
    assert len(listed) == 1, listed
    # once as not reached yet, once with its result
    assert sorted(encoded) == sorted(cases * 2), encoded
    text = (out / "inference_summary.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2) + "\n"
    report = json.loads(text)
    assert [r["case"] for r in report["results"]] == sorted(cases) and report["cases"] == len(cases)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".P5.json.bak", "inference_summary.json"]
        + [f"{c}{s}" for c in cases for s in (".json", ".nii.gz", "_prob.nii.gz")])


@pytest.mark.parametrize("destination", ["P1.nii.gz", "P1.nii", "P1.json", "P 1.x_prob.nii.gz", "3.nii.gz", "notes"])
def test_temporary_names_map_back_to_their_output(destination, tmp_path):
    from app.inference.io import AtomicOutputs

    temp = Path(AtomicOutputs().temp(tmp_path / destination)).name
    assert AtomicOutputs.is_temporary_of(temp, destination)
    assert AtomicOutputs.temporary_destination(temp) == destination
    assert AtomicOutputs.temporary_destination(destination) is None
    assert AtomicOutputs.temporary_destination(f".{destination}.xyz.tmp.json") is None


def test_a_case_named_as_the_batch_report_fails_instead_of_losing_its_summary(phantom_root, random_ckpt, tmp_path,
                                                                              capsys):
    """A case named ``inference_summary`` wrote its summary to inference_summary.json, which the batch's
    report of every case then replaced: the case was reported ok without its summary."""
    root, out = tmp_path / "in", tmp_path / "out"
    _copy_case(phantom_root, root, "inference_summary", seqs=("flair",))
    _copy_case(phantom_root, root, "P1", seqs=("flair",))
    rc = batch_main(["--input-dir", str(root), "--output-dir", str(out), "--ckpt", random_ckpt, "--device", "cpu"])
    assert rc == 2
    assert "case inference_summary: Its summary inference_summary.json would be replaced by the batch's report" \
        in capsys.readouterr().err
    report = json.loads((out / "inference_summary.json").read_text())
    assert report["output_dir"] == str(out)
    assert {r["case"]: r["status"] for r in report["results"]} == {"P1": "ok", "inference_summary": "error"}
    assert sorted(p.name for p in out.iterdir()) == ["P1.json", "P1.nii.gz", "inference_summary.json"]


def test_a_case_with_a_sequence_copied_from_another_fails_alone(phantom_root, segmenter, tmp_path):
    """A case whose T1ce file is a copy of its T1 (so that it "has" four files) was segmented as if it held a
    contrast scan; it now fails with training's message, and the other cases run."""
    root = tmp_path / "in"
    _copy_case(phantom_root, root, "Good")
    copied = _copy_case(phantom_root, root, "Copied")
    shutil.copy(copied / "Copied_t1.nii.gz", copied / "Copied_t1ce.nii.gz")
    out = tmp_path / "out"
    with pytest.raises(BatchError, match="1 of 2 case"):
        run_batch(segmenter, root, out)
    report = _report(out)
    assert {c: r["status"] for c, r in report.items()} == {"Copied": "error", "Good": "ok"}
    assert report["Copied"]["error"].startswith(f"{copied / 'Copied_t1ce.nii.gz'} (t1ce) holds the same voxels as ")
    assert not (out / "Copied.nii.gz").exists() and (out / "Good.nii.gz").exists()


def test_a_batch_says_how_many_cases_it_has_and_ends_with_one_line_of_its_outcome(phantom_root, random_ckpt,
                                                                                  tmp_path, capsys):
    """A batch that segmented every case printed the cases' lines and nothing after them, so a service could not
    tell a finished batch from one still running or cut short, nor read how many cases there were in all."""
    import re

    root = tmp_path / "in"
    _copy_case(phantom_root, root, "A", seqs=("flair", "t2"))
    _copy_case(phantom_root, root, "B")
    out = tmp_path / "out"
    args = ["--input-dir", str(root), "--output-dir", str(out), "--ckpt", random_ckpt, "--device", "cpu"]
    assert batch_main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"Segmenting 2 case(s) under {root} into {out}."
    assert re.fullmatch(r"Batch finished: 2 of 2 case\(s\) segmented, 0 failed, in [\d.]+ s; report: "
                        + re.escape(str(out / "inference_summary.json")) + r"\.", lines[-1]), lines[-1]
    (root / "B" / "B_t2.nii.gz").write_bytes(b"not a scan")
    assert batch_main(args) == 2
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1].startswith("Batch finished: 1 of 2 case(s) segmented, 1 failed, in ")
    errors = captured.err.strip().splitlines()
    # the case's error is said once, on its own line; the last line names the failed case without repeating it
    assert len(errors) == 2 and errors[0].startswith("error: case B: ") and errors[0].endswith(".")
    assert errors[-1] == (f"error: 1 of 2 case(s) failed (B): each case's error is on its 'error: case' line above "
                          f"and in {out / 'inference_summary.json'}.")


def test_messages_name_the_options_as_the_entry_point_running_spells_them(phantom_root, random_ckpt, tmp_path, capsys):
    """The batch bundle (inference.yaml) takes --sw_overlap and --resample_to; its errors said "overlap must be in
    [0, 1)" and "--resample-to", the library's and the batch command's spellings."""
    from app.inference.batch import load_segmenter_or_exit
    from app.inference.io import bundle_options, read_case

    with pytest.raises(ValueError, match=r"^--overlap 1\.0 must be a number >= 0 and < 1, e\.g\. --overlap 0\.5\.$"):
        load_segmenter(random_ckpt, device="cpu", overlap=1.0)  # python -m app infer and the batch command
    with pytest.raises(ValueError, match=r"^--sw-batch-size 0 must be a whole number >= 1"):
        load_segmenter(random_ckpt, device="cpu", sw_batch_size=0)
    for kwargs, line in (({"overlap": 1}, "error: --sw_overlap 1 must be a number >= 0 and < 1, e.g. --sw_overlap 0.5."),
                         ({"sw_batch_size": 0}, "error: --sw_batch_size 0 must be a whole number >= 1, e.g. "
                                                "--sw_batch_size 1.")):
        with pytest.raises(SystemExit) as exit_:
            load_segmenter_or_exit(random_ckpt, device="cpu", **kwargs)  # the bundle's segmenter
        assert exit_.value.code == 2 and capsys.readouterr().err.strip() == line
    with pytest.raises(SystemExit):
        load_segmenter_or_exit("", device="cpu")
    assert capsys.readouterr().err.strip().endswith("(--ckpt_path).")  # not the batch command's --ckpt, BRATS_CKPT
    with pytest.raises(ValueError, match=r"\(--ckpt, BRATS_CKPT\)\.$"):
        load_segmenter("", device="cpu")
    root = tmp_path / "in"
    _copy_case(phantom_root, root, "P1", seqs=("flair",))
    with bundle_options():
        with pytest.raises(ValueError, match="^--resample_to 'dwi' is not a sequence name"):
            run_batch(None, root, tmp_path / "out", resample_to="dwi")
        with pytest.raises(ValueError, match=r"^--input_dir is empty \(an unset variable\), which"):  # no BRATS_INPUT
            run_batch(None, None, tmp_path / "out")
    with pytest.raises(ValueError, match=r"^--input-dir is empty \(an unset variable, or BRATS_INPUT set to ''\)"):
        run_batch(None, None, tmp_path / "out")
    # a case's own error: sequences on different grids
    flair = phantom_root / "Phantom_000" / "Phantom_000_flair.nii.gz"
    t2 = load(phantom_root / "Phantom_000" / "Phantom_000_t2.nii.gz")
    moved = t2.affine.copy()
    moved[0, 3] += 2.5
    nib.save(nib.Nifti1Image(np.asarray(t2.dataobj), moved), str(tmp_path / "t2_moved.nii.gz"))
    sequences = {"flair": str(flair), "t2": str(tmp_path / "t2_moved.nii.gz")}
    with pytest.raises(Exception, match=r"or pass --resample-to flair to resample onto flair\.$"):
        read_case(sequences)
    with bundle_options(), pytest.raises(Exception, match=r"or pass --resample_to flair to resample onto flair\.$"):
        read_case(sequences)
    assert not (tmp_path / "out").exists()

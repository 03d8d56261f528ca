"""Bad input: one clear line on stderr naming the file and the fix, exit status 2, nothing written."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.inference.conftest import REPO, load
from tests.bundles.helpers import repo_env


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> str:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return str(path)


def _like(case, seq: str, data: np.ndarray, tmp_path: Path, name: str) -> str:
    return _save(tmp_path / name, data, load(case[seq]).affine)


def _corrupt(case, tmp_path):
    path = tmp_path / "corrupt_t2.nii.gz"
    path.write_bytes(b"this is not a NIfTI file" * 20)
    return ["--flair", case["flair"], "--t2", str(path)], "corrupt_t2.nii.gz"


def _truncated(case, tmp_path):
    raw = gzip.decompress(Path(case["t2"]).read_bytes())
    path = tmp_path / "truncated_t2.nii.gz"
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))  # valid header, half the voxels
    return ["--flair", case["flair"], "--t2", str(path)], "truncated_t2.nii.gz"


def _empty(case, tmp_path):
    shape = load(case["t1"]).shape
    path = _like(case, "t1", np.zeros(shape, np.int16), tmp_path, "empty_t1.nii.gz")
    return ["--flair", case["flair"], "--t1", path], "empty_t1.nii.gz"


def _constant(case, tmp_path):
    shape = load(case["t1"]).shape
    path = _like(case, "t1", np.full(shape, 7, np.int16), tmp_path, "const_t1.nii.gz")
    return ["--t1", path], "const_t1.nii.gz"


def _nan(case, tmp_path):
    data = np.asarray(load(case["t1ce"]).dataobj, dtype=np.float32)
    data[3, 4, 5] = np.nan
    path = _like(case, "t1ce", data, tmp_path, "nan_t1ce.nii.gz")
    return ["--flair", case["flair"], "--t1ce", path], "nan_t1ce.nii.gz"


def _two_d(case, tmp_path):
    return ["--flair", _save(tmp_path / "slice_flair.nii.gz", np.ones((32, 32), np.int16))], "slice_flair.nii.gz"


def _single_slice(case, tmp_path):
    data = np.asarray(load(case["flair"]).dataobj)[:, :, 16:17]
    return ["--flair", _save(tmp_path / "one_flair.nii.gz", data)], "one_flair.nii.gz"


def _four_d(case, tmp_path):
    data = np.stack([np.asarray(load(case[s]).dataobj) for s in ("flair", "t2")], axis=-1)
    return ["--flair", _like(case, "flair", data, tmp_path, "stack_flair.nii.gz")], "stack_flair.nii.gz"


def _mismatched(case, tmp_path):
    data = np.asarray(load(case["t2"]).dataobj)[:, :, :30]
    return ["--flair", case["flair"], "--t2", _like(case, "t2", data, tmp_path, "short_t2.nii.gz")], "short_t2.nii.gz"


def _missing(case, tmp_path):
    return ["--flair", case["flair"], "--t1", str(tmp_path / "nowhere_t1.nii.gz")], "nowhere_t1.nii.gz"


def _not_nifti(case, tmp_path):
    path = tmp_path / "scan_t2.mha"
    path.write_bytes(b"x")
    return ["--t2", str(path)], "scan_t2.mha"


def _no_sequence(case, tmp_path):
    return [], "--flair"


def _unknown_name(case, tmp_path):
    return ["--input", f"dwi={case['flair']}"], "'dwi'"


def _unknown_flag(case, tmp_path):
    return ["--dwi", case["flair"]], "--dwi"


def _resample_to_absent(case, tmp_path):
    return ["--flair", case["flair"], "--resample-to", "t1ce"], "--resample-to t1ce"


def _empty_path(case, tmp_path):
    return ["--flair", case["flair"], "--t1", ""], "The t1 path is empty"


def _resample_to_unknown(case, tmp_path):
    return ["--flair", case["flair"], "--resample-to", "dwi"], "--resample-to 'dwi' is not a sequence name"


def _output_is_input(case, tmp_path):
    return ["--flair", case["flair"], "--out", case["flair"]], "is also an input"


def _output_is_input_through_symlink(case, tmp_path):
    link = tmp_path / "linked"
    link.symlink_to(Path(case["flair"]).parent, target_is_directory=True)
    return ["--flair", case["flair"], "--out", str(link / Path(case["flair"]).name)], "is also an input"


def _output_is_input_hard_link(case, tmp_path):
    other = tmp_path / "flair_link.nii.gz"
    os.link(case["flair"], other)
    return ["--flair", case["flair"], "--out", str(other)], "is also an input"


def _bad_ckpt(case, tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    return ["--flair", case["flair"], "--ckpt", str(path)], "broken.pt"


def _flipped_byte_ckpt(case, tmp_path):
    """A weight changed after the file was written: zip checksums catch what torch.load does not."""
    import torch

    from app.networks import DSUNet

    path = tmp_path / "flipped.pt"
    torch.save(DSUNet(features=(8, 16, 32, 64)).state_dict(), path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4] = b"\x00\x00\xc0\x7f"  # a float32 NaN inside some tensor
    path.write_bytes(bytes(data))
    return ["--flair", case["flair"], "--ckpt", str(path)], "flipped.pt is damaged (entry "


def _nan_weights_ckpt(case, tmp_path):
    import torch

    from app.networks import DSUNet

    state = DSUNet(features=(8, 16, 32, 64)).state_dict()
    next(v for v in state.values() if v.is_floating_point())[0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    return ["--flair", case["flair"], "--ckpt", str(tmp_path / "nan.pt")], "nan.pt holds NaN or infinite weights"


def _tensor_ckpt(case, tmp_path):
    import torch

    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    return ["--flair", case["flair"], "--ckpt", str(tmp_path / "tensor.pt")], "holds no state dict"


def _wrong_features(case, tmp_path):
    return ["--flair", case["flair"], "--features", "16", "32"], "different network configuration"


def _bad_device(case, tmp_path):
    return ["--flair", case["flair"], "--device", "gpu"], "--device 'gpu' is not a device"


def _zero_threads(case, tmp_path):
    return ["--flair", case["flair"], "--threads", "0"], "expected a positive integer"


def _label_map(case, tmp_path):
    seg = Path(case["flair"]).parent / "Phantom_000_seg.nii.gz"  # the case's reference segmentation
    return ["--flair", str(seg)], f"{seg} (flair) looks like a segmentation label map"


def _copied_sequence(case, tmp_path):
    # T1 saved as T1ce so that the case "has" four files: training refuses it, and the network would read T1 as T1ce
    import shutil

    copy = shutil.copy(case["t1"], tmp_path / "t1ce_copy.nii.gz")
    return (["--flair", case["flair"], "--t1", case["t1"], "--t1ce", str(copy)],
            f"{copy} (t1ce) holds the same voxels as {case['t1']} (t1)")


def _copied_sequence_in_case_dir(case, tmp_path):
    import shutil

    folder = Path(case["t1"]).parent
    shutil.copy(case["t1"], case["t1ce"])
    return ["--case-dir", str(folder)], f"{case['t1ce']} (t1ce) holds the same voxels as {case['t1']} (t1)"


def _copied_channel(case, tmp_path):
    msd = _msd_task(case, tmp_path / "Task01")
    image = msd / "imagesTs" / "BRATS_001.nii.gz"
    data = np.asarray(load(image).dataobj).copy()
    data[..., 2] = data[..., 1]  # the t1gd channel filled with T1
    _save(image, data, load(image).affine)
    return ["--case-dir", str(msd)], f"{image} (channel 2) (t1ce) holds the same voxels as {image} (channel 1) (t1)"


def _channel_first(case, tmp_path):
    # a (4, X, Y, Z) array saved as it is: its "channels" were read as 4-voxel-thick slabs
    msd = _msd_task(case, tmp_path / "Task01")
    image = msd / "imagesTs" / "BRATS_001.nii.gz"
    data = np.asarray(load(image).dataobj)
    _save(image, np.ascontiguousarray(np.moveaxis(data, -1, 0)), load(image).affine)
    shape = ", ".join(map(str, data.shape[:3]))
    return ["--case-dir", str(msd)], f"{image} has shape (4, {shape}): its 4 channels lie along the first axis"


BAD = {f.__name__.lstrip("_"): f for f in (
    _corrupt, _truncated, _empty, _constant, _nan, _two_d, _single_slice, _four_d, _mismatched, _missing, _not_nifti,
    _no_sequence, _unknown_name, _unknown_flag, _resample_to_absent, _resample_to_unknown, _empty_path,
    _output_is_input, _output_is_input_through_symlink,
    _output_is_input_hard_link, _bad_ckpt, _flipped_byte_ckpt, _nan_weights_ckpt, _tensor_ckpt, _wrong_features,
    _bad_device, _zero_threads, _label_map, _copied_sequence, _copied_sequence_in_case_dir, _copied_channel,
    _channel_first,
)}


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_exits_2_with_one_line_and_no_output(kind, case, random_ckpt, infer, tmp_path):
    args, expected = BAD[kind](case, tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = ["--ckpt", random_ckpt, "--out", str(out_dir / "seg.nii.gz"), "--summary", str(out_dir / "seg.json"),
            "--probabilities", str(out_dir / "prob.nii.gz"), *args]
    # later options win in argparse, so the case may override --ckpt / --out
    before = _files(tmp_path)
    rc, stdout, stderr = infer(*argv)
    assert rc == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert _files(out_dir) == set(), "no output or temporary file may be left behind"
    assert _files(tmp_path) == before
    assert stdout == ""


def test_case_dir_with_several_cases_is_refused(phantom_root, random_ckpt, infer, tmp_path):
    rc, _, err = infer("--ckpt", random_ckpt, "--case-dir", phantom_root, "--out", tmp_path / "seg.nii.gz")
    assert rc == 2 and "holds 3 cases" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "seg.nii.gz").exists()


def _msd_task(case, folder: Path) -> Path:
    """An MSD Task01 folder holding the case as one 4D test image, ``imagesTs/BRATS_001.nii.gz``."""
    (folder / "imagesTs").mkdir(parents=True)
    data = np.stack([np.asarray(load(case[s]).dataobj) for s in ("flair", "t1", "t1ce", "t2")], axis=-1)
    _save(folder / "imagesTs" / "BRATS_001.nii.gz", data, load(case["flair"]).affine)
    (folder / "dataset.json").write_text('{"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}, '
                                         '"labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", '
                                         '"3": "enhancing tumour"}}')
    return folder


def test_outputs_never_replace_a_file_that_case_dir_reads(case, random_ckpt, infer, tmp_path):
    """``--case-dir`` reads an MSD folder's dataset.json besides the 4D scan: no output may replace
    either, also through a symlinked folder."""
    msd = _msd_task(case, tmp_path / "Task01")
    link = tmp_path / "linked"
    link.symlink_to(msd, target_is_directory=True)
    before = {p: p.read_bytes() for p in msd.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    for flag, target in (("--summary", msd / "dataset.json"), ("--summary", link / "dataset.json"),
                         ("--probabilities", msd / "imagesTs" / "BRATS_001.nii.gz")):
        rc, _, err = infer("--ckpt", random_ckpt, "--case-dir", msd, "--out", out / "seg.nii.gz", flag, target)
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert f"{flag} {target} is also an input" in err, err
        assert {p: p.read_bytes() for p in msd.rglob("*") if p.is_file()} == before
        assert not out.exists()
    rc, _, err = infer("--ckpt", random_ckpt, "--case-dir", msd, "--out", out / "seg.nii.gz", "--summary",
                       out / "seg.json")
    assert rc == 0, err


def test_failure_while_writing_leaves_nothing(case, random_ckpt, infer, tmp_path, monkeypatch):
    """An error after the label map was written (here: the probability map) removes the temporary files."""
    import app.inference.pipeline as pipeline

    real_save = nib.save
    calls = []

    def failing_save(img, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(f"No space left on device: {path}")
        real_save(img, path)

    monkeypatch.setattr(pipeline.nib, "save", failing_save)
    out_dir = tmp_path / "out"
    rc, _, err = infer("--ckpt", random_ckpt, "--flair", case["flair"], "--out", out_dir / "seg.nii.gz",
                       "--probabilities", out_dir / "prob.nii.gz")
    assert rc == 2 and "No space left" in err
    assert len(calls) == 2 and Path(calls[0]).parent == out_dir and Path(calls[0]).name.startswith(".seg.")
    assert list(out_dir.iterdir()) == []


def test_unwritable_outputs_are_refused_before_the_network_runs(case, random_ckpt, infer, tmp_path, monkeypatch,
                                                                capsys):
    import tempfile

    import app.inference.pipeline as pipeline
    from app.inference.batch import main as batch_main

    ran = []
    monkeypatch.setattr(pipeline.Segmenter, "predict", lambda *a, **k: ran.append(1))
    (tmp_path / "afile").write_text("x")
    rc, _, err = infer("--ckpt", random_ckpt, "--flair", case["flair"], "--out", tmp_path / "afile" / "seg.nii.gz")
    assert rc == 2 and "afile is a file, not a folder: choose another output folder" in err
    from app.inference.pipeline import check_writable_folder

    monkeypatch.setattr(pipeline.os.path, "exists", lambda path: False)  # a drive or share that is not there
    with pytest.raises(ValueError, match=r"--out X: no part of .* exists: choose an output folder on a disk"):
        check_writable_folder(tmp_path / "x", "--out X")
    monkeypatch.undo()
    monkeypatch.setattr(pipeline.Segmenter, "predict", lambda *a, **k: ran.append(1))
    # a folder that refuses new files (permissions, read-only mount, immutable): root passes chmod,
    # so the refusal is simulated where the product probes
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == locked:
            raise PermissionError(1, "Operation not permitted")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    rc, _, err = infer("--ckpt", random_ckpt, "--flair", case["flair"], "--out", tmp_path / "new" / "seg.nii.gz",
                       "--summary", locked / "sub" / "seg.json")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--summary {locked / 'sub' / 'seg.json'}: cannot write in {locked} (Operation not permitted)" in err
    assert "--user $(id -u):$(id -g)" in err and not (tmp_path / "new").exists() and list(locked.iterdir()) == []
    rc = batch_main(["--input-dir", str(Path(case["flair"]).parent), "--output-dir", str(locked),
                     "--ckpt", str(random_ckpt), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and f"error: --output-dir {locked}: cannot write in {locked}" in err and "case " not in err
    assert list(locked.iterdir()) == []
    assert ran == []  # no case was segmented for outputs that could not be written


def test_outputs_that_are_one_file_through_a_symlinked_folder(case, random_ckpt, infer, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    rc, _, err = infer("--ckpt", random_ckpt, "--flair", case["flair"], "--out", tmp_path / "real" / "x.nii.gz",
                       "--probabilities", tmp_path / "link" / "x.nii.gz")
    assert rc == 2 and "--out, --probabilities and --summary must be different files" in err
    assert list((tmp_path / "real").iterdir()) == []


def test_process_exit_status_through_python_m_app(tmp_path, random_ckpt):
    """The real command line: status 2 and one stderr line for a corrupt file (subprocess)."""
    bad = tmp_path / "bad_flair.nii.gz"
    bad.write_bytes(b"\x00" * 100)
    proc = subprocess.run(
        [sys.executable, "-m", "app", "infer", "--ckpt", random_ckpt, "--flair", str(bad), "--out",
         str(tmp_path / "seg.nii.gz")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=repo_env(OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "bad_flair.nii.gz" in proc.stderr
    assert not (tmp_path / "seg.nii.gz").exists()


def test_non_finite_network_output_writes_nothing(case, tmp_path):
    """A NaN logit thresholds to "no tumour": the case must fail instead of reporting 0 mL."""
    import torch

    from app.data.errors import CaseError
    from app.inference.pipeline import Segmenter, segment_case

    class NaNNet(torch.nn.Module):
        def forward(self, image, mask):
            out = torch.zeros(image.shape[0], 3, *image.shape[2:])
            out[:, 0] = float("nan")  # WT everywhere: a damaged weight in the WT path
            return out

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CaseError, match=r"flair.nii.gz: the network gave \d+ NaN or infinite value"):
        segment_case(Segmenter(NaNNet(), divisor=8, spacing="native"), {"flair": case["flair"]}, out / "seg.nii.gz",
                     summary=out / "seg.json")
    assert _files(out) == set()


def test_unreadable_files_are_reported_as_permissions_not_damage(case, random_ckpt, infer, tmp_path, monkeypatch):
    """A file the process may not read (e.g. Docker --user and a model written under umask 077) is a
    permission problem with its own fix, not a corrupt file."""
    import builtins
    import gzip

    import torch

    locked = set()

    def guard(opener):
        def wrapped(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and str(Path(file).resolve()) in locked:
                raise PermissionError(13, "Permission denied", str(file))
            return opener(file, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(builtins, "open", guard(builtins.open))
    monkeypatch.setattr(gzip, "open", guard(gzip.open))
    monkeypatch.setattr(torch, "load", guard(torch.load))
    rc, _, err = infer("--ckpt", random_ckpt, "--out", str(tmp_path / "earlier.nii.gz"), "--t2", case["t2"])
    assert rc == 0, err
    # an earlier output another user wrote (e.g. another Docker --user): a permission problem, not someone's scan
    locked.add(str((tmp_path / "earlier.nii.gz").resolve()))
    rc, _, err = infer("--ckpt", random_ckpt, "--out", str(tmp_path / "earlier.nii.gz"), "--t2", case["t2"])
    assert rc == 2 and "earlier.nii.gz is not readable by user id" in err and "not written by" not in err, err
    for path in (case["t2"], random_ckpt):
        locked.clear()
        locked.add(str(Path(path).resolve()))
        rc, _, err = infer("--ckpt", random_ckpt, "--out", str(tmp_path / "seg.nii.gz"), "--t2", case["t2"])
        assert rc == 2 and f"{Path(path).name} is not readable by user id" in err and "chmod a+r" in err, err
        assert "corrupt" not in err and not (tmp_path / "seg.nii.gz").exists()


def test_reference_segmentation_is_never_overwritten(case, random_ckpt, infer, tmp_path, capsys):
    """``<case>_seg.nii.gz`` is the natural name for a prediction, and also the name of BraTS's own
    reference label: an existing image the product did not write is refused, in one case and in a batch."""
    from app.inference.batch import main as batch_main

    folder = Path(case["flair"]).parent
    label = folder / "Phantom_000_seg.nii.gz"
    before = label.read_bytes()
    rc, _, err = infer("--ckpt", random_ckpt, "--case-dir", str(folder), "--out", str(label))
    assert rc == 2 and "Phantom_000_seg.nii.gz already exists and was not written by this product" in err, err
    assert label.read_bytes() == before
    # its own earlier output is replaced as before
    ours = tmp_path / "pred.nii.gz"
    for _ in range(2):
        rc, _, err = infer("--ckpt", random_ckpt, "--case-dir", str(folder), "--out", str(ours))
        assert rc == 0, err
    # MSD layout, batch written into labelsTr: every case fails, no label changes
    msd = tmp_path / "Task01"
    (msd / "imagesTr").mkdir(parents=True)
    (msd / "labelsTr").mkdir()
    image = nib.load(case["flair"])
    data = np.stack([np.asarray(nib.load(case[s]).dataobj) for s in ("flair", "t1", "t1ce", "t2")], axis=-1)
    nib.save(nib.Nifti1Image(data, image.affine), msd / "imagesTr" / "BRATS_001.nii.gz")
    nib.save(nib.load(str(label)), msd / "labelsTr" / "BRATS_001.nii.gz")
    (msd / "dataset.json").write_text('{"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}, '
                                      '"labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", '
                                      '"3": "enhancing tumour"}}')
    kept = (msd / "labelsTr" / "BRATS_001.nii.gz").read_bytes()
    capsys.readouterr()
    assert batch_main(["--ckpt", random_ckpt, "--input-dir", str(msd), "--output-dir", str(msd / "labelsTr"),
                       "--device", "cpu"]) == 2
    assert (msd / "labelsTr" / "BRATS_001.nii.gz").read_bytes() == kept
    # batch mode has no --out: the hint names what the user can change there
    err = capsys.readouterr().err
    assert f"case BRATS_001: Output {msd / 'labelsTr' / 'BRATS_001.nii.gz'} already exists" in err, err
    assert "choose another output folder, or move that file away first" in err and "--out" not in err, err


def test_json_summary_never_replaces_a_file_the_product_did_not_write(case, random_ckpt, infer, tmp_path):
    """``--summary notes.json`` used to overwrite the user's file: like an image, an existing JSON file
    is replaced only when it is one of the product's own summaries."""
    out = tmp_path / "out"
    out.mkdir()
    for name, text in (("notes.json", '{"mine": 1}\n'), ("list.json", "[1, 2]\n"), ("broken.json", "{not json")):
        (out / name).write_text(text)
        rc, stdout, err = infer("--ckpt", random_ckpt, "--flair", case["flair"], "--out", out / "seg.nii.gz",
                                "--summary", out / name)
        assert rc == 2 and stdout == "" and len(err.strip().splitlines()) == 1, err
        assert f"--summary {out / name} already exists and was not written by this product" in err, err
        assert "choose another output name, or move that file away first" in err
        assert (out / name).read_text() == text
        assert all(p.suffix == ".json" for p in out.iterdir()), "no output or temporary file may be left behind"
    for _ in range(2):  # its own summary, of this or another case, is replaced
        rc, _, err = infer("--ckpt", random_ckpt, "--flair", case["flair"], "--out", out / "seg.nii.gz",
                           "--summary", out / "seg.json")
        assert rc == 0, err
    rc, _, err = infer("--ckpt", random_ckpt, "--case-dir", Path(case["flair"]).parent, "--out", out / "seg.nii.gz",
                       "--summary", out / "seg.json")
    assert rc == 0, err


@pytest.mark.parametrize("stage", ["network", "writing"])
def test_sigterm_stops_cleanly_with_nothing_partial(stage, case, random_ckpt, tmp_path, monkeypatch, capsys):
    """``docker stop`` or a scheduler's cancel sends SIGTERM: the run ends with one line and status 143,
    and neither an output nor a temporary file is left, whether it stops in the network or mid-write."""
    import signal

    import app.inference.pipeline as pipeline
    from app.atomic import run_interruptible
    from app.inference.cli import main as infer_main

    def terminate():  # the handler runs as soon as this returns, in the main thread
        os.kill(os.getpid(), signal.SIGTERM)

    if stage == "network":
        real = pipeline.sliding_window_inference
        monkeypatch.setattr(pipeline, "sliding_window_inference", lambda *a, **k: (terminate(), real(*a, **k))[1])
    else:
        real_save = pipeline.nib.save
        monkeypatch.setattr(pipeline.nib, "save", lambda img, path: (real_save(img, path), terminate()))
    out = tmp_path / "out"
    out.mkdir()
    previous = signal.getsignal(signal.SIGTERM)
    rc = run_interruptible(lambda: infer_main(["--ckpt", random_ckpt, "--flair", case["flair"], "--out",
                                               str(out / "seg.nii.gz"), "--probabilities", str(out / "p.nii.gz")]))
    err = capsys.readouterr().err
    assert rc == 143 and err.startswith("error: stopped by SIGTERM") and err.count("\n") == 1, err
    assert _files(out) == set()
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is the tool's only while it runs


@pytest.mark.parametrize("error", [
    MemoryError("Unable to allocate 1.2 GiB for an array with shape (4, 240, 240, 155)"),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 210567168 bytes."),
])
def test_a_case_too_large_for_memory_is_one_line(error, case, random_ckpt, infer, tmp_path, monkeypatch):
    """Running out of memory on a large scan gives one line naming the scan and the fix (smaller
    windows), exit status 2 and no output, not a traceback."""
    import app.inference.pipeline as pipeline

    def network(*args, **kwargs):
        raise error

    monkeypatch.setattr(pipeline, "sliding_window_inference", network)
    out = tmp_path / "seg.nii.gz"
    rc, _, err = infer("--ckpt", random_ckpt, "--flair", case["flair"], "--t2", case["t2"], "--out", out,
                       "--summary", tmp_path / "seg.json", "--device", "cpu")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {case['flair']}: not enough memory on cpu") and "--patch-size 96 96 96" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Phantom_000"]


def test_a_scan_too_large_for_memory_is_not_called_corrupt(case, random_ckpt, infer, tmp_path, monkeypatch):
    """An intact scan whose voxels do not fit in the memory left (a container's --memory limit) is named
    as a memory problem, not as a corrupt or truncated file to re-export."""
    def no_memory(self, *args, **kwargs):
        raise MemoryError("Unable to allocate 400. MiB for an array with shape (512, 512, 400) and data type float32")

    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", no_memory)
    out = tmp_path / "seg.nii.gz"
    rc, _, err = infer("--ckpt", random_ckpt, "--flair", case["flair"], "--out", out)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: Not enough memory to read {case['flair']} (shape (32, 32, 32), 0 MiB in memory)")
    assert "corrupt" not in err and "more free memory" in err and not out.exists()


def test_a_full_disk_names_the_output_and_the_fix(case, random_ckpt, infer, tmp_path, monkeypatch):
    """The disk's own error (``[Errno 28] No space left on device``) names neither file nor fix."""
    import errno

    import app.inference.pipeline as pipeline

    def full_disk(img, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline.nib, "save", full_disk)
    out_dir = tmp_path / "out"
    rc, _, err = infer("--ckpt", random_ckpt, "--flair", case["flair"], "--out", out_dir / "seg.nii.gz")
    assert rc == 2 and err.count("\n") == 1 and "[Errno" not in err
    assert f"error: Cannot write {out_dir / 'seg.nii.gz'} (No space left on device): free space on that disk" in err
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_a_rerun_removes_what_a_killed_run_was_writing(case, random_ckpt, infer, tmp_path):
    """``infer`` killed while writing (SIGKILL, the OOM killer: nothing can clean up) left a hidden
    temporary file beside ``--out``, and every rerun kept it. The rerun removes those whose process
    is gone; one of a process still writing the same output stays."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    abandoned = [out_dir / f".seg.0123abcd-{dead_pid}.tmp.nii.gz", out_dir / f".prob.89abcdef-{dead_pid}.tmp.nii.gz"]
    running = out_dir / f".seg.fedcba98-{os.getpid()}.tmp.nii.gz"  # this process is alive
    for path in (*abandoned, running):
        path.write_bytes(b"half a label map")
    rc, _, err = infer("--ckpt", random_ckpt, "--flair", case["flair"], "--out", out_dir / "seg.nii.gz",
                       "--probabilities", out_dir / "prob.nii.gz")
    assert rc == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(["prob.nii.gz", "seg.nii.gz", running.name])

"""The bad-input classes of docs/bad_inputs.md that no other test covers.

Training-side cases go through ``LoadCased`` (the first transform of the bundle's preprocessing, whose
``CaseError`` ends a bundle run with exit status 1); inference cases through ``python -m app infer``
in-process (exit status 2, one stderr line, no output). No class of the catalogue is a known gap,
so no test here is marked ``xfail``; a class found unhandled gets an ``xfail(strict=True)`` test stating
the wanted behaviour (it fails the suite once the gap is fixed, so the marker and the catalogue entry
are updated together).
"""

from __future__ import annotations

import gzip
import io
import shutil
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine

from app.__main__ import main as app_main
from app.data import LoadCased, discover_cases, prepare_datalist
from app.data.errors import CaseError
from app.data.phantoms import write_phantoms
from app.engines import (
    ResumableCheckpoint, distributed_device, init_distributed, load_training_checkpoint, load_weights,
)
from app.networks import DSUNet
from app.subsets import BRATS_MODALITIES
from tests.inference.conftest import needs_simpleitk

FEATURES = [4, 8, 16]


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_phantoms(root, cases=1, size=24, seed=0)
    return root


@pytest.fixture
def case(phantom_root, tmp_path):
    """A private copy of one 24^3 phantom case: ``{sequence or "seg": path, "root": dataset folder}``."""
    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    paths = {s: root / "Phantom_000" / f"Phantom_000_{s}.nii.gz" for s in (*BRATS_MODALITIES, "seg")}
    return {**paths, "root": root}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(DSUNet(features=FEATURES).state_dict(), path)
    return path


@pytest.fixture
def infer(ckpt, capfd, tmp_path):
    """``infer(*args) -> (exit status, stderr lines)`` of ``python -m app infer``; checks no output is left.

    ``capfd`` also sees what C++ libraries (ITK) print on file descriptor 2.
    """

    def run(*args):
        out = tmp_path / "out"
        out.mkdir(exist_ok=True)
        capfd.readouterr()
        rc = app_main(["infer", "--ckpt", str(ckpt), "--out", str(out / "seg.nii.gz"), "--patch-size", "16", "16",
                       "16", *map(str, args)])
        err = capfd.readouterr().err
        if rc != 0:
            assert list(out.iterdir()) == [], "a failed inference must not leave output behind"
        return rc, err.strip().splitlines()

    return run


def load_training_case(root):
    """What the training bundle does with each case: discovery, then ``LoadCased``."""
    (record,) = discover_cases(root, require_label=True)
    return LoadCased()(record)


def _save_like(path, data, ref):
    img = nib.load(ref)
    nib.save(nib.Nifti1Image(np.asarray(data), img.affine), str(path))


def _rewrite_header(path, shape):
    """Keep the voxel bytes of ``path`` but make its header claim ``shape``."""
    raw = gzip.decompress(path.read_bytes())
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    header.set_data_shape(shape)
    offset = int(header["vox_offset"])
    path.write_bytes(gzip.compress(header.binaryblock + raw[len(header.binaryblock):offset] + raw[offset:]))


def _bit_rot(path):
    """Flip bytes in the middle of the voxel data of a .nii.gz; the gzip CRC no longer matches.

    The file is re-compressed with stored (uncompressed) deflate blocks so the damage can never be
    a zlib format error: only the CRC at the end of the stream shows it, as with real bit rot.
    """
    raw = gzip.decompress(path.read_bytes())
    stored = bytearray(gzip.compress(raw, compresslevel=0))
    mid = len(stored) // 2
    for i in range(mid, mid + 256):
        stored[i] ^= 0x5A
    path.write_bytes(bytes(stored))


# -- corrupt and truncated files ---------------------------------------------------------------------
def test_corrupt_gzip_training(case):
    _bit_rot(case["t2"])
    with pytest.raises(CaseError, match=r"Phantom_000_t2\.nii\.gz.*corrupt"):
        load_training_case(case["root"])


def test_corrupt_gzip_inference(case, infer):
    _bit_rot(case["t2"])
    rc, err = infer("--flair", case["flair"], "--t2", case["t2"])
    assert rc == 2 and len(err) == 1 and "Phantom_000_t2.nii.gz" in err[0] and "corrupt" in err[0]


def test_truncated_nifti_training(case):
    raw = gzip.decompress(case["t1"].read_bytes())
    case["t1"].write_bytes(gzip.compress(raw[: len(raw) // 2]))  # a valid gzip holding half the voxels
    with pytest.raises(CaseError, match=r"Phantom_000_t1\.nii\.gz holds \d+ bytes of voxels, but its header describes "
                                        r".*truncated"):
        load_training_case(case["root"])


def test_header_claims_more_voxels_than_the_file_holds(case, infer):
    _rewrite_header(case["flair"], (24, 24, 30))
    with pytest.raises(CaseError, match=r"Phantom_000_flair\.nii\.gz holds \d+ bytes of voxels, but its header "
                                        r"describes \(24, 24, 30\)"):
        load_training_case(case["root"])
    rc, err = infer("--flair", case["flair"])
    assert rc == 2 and len(err) == 1 and "header describes (24, 24, 30)" in err[0] and "Phantom_000_flair" in err[0]


def test_header_claims_fewer_voxels_next_to_other_sequences(case, infer):
    _rewrite_header(case["t2"], (24, 24, 20))  # the file holds 24 slices
    with pytest.raises(CaseError, match=r"Phantom_000_t2\.nii\.gz holds at least \d+ bytes beyond .*header's dimensions"):
        load_training_case(case["root"])
    rc, err = infer("--flair", case["flair"], "--t2", case["t2"])
    assert rc == 2 and len(err) == 1 and "Phantom_000_t2.nii.gz" in err[0] and "header's dimensions" in err[0]


def test_header_claims_fewer_voxels_alone(case, infer):
    _rewrite_header(case["flair"], (24, 24, 20))
    rc, err = infer("--flair", case["flair"])
    assert rc == 2 and len(err) == 1 and "Phantom_000_flair.nii.gz" in err[0] and "header's dimensions" in err[0]


# -- voxel values ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, 7])
def test_constant_volume_training(case, value):
    _save_like(case["t1"], np.full((24, 24, 24), value, np.int16), case["t1"])
    with pytest.raises(CaseError, match=r"Phantom_000_t1\.nii\.gz is constant .*remove it so the sequence counts as missing"):
        load_training_case(case["root"])


# -- geometry ----------------------------------------------------------------------------------------
def test_orientation_differs_between_sequences_training(case):
    """An axis-reversed copy is the same grid and is reordered exactly; another grid is refused."""
    img = nib.load(case["t2"])
    before = load_training_case(case["root"])["image"][3].numpy()
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, img.shape[0] - 1  # same voxels in space, stored with the first axis reversed
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), img.affine @ flip), str(case["t2"]))
    np.testing.assert_array_equal(load_training_case(case["root"])["image"][3].numpy(), before)
    # one more slice before the first axis: the same anatomy on a larger grid, which training does not resample
    shift = np.eye(4)
    shift[0, 3] = -1
    padded = np.concatenate([np.zeros((1, *img.shape[1:]), dtype=img.get_data_dtype()), np.asarray(img.dataobj)])
    nib.save(nib.Nifti1Image(padded, img.affine @ shift), str(case["t2"]))
    with pytest.raises(CaseError, match=r"Phantom_000_t2\.nii\.gz and .*different grids.*Resample/register"):
        load_training_case(case["root"])


# -- folders and cases -------------------------------------------------------------------------------
def test_empty_folder_in_discovery_training_and_inference(tmp_path, infer):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CaseError, match=f"No cases found under {empty}"):
        discover_cases(empty)
    with pytest.raises(CaseError, match="No cases found"):
        prepare_datalist(empty, tmp_path / "run")
    rc, err = infer("--case-dir", empty)
    assert rc == 2 and len(err) == 1 and "No cases found" in err[0]


def test_training_needs_two_cases(case, tmp_path):
    with pytest.raises(ValueError, match=r"holds 1 labelled case\(s\): training needs at least 2"):
        prepare_datalist(case["root"], tmp_path / "run")


def test_one_sequence_given_twice_to_inference(case, infer):
    rc, err = infer("--flair", case["flair"], "--input", f"t2f={case['t1']}")
    assert rc == 2 and len(err) == 1 and "given twice" in err[0]
    # the same flag twice: argparse alone would keep the last file (a T1 segmented as FLAIR)
    rc, err = infer("--flair", case["flair"], "--flair", case["t1"])
    assert rc == 2 and len(err) == 1 and "Sequence 'flair' given twice" in err[0] and str(case["t1"]) in err[0]


# -- DICOM -------------------------------------------------------------------------------------------
def _write_series(nifti, folder, series_uid="1.2.826.0.1.3680043.2.1125.1.2"):
    """One DICOM file per slice, with the volume's orientation and slice positions (oblique too)."""
    import SimpleITK as sitk

    folder.mkdir(exist_ok=True)
    img = sitk.Cast(sitk.ReadImage(str(nifti)), sitk.sitkInt16)
    cosines = np.asarray(img.GetDirection()).reshape(3, 3)
    orientation = "\\".join(f"{v:.6f}" for v in (*cosines[:, 0], *cosines[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        sl = img[:, :, k:k + 1]  # a 3D slice keeps the full direction cosines
        for tag, value in {"0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": series_uid,
                           "0008|0060": "MR", "0020|0013": str(k + 1), "0020|0037": orientation}.items():
            sl.SetMetaData(tag, value)
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))))
        writer.SetFileName(str(folder / f"{series_uid[-1]}_{k:03d}.dcm"))
        writer.Execute(sl)
    return folder


def _folder_without_dicom(tmp_path):
    folder = tmp_path / "t2_dicom"
    folder.mkdir()
    (folder / "IM0001.dcm").write_bytes(b"not a DICOM file" * 64)
    return folder


@needs_simpleitk
def test_folder_without_dicom_series(case, infer, tmp_path):
    folder = _folder_without_dicom(tmp_path)
    rc, err = infer("--flair", case["flair"], "--t2", folder)
    assert rc == 2 and f"{folder} holds no DICOM series" in err[-1]


def test_dicom_folder_without_simpleitk_names_the_fix(case, infer, tmp_path, monkeypatch):
    folder = _folder_without_dicom(tmp_path)
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # import SimpleITK now raises ImportError
    rc, err = infer("--flair", case["flair"], "--t2", folder)
    assert rc == 2 and len(err) == 1
    assert f"{folder} is a folder (DICOM series) but SimpleITK is not installed: pip install SimpleITK" in err[0]


def test_folder_without_dicom_series_prints_one_line(case, infer, tmp_path):
    folder = _folder_without_dicom(tmp_path)
    rc, err = infer("--flair", case["flair"], "--t2", folder)
    assert rc == 2 and len(err) == 1


@needs_simpleitk
def test_folder_with_two_dicom_series(case, infer, tmp_path):
    folder = _write_series(case["t2"], tmp_path / "t2_dicom", series_uid="1.2.3.4.1")
    _write_series(case["t1"], folder, series_uid="1.2.3.4.2")
    rc, err = infer("--flair", case["flair"], "--t2", folder)
    assert rc == 2 and "holds 2 DICOM series" in err[-1] and "own folder" in err[-1]


@needs_simpleitk
@pytest.mark.parametrize("with_other", [False, True])
def test_dicom_series_with_a_truncated_slice(case, infer, tmp_path, with_other):
    folder = _write_series(case["t2"], tmp_path / "t2_dicom")
    broken = sorted(folder.iterdir())[10]
    broken.write_bytes(broken.read_bytes()[:200])  # GDCM would skip it and segment the other slices
    args = ["--flair", case["flair"]] if with_other else []
    rc, err = infer(*args, "--t2", folder)  # the fixture checks that nothing was written
    assert rc == 2 and len(err) == 1
    assert f"{folder} has 1 DICOM file(s) that could not be read" in err[-1] and broken.name in err[-1]
    assert "re-export the complete series" in err[-1]


@needs_simpleitk
def test_dicom_series_with_a_missing_slice(case, infer, tmp_path):
    folder = _write_series(case["t2"], tmp_path / "t2_dicom")
    files = sorted(folder.iterdir())
    files[10].unlink()
    rc, err = infer("--t2", folder)
    assert rc == 2 and "not evenly spaced" in err[-1] and files[9].name in err[-1] and files[11].name in err[-1]


@needs_simpleitk
def test_oblique_dicom_series_keeps_its_geometry_and_a_missing_slice_is_caught(case, tmp_path):
    from app.inference.io import read_volume

    img = nib.load(case["t2"])
    tilt = np.deg2rad(30)
    rotation = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
    affine = img.affine.copy()
    affine[:3, :3] = rotation @ affine[:3, :3] @ np.diag([1.0, 1.0, 1.5])  # oblique, 1.5 mm slices
    oblique = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), oblique)
    folder = _write_series(oblique, tmp_path / "t2_dicom")
    volume = read_volume(folder, "t2")
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(volume.data, np.asarray(img.dataobj).astype(np.int16))
    files = sorted(folder.iterdir())
    files[5].unlink()
    with pytest.raises(CaseError, match=r"not evenly spaced \(3 mm between .*_004\.dcm and .*_006\.dcm, 1\.5 mm"):
        read_volume(folder, "t2")


@needs_simpleitk
def test_dicom_series_next_to_other_files_is_read(case, infer, tmp_path):
    folder = _write_series(case["t2"], tmp_path / "t2_dicom")
    (folder / "notes.txt").write_text("acquired on scanner 2")
    (folder / "thumbnail.png").write_bytes(b"\x89PNG" + bytes(300))
    (folder / "DICOMDIR").write_bytes(bytes(128) + b"DICM" + bytes(200))  # the index of a DICOM export
    rc, err = infer("--t2", folder)
    assert rc == 0, err
    assert nib.load(tmp_path / "out" / "seg.nii.gz").shape == nib.load(case["t2"]).shape


# -- checkpoints -------------------------------------------------------------------------------------
class _Payload:
    """Pickles as a call to ``open(marker, "w")``: loading it without ``weights_only`` creates the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_checkpoints_holding_code_are_refused_without_running_it(ckpt, infer, tmp_path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": torch.load(ckpt, weights_only=True), "extra": _Payload(marker)}, evil)
    with pytest.raises(ValueError, match=r"Cannot read checkpoint .*evil\.pt"):
        load_weights(DSUNet(features=FEATURES), evil)
    with pytest.raises(ValueError, match=r"Cannot read training checkpoint .*evil\.pt"):
        load_training_checkpoint(evil)
    rc, err = infer("--ckpt", evil, "--flair", tmp_path / "unused.nii.gz")
    assert rc == 2 and "evil.pt" in err[-1]
    assert not marker.exists(), "unpickling ran code from the checkpoint"


def _engine(epoch_length=3):
    engine = Engine(lambda e, b: None)
    engine.state.epoch_length, engine.state.max_epochs, engine.state.iteration = epoch_length, 2, 2
    return engine


def _handler(save_dir, features, resume="false"):
    net = DSUNet(features=features)
    return ResumableCheckpoint(save_dir, net, torch.optim.AdamW(net.parameters()), resume=resume)


def test_resume_with_another_network_configuration(tmp_path):
    _handler(tmp_path, FEATURES).save(_engine())
    other = _handler(tmp_path, [4, 8])
    with pytest.raises(ValueError, match="different network configuration") as err:
        other.restore(_engine(), load_training_checkpoint(tmp_path / "checkpoint_last.pt"))
    message = str(err.value)
    assert "features [4, 8, 16]" in message and "features [4, 8]" in message and "--features" in message
    # a sentence, not a shape dump (the checkpoint's path, whose length varies, left out)
    assert "size mismatch" not in message and len(message.replace(str(tmp_path), "")) < 400


def test_resume_with_another_epoch_length(tmp_path):
    _handler(tmp_path, FEATURES).save(_engine(epoch_length=3))
    with pytest.raises(ValueError, match=r"3 iterations per epoch, this run has 5.*--epoch_length"):
        _handler(tmp_path, FEATURES).restore(_engine(epoch_length=5),
                                             load_training_checkpoint(tmp_path / "checkpoint_last.pt"))


def test_resume_from_a_corrupt_or_wrong_file(tmp_path, ckpt):
    corrupt = tmp_path / "checkpoint_last.pt"
    corrupt.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"Cannot read training checkpoint .*checkpoint_last\.pt.*--resume false"):
        load_training_checkpoint(corrupt)
    with pytest.raises(ValueError, match=r"model\.pt is not a training checkpoint.*checkpoint_last\.pt"):
        load_training_checkpoint(ckpt)
    with pytest.raises(FileNotFoundError, match=r"No training checkpoint at .*nowhere\.pt.*--resume"):
        load_training_checkpoint(tmp_path / "nowhere.pt")


# -- multi-process launch ----------------------------------------------------------------------------
def test_multi_gpu_config_without_torchrun(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match=r"torchrun --standalone --nproc_per_node N"):  # one line from the bundle
        init_distributed("gloo")
    with pytest.raises(ValueError, match=r"dist_backend must be one of \['nccl', 'gloo'\]"):
        init_distributed("mpi")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_nccl_without_gpu_names_gloo():
    with pytest.raises(ValueError, match=r"nccl needs CUDA GPUs.*--dist_backend gloo"):
        distributed_device("nccl")

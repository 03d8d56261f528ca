"""Fixtures for the inference tests: 32^3 phantom cases and tiny checkpoints (features [8, 16, 32, 64]).

The random-weights checkpoint serves grid, orientation and I/O tests (its probabilities vary from
voxel to voxel, which is what those tests compare). The "trained" checkpoint is the same network
after a few optimiser steps on phantoms, trained in-process in a few seconds instead of through the
bundle (which takes over a minute on 2 CPU cores).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import torch

from app.__main__ import main as app_main
from app.data.phantoms import write_phantoms
from app.networks import DSUNet
from app.subsets import BRATS_MODALITIES
from tests.bundles.helpers import BRATS_DEV

FEATURES = [8, 16, 32, 64]
FEATURE_ARGS = ["--features", "8", "16", "32", "64"]
REPO = Path(__file__).resolve().parents[2]
DEV = BRATS_DEV
# DICOM input is optional (SimpleITK is imported only for a folder input), so are its tests
needs_simpleitk = pytest.mark.skipif(importlib.util.find_spec("SimpleITK") is None,
                                     reason="SimpleITK (DICOM input) is not installed: pip install SimpleITK")


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """Run the tiny networks on one thread (restored afterwards).

    On a shared 2-core machine, two OpenMP threads that wait for each other at every barrier while
    other processes hold the cores made a training step 20x slower than one thread; the 32^3
    volumes gain nothing from a second thread anyway.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three 32^3 phantom cases (BraTS 2018 names, LPS-stored like the BraTS releases)."""
    root = tmp_path_factory.mktemp("phantoms")
    write_phantoms(root, cases=3, size=32, seed=7)
    return root


@pytest.fixture
def case(phantom_root: Path, tmp_path: Path) -> dict[str, str]:
    """A private copy of phantom case 0 (``{sequence: path}``), so tests may damage it."""
    src = phantom_root / "Phantom_000"
    dst = tmp_path / "Phantom_000"
    shutil.copytree(src, dst)
    return {seq: str(dst / f"Phantom_000_{seq}.nii.gz") for seq in BRATS_MODALITIES}


@pytest.fixture(scope="session")
def random_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """State dict of an untrained DS U-Net with features [8, 16, 32, 64]."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "random.pt"
    torch.save(DSUNet(features=FEATURES).state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny DS U-Net trained for a few steps on phantoms with random sequence subsets.

    Preprocessing as in train.yaml; 24^3 crops, batch 2 and 4 steps keep it to seconds on 2 CPU cores.
    """
    from monai.losses import DiceCELoss
    from monai.transforms import Compose, CropForegroundd, NormalizeIntensityd, Orientationd, SpatialPadd

    from app.data import LoadCased, discover_cases
    from app.subsets import subset_masks

    root = tmp_path_factory.mktemp("train")
    write_phantoms(root, cases=2, size=32, seed=0)
    prep = Compose([
        LoadCased(),
        Orientationd(keys=["image", "label"], axcodes="RAS"),
        CropForegroundd(keys=["image", "label"], source_key="image"),
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        SpatialPadd(keys=["image", "label"], spatial_size=[24, 24, 24]),
    ])
    samples = [prep(rec) for rec in discover_cases(root, require_label=True)]

    def centre(t: torch.Tensor) -> torch.Tensor:  # the 24^3 block around the centre of the crop
        lo = [(s - 24) // 2 for s in t.shape[1:]]
        return t[:, lo[0]:lo[0] + 24, lo[1]:lo[1] + 24, lo[2]:lo[2] + 24]

    images = torch.stack([centre(torch.as_tensor(s["image"])) for s in samples])
    labels = torch.stack([centre(torch.as_tensor(s["label"])) for s in samples])
    torch.manual_seed(0)
    net = DSUNet(features=FEATURES)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    loss_fn = DiceCELoss(sigmoid=True, smooth_dr=1e-5, smooth_nr=0.0, squared_pred=True)
    masks = subset_masks(4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        mask = masks[torch.randint(len(masks), (len(images),), generator=gen)]
        loss = loss_fn(net(images, mask), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = root / "model.pt"
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture
def infer(capsys: pytest.CaptureFixture) -> Callable[..., tuple[int, str, str]]:
    """``infer(*argv) -> (exit status, stdout, stderr)`` of ``python -m app infer`` run in-process."""

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = app_main(["infer", *[str(a) for a in argv]])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def load(path: str | os.PathLike) -> nib.Nifti1Image:
    return nib.load(str(path))


def assert_same_grid(out_path: str | os.PathLike, ref_path: str | os.PathLike) -> None:
    """The output lies exactly on the reference grid: shape, affine, qform/sform matrices and codes."""
    out, ref = load(out_path), load(ref_path)
    assert out.shape[:3] == ref.shape[:3]
    np.testing.assert_array_equal(out.affine, ref.affine)
    for key in ("qform_code", "sform_code"):
        assert int(out.header[key]) == int(ref.header[key]), key
    np.testing.assert_array_equal(out.header.get_qform(), ref.header.get_qform())
    np.testing.assert_array_equal(out.header.get_sform(), ref.header.get_sform())

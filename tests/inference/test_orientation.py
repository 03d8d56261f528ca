"""The output overlays the input exactly, whatever the storage order or obliquity of the scan.

The same anatomy is stored three more ways: RAS instead of the BraTS LPS order, with permuted axes,
and with an oblique (rotated) affine and distinct qform/sform codes. The network sees the same RAS
array each time, so the probability maps must be the same anatomy, stored the way the input was.
"""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

from app.inference.pipeline import reorient, upload

from tests.inference.conftest import assert_same_grid, load


def _restore(case: dict[str, str], tmp_path, name: str, transform) -> dict[str, str]:
    """Write every sequence through ``transform(data, affine) -> (data, affine, qform_code, sform_code)``."""
    out = {}
    for seq, path in case.items():
        img = load(path)
        data, affine, qcode, scode = transform(np.asarray(img.dataobj), img.affine)
        new = nib.Nifti1Image(np.ascontiguousarray(data), affine)
        new.set_qform(affine, code=qcode)
        new.set_sform(affine, code=scode)
        out[seq] = str(tmp_path / f"{name}_{seq}.nii.gz")
        nib.save(new, out[seq])
    return out


def _run(infer, ckpt, paths, tmp_path, name):
    prob = tmp_path / f"{name}_prob.nii.gz"
    out = tmp_path / f"{name}_seg.nii.gz"
    rc, _, err = infer("--ckpt", ckpt, "--flair", paths["flair"], "--t1ce", paths["t1ce"], "--out", out,
                       "--probabilities", prob, "--patch-size", "16", "16", "16")
    assert rc == 0, err
    assert_same_grid(out, paths["flair"])
    assert_same_grid(prob, paths["flair"])
    return np.asarray(load(out).dataobj), np.asarray(load(prob).dataobj)


def _flip_xy(data, affine):
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = data.shape[0] - 1, data.shape[1] - 1
    return data[::-1, ::-1], affine @ flip, 1, 1


def _permute(data, affine):
    perm = np.zeros((4, 4))
    perm[3, 3] = 1
    for new, old in enumerate((2, 0, 1)):
        perm[old, new] = 1  # new voxel axis `new` is old axis `old`
    return data.transpose(2, 0, 1), affine @ perm, 1, 1


def _oblique(data, affine):
    a, b = np.deg2rad(14.0), np.deg2rad(-9.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0, 0], [np.sin(a), np.cos(a), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    rx = np.array([[1, 0, 0, 0], [0, np.cos(b), -np.sin(b), 0], [0, np.sin(b), np.cos(b), 0], [0, 0, 0, 1]])
    shift = np.eye(4)
    shift[:3, 3] = [12.5, -30.25, 7.0]
    return data, shift @ rz @ rx @ affine, 1, 2  # scanner qform, aligned sform


@pytest.fixture
def baseline(case, random_ckpt, infer, tmp_path):
    labels, prob = _run(infer, random_ckpt, case, tmp_path, "lps")
    assert prob.std() > 0  # a constant map would make the comparisons below vacuous
    return labels, prob


def test_ras_storage_overlays(case, random_ckpt, infer, tmp_path, baseline):
    labels, prob = _run(infer, random_ckpt, _restore(case, tmp_path, "ras", _flip_xy), tmp_path, "ras")
    np.testing.assert_array_equal(labels, baseline[0][::-1, ::-1])
    np.testing.assert_allclose(prob, baseline[1][::-1, ::-1], atol=1e-6)


def test_permuted_axes_overlay(case, random_ckpt, infer, tmp_path, baseline):
    labels, prob = _run(infer, random_ckpt, _restore(case, tmp_path, "perm", _permute), tmp_path, "perm")
    np.testing.assert_array_equal(labels, baseline[0].transpose(2, 0, 1))
    np.testing.assert_allclose(prob, baseline[1].transpose(2, 0, 1, 3), atol=1e-6)


def test_oblique_affine_keeps_header_and_voxels(case, random_ckpt, infer, tmp_path, baseline):
    paths = _restore(case, tmp_path, "obl", _oblique)
    labels, prob = _run(infer, random_ckpt, paths, tmp_path, "obl")
    out = load(tmp_path / "obl_seg.nii.gz")
    assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 2
    # the rotation is small, so the closest RAS axes and hence the network input are unchanged
    np.testing.assert_array_equal(labels, baseline[0])
    np.testing.assert_allclose(prob, baseline[1], atol=1e-6)


_ORNTS = [np.array([[a, f0], [b, f1], [c, f2]], dtype=float)
          for a, b, c in itertools.permutations(range(3)) for f0, f1, f2 in itertools.product((1, -1), repeat=3)]


@pytest.mark.parametrize("layout", ["fortran", "c", "strided", "transposed", "reversed", "reversed_single_slice"])
def test_upload_and_reorient_match_nibabel(layout):
    rng = np.random.default_rng(0)
    data = rng.random((5, 6, 7), dtype=np.float32)
    arr = {
        "fortran": np.asfortranarray(data),  # NIfTI
        "c": data,  # DICOM
        "strided": rng.random((10, 6, 14), dtype=np.float32)[::2, :, ::2],
        "transposed": np.ascontiguousarray(data.transpose(1, 2, 0)).transpose(2, 0, 1),
        "reversed": np.asfortranarray(data)[::-1, :, ::-1],  # negative strides
        # numpy calls this C-contiguous (a size-1 axis's stride does not count), torch refuses its negative stride
        "reversed_single_slice": rng.random((5, 1, 7), dtype=np.float32)[:, ::-1],
    }[layout]
    uploaded = upload(arr, "cpu")
    np.testing.assert_array_equal(uploaded.numpy(), arr)  # the axes of the array, whatever its memory order
    for ornt in _ORNTS:
        np.testing.assert_array_equal(reorient(uploaded, ornt).numpy(), apply_orientation(arr, ornt))
        back = ornt_transform(axcodes2ornt("RAS"), ornt)
        np.testing.assert_array_equal(reorient(reorient(uploaded, ornt), back).numpy(), arr)


def test_reorient_keeps_leading_channels():
    prob = np.random.default_rng(1).random((3, 4, 5, 6), dtype=np.float32)
    ornt = _ORNTS[17]
    expected = apply_orientation(prob.transpose(1, 2, 3, 0), ornt)  # nibabel: channels last
    np.testing.assert_array_equal(reorient(torch.from_numpy(prob), ornt).permute(1, 2, 3, 0).numpy(), expected)

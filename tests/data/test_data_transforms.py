"""LoadCased / load_case: tensors, meta and channel order, and a CaseError naming the file for each bad input."""

from __future__ import annotations

import gzip
import json
import os
import struct
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.transforms import Compose, Orientationd, Spacingd

from app.data.discovery import discover_cases
from app.data.errors import CaseError
from app.data.labels import labels_to_regions
from app.data.transforms import RECORD_KEYS, LoadCased, load_case
from tests.data.helpers import case_error_and_peak, errors_of_call_on_pipe

SHAPE = (16, 16, 12)  # the default shape written by the make_case fixture


def only(records):
    assert len(records) == 1
    return records[0]


def test_load_case_with_missing_sequence(tmp_path, make_case, nested_label):
    affine = np.diag([-1.0, -1.0, 1.2, 1.0])
    affine[:3, 3] = [5.0, 7.0, -3.0]
    folder = make_case(tmp_path, "A_1", seqs=("flair", "t1ce", "t2"))
    for f in folder.iterdir():  # re-save everything on a non-trivial grid
        img = nib.load(f)
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), affine), str(f))
    rec = only(discover_cases(tmp_path))
    out = load_case(rec)

    image, label = out["image"], out["label"]
    assert isinstance(image, MetaTensor) and image.dtype == torch.float32 and image.shape == (4, 16, 16, 12)
    assert out["modality_mask"].dtype == torch.bool and out["modality_mask"].tolist() == [True, False, True, True]
    assert torch.count_nonzero(image[1]) == 0  # absent t1 is zeros
    flair = nib.load(rec["images"]["flair"]).get_fdata()
    np.testing.assert_array_equal(image[0].numpy(), flair)
    assert image[2].min() >= 300 and image[3].min() >= 400  # channel c holds sequence c (see make_case)
    np.testing.assert_allclose(image.affine.numpy(), affine)
    assert image.meta["filename_or_obj"] == rec["images"]["flair"]
    assert image.meta["case"] == "A_1"

    assert isinstance(label, MetaTensor) and label.dtype == torch.float32 and label.shape == (3, 16, 16, 12)
    expected = labels_to_regions(nested_label(SHAPE, (2, 4, 1)), "brats2018")
    np.testing.assert_array_equal(label.numpy(), expected)
    np.testing.assert_allclose(label.affine.numpy(), affine)
    assert label.meta["filename_or_obj"] == rec["label"]
    assert out["label_file"] == rec["label"] and out["images"] == rec["images"]


def test_load_cased_is_batchable_and_monai_spatial_transforms_work(tmp_path, make_case):
    make_case(tmp_path, "A_1", seqs=("flair", "t1", "t1ce", "t2"))
    make_case(tmp_path, "B_2", seqs=("t1ce",))
    records = discover_cases(tmp_path, require_label=True)
    transform = Compose([
        LoadCased(),
        Orientationd(keys=["image", "label"], axcodes="RAS", labels=None),
        Spacingd(keys=["image", "label"], pixdim=(2.0, 2.0, 2.0), mode=("bilinear", "nearest")),
    ])
    sample = transform(records[0])
    assert not set(RECORD_KEYS) & set(sample)
    assert set(sample) == {"case", "layout", "image", "label", "modality_mask"}
    assert sample["image"].shape == (4, 8, 8, 6) and sample["label"].shape == (3, 8, 8, 6)
    # cases with different sequences still collate because record paths were dropped
    batch = next(iter(DataLoader(Dataset(records, LoadCased()), batch_size=2, num_workers=0)))
    assert batch["image"].shape == (2, 4, 16, 16, 12)
    assert batch["modality_mask"].tolist() == [[True] * 4, [False, False, True, False]]
    assert batch["case"] == ["A_1", "B_2"]


def test_load_cased_options(tmp_path, make_case):
    make_case(tmp_path, "A_1")
    rec = only(discover_cases(tmp_path))
    out = LoadCased(load_label=False, keep_record=True)(rec)
    assert "label" not in out and out["label_file"] == rec["label"] and out["images"] == rec["images"]
    assert rec["label"].endswith("_seg.nii.gz")  # the input record is not modified


def _not_constant(shape) -> np.ndarray:
    """An int16 volume of 100s with one voxel of 200 (constant volumes, and volumes of label values
    only, are refused)."""
    data = np.full(shape, 100, dtype=np.int16)
    data.flat[0] = 200
    return data


def test_msd_4d_channels_follow_dataset_json(tmp_path, write_nii):
    desc = {"modality": {"0": "T2w", "1": "FLAIR", "2": "t1gd"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}}
    (tmp_path / "dataset.json").write_text(json.dumps(desc))
    data = np.stack([np.full(SHAPE, v, dtype=np.float32) for v in (40.0, 10.0, 30.0)], axis=-1)
    data[0, 0, 0] += 1.0  # not constant (constant volumes are refused), same channel means
    data[0, 0, 1] -= 1.0
    write_nii(tmp_path / "imagesTr" / "BRATS_001.nii.gz", data)
    lab = np.zeros(SHAPE, dtype=np.uint8)
    lab[2:4, 2:4, 2:4] = [[[1, 2], [3, 0]], [[0, 0], [0, 0]]]
    write_nii(tmp_path / "labelsTr" / "BRATS_001.nii.gz", lab)
    out = load_case(only(discover_cases(tmp_path)))
    assert [float(out["image"][c].mean()) for c in range(4)] == [10.0, 0.0, 30.0, 40.0]
    assert out["modality_mask"].tolist() == [True, False, True, True]
    # BRATS_MODALITIES order, not the order dataset.json lists the channels in (T2w, FLAIR, t1gd)
    assert out["modalities"] == ["flair", "t1ce", "t2"]
    assert out["label"][:, 2, 2, 2].tolist() == [1.0, 0.0, 0.0]  # 1 = edema: WT only
    assert out["label"][:, 2, 2, 3].tolist() == [1.0, 1.0, 0.0]  # 2 = non-enhancing: WT + TC
    assert out["label"][:, 2, 3, 2].tolist() == [1.0, 1.0, 1.0]  # 3 = enhancing
    assert out["image"].meta["filename_or_obj"].endswith("imagesTr/BRATS_001.nii.gz")

    write_nii(tmp_path / "imagesTr" / "BRATS_001.nii.gz", data[..., :2])
    with pytest.raises(CaseError, match=r"BRATS_001\.nii\.gz has 2 channel\(s\).*dataset\.json"):
        load_case(only(discover_cases(tmp_path)))


def test_a_channel_first_msd_image_is_told_to_be_saved_channel_last(tmp_path, write_nii):
    """A 4D image saved from a channel-first array ((4, X, Y, Z), as PyTorch and MONAI hold it) read its first
    slices as the sequences, and was refused only as a label on 'different grids', to be resampled."""
    rng = np.random.default_rng(0)
    _msd_4d(tmp_path, write_nii, [rng.normal(100, 10, SHAPE) for _ in range(4)])
    channel_last = nib.load(str(tmp_path / "imagesTr" / "BRATS_001.nii.gz"))
    write_nii(tmp_path / "imagesTr" / "BRATS_001.nii.gz", np.moveaxis(np.asarray(channel_last.dataobj), -1, 0))
    for load_label in (True, False):  # without the label (no grid to compare), it was read as it came
        with pytest.raises(CaseError) as err:
            load_case(only(discover_cases(tmp_path)), load_label=load_label)
        msg = str(err.value)
        assert "BRATS_001.nii.gz has shape (4, 16, 16, 12): its 4 channels lie along the first axis" in msg
        assert "as shape (16, 16, 12, 4)" in msg and "different grids" not in msg


def _msd_4d(root, write_nii, channels):
    """An MSD folder with one case whose 4D image holds ``channels`` (FLAIR, T1w, t1gd, T2w) and a label."""
    desc = {"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}}
    (root / "dataset.json").write_text(json.dumps(desc))
    write_nii(root / "imagesTr" / "BRATS_001.nii.gz", np.stack(channels, axis=-1).astype(np.float32))
    lab = np.zeros(SHAPE, dtype=np.uint8)
    lab[4:8, 4:8, 4:8] = 1
    write_nii(root / "labelsTr" / "BRATS_001.nii.gz", lab)


def test_msd_4d_all_zero_channel_is_a_missing_sequence(tmp_path, write_nii):
    # in a 4D file a sequence that was not acquired can only be an all-zero channel
    flair, t1ce, t2 = (_not_constant(SHAPE) * v for v in (1, 3, 4))
    _msd_4d(tmp_path, write_nii, [flair, np.zeros(SHAPE), t1ce, t2])
    records = discover_cases(tmp_path, require_label=True)
    out = load_case(only(records))
    assert out["modality_mask"].tolist() == [True, False, True, True]
    assert out["modalities"] == ["flair", "t1ce", "t2"]  # as for a case without a t1 file
    assert torch.count_nonzero(out["image"][1]) == 0
    np.testing.assert_array_equal(out["image"][3].numpy(), t2)
    assert out["label"].shape == (3, *SHAPE)
    # the batched mask the trainer and the evaluator read
    batch = next(iter(DataLoader(Dataset(records, LoadCased()), batch_size=1, num_workers=0)))
    assert batch["modality_mask"].tolist() == [[True, False, True, True]]


def test_msd_4d_constant_or_empty_channels_are_refused(tmp_path, write_nii):
    flair = _not_constant(SHAPE)
    _msd_4d(tmp_path, write_nii, [flair, np.full(SHAPE, 7.0), flair, flair])
    with pytest.raises(CaseError, match=r"BRATS_001\.nii\.gz \(channel 1, t1\) is constant \(every voxel is 7\).*"
                                        r"set the channel to 0"):
        load_case(only(discover_cases(tmp_path)))
    _msd_4d(tmp_path, write_nii, [np.zeros(SHAPE)] * 4)
    with pytest.raises(CaseError, match=r"BRATS_001\.nii\.gz: every channel is 0.*holds no image"):
        load_case(only(discover_cases(tmp_path)))


def test_all_zero_3d_file_is_refused(tmp_path, make_case, write_nii):
    # a 3D sequence is left out by removing its file, so an all-zero file is a mistake
    folder = make_case(tmp_path, "A_1")
    write_nii(folder / "A_1_t1.nii.gz", np.zeros(SHAPE, dtype=np.int16))
    with pytest.raises(CaseError, match=r"A_1_t1\.nii\.gz is constant \(every voxel is 0\).*remove it"):
        load_case(only(discover_cases(tmp_path)))


def test_label_map_given_as_a_sequence_is_refused(tmp_path, make_case, write_nii):
    """A segmentation under a sequence's name is refused by the check inference shares; MRI is not,
    whatever its type: int16 or float, with a large range or fractional values."""
    from app.data.transforms import check_voxels

    folder = make_case(tmp_path, "A_1")
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[2:6, 2:6, 2:6], labels[3:5, 3:5, 3:5] = 2, 4
    for dtype in (np.uint8, np.float32):
        write_nii(folder / "A_1_t2.nii.gz", labels.astype(dtype))
        with pytest.raises(CaseError, match=r"A_1_t2\.nii\.gz looks like a segmentation label map \(every voxel "
                                            r"is one of 0, 2, 4\).*pass the MRI sequence instead"):
            load_case(only(discover_cases(tmp_path)))
    rng = np.random.default_rng(0)
    for mri in (rng.integers(0, 1500, SHAPE).astype(np.int16), rng.normal(300, 80, SHAPE).astype(np.float32),
                rng.uniform(0, 4, SHAPE).astype(np.float32),  # rescaled to a small range: not integers
                np.where(labels > 0, 5 + labels, labels).astype(np.int16)):  # integers, but beyond the label values
        assert check_voxels(mri, "mri.nii.gz") == (float(mri.min()), float(mri.max()))


def test_a_mask_given_as_a_sequence_is_refused_as_inference_refuses_it(tmp_path, make_case, write_nii):
    """A brain mask saved as 0/255 under a sequence's name passed every check: normalised on its voxels that are not
    0 (standard deviation 0, replaced by 1) it became a present sequence of zeros, trained and segmented without a
    word. A 0/1 mask was already refused as a label map."""
    from app.data.transforms import check_voxels
    from app.inference.io import read_case

    folder = make_case(tmp_path, "A_1")
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[1:7, 2:6, 1:5] = 255
    write_nii(folder / "A_1_t2.nii.gz", mask)
    rec = only(discover_cases(tmp_path))
    expected = (r"A_1_t2\.nii\.gz( \(t2\))? holds a single value \(255\) on every voxel that is not 0: a mask, not an MRI "
                r"sequence .* pass the MRI sequence instead, or remove it")
    with pytest.raises(CaseError, match=expected):
        load_case(rec)
    with pytest.raises(CaseError, match=expected):
        read_case(rec["images"])
    with pytest.raises(CaseError, match=r"\(channel 3, t2\) holds a single value \(1000\).*set the channel to 0"):
        check_voxels(mask.astype(np.float32) * (1000 / 255), "img.nii.gz (channel 3, t2)", channel=True)
    # a head with one other intensity anywhere, or a volume without 0 (no mask), is an image
    two = mask.astype(np.float32)
    two[3, 3, 3] = 254.5
    assert check_voxels(two, "t2.nii.gz") == (0.0, 255.0)
    assert check_voxels(np.where(mask > 0, 255, 40).astype(np.int16), "t2.nii.gz") == (40.0, 255.0)


def test_sequences_on_different_grids(tmp_path, make_case, write_nii):
    folder = make_case(tmp_path, "A_1")
    t2 = folder / "A_1_t2.nii.gz"
    write_nii(t2, _not_constant((16, 16, 13)))
    with pytest.raises(CaseError, match=r"A_1_t2\.nii\.gz and .*A_1_flair\.nii\.gz.*Resample/register"):
        load_case(only(discover_cases(tmp_path)))
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    write_nii(t2, _not_constant(SHAPE), shifted)
    with pytest.raises(CaseError, match=r"A_1_t2\.nii\.gz.*different grids"):
        load_case(only(discover_cases(tmp_path)))
    nearly = np.eye(4)
    nearly[0, 3] = 1e-5  # float noise between exports is tolerated
    write_nii(t2, _not_constant(SHAPE), nearly)
    assert load_case(only(discover_cases(tmp_path)))["image"].shape == (4, *SHAPE)


def test_label_on_different_grid(tmp_path, make_case, write_nii):
    folder = make_case(tmp_path, "A_1")
    write_nii(folder / "A_1_seg.nii.gz", np.zeros((16, 16, 11), dtype=np.uint8))
    with pytest.raises(CaseError, match=r"A_1_seg\.nii\.gz and .*A_1_flair\.nii\.gz"):
        load_case(only(discover_cases(tmp_path)))
    # without the label the case still loads (inference)
    assert "label" not in load_case(only(discover_cases(tmp_path)), load_label=False)


@pytest.mark.parametrize("shape, match", [((16, 16), "2D"), ((16, 16, 12, 2), "4D")])
def test_image_not_3d(tmp_path, make_case, write_nii, shape, match):
    folder = make_case(tmp_path, "A_1")
    write_nii(folder / "A_1_t1.nii.gz", _not_constant(shape))
    with pytest.raises(CaseError, match=rf"A_1_t1\.nii\.gz is {match}"):
        load_case(only(discover_cases(tmp_path)))


def test_a_single_slice_is_refused_as_inference_refuses_it(tmp_path, make_case, write_nii):
    """One slice of a series saved as a 3D file (X*Y*1, a 2D export) was padded to the patch size and trained on
    (and scored) without a word, while inference refused it; both now share the check and its message."""
    folder = make_case(tmp_path / "brats", "A_1", shape=(16, 16, 1))
    with pytest.raises(CaseError, match=r"A_1_flair\.nii\.gz has shape \(16, 16, 1\), a single slice: expected a "
                                        r"3D volume; pass the whole 3D series"):
        load_case(only(discover_cases(tmp_path / "brats")), load_label=False)
    # an MSD 4D image of single slices
    (tmp_path / "msd").mkdir()
    _msd_4d(tmp_path / "msd", write_nii, [_not_constant((16, 1, 12)) * (k + 1) for k in range(4)])
    with pytest.raises(CaseError, match=r"BRATS_001\.nii\.gz has shape \(16, 1, 12, 4\), a single slice"):
        load_case(only(discover_cases(tmp_path / "msd")), load_label=False)


def test_a_sequence_without_a_positive_voxel_is_refused_as_inference_refuses_it(tmp_path, make_case, write_nii):
    """A sequence whose intensities an export shifted below 0 holds no head for the foreground crop (voxels above
    0): inference refused it, training trained on it without a word. Both now share the check and its message."""
    from app.inference.io import read_case

    folder = make_case(tmp_path, "A_1")
    write_nii(folder / "A_1_t2.nii.gz", _not_constant(SHAPE) - 1000)
    rec = only(discover_cases(tmp_path))
    expected = r"A_1_t2\.nii\.gz( \(t2\))? has no positive voxel \(range -900 to -800\): the model expects"
    with pytest.raises(CaseError, match=expected):
        load_case(rec)
    with pytest.raises(CaseError, match=expected):
        read_case(rec["images"])


def _without_orientation(path):
    """Re-save ``path`` with qform_code and sform_code 0, as a tool that drops the orientation writes it."""
    img = nib.load(str(path))
    out = nib.Nifti1Image(np.asarray(img.dataobj), None, img.header.copy())
    out.header.set_qform(None, code=0)
    out.header.set_sform(None, code=0)
    nib.save(out, str(path))


def test_an_image_without_orientation_on_another_grid_is_told_to_copy_the_geometry(tmp_path, make_case):
    """A T2 (or a segmentation) whose header lost its orientation gets nibabel's guessed affine, so training called
    it 'on different grids' and said to resample, which would move it by the guess; inference already said to copy
    the geometry. Both now give the same message."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [0.0, 15.0, 0.0]  # stored as BraTS stores its cases
    folder = make_case(tmp_path, "A_1")
    for f in folder.iterdir():
        img = nib.load(str(f))
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), str(f))
    _without_orientation(folder / "A_1_t2.nii.gz")
    with pytest.raises(CaseError) as err:
        load_case(only(discover_cases(tmp_path)))
    msg = str(err.value)
    assert msg.startswith(f"{folder / 'A_1_t2.nii.gz'} has no orientation in its header (qform_code and sform_code "
                          f"are 0), so where it lies relative to {folder / 'A_1_flair.nii.gz'} is unknown")
    assert f"fslcpgeom {folder / 'A_1_flair.nii.gz'} {folder / 'A_1_t2.nii.gz'}" in msg and "Resample" not in msg
    for f in folder.iterdir():  # every file without orientation: one (guessed) grid, read as it is
        _without_orientation(f)
    load_case(only(discover_cases(tmp_path)))
    for f in folder.iterdir():
        if "_seg" not in f.name:
            nib.save(nib.Nifti1Image(np.asarray(nib.load(str(f)).dataobj), affine), str(f))
    with pytest.raises(CaseError, match=r"A_1_seg\.nii\.gz has no orientation in its header .*fslcpgeom"):
        load_case(only(discover_cases(tmp_path)))


def _placed_in(path, code, shape=None):
    """Re-save ``path`` with sform and qform code ``code`` (1 scanner, 4 MNI 152), cropped to ``shape`` if given."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    if shape is not None:
        data = data[tuple(slice(0, n) for n in shape)]
    out = nib.Nifti1Image(data, img.affine)
    out.set_sform(img.affine, code=code)
    out.set_qform(img.affine, code=code)
    nib.save(out, str(path))


def test_sequences_on_different_grids_in_different_spaces_are_told_to_register_as_inference_tells(tmp_path,
                                                                                                   make_case):
    """A FLAIR registered to MNI 152 (sform code 4) beside a T1 in scanner coordinates (code 1), on another grid:
    training said to resample onto one grid, which would resample by the coordinates of two spaces, while inference
    said to register them into one space. Both now give the shared message."""
    from app.inference.io import read_case

    folder = make_case(tmp_path, "A_1", seqs=("flair", "t1"))
    _placed_in(folder / "A_1_flair.nii.gz", 4)
    _placed_in(folder / "A_1_t1.nii.gz", 1, shape=(16, 16, 11))
    rec = only(discover_cases(tmp_path))
    expected = (r"A_1_t1\.nii\.gz( \(t1\))? and .*A_1_flair\.nii\.gz( \(flair\))? lie on different grids in "
                r"different spaces \(scanner and MNI 152 coordinates, by their headers' sform/qform codes\).*register "
                r"them into one space")
    with pytest.raises(CaseError, match=expected) as err:
        load_case(rec)
    assert "Resample/register" not in str(err.value)
    with pytest.raises(CaseError, match=expected):
        read_case(rec["images"])
    # one grid in two spaces' codes: read as it is (the grid is the same, nothing is resampled)
    make_case(tmp_path, "A_1", seqs=("t1",), label=False)
    _placed_in(folder / "A_1_t1.nii.gz", 1)
    assert load_case(only(discover_cases(tmp_path)))["modalities"] == ["flair", "t1"]
    # codes 1 and 2 are one space: the grid message, with its resampling fix
    _placed_in(folder / "A_1_flair.nii.gz", 2)
    _placed_in(folder / "A_1_t1.nii.gz", 1, shape=(16, 16, 11))
    with pytest.raises(CaseError, match=r"are on different grids.*Resample/register"):
        load_case(only(discover_cases(tmp_path)))


def _with_singular_sform(path):
    """Rewrite the header bytes of ``path`` (nibabel will not save it) with qform_code 0 and an sform whose z row is
    0, as a converter writing pixdim 0 on an axis leaves it: a singular voxel-to-world matrix."""
    raw = bytearray(gzip.decompress(open(path, "rb").read()))
    struct.pack_into("<h", raw, 252, 0)  # qform_code
    struct.pack_into("<h", raw, 254, 1)  # sform_code: scanner
    struct.pack_into("<4f", raw, 312, 0.0, 0.0, 0.0, 0.0)  # srow_z
    open(path, "wb").write(gzip.compress(bytes(raw)))


@pytest.mark.parametrize("which", ["A_1_flair", "A_1_t2", "A_1_seg"])
def test_a_degenerate_voxel_to_world_matrix_is_refused_as_inference_refuses_it(tmp_path, make_case, which):
    """A singular affine (a zero sform row, pixdim 0) crashed training with nibabel's 'Unable to find out axis nan'
    (the grid comparison) or, in every file of a case, trained on it without a word, while inference refused it.
    Both now share the check and its message, which names the file."""
    from app.inference.io import read_case

    folder = make_case(tmp_path, "A_1")
    _with_singular_sform(folder / f"{which}.nii.gz")
    rec = only(discover_cases(tmp_path))
    expected = rf"{which}\.nii\.gz( \(\w+\))? has a degenerate voxel-to-world matrix .*: fix the header \(qform/sform\)"
    with pytest.raises(CaseError, match=expected):
        load_case(rec)
    if which != "A_1_seg":
        with pytest.raises(CaseError, match=expected):
            read_case(rec["images"])


def test_a_one_hot_4d_label_is_told_to_be_merged_into_one_label_map(tmp_path, make_case, write_nii):
    """A segmentation exported one channel per region (WT/TC/ET one-hot) was told to be split 'into one file
    per sequence' or described with an MSD dataset.json, fixes for an image that do not apply to a label."""
    folder = make_case(tmp_path, "A_1")
    regions = np.zeros((*SHAPE, 3), dtype=np.uint8)
    regions[4:8, 4:8, 4:8, 0] = 1
    write_nii(folder / "A_1_seg.nii.gz", regions)
    with pytest.raises(CaseError) as err:
        load_case(only(discover_cases(tmp_path)))
    msg = str(err.value)
    assert "A_1_seg.nii.gz is 4D (shape (16, 16, 12, 3)); a segmentation is one 3D label map" in msg
    assert "Merge its channels" in msg and "per sequence" not in msg and "dataset.json" not in msg


def test_a_sequence_that_is_a_copy_of_another_is_refused(tmp_path, make_case, write_nii):
    """A site that fills a missing sequence with a copy of another (T1 saved as T1ce, so every case has four
    files) trained and scored T1 as T1ce without a word; a case may lack a sequence instead."""
    import shutil

    folder = make_case(tmp_path / "brats", "A_1")
    shutil.copy(folder / "A_1_t1.nii.gz", folder / "A_1_t1ce.nii.gz")
    with pytest.raises(CaseError) as err:
        load_case(only(discover_cases(tmp_path / "brats")))
    msg = str(err.value)
    assert msg.startswith(f"{folder / 'A_1_t1ce.nii.gz'} (t1ce) holds the same voxels as {folder / 'A_1_t1.nii.gz'}")
    assert "counts as lacking t1ce" in msg
    # a real scan that agrees with another on the sampled voxels (every 997th), but not everywhere, is no copy
    t1 = nib.load(str(folder / "A_1_t1.nii.gz"))
    near = np.asarray(t1.dataobj).copy()
    near[0, 0, 1] += 1
    write_nii(folder / "A_1_t1ce.nii.gz", near, t1.affine)
    assert load_case(only(discover_cases(tmp_path / "brats")))["modalities"] == ["flair", "t1", "t1ce", "t2"]
    (folder / "A_1_t1ce.nii.gz").unlink()  # left out: the case lacks T1ce
    assert load_case(only(discover_cases(tmp_path / "brats")))["modalities"] == ["flair", "t1", "t2"]
    # in an MSD 4D image, a channel copied from another
    rng = np.random.default_rng(0)
    flair, t1 = (rng.normal(100, 10, SHAPE) for _ in range(2))
    (tmp_path / "msd").mkdir()
    _msd_4d(tmp_path / "msd", write_nii, [flair, t1, t1, rng.normal(100, 10, SHAPE)])
    with pytest.raises(CaseError, match=r"BRATS_001\.nii\.gz \(channel 2\) \(t1ce\) holds the same voxels as "
                                        r".*BRATS_001\.nii\.gz \(channel 1\) \(t1\)"):
        load_case(only(discover_cases(tmp_path / "msd")))


def test_trailing_singleton_dimension_is_accepted(tmp_path, make_case, write_nii):
    folder = make_case(tmp_path, "A_1")
    write_nii(folder / "A_1_t1.nii.gz", _not_constant((*SHAPE, 1)))
    assert load_case(only(discover_cases(tmp_path)))["image"].shape == (4, *SHAPE)


def test_nan_in_image(tmp_path, make_case, write_nii):
    folder = make_case(tmp_path, "A_1")
    data = np.ones(SHAPE, dtype=np.float32)
    data[1, 2, 3] = np.nan
    data[2, 2, 3] = np.inf
    write_nii(folder / "A_1_t1ce.nii.gz", data)
    with pytest.raises(CaseError, match=r"A_1_t1ce\.nii\.gz contains 2 NaN/Inf"):
        load_case(only(discover_cases(tmp_path)))


def test_unknown_label_values(tmp_path, make_case):
    make_case(tmp_path, "Brats18_X_1", label_values=(2, 3, 1))  # BraTS 2023 values under 2018 names
    with pytest.raises(CaseError, match=r"Brats18_X_1_seg\.nii\.gz contains values \[3\].*'brats2023'"):
        LoadCased()(only(discover_cases(tmp_path)))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_file(tmp_path, make_case, damage):
    folder = make_case(tmp_path, "A_1", shape=(24, 24, 24))
    path = folder / "A_1_flair.nii.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"not a nifti file at all" * 10)
    with pytest.raises(CaseError, match=r"A_1_flair\.nii\.gz.*(corrupt|truncated)"):
        load_case(only(discover_cases(tmp_path)))


def test_a_file_too_large_for_memory_is_not_called_corrupt(tmp_path, make_case, monkeypatch):
    """An intact file whose voxels do not fit in the memory left (a container's limit) is named as
    a memory problem, not as a corrupt file to re-export."""
    folder = make_case(tmp_path, "A_1", shape=(24, 24, 24))

    def no_memory(self, *args, **kwargs):
        raise MemoryError("Unable to allocate 54.0 KiB for an array with shape (24, 24, 24) and data type float32")

    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", no_memory)
    with pytest.raises(CaseError) as info:
        load_case(only(discover_cases(tmp_path)))
    message = str(info.value)
    assert message.startswith(f"Not enough memory to read {folder / 'A_1_flair.nii.gz'} (shape (24, 24, 24), 0 MiB")
    assert "not damaged" in message and "more free memory" in message and "corrupt" not in message


def _rewrite_nifti_gz(path, shape=None, surplus=0):
    """Rewrite ``path`` (.nii.gz) with its header claiming ``shape`` and ``surplus`` zero bytes after its voxels."""
    img = nib.load(str(path))
    header = img.header.copy()
    if shape is not None:
        header.set_data_shape(shape)
    raw = gzip.decompress(path.read_bytes())
    with gzip.open(path, "wb") as f:
        f.write(header.binaryblock + raw[len(header.binaryblock):])
        for _ in range(surplus // (1 << 20)):
            f.write(bytes(1 << 20))


def test_a_header_claiming_gigabytes_in_a_small_file_is_refused_before_the_memory_is_taken(tmp_path, make_case):
    """A file from elsewhere whose header claims a huge volume (here 400 MB of int16 voxels in a few kilobytes)
    made the reader allocate what the header asked for, and then called the file intact but too large for
    the machine's memory; a larger claim exhausts a shared server's memory. The stream's length shows it first."""
    folder = make_case(tmp_path, "A_1", shape=(24, 24, 24))
    path = folder / "A_1_flair.nii.gz"
    _rewrite_nifti_gz(path, shape=(1000, 1000, 200))
    message, peak = case_error_and_peak(lambda: load_case(only(discover_cases(tmp_path))))
    assert message.startswith(f"{path} holds ") and "(1000, 1000, 200) int16 voxels (400000000 bytes)" in message
    assert "truncated or its header's dimensions are wrong" in message and "not damaged" not in message
    assert peak < 50 * 2**20, f"{peak / 2**20:.0f} MiB allocated for a file of {path.stat().st_size} bytes"


def test_a_stream_longer_than_its_header_describes_is_not_decompressed_to_its_end(tmp_path, make_case, monkeypatch):
    """A gzip bomb: a header for a small volume followed by gigabytes of zeros that compress to almost nothing.
    The check used to decompress the whole stream before comparing its length with the header's; it stops at
    the first read past what the header describes."""
    folder = make_case(tmp_path, "A_1", shape=(24, 24, 24))
    path = folder / "A_1_flair.nii.gz"
    _rewrite_nifti_gz(path, surplus=64 << 20)
    decompressed = []
    real_read = gzip.GzipFile.read
    monkeypatch.setattr(gzip.GzipFile, "read", lambda self, *a: decompressed.append(len(chunk := real_read(self, *a)))
                        or chunk)
    with pytest.raises(CaseError, match=r"A_1_flair\.nii\.gz holds at least \d+ bytes beyond the \(24, 24, 24\) "
                                        r"voxels its header describes"):
        load_case(only(discover_cases(tmp_path)))
    assert sum(decompressed) < 40 << 20  # the stream holds 64 MiB more; the check reads 16 MiB at a time


@pytest.mark.parametrize("image_class", [nib.Nifti1Image, nib.Nifti2Image])
def test_header_extensions_larger_than_a_scan_holds_are_refused_before_they_are_read(tmp_path, make_case,
                                                                                     image_class):
    """nibabel reads a NIfTI's header extensions into memory when it opens the header, up to the voxel offset the
    file sets: 80 MiB of zeros in an extension (80 kB compressed) were read, and a few megabytes of them take
    gigabytes, in discovery (which opens every header of a folder) before any other check. NIfTI-2 keeps the
    offset elsewhere in a larger header, as an integer."""
    import struct

    folder = make_case(tmp_path, "A_1", shape=(24, 24, 24))
    path = folder / "A_1_flair.nii.gz"
    img = image_class.from_image(nib.load(str(path)))
    header, voxels = img.header.copy(), np.asarray(img.dataobj).astype(img.get_data_dtype()).tobytes(order="F")
    size = 80 << 20  # beyond the 64 MiB a scan's extensions may take
    start = len(header.binaryblock) + 4  # the voxels follow the header and its 4-byte extension flag
    header["vox_offset"] = start + size
    with gzip.open(path, "wb", compresslevel=1) as f:  # a valid file: nibabel reads it whole
        f.write(header.binaryblock + b"\x01\0\0\0" + struct.pack("<ii", size, 0))
        for _ in range((size - 8) // (1 << 20)):
            f.write(bytes(1 << 20))
        f.write(bytes((size - 8) % (1 << 20)) + voxels)
    message, peak = case_error_and_peak(lambda: load_case(only(discover_cases(tmp_path))))
    assert message.startswith(f"Cannot read {path} (ValueError: its header puts the voxels {start + size} bytes into "
                              "the file, behind 80 MiB of header extensions (at most 64 MiB are read)")
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB allocated"


def test_a_volume_larger_than_the_memory_left_is_refused_before_it_is_read(tmp_path, make_case, monkeypatch):
    """Linux hands out memory as it is filled, so a volume too large for what is left was read until the kernel's
    out-of-memory killer ended this run, or another process on a shared server. It is refused from its header."""
    folder = make_case(tmp_path, "A_1", shape=(24, 24, 24))
    monkeypatch.setattr("app.data.transforms.available_memory", lambda: 24 * 24 * 24 * 4 - 1, raising=False)
    read = []
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", lambda self, *a, **k: read.append(1))
    with pytest.raises(CaseError) as info:
        load_case(only(discover_cases(tmp_path)))
    assert str(info.value).startswith(f"Not enough memory to read {folder / 'A_1_flair.nii.gz'} (shape (24, 24, 24)")
    assert read == []


def test_a_named_pipe_under_a_scans_name_is_refused_instead_of_waited_on(tmp_path, make_case):
    """A data folder unpacked from an archive may hold a named pipe under a scan's name: opening it waited for a
    writer forever, so training, evaluation and inference hung instead of stopping with a message."""
    folder = make_case(tmp_path, "A_1", shape=(24, 24, 24))
    pipe = folder / "A_1_t2.nii.gz"
    pipe.unlink()
    os.mkfifo(pipe)
    record = only(discover_cases(tmp_path))
    outcome = errors_of_call_on_pipe(lambda: load_case(record), pipe, "reading the case")
    assert outcome == [f"{pipe} is a named pipe, not a file: it is not read (reading it would wait or run forever). "
                       "Replace it with the scan's file, or remove it."]


def test_missing_file(tmp_path, make_case):
    make_case(tmp_path, "A_1")
    rec = only(discover_cases(tmp_path))
    os.unlink(rec["images"]["t2"])
    with pytest.raises(CaseError, match=r"A_1_t2\.nii\.gz does not exist"):
        load_case(rec)


def test_absent_sequences_stay_zero_channels_through_the_bundle_augmentation(tmp_path, make_case):
    """The bundle's intensity shift moves every channel; ZeroAbsentSequencesd puts absent ones back to 0."""
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    from app.data.transforms import ZeroAbsentSequencesd

    make_case(tmp_path, "P1", seqs=("flair", "t1ce"))
    (record,) = discover_cases(tmp_path, require_label=True)
    parser = ConfigParser()
    parser.read_config(os.path.join(os.path.dirname(__file__), "..", "..", "bundles", "brats_gmd", "configs", "train.yaml"))
    parser["patch_size"] = [8, 8, 8]
    train = parser.get_parsed_content("train#preprocessing")
    assert any(isinstance(t, ZeroAbsentSequencesd) for t in train.transforms)
    set_determinism(0)
    for _ in range(6):
        for sample in train(record):
            mask = sample["modality_mask"]
            assert mask.tolist() == [True, False, True, False]
            assert (sample["image"][~mask] == 0).all() and (sample["image"][mask] != 0).any()
    set_determinism(None)
    # the input sample is not changed in place (a cached sample is reused every epoch)
    image = torch.ones(4, 2, 2, 2)
    out = ZeroAbsentSequencesd()({"image": image, "modality_mask": torch.tensor([True, False, True, False])})
    assert out["image"][:, 0, 0, 0].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert (image == 1).all()
    with pytest.raises(ValueError, match="channels"):
        ZeroAbsentSequencesd()({"image": torch.ones(3, 2, 2, 2), "modality_mask": torch.ones(4, dtype=torch.bool)})


def test_zero_absent_sequences_takes_allow_missing_keys_as_monai_dictionary_transforms_do():
    from app.data.transforms import ZeroAbsentSequencesd

    mask = torch.tensor([True, False, True, False])
    zero = ZeroAbsentSequencesd(keys=("image", "aux"), allow_missing_keys=True)
    out = zero({"image": torch.ones(4, 2, 2, 2), "modality_mask": mask})
    assert out["image"][:, 0, 0, 0].tolist() == [1.0, 0.0, 1.0, 0.0] and "aux" not in out
    assert zero({"label": torch.ones(3, 2, 2, 2)}).keys() == {"label"}  # no image key: the mask is not needed
    with pytest.raises(KeyError, match="aux"):
        ZeroAbsentSequencesd(keys=("image", "aux"))({"image": torch.ones(4, 2, 2, 2), "modality_mask": mask})
    with pytest.raises(KeyError, match="'modality_mask' \\(the modality mask\\) is not in the sample"):
        ZeroAbsentSequencesd()({"image": torch.ones(4, 2, 2, 2)})


def test_a_sequence_stored_in_another_voxel_order_is_put_on_the_reference_grid(tmp_path, make_case, write_nii):
    """One acquisition stored LPS by one converter and RAS by another lies on the same grid: its
    axes are flipped and permuted back (exact, no interpolation); a real difference is still refused."""
    folder = make_case(tmp_path, "A_1")
    ras = load_case(only(discover_cases(tmp_path)))
    ref_affine = np.asarray(ras["image"].affine, dtype=np.float64)
    t1 = np.asarray(nib.load(folder / "A_1_t1.nii.gz").dataobj)
    seg = np.asarray(nib.load(folder / "A_1_seg.nii.gz").dataobj)

    def stored_otherwise(volume):
        """The same voxels flipped in x and y and with x/z swapped, and the affine that keeps them in place."""
        img = nib.Nifti1Image(volume, ref_affine)
        ornt = np.array([[2, -1], [1, -1], [0, 1]])  # input axis i -> output axis ornt[i, 0], flipped if -1
        return img.as_reoriented(ornt)

    other = stored_otherwise(t1)
    assert other.shape != t1.shape and not np.allclose(other.affine, ref_affine)
    write_nii(folder / "A_1_t1.nii.gz", np.asarray(other.dataobj), other.affine)
    lab = stored_otherwise(seg)
    write_nii(folder / "A_1_seg.nii.gz", np.asarray(lab.dataobj), lab.affine)
    case = load_case(only(discover_cases(tmp_path)))
    np.testing.assert_array_equal(np.asarray(case["image"]), np.asarray(ras["image"]))
    np.testing.assert_array_equal(np.asarray(case["label"]), np.asarray(ras["label"]))
    assert np.allclose(np.asarray(case["image"].affine), ref_affine)
    assert np.allclose(np.asarray(case["label"].affine), ref_affine)  # the grid the label now lies on
    # reordered and also shifted by half a voxel: a different grid
    shifted = other.affine.copy()
    shifted[0, 3] += 0.5
    write_nii(folder / "A_1_t1.nii.gz", np.asarray(other.dataobj), shifted)
    with pytest.raises(CaseError, match=r"A_1_t1\.nii\.gz and .*A_1_flair\.nii\.gz are on different grids"):
        load_case(only(discover_cases(tmp_path)))


def test_a_sequence_stored_with_its_axes_rotated_is_put_on_the_reference_grid(tmp_path, make_case, write_nii):
    """A cyclic axis permutation (x->y, y->z, z->x, z flipped) is not its own inverse, unlike a swap:
    the reordering must map stored axis i to the reference axis it came from, not the other way."""
    folder = make_case(tmp_path, "A_1", shape=(10, 12, 14))  # three different lengths
    ras = load_case(only(discover_cases(tmp_path)))
    ref_affine = np.asarray(ras["image"].affine, dtype=np.float64)
    ornt = np.array([[1, 1], [2, -1], [0, 1]])
    for name in ("A_1_t2", "A_1_seg"):
        img = nib.Nifti1Image(np.asarray(nib.load(folder / f"{name}.nii.gz").dataobj), ref_affine).as_reoriented(ornt)
        assert img.shape == (14, 10, 12)  # stored axis 0 is reference z, 1 is x, 2 is y
        write_nii(folder / f"{name}.nii.gz", np.asarray(img.dataobj), img.affine)
    case = load_case(only(discover_cases(tmp_path)))
    assert case["image"].shape == (4, 10, 12, 14)
    np.testing.assert_array_equal(np.asarray(case["image"]), np.asarray(ras["image"]))
    np.testing.assert_array_equal(np.asarray(case["label"]), np.asarray(ras["label"]))


def test_an_unedited_inference_output_in_the_label_slot_is_not_read_as_the_reference(tmp_path, make_case, capsys):
    """``infer --case-dir P --out P/<case>_seg.nii.gz`` on an unlabelled case puts the model's own label map
    where discovery looks for the reference: training and evaluation read it as one, and an evaluation
    scored the model against its own output. A map corrected by hand since (the viewer keeps the header,
    not the checksum) is the user's reference and is read."""
    import nibabel as nib
    import torch

    from app.__main__ import main as app_main
    from app.networks import DSUNet

    folder = make_case(tmp_path / "data", "P1", label=False)
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    torch.save(DSUNet(features=(8, 16, 32, 64)).state_dict(), ckpt)
    out = folder / "P1_seg.nii.gz"
    assert app_main(["infer", "--ckpt", str(ckpt), "--case-dir", str(folder), "--out", str(out), "--quiet",
                     "--no-head-mask", "--device", "cpu"]) == 0, capsys.readouterr().err
    rec = only(discover_cases(tmp_path / "data", require_label=True))
    assert rec["label"] == str(out)
    with pytest.raises(CaseError, match=r"P1_seg\.nii\.gz is a label map written by this product's inference"):
        load_case(rec)
    # corrected by hand and saved with the same header: the user's reference now
    img = nib.load(str(out))
    edited = np.asarray(img.dataobj).copy()
    edited[2:6, 2:6, 2:6] = 2
    nib.save(nib.Nifti1Image(edited, img.affine, header=img.header), str(out))
    assert bytes(nib.load(str(out)).header["descrip"]).startswith(b"brats_gmd labels")
    assert load_case(rec)["label"].shape[0] == 3


@pytest.mark.parametrize("extension", [".Nii.gz", ".nII.GZ", ".Nii"])
def test_a_mixed_case_extension_is_read_as_discovery_finds_it(tmp_path, make_case, extension):
    """Discovery matches extensions in any case, but nibabel looked a mixed-case one (``.Nii.gz``) up under its
    own spelling (``.nii.gz``): loading said the file did not exist, and the training spacing went unrecorded."""
    import gzip

    from app.data.datalist import median_spacing

    folder = make_case(tmp_path, "A_1")
    for path in sorted(folder.glob("*.nii.gz")):
        target = path.with_name(path.name[: -len(".nii.gz")] + extension)
        if extension.lower() == ".nii":
            target.write_bytes(gzip.decompress(path.read_bytes()))
            path.unlink()
        else:
            path.rename(target)
    rec = only(discover_cases(tmp_path, require_label=True))
    assert rec["images"]["flair"].endswith(extension)
    out = load_case(rec)
    assert tuple(out["image"].shape) == (4, *SHAPE) and out["label"].shape[0] == 3
    assert median_spacing([rec]) is not None


def test_the_copy_check_takes_no_copy_of_volumes_read_in_fortran_order():
    """Inference reads NIfTI voxels in Fortran order; sampling them through a flattened view copied each volume for
    every pair compared (0.4 s per full-resolution BraTS case). The sample is now a strided view."""
    from app.data.transforms import check_distinct_sequences

    rng = np.random.default_rng(0)
    volumes = {s: np.asfortranarray(rng.normal(100, 10, (64, 64, 64)).astype(np.float32)) for s in ("flair", "t1")}
    tracemalloc.start()
    try:
        check_distinct_sequences(volumes, {s: f"{s}.nii.gz" for s in volumes})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < volumes["flair"].nbytes // 8, peak
    volumes["t1"] = volumes["flair"].copy(order="C")  # the same voxels in another memory order: still a copy
    with pytest.raises(CaseError, match=r"t1\.nii\.gz \(t1\) holds the same voxels as flair\.nii\.gz \(flair\)"):
        check_distinct_sequences(volumes, {s: f"{s}.nii.gz" for s in volumes})

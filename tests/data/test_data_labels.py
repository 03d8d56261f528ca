"""Label conventions: labels -> WT/TC/ET regions and back, and unknown-value errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.data.errors import CaseError
from app.data.labels import LABEL_CONVENTIONS, check_label_values, labels_to_regions, regions_to_labels

MSD_MAP = {"ncr": [2], "ed": [1], "et": [3]}


@pytest.mark.parametrize(
    "convention, label, wt, tc, et",
    [
        #            bg ncr ed et           WT          TC          ET
        ("brats2018", [0, 1, 2, 4], [0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]),
        ("brats2023", [0, 1, 2, 3], [0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]),
        # BraTS 2024: the resection cavity (4) is in no region
        ("brats2024", [0, 1, 4, 3], [0, 1, 0, 1], [0, 1, 0, 1], [0, 0, 0, 1]),
        (MSD_MAP, [0, 2, 1, 3], [0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]),
    ],
)
def test_labels_to_regions_by_hand(convention, label, wt, tc, et):
    lab = np.array(label, dtype=np.uint8).reshape(2, 2, 1)
    regions = labels_to_regions(lab, convention)
    assert regions.dtype == np.float32 and regions.shape == (3, 2, 2, 1)
    np.testing.assert_array_equal(regions[0].ravel(), wt)
    np.testing.assert_array_equal(regions[1].ravel(), tc)
    np.testing.assert_array_equal(regions[2].ravel(), et)


def test_labels_to_regions_reads_every_value_of_a_part():
    # a label map may give several values per part (e.g. merged datasets): ncr {1, 5}, et {4, 6}
    label_map = {"ncr": [1, 5], "ed": [2], "et": [4, 6]}
    lab = np.array([0, 1, 5, 2, 4, 6], dtype=np.uint8)
    regions = labels_to_regions(lab, label_map)
    # WT: every tumour value; TC: ncr and et values; ET: et values
    np.testing.assert_array_equal(regions[0], [0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(regions[1], [0, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(regions[2], [0, 0, 0, 0, 1, 1])


def test_labels_to_regions_torch_and_float_input():
    lab = torch.tensor([[0.0, 4.0], [2.0, 1.0]])
    regions = labels_to_regions(lab, "brats2018")
    assert isinstance(regions, torch.Tensor) and regions.dtype == torch.float32
    torch.testing.assert_close(regions[2], torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(CaseError, match=r"seg\.nii\.gz.*non-integer.*nearest"):
        labels_to_regions(np.array([0.0, 0.5, 1.0]), "brats2018", source="case_seg.nii.gz")


def test_whole_labels_stored_with_rounding_error_are_not_called_interpolated():
    """A float label whose values are whole numbers up to rounding error (3.9999 for 4) was called resampled with
    linear interpolation and told to resample with nearest-neighbour, which it never was; a boundary voxel an
    interpolation blended (1.5, 3.2) still is."""
    label = np.array([0.0, 1.0, 2.0, 3.9999, 3.9999], dtype=np.float32)
    with pytest.raises(CaseError) as err:
        labels_to_regions(label, "brats2018", source="X_seg.nii.gz")
    msg = str(err.value)
    assert "X_seg.nii.gz holds whole label values stored with rounding error (e.g. [3.999" in msg
    assert "integer voxels" in msg and "interpolation" not in msg
    with pytest.raises(CaseError, match=r"non-integer values \(e\.g\. \[1\.5, 3\.99.*nearest-neighbour"):
        labels_to_regions(np.array([0.0, 1.5, 3.9999], dtype=np.float32), "brats2018", source="X_seg.nii.gz")


def test_unknown_values_suggest_the_other_convention():
    lab = np.array([0, 1, 2, 3], dtype=np.uint8)
    with pytest.raises(CaseError) as err:
        labels_to_regions(lab, "brats2018", source="/data/Brats18_X_seg.nii.gz")
    msg = str(err.value)
    assert "/data/Brats18_X_seg.nii.gz" in msg and "[3]" in msg and "found [0, 1, 2, 3]" in msg
    assert "'brats2023'" in msg and "<case>-seg.nii.gz" in msg
    with pytest.raises(CaseError, match=r"BraTS-X-seg\.nii\.gz.*\[4\].*'brats2018'"):
        labels_to_regions(np.array([0, 4]), "brats2023", source="BraTS-X-seg.nii.gz")


def test_resection_cavity_in_brats2023_names_points_to_brats2024():
    with pytest.raises(CaseError) as err:
        labels_to_regions(np.array([0, 1, 2, 3, 4]), "brats2023", source="BraTS-GLI-02000-000-seg.nii.gz")
    msg = str(err.value)
    assert "[4] unknown" in msg and "'brats2024' (BraTS 2024 post-treatment" in msg and "resection cavity 4" in msg
    assert "--label_convention NAME" in msg and "'brats2018' (BraTS" not in msg  # 3 and 4 together fit no older release
    assert check_label_values(np.array([0, 4, 3]), "brats2024") == [0, 3, 4]
    # {1, 2, 4} under the 2023 names is a 2018 label renamed, or a BraTS 2024 case with a cavity and no
    # enhancing tumour: both are offered, with what each makes of 4
    with pytest.raises(CaseError) as err:
        labels_to_regions(np.array([0, 1, 2, 4]), "brats2023", source="BraTS-X-seg.nii.gz", layout="brats2023")
    msg = str(err.value)
    assert "'brats2018' (BraTS 2018-2021" in msg and "'brats2024' (BraTS 2024" in msg
    assert "They disagree on [4]: tumour for ['brats2018'], a resection cavity (no tumour) for ['brats2024']" in msg
    # under the 2018 names, 4 is enhancing tumour: brats2024 is not offered (it is refused for those names)
    with pytest.raises(CaseError) as err:
        labels_to_regions(np.array([0, 1, 2, 4, 3]), "brats2018", source="X_seg.nii.gz", layout="brats2018")
    assert "'brats2024'" in str(err.value)  # 3 and 4 together: only the 2024 values know both


def test_cavity_values_under_2018_names_say_to_rename_not_to_pass_the_refused_option(tmp_path):
    """Under 2018 names, {1, 2, 3, 4} was told to pass --label_convention brats2024, which discovery then
    refuses for those names (telling to use auto): the user went back and forth between two errors."""
    from app.data.discovery import discover_cases

    with pytest.raises(CaseError) as err:
        labels_to_regions(np.array([0, 1, 2, 4, 3]), "brats2018", source="X_seg.nii.gz", layout="brats2018")
    msg = str(err.value)
    assert "rename the files to <case>-{t2f,t1n,t1c,t2w,seg}.nii.gz and pass --label_convention brats2024" in msg
    assert "--label_convention NAME" not in msg
    # brats2024 leaves cases with 2018 names on brats2018: passing it would not read their 3 either
    import nibabel as nib

    for name in ("X_flair.nii.gz", "X_seg.nii.gz"):
        nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), str(tmp_path / name))
    assert [r["label_map"] for r in discover_cases(tmp_path, require_label=True, label_convention="brats2024")] == [
        LABEL_CONVENTIONS["brats2018"]]


def test_dataset_json_cases_are_told_to_name_their_labels():
    with pytest.raises(CaseError) as err:
        labels_to_regions(np.array([0, 1, 2, 3, 4]), MSD_MAP, source="labelsTr/x.nii.gz", layout="msd")
    msg = str(err.value)
    assert "'labels' entry of dataset.json" in msg and "'resection cavity'" in msg and "--label_convention" not in msg


def test_unknown_values_without_fitting_convention():
    with pytest.raises(CaseError) as err:
        check_label_values(np.array([0, 1, 7, 200]), MSD_MAP, source="labelsTr/x.nii.gz")
    msg = str(err.value)
    assert "labelsTr/x.nii.gz" in msg and "[7, 200]" in msg and "'et': [3]" in msg and "Relabel" in msg
    assert check_label_values(np.zeros((2, 2), dtype=np.int16), "brats2018") == [0]
    with pytest.raises(CaseError, match=r"\[-1\]"):
        check_label_values(np.array([-1, 0, 1]), "brats2018")


@pytest.mark.parametrize("layout, convention", [("brats2018", "brats2018"), ("brats2023", "brats2023")])
def test_a_value_no_convention_knows_in_a_brats_named_case_does_not_point_to_a_dataset_json(layout, convention):
    """A BraTS-named case (label 5 from a site's own protocol) has no dataset.json to fix."""
    with pytest.raises(CaseError) as err:
        labels_to_regions(np.array([0, 1, 2, 5]), convention, source="A/A_seg.nii.gz", layout=layout)
    msg = str(err.value)
    assert "A/A_seg.nii.gz" in msg and "[5]" in msg and "No BraTS label convention knows [5]" in msg
    assert "dataset.json" not in msg and "relabel the segmentation" in msg


def test_regions_to_labels_priority_by_hand():
    # voxels: bg, WT only, WT+TC, WT+TC+ET, ET only (inconsistent), TC only (inconsistent)
    wt = [0, 1, 1, 1, 0, 0]
    tc = [0, 0, 1, 1, 0, 1]
    et = [0, 0, 0, 1, 1, 0]
    regions = np.array([wt, tc, et], dtype=bool)
    np.testing.assert_array_equal(regions_to_labels(regions, "brats2018"), [0, 2, 1, 4, 4, 1])
    np.testing.assert_array_equal(regions_to_labels(regions, "brats2023"), [0, 2, 1, 3, 3, 1])
    np.testing.assert_array_equal(regions_to_labels(regions, MSD_MAP), [0, 1, 2, 3, 3, 2])
    out = regions_to_labels(torch.tensor(regions, dtype=torch.float32) * 0.9, "brats2018")  # thresholded at 0.5
    assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8
    assert out.tolist() == [0, 2, 1, 4, 4, 1]
    assert regions_to_labels(regions, "brats2018").dtype == np.uint8


def test_regions_to_labels_thresholds_probabilities_at_one_half():
    # voxels: WT probability 0.3 (background), 0.7 (oedema); the third also has TC 0.4 (still oedema),
    # the fourth TC 0.6 and ET 0.45 (necrosis), the fifth ET 0.51 (enhancing). 0.5 itself is not above.
    wt = [0.3, 0.7, 0.7, 0.9, 0.9, 0.5]
    tc = [0.0, 0.2, 0.4, 0.6, 0.8, 0.5]
    et = [0.0, 0.1, 0.1, 0.45, 0.51, 0.5]
    expected = [0, 2, 2, 1, 4, 0]
    probs = np.array([wt, tc, et], dtype=np.float32)
    np.testing.assert_array_equal(regions_to_labels(probs, "brats2018"), expected)
    assert regions_to_labels(torch.from_numpy(probs), "brats2018").tolist() == expected


@pytest.mark.parametrize("convention", [*LABEL_CONVENTIONS, "msd"])
def test_round_trip(convention):
    label_map = MSD_MAP if convention == "msd" else LABEL_CONVENTIONS[convention]
    values = [0, label_map["ncr"][0], label_map["ed"][0], label_map["et"][0]]
    lab = np.random.default_rng(0).choice(values, size=(6, 5, 4)).astype(np.uint8)
    np.testing.assert_array_equal(regions_to_labels(labels_to_regions(lab, label_map), label_map), lab)


def test_bad_arguments():
    with pytest.raises(ValueError, match="brats2018"):
        labels_to_regions(np.zeros(3), "brats2020")
    with pytest.raises(ValueError, match="lacks"):
        labels_to_regions(np.zeros(3), {"ncr": [1]})
    with pytest.raises(ValueError, match="3 channels"):
        regions_to_labels(np.zeros((2, 4, 4), dtype=bool))

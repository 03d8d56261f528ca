"""Case discovery on the BraTS 2018, BraTS 2023 and MSD / nnU-Net v2 layouts, and its error messages."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest

from app.data.discovery import CaseError, discover_cases, msd_label_map
from tests.data.helpers import errors_of_call_on_pipe

MSD_DESC = {
    "name": "BRATS",
    "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
    "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
}


def touch(path: Path) -> Path:
    # discovery only looks at names, so empty files are enough here
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def brats18(root: Path, case: str, seqs=("flair", "t1", "t1ce", "t2", "seg"), ext=".nii.gz") -> None:
    for s in seqs:
        touch(root / case / f"{case}_{s}{ext}")


def test_brats2018_layout_with_missing_sequence_and_label(tmp_path):
    brats18(tmp_path, "Brats18_B_1")
    brats18(tmp_path, "Brats18_A_1", seqs=("t2", "flair", "t1"))  # no t1ce, no seg
    touch(tmp_path / "README.txt")
    cases = discover_cases(tmp_path)
    assert [c["case"] for c in cases] == ["Brats18_A_1", "Brats18_B_1"]
    a, b = cases
    assert a["layout"] == "brats2018"
    assert list(a["images"]) == ["flair", "t1", "t2"]
    assert a["modalities"] == ["flair", "t1", "t2"]
    assert a["label"] is None and a["image4d"] is None and a["channels"] == {}
    assert a["label_map"] == {"ncr": [1], "ed": [2], "et": [4]}
    assert b["modalities"] == ["flair", "t1", "t1ce", "t2"]
    assert b["label"] == str(tmp_path / "Brats18_B_1" / "Brats18_B_1_seg.nii.gz")
    assert b["images"]["t1ce"].endswith("Brats18_B_1_t1ce.nii.gz")
    assert json.loads(json.dumps(cases)) == cases  # plain JSON
    a["label_map"]["et"].append(99)  # records do not share the convention table
    assert discover_cases(tmp_path)[1]["label_map"]["et"] == [4]


def test_a_misnamed_sequence_is_warned_about(tmp_path, caplog):
    """``<case>_t1c.nii.gz`` under the 2018 names is not a sequence of that layout: the case is used
    without T1ce (it may be a real missing sequence), with a warning naming the file."""
    brats18(tmp_path, "CASEA_1", seqs=("flair", "t1", "t2", "seg"))
    touch(tmp_path / "CASEA_1" / "CASEA_1_t1c.nii.gz")
    brats18(tmp_path, "CASEB_1", seqs=("flair", "t1", "t2", "seg"))  # without t1ce, plus an extra file:
    touch(tmp_path / "CASEB_1" / "CASEB_1_brainmask.nii.gz")  # the warning says "if", as it cannot know
    brats18(tmp_path, "CASEC_1")  # complete: its extra file is nobody's concern
    touch(tmp_path / "CASEC_1" / "CASEC_1_brainmask.nii.gz")
    with caplog.at_level(logging.WARNING, logger="app.data.discovery"):
        cases = discover_cases(tmp_path)
    assert [list(c["images"]) for c in cases] == [["flair", "t1", "t2"]] * 2 + [["flair", "t1", "t1ce", "t2"]]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "case 'CASEA_1' is used without t1ce, but CASEA_1_t1c.nii.gz has no accepted" in \
        warnings[0] and "CASEB_1_brainmask.nii.gz" in warnings[1]


def test_uncompressed_and_flat_folder(tmp_path):
    brats18(tmp_path, "X_1", ext=".nii")
    for s in ("flair", "t2"):
        touch(tmp_path / f"Y_2_{s}.nii.gz")  # several cases side by side in one folder
    touch(tmp_path / "Y_2_seg.nii.gz")
    cases = {c["case"]: c for c in discover_cases(tmp_path, require_label=True)}
    assert set(cases) == {"X_1", "Y_2"}
    assert cases["X_1"]["images"]["flair"].endswith("X_1_flair.nii")
    assert cases["Y_2"]["modalities"] == ["flair", "t2"]


def test_require_label_names_case_and_expected_file(tmp_path):
    brats18(tmp_path, "Brats18_A_1", seqs=("flair", "t1", "t1ce", "t2"))
    brats18(tmp_path, "Brats18_B_1")
    assert len(discover_cases(tmp_path)) == 2
    with pytest.raises(CaseError, match="Brats18_A_1") as err:
        discover_cases(tmp_path, require_label=True)
    assert "Brats18_A_1_seg.nii.gz" in str(err.value)
    assert "Brats18_B_1" not in str(err.value)


def test_a_missing_label_names_the_misnamed_segmentation_beside_it(tmp_path):
    """BraTS 2020's case 355 ships its segmentation as W39_1998.09.19_Segm.nii: training stopped on a missing
    label and told to add it, with the file it needed lying, under another name, in the case's folder."""
    case = "BraTS20_Training_355"
    brats18(tmp_path, case, seqs=("flair", "t1", "t1ce", "t2"))
    touch(tmp_path / case / "W39_1998.09.19_Segm.nii")
    brats18(tmp_path, "BraTS20_Training_001")
    with pytest.raises(CaseError) as err:
        discover_cases(tmp_path, require_label=True)
    msg = str(err.value)
    assert f"expected {tmp_path / case / (case + '_seg.nii.gz')} (its folder holds W39_1998.09.19_Segm.nii" in msg
    assert f"rename it to {case}_seg.nii)" in msg  # its own extension: a .nii named .nii.gz would not read
    # in a folder of several cases, only files named after the case are offered
    flat = tmp_path / "flat"
    for name in ("A-t2f.nii.gz", "A-t1c.nii.gz", "A-segmentation.nii.gz", "B-t2f.nii.gz", "B-seg.nii.gz",
                 "atlas.nii.gz"):
        touch(flat / name)
    with pytest.raises(CaseError) as err:
        discover_cases(flat, require_label=True)
    msg = str(err.value)
    assert "(its folder holds A-segmentation.nii.gz, which no accepted name matches" in msg and "atlas" not in msg
    assert "rename it to A-seg.nii.gz)" in msg
    # a label map that inference wrote beside a case is the model's own output: never offered as its reference
    import nibabel as nib

    out_case = "BraTS20_Training_356"
    brats18(tmp_path / "outs", out_case, seqs=("flair", "t1", "t1ce", "t2"))
    pred = nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4))
    pred.header["descrip"] = b"brats_gmd labels brats2018 flair+t1+t1ce+t2"
    nib.save(pred, str(tmp_path / "outs" / out_case / f"{out_case}_prediction.nii.gz"))
    with pytest.raises(CaseError) as err:
        discover_cases(tmp_path / "outs", require_label=True)
    assert f"expected {tmp_path / 'outs' / out_case / (out_case + '_seg.nii.gz')}." in str(err.value)
    assert "prediction" not in str(err.value)


def test_a_folder_of_downloaded_archives_says_to_extract_them(tmp_path):
    """A release as downloaded (BraTS2021_Training_Data.tar, a BraTS 2023 .zip) holds its cases in an archive:
    the folder gave 'No cases found' and the accepted layouts, which its cases, once extracted, already follow."""
    touch(tmp_path / "downloads" / "BraTS2021_Training_Data.tar")
    touch(tmp_path / "downloads" / "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData.ZIP")
    touch(tmp_path / "downloads" / "notes.txt")
    with pytest.raises(CaseError) as err:
        discover_cases(tmp_path, require_label=True)
    msg = str(err.value)
    assert msg.startswith(f"No cases found under {tmp_path}.")
    assert (f"{tmp_path} holds 2 archive(s) (downloads/ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData.ZIP, "
            "downloads/BraTS2021_Training_Data.tar), whose cases are not read from inside them: extract them") in msg
    brats18(tmp_path / "extracted", "BraTS2021_00000")  # once a case is there, the archives are no concern
    assert [r["case"] for r in discover_cases(tmp_path, require_label=True)] == ["BraTS2021_00000"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaseError) as err:  # a folder without archives: the layouts alone
        discover_cases(tmp_path / "empty", require_label=True)
    assert "archive" not in str(err.value)


def test_brats2023_names(tmp_path):
    case = "BraTS-GLI-00001-000"
    for s in ("t2f", "t1n", "t1c", "t2w", "seg"):
        touch(tmp_path / case / f"{case}-{s}.nii.gz")
    touch(tmp_path / "BraTS-GLI-00002-000" / "BraTS-GLI-00002-000-t1c.nii.gz")
    cases = discover_cases(tmp_path)
    c = cases[0]
    assert c["case"] == case and c["layout"] == "brats2023"
    assert c["images"] == {
        "flair": str(tmp_path / case / f"{case}-t2f.nii.gz"),
        "t1": str(tmp_path / case / f"{case}-t1n.nii.gz"),
        "t1ce": str(tmp_path / case / f"{case}-t1c.nii.gz"),
        "t2": str(tmp_path / case / f"{case}-t2w.nii.gz"),
    }
    assert c["label_map"] == {"ncr": [1], "ed": [2], "et": [3]}
    assert cases[1]["modalities"] == ["t1ce"] and cases[1]["label"] is None
    with pytest.raises(CaseError, match="BraTS-GLI-00002-000-seg.nii.gz"):
        discover_cases(tmp_path, require_label=True)


def test_label_convention_overrides_the_naming(tmp_path):
    case = "BraTS-GLI-02000-000"  # BraTS 2024 post-treatment glioma: named as BraTS 2023
    for s in ("t2f", "t1c", "seg"):
        touch(tmp_path / case / f"{case}-{s}.nii.gz")
    brats18(tmp_path, "Brats18_X_1", seqs=("flair", "seg"))
    by_name = {c["case"]: c["label_map"] for c in discover_cases(tmp_path, label_convention="auto")}
    assert by_name == {case: {"ncr": [1], "ed": [2], "et": [3]}, "Brats18_X_1": {"ncr": [1], "ed": [2], "et": [4]}}
    assert {c["case"]: c["label_map"] for c in discover_cases(tmp_path, label_convention=" AUTO ")} == by_name
    with pytest.raises(ValueError, match=r"^--label_convention 'brats2025' is not a label convention: .*auto.*'brats2024'"):
        discover_cases(tmp_path, label_convention="brats2025")
    # BraTS 2024 ships with the 2023 names: under 2018 names, 4 is enhancing tumour, which such a case keeps
    mixed = {c["case"]: c["label_map"] for c in discover_cases(tmp_path, label_convention="brats2024")}
    assert mixed == {case: {"ncr": [1], "ed": [2], "et": [3], "other": [4]}, "Brats18_X_1": by_name["Brats18_X_1"]}
    forced = discover_cases(tmp_path / case, require_label=True, label_convention="brats2024")
    assert [c["label_map"] for c in forced] == [{"ncr": [1], "ed": [2], "et": [3], "other": [4]}]


def test_brats2024_convention_reads_a_union_of_releases_each_case_by_its_names(tmp_path, caplog):
    """A consortium's folder holding BraTS 2020 cases (2018 names, 4 = enhancing tumour) beside BraTS 2024
    post-treatment cases (2023 names, 4 = resection cavity) could not be trained: auto stopped at the 2024
    cases' 4 and told to pass --label_convention brats2024, which was refused for the 2020 cases' names,
    telling to use auto. brats2024 now reads the 2023-named cases and leaves the others on brats2018."""
    import nibabel as nib

    from app.data.transforms import load_case

    rng = np.random.default_rng(0)
    seg = np.zeros((6, 6, 6), np.uint8)
    seg[1, 1, 1], seg[2, 2, 2], seg[3, 3, 3], seg[4, 4, 4] = 1, 2, 3, 4
    for case, sep, seqs in (("BraTS20_Training_001", "_", ("flair", "t1ce")),
                            ("BraTS-GLI-02073-100", "-", ("t2f", "t1c"))):
        (tmp_path / case).mkdir()
        for s in seqs:
            nib.save(nib.Nifti1Image(rng.normal(100, 20, seg.shape).astype(np.float32), np.eye(4)),
                     str(tmp_path / case / f"{case}{sep}{s}.nii.gz"))
        values = seg if sep == "-" else np.where(seg == 3, 0, seg).astype(np.uint8)  # 2018 values: no 3
        nib.save(nib.Nifti1Image(values, np.eye(4)), str(tmp_path / case / f"{case}{sep}seg.nii.gz"))
    with caplog.at_level("INFO", logger="app.data.discovery"):
        records = {r["case"]: r for r in discover_cases(tmp_path, require_label=True, label_convention="brats2024")}
    assert "the 1 with BraTS 2018-2021 names (e.g. BraTS20_Training_001) keep brats2018" in caplog.text
    # a union is what the option is for: said, not warned about; with no 2023-named case it changes nothing
    said = [r.levelname for r in caplog.records if "keep brats2018" in r.getMessage()]
    assert said == ["INFO"], said
    caplog.clear()
    with caplog.at_level("INFO", logger="app.data.discovery"):
        discover_cases(tmp_path / "BraTS20_Training_001", require_label=True, label_convention="brats2024")
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "keep brats2018" in r.getMessage()]
    assert [level for level, _ in said] == ["WARNING"] and said[0][1].endswith("the option changes nothing here."), said
    et_2020 = load_case(records["BraTS20_Training_001"])["label"][2].numpy()
    et_2024 = load_case(records["BraTS-GLI-02073-100"])["label"][2].numpy()
    assert et_2020[4, 4, 4] == 1 and et_2020.sum() == 1  # 4 is enhancing tumour under the 2018 names
    assert et_2024[3, 3, 3] == 1 and et_2024.sum() == 1  # 3 is, under the 2023 names; 4 is a cavity there
    assert load_case(records["BraTS-GLI-02073-100"])["label"][0].numpy()[4, 4, 4] == 0  # in no tumour region


def test_msd_task01_layout(tmp_path):
    task = tmp_path / "Task01_BrainTumour"
    task.mkdir()
    (task / "dataset.json").write_text(json.dumps(MSD_DESC))
    touch(task / "imagesTr" / "BRATS_001.nii.gz")
    touch(task / "imagesTr" / "BRATS_002.nii.gz")
    touch(task / "imagesTr" / "._BRATS_001.nii.gz")  # macOS junk shipped in the MSD tarball
    touch(task / "labelsTr" / "BRATS_001.nii.gz")
    touch(task / "labelsTr" / "BRATS_002.nii.gz")
    touch(task / "imagesTs" / "BRATS_900.nii.gz")
    cases = discover_cases(tmp_path)
    assert [c["case"] for c in cases] == ["BRATS_001", "BRATS_002", "BRATS_900"]
    c = cases[0]
    assert c["layout"] == "msd"
    assert c["image4d"] == str(task / "imagesTr" / "BRATS_001.nii.gz")
    assert c["images"] == {}
    assert c["channels"] == {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3}
    assert c["modalities"] == ["flair", "t1", "t1ce", "t2"]
    assert c["label"] == str(task / "labelsTr" / "BRATS_001.nii.gz")
    assert c["label_map"] == {"ncr": [2], "ed": [1], "et": [3]}
    assert cases[2]["label"] is None


def _task01(root: Path, train=("BRATS_001", "BRATS_002"), test=("BRATS_485", "BRATS_486")) -> Path:
    """An MSD Task01 folder as downloaded: labelled imagesTr/ cases and unlabelled imagesTs/ cases."""
    task = root / "Task01_BrainTumour"
    task.mkdir(parents=True)
    (task / "dataset.json").write_text(json.dumps(MSD_DESC))
    for case in train:
        touch(task / "imagesTr" / f"{case}.nii.gz")
        touch(task / "labelsTr" / f"{case}.nii.gz")
    for case in test:
        touch(task / "imagesTs" / f"{case}.nii.gz")
    return task


def test_msd_test_images_are_left_out_when_labels_are_required(tmp_path, caplog):
    task = _task01(tmp_path)
    with caplog.at_level(logging.INFO, logger="app.data.discovery"):
        cases = discover_cases(tmp_path, require_label=True)
    assert [c["case"] for c in cases] == ["BRATS_001", "BRATS_002"]
    assert all(c["label"] for c in cases)
    assert "2 unlabelled test case(s)" in caplog.text and str(task / "imagesTs") in caplog.text
    # inference still sees the test images
    assert [c["case"] for c in discover_cases(tmp_path)] == ["BRATS_001", "BRATS_002", "BRATS_485", "BRATS_486"]


def test_msd_training_case_without_label_still_fails(tmp_path):
    task = _task01(tmp_path)
    touch(task / "imagesTr" / "BRATS_003.nii.gz")  # a training image whose label is missing
    with pytest.raises(CaseError, match=r"1 case\(s\) have no label: case 'BRATS_003'.*labelsTr") as err:
        discover_cases(tmp_path, require_label=True)
    assert "BRATS_485" not in str(err.value)


def test_msd_labelled_test_images_are_kept(tmp_path):
    # a test set with labelsTs/ is what evaluation runs on
    task = _task01(tmp_path)
    touch(task / "labelsTs" / "BRATS_485.nii.gz")
    cases = {c["case"]: c for c in discover_cases(tmp_path, require_label=True)}
    assert sorted(cases) == ["BRATS_001", "BRATS_002", "BRATS_485"]
    assert cases["BRATS_485"]["label"] == str(task / "labelsTs" / "BRATS_485.nii.gz")


def test_msd_folder_with_only_unlabelled_test_images(tmp_path):
    task = _task01(tmp_path, train=())
    with pytest.raises(CaseError, match=r"No labelled case.*2 test image\(s\) in .*imagesTs") as err:
        discover_cases(tmp_path, require_label=True)
    assert str(task / "labelsTr") in str(err.value)


def test_nnunet_v2_test_images_are_left_out_when_labels_are_required(tmp_path):
    desc = {"channel_names": {"0": "FLAIR", "1": "T1", "2": "T1ce", "3": "T2"},
            "labels": {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}}
    (tmp_path / "dataset.json").write_text(json.dumps(desc))
    for c in ("0000", "0001", "0002", "0003"):
        touch(tmp_path / "imagesTr" / f"case_1_{c}.nii.gz")
        touch(tmp_path / "imagesTs" / f"case_9_{c}.nii.gz")
    touch(tmp_path / "labelsTr" / "case_1.nii.gz")
    assert [c["case"] for c in discover_cases(tmp_path, require_label=True)] == ["case_1"]
    assert [c["case"] for c in discover_cases(tmp_path)] == ["case_1", "case_9"]


def test_msd_channel_aliases_and_order(tmp_path):
    desc = dict(MSD_DESC, modality={"0": "t2-FLAIR", "1": "T1-Gd", "2": "T1", "3": "t2w"})
    (tmp_path / "dataset.json").write_text(json.dumps(desc))
    touch(tmp_path / "imagesTr" / "c1.nii.gz")
    (c,) = discover_cases(tmp_path)
    # record lists channels in BRATS_MODALITIES order, indices from dataset.json
    assert list(c["channels"].items()) == [("flair", 0), ("t1", 2), ("t1ce", 1), ("t2", 3)]


def test_nnunet_v2_per_channel_files_and_region_labels(tmp_path):
    desc = {
        "channel_names": {"0": "FLAIR", "1": "T1", "2": "T1ce", "3": "T2"},
        "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3},
        "file_ending": ".nii.gz",
    }
    (tmp_path / "dataset.json").write_text(json.dumps(desc))
    touch(tmp_path / "imagesTr" / "case_7_0000.nii.gz")
    touch(tmp_path / "imagesTr" / "case_7_0002.nii.gz")
    touch(tmp_path / "labelsTr" / "case_7.nii.gz")
    (c,) = discover_cases(tmp_path, require_label=True)
    assert c["case"] == "case_7" and c["image4d"] is None and c["channels"] == {}
    assert c["images"] == {"flair": str(tmp_path / "imagesTr" / "case_7_0000.nii.gz"),
                           "t1ce": str(tmp_path / "imagesTr" / "case_7_0002.nii.gz")}
    assert c["modalities"] == ["flair", "t1ce"]
    assert c["label_map"] == {"ncr": [2], "ed": [1], "et": [3]}


@pytest.mark.parametrize(
    "labels, expected",
    [
        ({"0": "background", "1": "NCR", "2": "SNFH", "3": "ET"}, {"ncr": [1], "ed": [2], "et": [3]}),
        ({"0": "Background", "1": "Necrotic tumour core", "2": "Peritumoral Oedema", "4": "GD-enhancing tumor"},
         {"ncr": [1], "ed": [2], "et": [4]}),
        ({"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3},
         {"ncr": [2], "ed": [1], "et": [3]}),
        ({"background": 0, "NETC": 1, "SNFH": 2, "ET": 3, "RC": 4}, {"ncr": [1], "ed": [2], "et": [3], "other": [4]}),
        ({"0": "background", "1": "necrosis", "2": "edema", "3": "enhancing", "4": "Resection cavity"},
         {"ncr": [1], "ed": [2], "et": [3], "other": [4]}),
    ],
)
def test_label_name_variants(labels, expected):
    assert msd_label_map({"labels": labels}) == expected


def test_msd_errors_name_dataset_json(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps(dict(MSD_DESC, modality={"0": "FLAIR", "1": "DWI"})))
    touch(tmp_path / "imagesTr" / "c1.nii.gz")
    with pytest.raises(CaseError, match=r"dataset\.json.*'DWI'"):
        discover_cases(tmp_path)
    cyst = {"0": "background", "1": "edema", "2": "cyst"}
    (tmp_path / "dataset.json").write_text(json.dumps(dict(MSD_DESC, labels=cyst)))
    with pytest.raises(CaseError, match=r"dataset\.json.*'cyst'"):
        discover_cases(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps(dict(MSD_DESC, labels={"0": "background", "1": "edema"})))
    with pytest.raises(CaseError, match=r"dataset\.json.*\['ncr', 'et'\]"):
        discover_cases(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(CaseError, match=r"dataset\.json"):
        discover_cases(tmp_path)


def test_msd_label_without_image(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps(MSD_DESC))
    touch(tmp_path / "imagesTr" / "BRATS_001.nii.gz")
    touch(tmp_path / "labelsTr" / "BRATS_001.nii.gz")
    touch(tmp_path / "labelsTr" / "BRATS_003.nii.gz")
    with pytest.raises(CaseError, match=r"labelsTr/BRATS_003\.nii\.gz.*imagesTr"):
        discover_cases(tmp_path)


def test_duplicate_case_ids_name_both_paths(tmp_path):
    brats18(tmp_path / "site_a", "Brats18_A_1")
    brats18(tmp_path / "site_b", "Brats18_A_1")
    with pytest.raises(CaseError, match="Duplicate case id 'Brats18_A_1'") as err:
        discover_cases(tmp_path)
    assert str(tmp_path / "site_a") in str(err.value) and str(tmp_path / "site_b") in str(err.value)


def test_duplicate_sequence_file(tmp_path):
    brats18(tmp_path, "A_1")
    touch(tmp_path / "A_1" / "A_1_flair.nii")
    with pytest.raises(CaseError, match=r"two 'flair' files.*A_1_flair\.nii"):
        discover_cases(tmp_path)


@pytest.mark.parametrize("layout", ["msd", "nnunet_v2", "msd_label"])
def test_duplicate_image_or_label_file_in_msd_and_nnunet_folders(tmp_path, layout):
    """``X.nii`` beside ``X.nii.gz`` (or ``X_0000.NII``) was resolved silently, the listing order
    picking which file was the scan: refused now, as two files of one BraTS-named sequence are."""
    if layout == "nnunet_v2":
        desc = {"channel_names": {"0": "FLAIR", "1": "T2"},
                "labels": {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}}
        images = ["A_0000.nii.gz", "A_0000.NII", "A_0001.nii.gz", "B_0000.nii.gz"]
    else:
        desc = MSD_DESC
        images = ["A.nii.gz", "B.nii.gz"] + (["A.nii"] if layout == "msd" else [])
    (tmp_path / "dataset.json").write_text(json.dumps(desc))
    for name in images:
        touch(tmp_path / "imagesTr" / name)
    for name in ["A.nii.gz", "B.nii.gz"] + (["A.Nii"] if layout == "msd_label" else []):
        touch(tmp_path / "labelsTr" / name)
    what = {"msd": "two image files", "nnunet_v2": "two 'flair' files (channel 0000)",
            "msd_label": "two label files"}[layout]
    with pytest.raises(CaseError, match=rf"Case 'A' has {re.escape(what)}: .*A.*A.*Keep one"):
        discover_cases(tmp_path, require_label=True)
    errors: dict[str, str] = {}
    assert [c["case"] for c in discover_cases(tmp_path, case_errors=errors)] == ["B"] and list(errors) == ["A"]


def test_case_with_zero_sequences_names_folder(tmp_path):
    brats18(tmp_path, "A_1")
    touch(tmp_path / "labels_only" / "B_2_seg.nii.gz")
    with pytest.raises(CaseError, match="no image sequence") as err:
        discover_cases(tmp_path)
    assert str(tmp_path / "labels_only") in str(err.value) and "B_2_{flair,t1,t1ce,t2}.nii.gz" in str(err.value)


def test_empty_and_missing_folders(tmp_path):
    touch(tmp_path / "notes" / "scan.nii.gz")  # not a recognised name
    with pytest.raises(CaseError, match="No cases found") as err:
        discover_cases(tmp_path)
    assert str(tmp_path) in str(err.value) and "BraTS 2023" in str(err.value) and "dataset.json" in str(err.value)
    with pytest.raises(CaseError, match="does not exist"):
        discover_cases(tmp_path / "nope")


def test_symlinked_case_folder(tmp_path):
    brats18(tmp_path / "store", "A_1")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "A_1").symlink_to(tmp_path / "store" / "A_1", target_is_directory=True)
    (c,) = discover_cases(tmp_path / "data", require_label=True)
    assert c["case"] == "A_1"


def test_case_errors_collects_problems_of_single_cases(tmp_path):
    brats18(tmp_path, "A_1")
    brats18(tmp_path, "B_1", seqs=("flair", "t2"))
    touch(tmp_path / "B_1" / "B_1_flair.nii")  # two flair files in one case
    touch(tmp_path / "labels_only" / "C_2_seg.nii.gz")
    brats18(tmp_path / "site_a", "D_1")
    brats18(tmp_path / "site_b", "D_1")
    errors: dict[str, str] = {}
    cases = discover_cases(tmp_path, case_errors=errors)
    assert [c["case"] for c in cases] == ["A_1"]
    assert sorted(errors) == ["B_1", "C_2", "D_1"]
    assert "two 'flair' files" in errors["B_1"] and "B_1_flair.nii " in errors["B_1"]
    assert "no image sequence" in errors["C_2"] and str(tmp_path / "labels_only") in errors["C_2"]
    assert "Duplicate case id 'D_1'" in errors["D_1"] and str(tmp_path / "site_b") in errors["D_1"]
    with pytest.raises(CaseError, match="two 'flair' files"):  # without the dict nothing changes
        discover_cases(tmp_path)


def test_case_errors_leaves_out_every_copy_of_a_case_id_with_a_problem(tmp_path):
    brats18(tmp_path / "site_a", "A_1", seqs=("flair", "t2"))
    touch(tmp_path / "site_a" / "A_1" / "A_1_t2.nii")
    brats18(tmp_path / "site_b", "A_1")  # fine on its own, but would write the same outputs
    brats18(tmp_path, "B_1")
    errors: dict[str, str] = {}
    assert [c["case"] for c in discover_cases(tmp_path, case_errors=errors)] == ["B_1"]
    assert list(errors) == ["A_1"] and "two 't2' files" in errors["A_1"] and str(tmp_path / "site_b") in errors["A_1"]


def test_case_errors_in_msd_and_nnunet_folders(tmp_path):
    desc = {"channel_names": {"0": "FLAIR", "1": "T2"},
            "labels": {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}}
    (tmp_path / "dataset.json").write_text(json.dumps(desc))
    for case in ("ok", "extra", "misnamed"):
        for c in ("0000", "0001"):
            touch(tmp_path / "imagesTr" / f"{case}_{c}.nii.gz")
        touch(tmp_path / "labelsTr" / f"{case}.nii.gz")
    touch(tmp_path / "imagesTr" / "extra_0002.nii.gz")  # channel 2 is not in dataset.json
    touch(tmp_path / "imagesTr" / "misnamed.nii.gz")
    touch(tmp_path / "labelsTr" / "orphan.nii.gz")
    errors: dict[str, str] = {}
    assert [c["case"] for c in discover_cases(tmp_path, case_errors=errors)] == ["ok"]
    assert sorted(errors) == ["extra", "misnamed", "orphan"]  # the labels of bad cases are not orphans
    assert "channel 0002 is not listed" in errors["extra"] and "extra_0002.nii.gz" in errors["extra"]
    assert "must be named <case>_XXXX" in errors["misnamed"]
    assert "orphan.nii.gz has no image" in errors["orphan"]


def test_case_errors_still_raises_for_the_whole_folder(tmp_path):
    with pytest.raises(CaseError, match="does not exist"):
        discover_cases(tmp_path / "nope", case_errors={})
    with pytest.raises(CaseError, match="No cases found"):
        discover_cases(tmp_path, case_errors={})
    (tmp_path / "dataset.json").write_text("{not json")
    touch(tmp_path / "imagesTr" / "c1.nii.gz")
    with pytest.raises(CaseError, match=r"dataset\.json"):
        discover_cases(tmp_path, case_errors={})
    (tmp_path / "dataset.json").unlink()
    touch(tmp_path / "X_1" / "X_1_seg.nii.gz")  # only a bad case: reported, not "No cases found"
    errors: dict[str, str] = {}
    assert discover_cases(tmp_path, case_errors=errors) == [] and list(errors) == ["X_1"]


@pytest.mark.parametrize("listed", [True, False])
def test_nnunet_v1_per_channel_files_with_the_modality_key(tmp_path, listed):
    """nnU-Net v1 keeps MSD's dataset.json ('modality', 'training') but splits channels into files."""
    desc = {"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}}
    if listed:
        desc["training"] = [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}]
    (tmp_path / "dataset.json").write_text(json.dumps(desc))
    for idx in (0, 1, 3):
        touch(tmp_path / "imagesTr" / f"BRATS_001_{idx:04d}.nii.gz")
    touch(tmp_path / "labelsTr" / "BRATS_001.nii.gz")
    (c,) = discover_cases(tmp_path, require_label=True)
    assert c["case"] == "BRATS_001" and c["image4d"] is None and c["modalities"] == ["flair", "t1", "t2"]
    assert c["images"]["t2"] == str(tmp_path / "imagesTr" / "BRATS_001_0003.nii.gz")


def test_nnunet_v1_first_listed_case_without_channel_0000_is_still_per_channel(tmp_path):
    """A first listed case lacking FLAIR (_0000) made the folder read as MSD 4D: every channel file a case."""
    desc = {"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
            "training": [{"image": f"./imagesTr/BRATS_00{i}.nii.gz", "label": f"./labelsTr/BRATS_00{i}.nii.gz"}
                         for i in (1, 2)]}
    (tmp_path / "dataset.json").write_text(json.dumps(desc))
    for case, channels in (("BRATS_001", (1, 2, 3)), ("BRATS_002", (0, 1, 2, 3))):
        for idx in channels:
            touch(tmp_path / "imagesTr" / f"{case}_{idx:04d}.nii.gz")
        touch(tmp_path / "labelsTr" / f"{case}.nii.gz")
    first, second = discover_cases(tmp_path, require_label=True)
    assert (first["case"], first["image4d"], first["modalities"]) == ("BRATS_001", None, ["t1", "t1ce", "t2"])
    assert (second["case"], second["modalities"]) == ("BRATS_002", ["flair", "t1", "t1ce", "t2"])


def test_msd_4d_files_whose_ids_end_in_four_digits_stay_4d(tmp_path):
    desc = {"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
            "training": [{"image": "./imagesTr/pat_0001.nii.gz", "label": "./labelsTr/pat_0001.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(desc))
    touch(tmp_path / "imagesTr" / "pat_0001.nii.gz")
    touch(tmp_path / "labelsTr" / "pat_0001.nii.gz")
    (c,) = discover_cases(tmp_path, require_label=True)
    assert c["case"] == "pat_0001" and c["image4d"] == str(tmp_path / "imagesTr" / "pat_0001.nii.gz")


V1_DESC = {"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
           "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}}


@pytest.mark.parametrize("layout", ["msd", "nnunet_v1", "nnunet_v2"])
def test_msd_and_nnunet_files_with_upper_case_extensions_are_found(tmp_path, layout):
    """``.NII.GZ`` files were silently skipped in MSD / nnU-Net folders (a case vanished from training
    and evaluation) while BraTS-named ones with the same extension were used: both are read now."""
    desc = dict(V1_DESC)
    if layout == "nnunet_v2":
        desc = {"channel_names": V1_DESC["modality"], "labels": {"background": 0, "edema": 1,
                                                                  "non-enhancing tumor": 2, "enhancing tumour": 3}}
    else:
        desc["training"] = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ("A", "B")]
    (tmp_path / "dataset.json").write_text(json.dumps(desc))
    for case, ext in (("A", ".NII.GZ"), ("B", ".nii.gz")):
        names = [f"{case}{ext}"] if layout == "msd" else [f"{case}_{i:04d}{ext}" for i in (0, 3)]
        for name in names:
            touch(tmp_path / "imagesTr" / name)
        touch(tmp_path / "labelsTr" / f"{case}{ext}")
    touch(tmp_path / "labelsTr" / "orphan.Nii")  # a label without image is reported in any case
    with pytest.raises(CaseError, match="orphan.Nii has no image"):
        discover_cases(tmp_path, require_label=True)
    (tmp_path / "labelsTr" / "orphan.Nii").unlink()
    a, b = discover_cases(tmp_path, require_label=True)
    assert (a["case"], b["case"]) == ("A", "B")
    assert a["label"] == str(tmp_path / "labelsTr" / "A.NII.GZ")
    if layout == "msd":
        assert a["image4d"] == str(tmp_path / "imagesTr" / "A.NII.GZ") and a["modalities"] == b["modalities"]
    else:
        assert a["image4d"] is None and a["images"] == {"flair": str(tmp_path / "imagesTr" / "A_0000.NII.GZ"),
                                                        "t2": str(tmp_path / "imagesTr" / "A_0003.NII.GZ")}


def _nifti(path: Path, shape: tuple[int, ...]) -> None:
    import nibabel as nib
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)), str(path))


@pytest.mark.parametrize("labelled", [True, False])
def test_nnunet_v1_with_one_channel_file_per_case_and_no_training_list(tmp_path, labelled):
    """nnU-Net v1 (MSD's 'modality' key) without a 'training' list, every case with one sequence:
    ``<case>_0000.nii.gz`` was read as an MSD 4D case named ``<case>_0000``, so its label was an
    orphan (training stopped) or, unlabelled, the outputs were named after the file, not the case."""
    (tmp_path / "dataset.json").write_text(json.dumps(V1_DESC))
    images = "imagesTr" if labelled else "imagesTs"
    for case in ("BRATS_001", "BRATS_002"):
        _nifti(tmp_path / images / f"{case}_0000.nii.gz", (4, 4, 4))
        if labelled:
            _nifti(tmp_path / "labelsTr" / f"{case}.nii.gz", (4, 4, 4))
    first, second = discover_cases(tmp_path, require_label=labelled)
    assert (first["case"], second["case"]) == ("BRATS_001", "BRATS_002")
    assert first["image4d"] is None and first["modalities"] == ["flair"]
    assert first["images"] == {"flair": str(tmp_path / images / "BRATS_001_0000.nii.gz")}


def test_msd_4d_files_one_per_case_whose_ids_end_in_four_digits_stay_4d_without_training_list(tmp_path):
    """The other reading of the same names: MSD 4D images named ``pat_0001.nii.gz``, labelled as such
    or (unlabelled) holding their channels along a 4th axis, stay one case per file."""
    (tmp_path / "dataset.json").write_text(json.dumps(V1_DESC))
    _nifti(tmp_path / "imagesTr" / "pat_0001.nii.gz", (4, 4, 4, 4))
    _nifti(tmp_path / "labelsTr" / "pat_0001.nii.gz", (4, 4, 4))
    _nifti(tmp_path / "imagesTs" / "pat_0002.nii.gz", (4, 4, 4, 4))
    assert [(c["case"], c["image4d"] is not None) for c in discover_cases(tmp_path)] == [
        ("pat_0001", True), ("pat_0002", True)]
    for p in (tmp_path / "labelsTr").iterdir():
        p.unlink()
    assert [(c["case"], c["image4d"] is not None) for c in discover_cases(tmp_path)] == [
        ("pat_0001", True), ("pat_0002", True)]


def test_nifti_files_an_msd_folder_does_not_read_are_warned_about(tmp_path, caplog):
    """A BraTS case folder or a loose scan kept in an nnU-Net folder was left out without a word:
    dataset.json makes the folder readable through imagesTr/ ... labelsTs/ only."""
    (tmp_path / "dataset.json").write_text(json.dumps(MSD_DESC))
    touch(tmp_path / "imagesTr" / "A.nii.gz")
    touch(tmp_path / "labelsTr" / "A.nii.gz")
    with caplog.at_level(logging.WARNING, logger="app.data.discovery"):
        assert [c["case"] for c in discover_cases(tmp_path)] == ["A"]
    assert not caplog.records  # a plain MSD folder: nothing to say
    brats18(tmp_path / "extra", "B_1")
    touch(tmp_path / "loose.NII.GZ")
    touch(tmp_path / "notes" / "readme.txt")
    with caplog.at_level(logging.WARNING, logger="app.data.discovery"):
        assert [c["case"] for c in discover_cases(tmp_path)] == ["A"]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "6 other NIfTI file(s) in it are not read" in warning and str(tmp_path / "loose.NII.GZ") in warning
    assert f"Move them out of {tmp_path}" in warning


def _product_output(path: Path) -> Path:
    """A NIfTI file as inference writes it: its header description starts with the product's prefix."""
    import nibabel as nib
    import numpy as np

    from app.data.discovery import OUTPUT_DESCRIPTION_PREFIX

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.zeros((2, 2, 2), dtype=np.uint8), np.eye(4))
    img.header["descrip"] = f"{OUTPUT_DESCRIPTION_PREFIX}labels".encode()
    nib.save(img, str(path))
    return path


def test_product_outputs_beside_msd_4d_images_are_not_cases(tmp_path):
    """Batch inference into an MSD imagesTs/ writes <case>_prob.nii.gz beside the 4D scans: a rerun
    must not read it as a 4D scan of a case 'BRATS_485_prob'."""
    task = _task01(tmp_path, test=("BRATS_485",))
    _product_output(task / "imagesTs" / "BRATS_485_prob.nii.gz")
    assert [c["case"] for c in discover_cases(tmp_path)] == ["BRATS_001", "BRATS_002", "BRATS_485"]


def test_product_outputs_in_a_case_folder_are_not_warned_about(tmp_path, caplog):
    brats18(tmp_path, "A_1", seqs=("flair", "t1ce", "seg"))
    _product_output(tmp_path / "A_1" / "A_1_prob.nii.gz")
    with caplog.at_level(logging.WARNING, logger="app.data.discovery"):
        (c,) = discover_cases(tmp_path)
    assert c["modalities"] == ["flair", "t1ce"] and not caplog.records
    touch(tmp_path / "A_1" / "A_1_t2w.nii.gz")  # a misnamed sequence beside it still is
    with caplog.at_level(logging.WARNING, logger="app.data.discovery"):
        discover_cases(tmp_path)
    assert len(caplog.records) == 1 and "A_1_t2w.nii.gz has no accepted" in caplog.records[0].getMessage()


def test_msd_4d_file_whose_id_ends_in_four_digits_without_training_entries_stays_4d(tmp_path):
    """Without 'training' entries only a case with two channel files means per-channel files."""
    (tmp_path / "dataset.json").write_text(json.dumps(MSD_DESC))
    touch(tmp_path / "imagesTr" / "pat_0001.nii.gz")
    touch(tmp_path / "labelsTr" / "pat_0001.nii.gz")
    (c,) = discover_cases(tmp_path, require_label=True)
    assert c["case"] == "pat_0001" and c["image4d"] == str(tmp_path / "imagesTr" / "pat_0001.nii.gz")


def test_msd_uncompressed_label_is_found(tmp_path):
    task = _task01(tmp_path, train=("BRATS_001",), test=())
    touch(task / "imagesTr" / "BRATS_002.nii.gz")
    touch(task / "labelsTr" / "BRATS_002.nii")
    cases = discover_cases(tmp_path, require_label=True)
    assert cases[1]["label"] == str(task / "labelsTr" / "BRATS_002.nii")


def test_hidden_folders_and_symlink_loops_are_not_searched(tmp_path):
    """A hidden copy (.ipynb_checkpoints, .Trash) and a link back to a parent would both show a case twice."""
    brats18(tmp_path / "data", "A_1")
    brats18(tmp_path / "data" / ".ipynb_checkpoints", "A_1")
    (tmp_path / "data" / "again").symlink_to(tmp_path / "data", target_is_directory=True)
    (c,) = discover_cases(tmp_path / "data", require_label=True)
    assert c["images"]["flair"] == str(tmp_path / "data" / "A_1" / "A_1_flair.nii.gz")


def test_a_link_above_the_data_folder_is_not_followed(tmp_path, caplog):
    """Linked case folders are followed, but a link to a folder holding the data folder (``..``, ``/``, a data
    folder unpacked from a collaborator's archive) made discovery read every case beside it: another study's
    cases were trained on, scored or segmented as this folder's."""
    brats18(tmp_path / "site1", "A_1")
    brats18(tmp_path / "site2", "B_1")  # another study on the same server
    (tmp_path / "site1" / "A_1" / "all").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "site1" / "root").symlink_to("/", target_is_directory=True)
    brats18(tmp_path / "store", "C_1")
    (tmp_path / "site1" / "C_1").symlink_to(tmp_path / "store" / "C_1", target_is_directory=True)  # still followed
    (tmp_path / "site1" / "C_1" / "back").symlink_to(tmp_path / "site1", target_is_directory=True)  # skipped quietly
    with caplog.at_level(logging.WARNING, logger="app.data.discovery"):
        cases = discover_cases(tmp_path / "site1", require_label=True)
    assert [c["case"] for c in cases] == ["A_1", "C_1"]
    warned = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"{tmp_path / 'site1' / 'A_1' / 'all'} is a symbolic link to {tmp_path}, which holds the "
                            "data folder") for m in warned), warned
    assert any(m.startswith(f"{tmp_path / 'site1' / 'root'} is a symbolic link to /,") for m in warned), warned
    assert not any("back is a symbolic link" in m for m in warned), warned  # a link to the data folder widens nothing


def test_a_dataset_json_that_is_a_named_pipe_is_refused_instead_of_waited_on(tmp_path):
    """Discovery opened every dataset.json it met; a named pipe under that name (a folder unpacked from an
    archive) made it wait for a writer forever."""
    (tmp_path / "Task01" / "imagesTr").mkdir(parents=True)
    pipe = tmp_path / "Task01" / "dataset.json"
    os.mkfifo(pipe)
    outcome = errors_of_call_on_pipe(lambda: discover_cases(tmp_path), pipe, "discovery")
    assert outcome and outcome[0].startswith(f"{pipe} is a named pipe, not a file")


def test_a_named_pipe_beside_a_case_lacking_a_sequence_is_not_waited_on(tmp_path):
    """Discovery opens the header of each unnamed file beside a case that lacks a sequence (to warn about a
    misnamed one); a named pipe there made it wait for a writer forever instead of listing the file."""
    import threading

    brats18(tmp_path, "A_1", seqs=("flair", "t1", "t1ce", "seg"))
    pipe = tmp_path / "A_1" / "A_1_t2w.nii.gz"
    os.mkfifo(pipe)
    outcome = []
    finder = threading.Thread(target=lambda: outcome.append(discover_cases(tmp_path)), daemon=True)
    finder.start()
    finder.join(timeout=20)
    if finder.is_alive():
        os.close(os.open(pipe, os.O_WRONLY))  # release it
        finder.join(timeout=20)
        pytest.fail("discovery waited on the named pipe")
    assert [c["case"] for c in outcome[0]] == ["A_1"]
    assert sorted(outcome[0][0]["images"]) == ["flair", "t1", "t1ce"]


def test_other_files_of_complete_cases_are_not_read(tmp_path, monkeypatch):
    """A flat folder of thousands of cases, each with a brain mask beside its sequences: the header of
    every such file was read, and every file of the folder matched against every case, though only
    a case lacking a sequence is warned about its other files."""
    import app.data.discovery as discovery

    read = []
    monkeypatch.setattr(discovery, "is_inference_output", lambda path: read.append(os.path.basename(path)) or False)
    for case in ("A", "A_1", "B.2", "3"):  # "A" is a prefix of "A_1"'s names too
        for s in ("flair", "t1", "t1ce", "t2", "seg", "brainmask"):
            touch(tmp_path / f"{case}_{s}.nii.gz")
    touch(tmp_path / "C_flair.nii.gz")  # lacks three sequences: its other files are looked at
    touch(tmp_path / "C_t1c.nii.gz")
    cases = discover_cases(tmp_path)
    assert [c["case"] for c in cases] == ["3", "A", "A_1", "B.2", "C"]
    assert read == ["C_t1c.nii.gz"]


@pytest.mark.parametrize("case", ["A\n1", "A\r1", "A\x1b[2K1", "A\x9b2K1", "A\u202e1", "A\u20281", "A\u200b1",
                                  "A\udcff1"])
def test_a_case_id_with_a_control_or_invisible_character_is_refused_as_written(tmp_path, case):
    """A case id comes from a file name, and lands in one-line errors (``error: case NAME: ...``), logs, report rows
    and datalist.json: a newline split them, a carriage return or an escape sequence rewrote a terminal line, a bidi
    override made the id read as another. A newline even hid the case (no file name pattern matched it), so the
    folder trained or was segmented without it and without a word. Such an id is refused, shown escaped."""
    brats18(tmp_path / "good", "Good")
    brats18(tmp_path / "bad", case)
    with pytest.raises(CaseError) as err:
        discover_cases(tmp_path, require_label=True)
    msg = str(err.value)
    assert msg.startswith(f"Case id {case!r} (from ") and "rename its files with printable characters only" in msg
    assert msg.isprintable()
    # batch inference: the case is an error under its escaped id, the others run
    errors: dict[str, str] = {}
    assert [r["case"] for r in discover_cases(tmp_path, case_errors=errors)] == ["Good"]
    (key,) = errors
    assert key == repr(case)[1:-1] and key.isprintable() and errors[key] == msg


@pytest.mark.parametrize("case", ["Größe Fall\u00a01", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645_1"])
def test_a_case_id_with_accents_or_spaces_is_still_accepted(tmp_path, case):
    """Accents, a non-breaking space and the zero-width non-joiner that Persian names are written with stay
    accepted: only characters that hide or reorder text are refused."""
    brats18(tmp_path, case)
    assert [r["case"] for r in discover_cases(tmp_path)] == [case]


@pytest.fixture
def locked(monkeypatch):
    """Folders this process may not list, as for a user without read permission (the tests may run as root,
    whom chmod does not stop): ``os.scandir`` (``os.walk``) and ``os.listdir`` refuse them."""
    import errno

    paths: set[str] = set()

    def guard(lister):
        def wrapped(path=".", *args, **kwargs):
            if os.path.realpath(path) in paths:
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
            return lister(path, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(os, "scandir", guard(os.scandir))
    monkeypatch.setattr(os, "listdir", guard(os.listdir))
    return lambda path: paths.add(os.path.realpath(path))


def test_a_folder_that_cannot_be_listed_stops_discovery_instead_of_losing_its_cases(tmp_path, locked):
    """os.walk passed over a case folder the user may not read: a training, an evaluation or a clinical batch ran
    on the other cases without a word (the batch: '5 of 5 case(s) segmented, 0 failed', exit 0), and a data folder
    the user may not read was 'No cases found'."""
    for case in ("A_1", "B_1", "C_1"):
        brats18(tmp_path / "data", case)
    locked(tmp_path / "data" / "B_1")
    message = (rf"^Cannot list the folder {re.escape(str(tmp_path / 'data' / 'B_1'))} \(Permission denied\): user id "
               rf"\d+ may not read it, so the cases in it would be left out: make it readable \(e\.g\. chmod a\+rx .*B_1\)")
    for case_errors in (None, {}):  # batch inference too: the folder's cases are unknown, so none can fail alone
        with pytest.raises(CaseError, match=message):
            discover_cases(tmp_path / "data", case_errors=case_errors)
    locked(tmp_path / "data")
    with pytest.raises(CaseError, match=rf"^Cannot list the folder {re.escape(str(tmp_path / 'data'))} \(Permission"):
        discover_cases(tmp_path / "data")
    # the file system's own lost+found (root's alone) at a data disk's mount point holds no case
    brats18(tmp_path / "disk", "A_1")
    (tmp_path / "disk" / "lost+found").mkdir()
    locked(tmp_path / "disk" / "lost+found")
    assert [c["case"] for c in discover_cases(tmp_path / "disk")] == ["A_1"]
    # an MSD / nnU-Net folder lists imagesTr/ and labelsTr/ itself
    task = tmp_path / "task"
    task.mkdir()
    (task / "dataset.json").write_text(json.dumps(MSD_DESC))
    touch(task / "imagesTr" / "BRATS_001.nii.gz")
    touch(task / "labelsTr" / "BRATS_001.nii.gz")
    (task / "notes").mkdir()  # a folder beside them, which only a warning about NIfTI files left unread looks into
    locked(task / "notes")
    assert [c["case"] for c in discover_cases(task)] == ["BRATS_001"]
    locked(task / "labelsTr")
    with pytest.raises(CaseError, match=r"^Cannot list the folder .*labelsTr \(Permission denied\)"):
        discover_cases(task)

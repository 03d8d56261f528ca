"""Train/validation splitting and datalist files."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from app.data.datalist import (
    evaluation_cases, median_spacing, prepare_datalist, read_datalist, shard_cases, split_cases, write_datalist,
)
from tests.data.helpers import errors_of_call_on_pipe


def records(n):
    return [{"case": f"Case_{i:03d}", "images": {"flair": f"/d/Case_{i:03d}_flair.nii.gz"}} for i in range(n)]


def ids(cases):
    return [c["case"] for c in cases]


def test_split_is_deterministic_and_order_independent():
    cases = records(20)
    train, val = split_cases(cases, val_fraction=0.2, seed=3)
    shuffled = cases[:]
    random.Random(1).shuffle(shuffled)
    assert (ids(train), ids(val)) == tuple(map(ids, split_cases(shuffled, val_fraction=0.2, seed=3)))
    assert len(val) == 4 and len(train) == 16
    assert sorted(ids(train) + ids(val)) == ids(cases) and not set(ids(train)) & set(ids(val))
    assert ids(val) == sorted(ids(val)) and ids(train) == sorted(ids(train))
    other_seeds = {tuple(ids(split_cases(cases, 0.2, seed=s)[1])) for s in range(5)}
    assert len(other_seeds) > 1  # the seed matters


def test_split_sizes():
    assert [len(v) for _, v in (split_cases(records(n), 0.2) for n in (1, 2, 3, 10, 11))] == [0, 1, 1, 2, 2]
    train, val = split_cases(records(2), val_fraction=0.9)
    assert len(train) == 1 and len(val) == 1  # never an empty training set
    assert split_cases([], 0.2) == ([], [])
    # rounded to the nearest whole case, halves up: 13 * 0.2 = 2.6 -> 3; 10 * 0.25 = 2.5 -> 3; 10 * 0.24 -> 2
    assert [len(split_cases(records(n), f)[1]) for n, f in ((13, 0.2), (10, 0.25), (10, 0.24))] == [3, 3, 2]


def test_split_rejects_bad_input():
    with pytest.raises(ValueError, match=r"^--val_fraction 1\.0 must be a number > 0 and < 1 .*, e\.g\. --val_fraction 0\.2\.$"):
        split_cases(records(4), val_fraction=1.0)
    # a word on the command line stopped the run with a TypeError traceback
    with pytest.raises(ValueError, match=r"^--val_fraction 'abc' must be a number > 0 and < 1"):
        split_cases(records(4), val_fraction="abc")
    assert split_cases(records(4), val_fraction="0.25") == split_cases(records(4), val_fraction=0.25)
    with pytest.raises(ValueError, match="Duplicate case ids"):
        split_cases(records(3) + records(1), 0.2)


def test_shards_cover_every_case_once_and_are_padded_to_one_length():
    cases = records(10)
    shards = [shard_cases(cases, r, 4, seed=2) for r in range(4)]
    assert [len(s) for s in shards] == [3, 3, 3, 3]  # 12 slots: two cases are dealt twice
    dealt = [c["case"] for s in shards for c in s]
    assert set(dealt) == set(ids(cases)) and len(set(dealt)) == 10
    shuffled = cases[::-1]
    assert [shard_cases(shuffled, r, 4, seed=2) for r in range(4)] == shards  # by id, not input order
    assert shard_cases(cases, 0, 4, seed=3) != shards[0]
    assert shard_cases(cases, 0, 1) == sorted(cases, key=lambda c: shard_cases(cases, 0, 1).index(c))
    assert len(shard_cases(cases, 0, 1)) == 10 and shard_cases([], 1, 2) == []
    assert [len(shard_cases(cases[:1], r, 3)) for r in range(3)] == [1, 1, 1]  # fewer cases than ranks
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size\)"):
        shard_cases(cases, 4, 4)


def test_write_and_read_datalist(tmp_path):
    train, val = split_cases(records(5), 0.2)
    path = tmp_path / "sub" / "datalist.json"
    assert write_datalist(path, train, val) == str(path)
    assert json.loads(path.read_text()) == {"training": train, "validation": val}
    assert read_datalist(path) == (train, val)
    write_datalist(path, val, train)  # overwrite in place
    assert read_datalist(path) == (val, train)
    assert sorted(p.name for p in path.parent.iterdir()) == ["datalist.json"]  # no temp files left


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "datalist.json"
    write_datalist(path, records(2), [])
    before = path.read_text()
    with pytest.raises(TypeError):
        write_datalist(path, [{"case": "x", "image": object()}], [])
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["datalist.json"]
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="datalist.json"):
        read_datalist(path)


def test_prepare_datalist_on_msd_task01_as_downloaded(tmp_path):
    # imagesTs/ holds the unlabelled test images of the download; training uses imagesTr/ + labelsTr/
    task = tmp_path / "Task01_BrainTumour"
    task.mkdir()
    (task / "dataset.json").write_text(json.dumps({
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
    }))
    for folder, names in (("imagesTr", range(1, 6)), ("labelsTr", range(1, 6)), ("imagesTs", range(485, 488))):
        (task / folder).mkdir()
        for i in names:
            (task / folder / f"BRATS_{i:03d}.nii.gz").write_bytes(b"")  # discovery only looks at names
    out = prepare_datalist(tmp_path, tmp_path / "run", val_fraction=0.2, seed=0)
    assert sorted(ids(out["training"]) + ids(out["validation"])) == [f"BRATS_{i:03d}" for i in range(1, 6)]
    assert read_datalist(tmp_path / "run" / "datalist.json") == (out["training"], out["validation"])


def test_evaluation_cases_are_every_case_or_a_runs_validation_cases(caplog, tmp_path):
    from app.data.phantoms import write_phantoms

    data = tmp_path / "data"
    write_phantoms(data, cases=4, size=16, seed=0)
    for path in list(data.glob("*/*.nii.gz")):  # one flat folder: the case folders are not the split
        path.rename(data / path.name)
    everything = evaluation_cases(data)
    assert len(everything) == 4
    split = prepare_datalist(data, tmp_path / "run", val_fraction=0.25)
    datalist = tmp_path / "run" / "datalist.json"
    assert evaluation_cases(data, datalist) == split["validation"]
    assert "not used with a datalist" not in caplog.text
    assert evaluation_cases(data, datalist, label_convention="brats2023") == split["validation"]
    assert "label_convention brats2023 is not used with a datalist" in caplog.text  # said, not silently dropped
    assert [r["case"] for r in evaluation_cases(data, None)] == [r["case"] for r in everything]
    assert len(evaluation_cases(data, "")) == 4  # an empty override means none
    with pytest.raises(ValueError, match=r"Cannot read datalist .*nope.*datalist.json that training wrote"):
        evaluation_cases(data, tmp_path / "nope" / "datalist.json")
    # moved data and an empty validation split name the problem
    Path(split["validation"][0]["label"]).unlink()
    with pytest.raises(ValueError, match=r"names 1 file\(s\) that do not exist.*--dataset_dir"):
        evaluation_cases(data, datalist)
    write_datalist(datalist, split["training"], [])
    with pytest.raises(ValueError, match="holds out no validation case"):
        evaluation_cases(data, datalist)


def test_median_spacing_is_per_ras_axis(tmp_path):
    import nibabel as nib
    import numpy as np

    def image(name, affine):
        path = tmp_path / name
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), affine), str(path))
        return str(path)

    # storage axes (S, R, A) with voxel sizes (5, 1, 2): along R, A, S that is (1, 2, 5)
    sra = np.array([[0, 1, 0, 0], [0, 0, 2, 0], [5, 0, 0, 0], [0, 0, 0, 1]], float)
    records = [{"images": {"flair": image("a.nii.gz", sra)}},
               {"images": {"t1": image("b.nii.gz", np.diag([1.0, 2.0, 5.0, 1.0]))}},
               {"image4d": image("c.nii.gz", np.diag([-3.0, 3.0, 3.0, 1.0])), "images": {}}]
    assert median_spacing(records) == [1.0, 2.0, 5.0]
    assert median_spacing(records[2:]) == [3.0, 3.0, 3.0]
    assert median_spacing([]) is None


def test_bundle_label_convention_reads_brats2024_resection_cavity_as_background(tmp_path, make_case):
    """BraTS 2024 cases are named as BraTS 2023's: the bundle's label_convention decides their label 4."""
    import os

    from monai.bundle import ConfigParser

    from app.data.errors import CaseError

    for case in ("BraTS-GLI-02000-000", "BraTS-GLI-02001-000"):  # outer oedema 2, middle cavity 4, inner ET 3
        make_case(tmp_path / "data", case, layout="brats2023", label_values=(2, 4, 3))
    bundle = os.path.join(os.path.dirname(__file__), "..", "..", "bundles", "brats_gmd", "configs")

    def first_sample(convention, evaluate=False):
        parser = ConfigParser()
        parser.read_config([os.path.join(bundle, "train.yaml")] + ([os.path.join(bundle, "evaluate.yaml")] * evaluate))
        parser.update({"dataset_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / convention),
                       "label_convention": convention})
        records = parser.get_parsed_content("validate#dataset#data" if evaluate else "datalist")
        record = records[0] if evaluate else records["training"][0]
        if not evaluate:  # the run's step that writes datalist.json (after the datasets are built)
            step = next(i for i, s in enumerate(parser.get("run")) if "write_datalist" in s)
            parser.get_parsed_content(f"run#{step}")
        return record, parser.get_parsed_content("preprocessing", instantiate=True)

    with pytest.raises(CaseError, match=r"\[4\] unknown.*'brats2024'.*--label_convention NAME"):
        record, preprocessing = first_sample("auto")
        for t in preprocessing:
            record = t(record)
    for evaluate in (False, True):
        record, preprocessing = first_sample("brats2024", evaluate)
        assert record["label_map"] == {"ncr": [1], "ed": [2], "et": [3], "other": [4]}
        sample = record
        for t in preprocessing:
            sample = t(sample)
        wt, tc, et = (sample["label"][i].bool() for i in range(3))
        assert int(wt.sum()) == 10 * 10 * 8 - 6 * 6 * 4 + 2 * 2 * 2  # the cavity shell is in no region
        assert bool((tc == et).all()) and int(et.sum()) == 2 * 2 * 2
    saved = read_datalist(tmp_path / "brats2024" / "datalist.json")[0]
    assert saved[0]["label_map"]["other"] == [4]


def test_a_resumed_run_keeps_its_split(tmp_path):
    """A resume that would split differently (new cases, another seed or fraction) must not move a
    case the model trained on into validation: refused, and the recorded split stays."""
    from app.data.phantoms import write_phantoms

    data, run = tmp_path / "data", tmp_path / "run"
    write_phantoms(data, cases=6, size=16, seed=0)
    first = prepare_datalist(data, run, val_fraction=0.34, seed=0)
    recorded = (run / "datalist.json").read_text()
    (run / "models").mkdir()
    (run / "models" / "checkpoint_last.pt").write_bytes(b"a checkpoint")
    for resume in ("true", "auto", True):
        assert prepare_datalist(data, run, val_fraction=0.34, seed=0, resume=resume) == first
    for change in ({"seed": 5}, {"val_fraction": 0.5}):
        settings = {"val_fraction": 0.34, "seed": 0, **change}
        with pytest.raises(ValueError, match=r"splits the cases differently .*validation \+Phantom_\d+.*"
                                             r"--dataset_dir, --val_fraction and --seed"):
            prepare_datalist(data, run, resume="auto", **settings)
        assert (run / "datalist.json").read_text() == recorded
        # a new run into the folder (no resume) may split as it likes
        prepare_datalist(data, run, resume=False, **settings)
        write_datalist(run / "datalist.json", first["training"], first["validation"])
    # a case added to the dataset since that lands in training only (same validation) is refused too
    first_train = first["training"]
    write_datalist(run / "datalist.json", first_train[1:], first["validation"])
    with pytest.raises(ValueError, match=rf"splits the cases differently from the run it continues \(training \+{first_train[0]['case']} against"):
        prepare_datalist(data, run, val_fraction=0.34, seed=0, resume=True)
    write_datalist(run / "datalist.json", first_train, first["validation"])
    # auto without a checkpoint is a new run
    (run / "models" / "checkpoint_last.pt").unlink()
    assert prepare_datalist(data, run, val_fraction=0.5, seed=0, resume="auto")["validation"] != first["validation"]


def test_a_resume_that_splits_differently_names_the_flag_and_value_that_restore_the_split(tmp_path):
    """--seed 1 on a resume was refused with 'Resume with the original --dataset_dir, --val_fraction and --seed': a
    colleague resuming days later did not know which seed the run had; the checkpoint records it."""
    import torch

    from app.data.phantoms import write_phantoms

    data, run = tmp_path / "data", tmp_path / "run"
    write_phantoms(data, cases=30, size=16, seed=0)
    prepare_datalist(data, run, val_fraction=0.5, seed=0)
    (run / "models").mkdir()
    torch.save({"settings": {"seed": 0, "val_fraction": 0.5, "dataset_dir": str(data)}},
               run / "models" / "checkpoint_last.pt")
    with pytest.raises(ValueError) as err:
        prepare_datalist(data, run, val_fraction=0.5, seed=3, resume=True)
    message = str(err.value)
    assert "Resume with --seed 0 (--seed 0 there, 3 here), or start a new run" in message, message
    # a split of many cases names a few of them and how many more
    assert " more" in message and message.count("+Phantom_") <= 10, message


def test_prepare_datalist_can_leave_the_writing_to_the_caller(tmp_path, make_case):
    """The bundles write the split only once every case has been read (no datalist.json after a bad file)."""
    from app.data.datalist import prepare_datalist, read_datalist, write_datalist

    for i in range(3):
        make_case(tmp_path / "data", f"case{i}")
    split = prepare_datalist(tmp_path / "data", tmp_path / "out", write=False)
    assert not (tmp_path / "out" / "datalist.json").exists()
    write_datalist(tmp_path / "out" / "datalist.json", split["training"], split["validation"])
    assert read_datalist(tmp_path / "out" / "datalist.json") == (split["training"], split["validation"])


def test_evaluation_of_a_folder_refuses_a_case_without_label(tmp_path, make_case):
    """Evaluation scores every case under --dataset_dir: one without its label is named, not skipped."""
    from app.data.datalist import evaluation_cases
    from app.data.errors import CaseError

    make_case(tmp_path, "case0")
    make_case(tmp_path, "case1", label=False)
    with pytest.raises(CaseError, match=r"case 'case1': expected .*case1_seg\.nii\.gz"):
        evaluation_cases(tmp_path)


def test_a_test_folder_given_with_a_datalist_is_refused_rather_than_silently_ignored(tmp_path):
    """--dataset_dir TEST --eval_datalist O/datalist.json scored the run's held-out cases and ignored TEST, so
    the report on the validation cases passed for one on the test folder."""
    from app.data.phantoms import write_phantoms

    data, test = tmp_path / "data", tmp_path / "test"
    write_phantoms(data, cases=4, size=16, seed=0)
    write_phantoms(test, cases=2, size=16, seed=1)
    split = prepare_datalist(data, tmp_path / "run", val_fraction=0.25)
    datalist = tmp_path / "run" / "datalist.json"
    with pytest.raises(ValueError, match=r"--eval_datalist .*datalist.json scores the held-out cases of a training "
                                         r"run, and they do not lie under --dataset_dir .*test .*pass --eval_datalist "
                                         r"alone .* or --dataset_dir alone"):
        evaluation_cases(test, datalist)
    # the training folder names the same cases (python -m app ablate passes it), also through a symlink
    assert evaluation_cases(data, datalist) == split["validation"]
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    assert evaluation_cases(tmp_path / "link", datalist) == split["validation"]
    assert evaluation_cases(None, datalist) == split["validation"]
    with pytest.raises(ValueError, match=r"No cases to score: pass --dataset_dir .* or --eval_datalist"):
        evaluation_cases(None, None)


def test_a_folder_the_command_line_read_as_a_number_is_refused_with_the_fix(tmp_path, monkeypatch):
    """``--dataset_dir 2021`` (a folder named after the release) reaches the bundle as the number 2021:
    training and evaluation stopped with ``TypeError: expected str, bytes or os.PathLike object, not
    int`` in a traceback, and ``--output_dir 2021`` would have failed the same way."""
    from app.data.datalist import evaluation_cases, prepare_datalist
    from app.engines import check_output_dir
    from app.inference.batch import run_batch

    monkeypatch.chdir(tmp_path)
    (tmp_path / "2021").mkdir()
    with pytest.raises(ValueError, match=r"--dataset_dir 2021 was read as a number.*--dataset_dir \./2021"):
        prepare_datalist(2021, tmp_path / "out")
    with pytest.raises(ValueError, match=r"--output_dir 2021 was read as a number.*--output_dir \./2021"):
        prepare_datalist(tmp_path, 2021)
    with pytest.raises(ValueError, match=r"--dataset_dir 2021 was read as a number"):
        evaluation_cases(2021)
    with pytest.raises(ValueError, match=r"--output_dir 2022 was read as a number"):
        check_output_dir(2022)
    with pytest.raises(ValueError, match=r"--input_dir 2021 was read as a number"):
        run_batch(None, 2021, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2021"]  # nothing written


def test_relative_paths_of_a_datalist_are_read_from_its_own_folder(tmp_path, monkeypatch):
    """A datalist written by hand with paths relative to itself (as MONAI's load_decathlon_datalist reads them)
    was read relative to the folder the command ran from: the evaluation found its cases only when a scheduler
    happened to start it beside the datalist, and called them moved otherwise."""
    import os

    from app.data.phantoms import write_phantoms

    data = tmp_path / "data"
    write_phantoms(data, cases=3, size=16, seed=0)
    split = prepare_datalist(data, tmp_path / "run", val_fraction=0.34)
    home = tmp_path / "lists" / "eval"  # not as deep as the folder the command runs from
    home.mkdir(parents=True)
    relative = [{**r, "images": {q: os.path.relpath(f, home) for q, f in r["images"].items()},
                 "label": os.path.relpath(r["label"], home)} for r in split["validation"]]
    assert relative[0]["label"].startswith("../../data/")
    datalist = home / "datalist.json"
    write_datalist(datalist, [], relative)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert evaluation_cases(None, datalist) == split["validation"]  # the absolute paths training would write
    assert evaluation_cases(data, os.path.relpath(datalist, elsewhere)) == split["validation"]
    assert read_datalist(datalist)[1] == split["validation"]
    # --dataset_dir=~/data (a '~' the shell left alone) names the folder discovery reads: the same cases
    monkeypatch.setenv("HOME", str(tmp_path))
    assert evaluation_cases("~/data", datalist) == split["validation"]


def test_a_datalist_from_elsewhere_is_confined_to_the_dataset_dir_given_with_it(tmp_path):
    """The path policy the Security section of the README states: a datalist names the files it reads (absolute,
    or relative to its folder, ``..`` included), so one from elsewhere may name any scan the user can read; given
    with --dataset_dir, every file it names must lie under that folder, so a ``..`` out of it is refused."""
    import os

    from app.data.phantoms import write_phantoms

    data, other = tmp_path / "data", tmp_path / "other_study"
    write_phantoms(data, cases=2, size=16, seed=0)
    write_phantoms(other, cases=2, size=16, seed=1)
    split = prepare_datalist(other, tmp_path / "run", val_fraction=0.5)
    home = data / "lists"
    home.mkdir()
    escaping = [{**r, "images": {q: os.path.relpath(f, home) for q, f in r["images"].items()},
                 "label": os.path.relpath(r["label"], home)} for r in split["validation"]]
    assert escaping[0]["label"].startswith("../../other_study/")
    datalist = home / "datalist.json"
    write_datalist(datalist, [], escaping)
    assert evaluation_cases(None, datalist) == split["validation"]  # alone: read as given
    with pytest.raises(ValueError, match=r"do not lie under --dataset_dir .*data \(e\.g\. .*other_study"):
        evaluation_cases(data, datalist)


def test_a_datalist_repeating_a_case_is_refused_instead_of_weighing_it_more(tmp_path):
    """A datalist edited by hand, or sent from elsewhere, that lists one validation case many times: each entry
    was scored, and the case weighed that much more in every subset's mean, with only a warning per subset."""
    from app.data.phantoms import write_phantoms

    data = tmp_path / "data"
    write_phantoms(data, cases=3, size=16, seed=0)
    split = prepare_datalist(data, tmp_path / "run", val_fraction=0.67)
    first, second = split["validation"][:2]
    datalist = tmp_path / "edited.json"
    write_datalist(datalist, [], [first, *[second] * 1000, first])
    with pytest.raises(ValueError, match=rf"edited\.json lists case '{second['case']}' 1000 times in its validation "
                                         r"cases \(and 1 other case\(s\) more than once\): .*Remove the repeated"):
        evaluation_cases(None, datalist)
    with pytest.raises(ValueError, match="1000 times"):
        evaluation_cases(data, datalist)


def test_relative_4d_image_of_a_datalist_is_read_from_its_own_folder_and_empty_values_are_kept(tmp_path):
    """A case given as one 4D file (image4d) is joined to the datalist's folder like separate sequences; an
    empty or null value (no label) stays as it is rather than becoming the datalist's folder."""
    datalist = tmp_path / "lists" / "datalist.json"
    datalist.parent.mkdir()
    write_datalist(datalist, [{"case": "a", "image4d": "../data/a.nii.gz", "label": ""}],
                   [{"case": "b", "images": {"flair": "b_flair.nii.gz"}, "label": None}])
    train, val = read_datalist(datalist)
    assert train == [{"case": "a", "image4d": str(tmp_path / "data" / "a.nii.gz"), "label": ""}]
    assert val == [{"case": "b", "images": {"flair": str(tmp_path / "lists" / "b_flair.nii.gz")}, "label": None}]


def test_a_datalist_written_by_hand_is_checked_entry_by_entry_naming_the_datalist_and_the_key(tmp_path):
    """A datalist assembled by hand from several sites stopped with a KeyError traceback (MONAI's own
    {'image': [...], 'label': ...} form) or with 'record has a label but no label_map; re-run discovery',
    which named neither the datalist nor the key to add."""
    from app.data.phantoms import write_phantoms

    data = tmp_path / "data"
    write_phantoms(data, cases=3, size=16, seed=0)
    split = prepare_datalist(data, tmp_path / "run", val_fraction=0.34)
    good = split["validation"][0]
    datalist = tmp_path / "hand.json"

    def refused(entry, match):
        write_datalist(datalist, [], [good, entry])
        with pytest.raises(ValueError, match=match) as err:
            evaluation_cases(None, datalist)
        assert str(err.value).startswith(f"{datalist}: ")  # the file to fix, first

    files = [*good["images"].values()]
    refused({"image": files, "label": good["label"]},
            r"validation entry 2 of 2 \(keys \['image', 'label'\]\) is not a case record.*'label_map'")
    refused(files, r"validation entry 2 of 2 \(list\) is not a case record")
    refused({**good, "images": files}, r"gives 'images' as list, which does not say which file is which sequence")
    refused({**good, "images": {"FLAIR": files[0]}}, r"names sequence\(s\) \['FLAIR'\] in 'images'")
    refused({**good, "images": {}}, r"names no image")
    refused({**good, "images": {}, "image4d": files[0], "channels": None}, r"has a 4D image but no 'channels'")
    refused({**good, "label": None}, r"has no 'label': evaluation scores each case against its segmentation")
    refused({k: v for k, v in good.items() if k not in ("label_map", "layout")},
            r"case '.*' has no 'label_map' with \['ncr', 'ed', 'et'\].*'et': \[3\] for BraTS 2023\+")
    # a label map lacking one part (a site without enhancing tumour values) scores no ET: refused the same way
    refused({**good, "label_map": {"ncr": [1], "ed": [2]}}, r"case '.*' has no 'label_map' with \['ncr', 'ed', 'et'\]")
    # the form training writes, with each site's own label values, is read as it is
    other_site = {**split["training"][0], "case": "site_b_001", "label_map": {"ncr": [1], "ed": [2], "et": [3]}}
    write_datalist(datalist, [], [good, other_site])
    assert evaluation_cases(None, datalist) == [good, other_site]


@pytest.mark.parametrize("how", ["symlink", "copy", "hard_link"])
def test_one_scan_under_two_case_ids_stays_on_the_training_side_of_the_split(tmp_path, caplog, how):
    """A folder assembled from several sites or BraTS releases can hold one case under two ids (BraTS 2020's
    BraTS20_Training_003 is also in BraTS 2021 under another name): the split by id put one copy in training
    and the other in validation without a word, and validation scored a case the model trained on."""
    import os
    import shutil

    from app.data.datalist import shared_scans
    from app.data.discovery import discover_cases
    from app.data.phantoms import write_phantoms

    data = tmp_path / "data"
    write_phantoms(data / "site_a", cases=4, size=16, seed=0)
    assert shared_scans(discover_cases(data, require_label=True)) == []  # other scans: nothing shared
    source = data / "site_a" / "Phantom_002"
    again = data / "site_b" / "BraTS2021_00002"
    again.mkdir(parents=True)
    for seq in ("flair", "t1", "t1ce", "t2", "seg"):
        src, dst = source / f"Phantom_002_{seq}.nii.gz", again / f"BraTS2021_00002_{seq}.nii.gz"
        {"symlink": lambda: dst.symlink_to(src), "copy": lambda: shutil.copy(src, dst),
         "hard_link": lambda: os.link(src, dst)}[how]()
    cases = discover_cases(data, require_label=True)
    assert [(a, b) for a, b, _, _ in shared_scans(cases)] == [("BraTS2021_00002", "Phantom_002")]
    copies = {"BraTS2021_00002", "Phantom_002"}
    # a seed whose split by id puts the two copies on either side
    seed = next(k for k in range(100) if len({c["case"] for c in split_cases(cases, 0.4, k)[1]} & copies) == 1)
    with caplog.at_level("WARNING", logger="app.data.datalist"):
        out = prepare_datalist(data, tmp_path / "run", val_fraction=0.4, seed=seed)
    assert copies <= set(ids(out["training"])) and not copies & set(ids(out["validation"]))
    assert len(out["validation"]) == 1 and ids(out["training"]) == sorted(ids(out["training"]))
    assert "Cases 'BraTS2021_00002' and 'Phantom_002' hold the same scan" in caplog.text
    assert str(again / "BraTS2021_00002_flair.nii.gz") in caplog.text and "train instead" in caplog.text
    assert read_datalist(tmp_path / "run" / "datalist.json") == (out["training"], out["validation"])
    # a case and its copy alone: nothing would be left to validate on
    pair = tmp_path / "pair"
    shutil.copytree(source, pair / "Phantom_002")
    shutil.copytree(source, pair / "Phantom_002_again")
    for path in (pair / "Phantom_002_again").iterdir():
        path.rename(path.with_name(path.name.replace("Phantom_002", "Phantom_002_again")))
    with pytest.raises(ValueError, match=r"Every validation case holds the scan of a training case.*--val_fraction"):
        prepare_datalist(pair, tmp_path / "run_pair")
    assert not (tmp_path / "run_pair").exists()


def test_copies_stay_together_on_either_side_and_the_warning_says_when_it_names_only_some(tmp_path, caplog):
    """Every case of a folder held twice (two sites' folders of one cohort): the copies of a training case train,
    the copies the split put in validation alone stay there together, and the warning's count matches the
    names it gives (it listed three of four moved cases as if they were all)."""
    import os

    from app.data.datalist import shared_scans
    from app.data.discovery import discover_cases
    from app.data.phantoms import write_phantoms

    data = tmp_path / "data"
    write_phantoms(data / "site_a", cases=6, size=16, seed=0)
    for case in sorted((data / "site_a").iterdir()):
        again = data / "site_b" / f"Copy{case.name}"
        again.mkdir(parents=True)
        for f in case.iterdir():
            os.link(f, again / f.name.replace(case.name, again.name))
    cases = discover_cases(data, require_label=True)
    assert len(shared_scans(cases)) == 6

    def scan(case_id):  # one id per scan: a copy's id without its prefix
        return case_id.removeprefix("Copy")

    # a seed whose split by id moves more than three validation cases and leaves a pair in validation
    def moved_and_pairs(seed):
        train, val = split_cases(cases, 0.5, seed)
        trained = {scan(r["case"]) for r in train}
        moved = [r for r in val if scan(r["case"]) in trained]
        return len(moved), len(val) - len(moved)
    seed = next(k for k in range(200) if moved_and_pairs(k)[0] > 3 and moved_and_pairs(k)[1] >= 2)
    n_moved, _ = moved_and_pairs(seed)
    with caplog.at_level("WARNING", logger="app.data.datalist"):
        out = prepare_datalist(data, tmp_path / "run", val_fraction=0.5, seed=seed, write=False)
    train, val = {scan(c) for c in ids(out["training"])}, [scan(c) for c in ids(out["validation"])]
    assert not train & set(val) and val and all(val.count(s) == 2 for s in val)  # pairs, on one side each
    assert f"{n_moved} validation case(s) holding a training case's scan (" in caplog.text
    assert ", ...) train instead" in caplog.text


def test_training_cases_at_another_voxel_size_than_the_others_are_named(tmp_path, caplog):
    """A site's cases at 2 mm among 1 mm ones trained at their own scale without a word, while the model records
    the median voxel size, to which inference resamples every scan."""
    import nibabel as nib
    import numpy as np

    from app.data.phantoms import write_phantoms

    data = tmp_path / "data"
    write_phantoms(data, cases=5, size=16, seed=0)  # 1 mm
    with caplog.at_level("WARNING", logger="app.data.datalist"):
        prepare_datalist(data, tmp_path / "run", val_fraction=0.2)
    assert "voxel size" not in caplog.text  # one scale: nothing to say
    split = prepare_datalist(data, tmp_path / "run", val_fraction=0.2)
    odd = split["training"][1]
    for path in [*odd["images"].values(), odd["label"]]:  # the same volumes as another site stores them, at 2 mm
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([2.0, 2.0, 2.0, 1.0])), path)
    caplog.clear()
    with caplog.at_level("WARNING", logger="app.data.datalist"):
        prepare_datalist(data, tmp_path / "run2", val_fraction=0.2)
    assert f"1 of the 4 training cases ({odd['case']} at [2.0, 2.0, 2.0] mm) have a voxel size more than 10% off" \
        in caplog.text
    assert "median, [1.0, 1.0, 1.0] mm" in caplog.text and "Resample them to [1.0, 1.0, 1.0] mm" in caplog.text


def test_a_header_that_contradicts_itself_is_warned_once_per_case_in_training_and_evaluation(tmp_path, make_case,
                                                                                          caplog):
    """Inference recorded sform/qform and sform/pixdim disagreements as header_conflicts; training and evaluation
    said nothing, though a researcher viewing such a case in ITK-SNAP sees it elsewhere. They now warn once per case
    by the same check (headers only)."""
    import logging

    import nibabel as nib
    import numpy as np

    from app.data.datalist import evaluation_cases, prepare_datalist
    from app.inference.io import read_case

    data = tmp_path / "data"
    for i in range(3):
        make_case(data, f"case{i}")
    turned = np.eye(4)
    turned[:3, :3] = [[1, 0, 0], [0, np.cos(0.1), -np.sin(0.1)], [0, np.sin(0.1), np.cos(0.1)]]
    for f in sorted((data / "case1").iterdir()):  # every file of the case: still one warning
        img = nib.load(str(f))
        out = nib.Nifti1Image(np.asarray(img.dataobj), turned)
        out.set_sform(turned, code=1)
        out.set_qform(np.eye(4), code=1)  # e.g. a registration that rewrote the sform only
        nib.save(out, str(f))
    with caplog.at_level(logging.WARNING, logger="app.data.datalist"):
        split = prepare_datalist(data, tmp_path / "run", val_fraction=0.34)
    warnings = [r.getMessage() for r in caplog.records if "ITK-SNAP" in r.getMessage()]
    conflict = read_case(dict(next(r for r in split["training"] + split["validation"]
                                   if r["case"] == "case1")["images"])).header_conflicts["flair"]
    assert len(warnings) == 1 and warnings[0].startswith(f"Case 'case1': {data / 'case1' / 'case1_flair.nii.gz'}: "
                                                         f"{conflict}. Training and evaluation read the sform")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="app.data.datalist"):
        evaluation_cases(data)
    assert [r.getMessage() for r in caplog.records if "ITK-SNAP" in r.getMessage()] == warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="app.data.datalist"):
        evaluation_cases(data, tmp_path / "run" / "datalist.json")
    said = [r.getMessage() for r in caplog.records if "ITK-SNAP" in r.getMessage()]
    assert said == (warnings if "case1" in [r["case"] for r in split["validation"]] else [])


def test_an_eval_datalist_that_is_a_named_pipe_is_refused_instead_of_waited_on(tmp_path):
    """``--eval_datalist`` naming a named pipe made evaluation wait for a writer forever, without a word."""
    pipe = tmp_path / "datalist.json"
    os.mkfifo(pipe)
    outcome = errors_of_call_on_pipe(lambda: evaluation_cases(None, pipe), pipe, "evaluation")
    assert outcome == [f"{pipe} is a named pipe, not a file: it is not read (reading it would wait or run forever). "
                       "Pass the datalist.json that training wrote into its --output_dir."]

"""Phantom cases: MRI-like contrasts per sequence, files on disk, and the command line."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from app.data.discovery import discover_cases
from app.data.phantoms import main, make_phantom, write_phantoms
from app.data.transforms import LoadCased

SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def phantoms():
    return [make_phantom(32, np.random.default_rng(s)) for s in SEEDS]


def test_arrays_and_labels(phantoms):
    for p in phantoms:
        assert set(p) == {"flair", "t1", "t1ce", "t2", "seg", "brain"}
        for seq in ("flair", "t1", "t1ce", "t2"):
            assert p[seq].dtype == np.int16 and p[seq].shape == (32, 32, 32) and p[seq].min() >= 0
        assert p["seg"].dtype == np.uint8
        assert set(np.unique(p["seg"]).tolist()) == {0, 1, 2, 4}
        head = p["flair"] > 0
        assert 0.2 < head.mean() < 0.8  # a head on zero background
        assert not p["seg"][~head].any()  # tumour inside the head
        assert p["brain"].sum() > 1000


def test_contrasts_like_real_mri(phantoms):
    for p in phantoms:
        seg, brain = p["seg"], p["brain"]
        ed, et, ncr, core, tumour = seg == 2, seg == 4, seg == 1, (seg == 1) | (seg == 4), seg > 0

        def mean(seq, mask):
            return float(p[seq][mask].mean())

        assert mean("flair", ed) > 1.3 * mean("flair", brain)
        assert mean("t1ce", et) > 1.3 * mean("t1ce", ncr)
        assert mean("t1ce", et) > 1.3 * mean("t1ce", brain)
        assert mean("t2", ed) > 1.2 * mean("t2", brain)
        assert mean("t2", core) > 1.2 * mean("t2", brain)
        flair_contrast = abs(mean("flair", tumour) / mean("flair", brain) - 1)
        t1_contrast = abs(mean("t1", tumour) / mean("t1", brain) - 1)
        assert t1_contrast < 0.4 * flair_contrast  # T1 alone barely shows the tumour


def test_reproducible_and_sizes():
    a = make_phantom(16, np.random.default_rng(5))
    b = make_phantom(16, 5)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert make_phantom((20, 18, 16), 0)["seg"].shape == (20, 18, 16)
    with pytest.raises(ValueError, match=">= 16"):
        make_phantom(8, 0)


def test_write_discover_and_load(tmp_path):
    folders = write_phantoms(tmp_path, cases=2, size=20, seed=7)
    assert folders == [str(tmp_path / "Phantom_000"), str(tmp_path / "Phantom_001")]
    cases = discover_cases(tmp_path, require_label=True)
    assert [c["case"] for c in cases] == ["Phantom_000", "Phantom_001"]
    assert all(c["layout"] == "brats2018" and c["modalities"] == ["flair", "t1", "t1ce", "t2"] for c in cases)
    img = nib.load(cases[0]["images"]["t1ce"])
    assert img.get_data_dtype() == np.int16 and img.shape == (20, 20, 20)
    np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), 1.0)
    assert nib.load(cases[0]["label"]).get_data_dtype() == np.uint8
    out = LoadCased()(cases[0])
    assert out["image"].shape == (4, 20, 20, 20) and out["label"].shape == (3, 20, 20, 20)
    assert out["label"][0].sum() > 0
    # case i depends only on (seed, i): writing more cases keeps the first ones
    more = write_phantoms(tmp_path / "more", cases=3, size=20, seed=7)
    np.testing.assert_array_equal(
        nib.load(f"{more[1]}/Phantom_001_flair.nii.gz").get_fdata(), nib.load(cases[1]["images"]["flair"]).get_fdata()
    )


def test_command_line(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--cases", "1", "--size", "16", "--seed", "1"]) == 0
    assert "Wrote 1 phantom case" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "Phantom_000").iterdir()) == [
        f"Phantom_000_{s}.nii.gz" for s in ("flair", "seg", "t1", "t1ce", "t2")
    ]
    capsys.readouterr()
    # each bad option is named with its value (the line named --cases beside a bad --size, and the other way round)
    for args, line in ((["--cases", "0"], "error: --cases 0 must be a whole number >= 1, e.g. --cases 16."),
                       (["--size", "8"], "error: --size 8: every size must be >= 16 voxels, e.g. --size 48.")):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path), "--cases", "1", *args])
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(line)
    with pytest.raises(SystemExit):
        main(["--cases", "2"])


def test_a_negative_seed_is_refused_naming_the_flag(tmp_path, capsys):
    # numpy refused it with "error: expected non-negative integer", which named no flag
    with pytest.raises(SystemExit) as stop:
        main(["--out", str(tmp_path / "out"), "--cases", "1", "--size", "16", "--seed", "-1"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: --seed must be a whole number >= 0, got -1: e.g. --seed 0.")
    assert not (tmp_path / "out").exists()


def test_an_output_path_that_is_a_file_is_refused_in_one_line(tmp_path, capsys):
    # `python -m app phantoms --out FILE` ended in a NotADirectoryError traceback
    from app.__main__ import main as app_main

    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    with pytest.raises(ValueError, match=r"notes.txt is a file, not a folder: pass a folder for the cases"):
        write_phantoms(taken, cases=1, size=16)
    assert app_main(["phantoms", "--out", str(taken / "sub"), "--cases", "1", "--size", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: phantom folder ") and err.count("\n") == 1
    assert taken.read_text() == "mine"


def test_a_bad_size_leaves_no_case_folder(tmp_path):
    with pytest.raises(ValueError, match="Phantom size"):
        write_phantoms(tmp_path / "out", cases=2, size=8)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())



def _phantoms_under_a_file_size_limit(out: str, limit: int, report: str) -> None:
    """``python -m app phantoms --out OUT --cases 2 --size 16`` in a forked process whose files cannot grow beyond
    ``limit`` bytes; its stderr goes to ``report``, and its exit status is the command's."""
    import contextlib
    import io
    import resource
    import signal
    import sys

    from app.__main__ import main as app_main

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write beyond the limit fails instead of killing
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rc = app_main(["phantoms", "--out", out, "--cases", "2", "--size", "16"])
    except BaseException:  # noqa: BLE001 - what the command let through is what the test reports
        import traceback

        traceback.print_exc(file=err)
        rc = 1
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    with open(report, "w") as f:
        f.write(err.getvalue())
    sys.exit(rc)


def test_a_write_cut_off_keeps_the_earlier_cases_whole_and_is_one_line(tmp_path):
    """nib.save wrote each scan in place: a full disk left a truncated scan, which training then refused as damaged,
    and `python -m app phantoms` ended in an OSError traceback. Now each case's files are written together, so a
    rerun cut off keeps the cases already there byte for byte and leaves no temporary file.

    The cut is a file-size limit (a write beyond it fails), which stops every writer at the same point, as a full
    disk does; the command runs in a forked process, which the limit is set in."""
    import multiprocessing

    out, report = tmp_path / "cases", tmp_path / "stderr.txt"
    write_phantoms(out, cases=2, size=16)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    child = multiprocessing.get_context("fork").Process(target=_phantoms_under_a_file_size_limit,
                                                        args=(str(out), 1000, str(report)))
    child.start()
    child.join(120)
    first = out / "Phantom_000" / "Phantom_000_flair.nii.gz"
    err = report.read_text()
    assert child.exitcode == 2 and err == f"error: Cannot write {first} (File too large): check that disk, or write " \
                                          "to another folder.\n", err[-2000:]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

"""Atomic writes (``app.atomic``): a write or its check that fails leaves the destination as it was."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from app.atomic import atomic_write, atomic_write_text
from tests.bundles.helpers import REPO, repo_env
from tests.fakes import FullDiskFile


def test_check_sees_the_complete_temporary_file_before_the_rename(tmp_path):
    target = tmp_path / "model.bin"
    atomic_write_text(target, "old")
    seen: list[tuple[str, str, str]] = []

    def check(tmp: Path) -> None:
        seen.append((tmp.parent.name, tmp.read_bytes().decode(), target.read_text()))

    atomic_write(target, lambda f: f.write(b"new"), check=check)
    assert seen == [(tmp_path.name, "new", "old")] and target.read_text() == "new"


def test_failed_check_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.bin"
    atomic_write_text(target, "old")

    def reject(tmp: Path) -> None:
        raise ValueError(f"{tmp} does not match its source")

    with pytest.raises(ValueError, match="does not match"):
        atomic_write(target, lambda f: f.write(b"new"), check=reject)
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("status, returncode", [(0, 0), (2, 2), (130, -2), (143, -15)])
def test_a_stopped_tool_dies_by_its_signal_so_a_shell_loop_stops(status, returncode):
    """bash ends a loop over cases at Ctrl-C only when the child died by SIGINT, not on exit 130."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", f"from app.atomic import exit_with; exit_with({status})"],
                          cwd=REPO, env=repo_env(), timeout=60)
    assert proc.returncode == returncode


def test_stop_by_signal_restores_the_previous_handler(capsys):
    import os
    import signal

    from app.atomic import run_interruptible

    previous = signal.getsignal(signal.SIGTERM)

    def stopped():
        os.kill(os.getpid(), signal.SIGTERM)
        return 0

    assert run_interruptible(stopped) == 143 and run_interruptible(lambda: 0) == 0
    assert capsys.readouterr().err.startswith("error: stopped by SIGTERM")
    assert signal.getsignal(signal.SIGTERM) is previous


def test_interrupted_write_removes_its_temporary_and_keeps_the_old_file(tmp_path):
    # Ctrl-C (KeyboardInterrupt, not an Exception) mid-write must not leave a temporary behind
    from app.atomic import stale_temporaries

    target = tmp_path / "model.bin"
    atomic_write_text(target, "old")

    def interrupted(f) -> None:
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"] and stale_temporaries(target) == []


def test_stale_temporaries_lists_only_the_hidden_temporaries_of_that_file(tmp_path):
    from app.atomic import stale_temporaries

    target = tmp_path / "model.bin"
    names = [".model.bin.123.abcdef01.tmp", "model.bin.123.abcdef01.tmp", ".other.bin.1.abcdef01.tmp", "model.bin"]
    for name in names:
        (tmp_path / name).write_text("x")
    assert [p.name for p in stale_temporaries(target)] == [".model.bin.123.abcdef01.tmp"]
    assert stale_temporaries(tmp_path / "missing" / "model.bin") == []


def test_the_file_is_fsynced_before_the_rename_and_the_folder_only_when_asked(tmp_path, monkeypatch):
    import os

    import app.atomic as atomic

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    monkeypatch.setattr(atomic, "fsync_dir", lambda folder: events.append(f"dir {Path(folder).name}"))
    atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"))
    assert events == ["fsync", "replace"]
    events.clear()
    atomic_write(tmp_path / "b.bin", lambda f: f.write(b"x"), sync_dir=True)
    assert events == ["fsync", "replace", f"dir {tmp_path.name}"]


@pytest.mark.parametrize("writer", ["bytes", "torch.save"])
def test_a_full_disk_names_the_file_and_the_fix_and_keeps_the_old_file(writer, tmp_path, monkeypatch, capsys):
    """The disk's own error named no file (``[Errno 28] No space left on device``), and torch.save
    turned it into ``RuntimeError: ... unexpected pos``: a training or evaluation that filled the disk
    ended in a traceback. The error now names the file and the fix, as one ``error:`` line of a bundle
    run, and the old file stays."""
    import errno
    import os
    import sys

    import torch

    import app.atomic as atomic
    from app.engines.utils import report_input_errors

    target = tmp_path / "model.pt"
    atomic_write_text(target, "old")
    real_fdopen = os.fdopen
    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: FullDiskFile(real_fdopen(fd, mode), room=10))
    write = (lambda f: f.write(b"x" * 100)) if writer == "bytes" else (lambda f: torch.save(torch.zeros(1000), f))
    with pytest.raises(OSError) as raised:
        atomic_write(target, write)
    monkeypatch.undo()
    err = raised.value
    assert str(err) == (f"Cannot write {target} (No space left on device): free space on that disk (or raise the "
                        "quota), or write to another folder.") and err.errno == errno.ENOSPC
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]

    monkeypatch.setattr(sys, "excepthook", lambda *a: print("traceback", file=sys.stderr))
    report_input_errors()  # what a bundle run installs first: the product's own errors as one line
    sys.excepthook(type(err), err, err.__traceback__)
    assert capsys.readouterr().err == f"error: {err}\n"


def test_a_name_too_long_for_the_temporary_names_the_fix(tmp_path):
    """A case id of 240 characters gives an output name the file system takes, but not the hidden
    temporary written first: the error said "check that disk" instead of naming the name's length."""
    from app.atomic import atomic_write_text

    path = tmp_path / ("L" * 240 + ".json")
    with pytest.raises(OSError, match=r"Cannot write .*L\.json \(File name too long\): use a shorter name \(245 bytes"):
        atomic_write_text(path, "{}\n")
    assert list(tmp_path.iterdir()) == []


def test_an_output_under_an_unexpanded_home_folder_is_refused(tmp_path, monkeypatch):
    """'~' quoted or after '=' (--out=~/seg.nii.gz) reached the tools as it is: inference, export, batch inference
    and the phantoms wrote into a folder named '~' where the job ran (the phantoms failed half-way: nibabel
    expands '~' and the case folder was made under ./~), while the inputs came from the home folder."""
    import os

    from app.atomic import check_writable_folder
    from app.inference.pipeline import check_output_path

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"^--output-dir ~/inf: '~' is not expanded here .*: give {tmp_path}/home/inf "
                                         rf"instead of a folder named '~' in {tmp_path}\.$"):
        check_writable_folder("~/inf", "--output-dir ~/inf")
    with pytest.raises(ValueError, match=rf"^--out ~/seg.nii.gz: .*give {tmp_path}/home/seg.nii.gz instead"):
        check_output_path("~/seg.nii.gz", "--out", (".nii.gz",))
    check_output_path("~seg.nii.gz", "--out", (".nii.gz",))  # a name starting with '~': no home folder meant
    assert os.listdir(tmp_path) == []


def test_an_input_under_an_unexpanded_home_folder_names_the_path_to_give(tmp_path, monkeypatch):
    """--ckpt_path=~/runs/model.pt (a '~' the shell leaves alone) was 'not found' although the file exists: the
    checkpoint, MMSA, datalist and scan readers now name the path the '~' stands for."""
    from app.data.datalist import read_datalist
    from app.data.mmsa import load_mmsa
    from app.inference.io import read_volume
    from app.inference.model import load_network
    from app.networks.weights import read_state_dict

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    hint = rf"\('~' is not expanded here: .*; give {tmp_path}/runs/x\.[\w.]+\)"
    for read, name in ((read_state_dict, "x.pt"), (load_network, "x.pt"), (load_mmsa, "x.pkl"),
                       (read_datalist, "x.json"), (lambda p: read_volume(p, "flair"), "x.nii.gz")):
        with pytest.raises((ValueError, OSError), match=rf"^(Checkpoint |MMSA feature file |Cannot read datalist )?"
                                                       rf"~/runs/{name}( \(flair\) does not exist| not found)? ?{hint}"):
            read(f"~/runs/{name}")
    with pytest.raises(FileNotFoundError) as missing:
        read_state_dict(tmp_path / "runs" / "x.pt")  # a path without '~' gets no hint
    assert "expanded" not in str(missing.value)


def test_an_output_folder_behind_a_dangling_link_is_refused_before_any_work(tmp_path):
    """A link to a disk that is not mounted passed the check (the folder it would be made in could be written):
    training then stopped with a FileExistsError traceback, batch inference with '[Errno 17] File exists', and
    single-case inference only after it had segmented the case."""
    import os

    from app.atomic import check_writable_folder
    from app.inference.pipeline import check_output_path

    link = tmp_path / "scratch"
    link.symlink_to(tmp_path / "not_mounted" / "runs")
    for folder in (link, link / "run1" / "models"):
        with pytest.raises(ValueError, match=rf"^--output_dir {folder}: {link} is a symbolic link to "
                                             rf"{tmp_path}/not_mounted/runs, which does not exist \(a disk that is not "
                                             r"mounted, or a moved folder\): mount or create its target"):
            check_writable_folder(folder, f"--output_dir {folder}")
    with pytest.raises(ValueError, match=rf"^--out {link}/seg.nii.gz: {link} is a symbolic link"):
        check_output_path(link / "seg.nii.gz", "--out", (".nii.gz",))
    (tmp_path / "not_mounted" / "runs").mkdir(parents=True)  # mounted: the link is a folder like another
    check_writable_folder(link / "run1", "--output_dir")
    assert sorted(os.listdir(tmp_path)) == ["not_mounted", "scratch"] and os.listdir(link) == []


def test_an_input_that_is_a_dangling_link_names_its_target(tmp_path):
    """A scan or checkpoint that ls lists but whose link points to a moved or unmounted file was reported as
    'does not exist', which the user could not reconcile with the listing."""
    from app.data.transforms import LoadCased
    from app.inference.io import read_volume
    from app.networks.weights import read_state_dict

    scan, ckpt = tmp_path / "Case_flair.nii.gz", tmp_path / "model.pt"
    scan.symlink_to(tmp_path / "archive" / "Case_flair.nii.gz")
    ckpt.symlink_to(tmp_path / "archive" / "model.pt")
    hint = rf"\(it is a symbolic link to {tmp_path}/archive/%s, which does not exist: a moved or unmounted file\)"
    with pytest.raises(ValueError, match=rf"^{scan} \(flair\) does not exist {hint % 'Case_flair.nii.gz'}"):
        read_volume(scan, "flair")
    with pytest.raises(FileNotFoundError, match=rf"^Checkpoint {ckpt} not found {hint % 'model.pt'}"):
        read_state_dict(ckpt)
    record = {"case": "Case", "images": {"flair": str(scan)}, "image4d": None, "channels": {}, "label": None,
              "modalities": ["flair"]}
    with pytest.raises(ValueError, match=rf"^{scan} does not exist {hint % 'Case_flair.nii.gz'}: restore the file"):
        LoadCased()(record)


def test_a_path_ending_with_the_carriage_return_of_a_windows_job_script_is_named(tmp_path):
    """A job script saved with Windows line endings gives the last argument of each line a carriage return:
    --output_dir /data/out wrote into a folder named 'out\\r' that every message showed as 'out', and
    infer refused --out seg.nii.gz as not ending with .nii.gz."""
    import os

    from app.atomic import check_writable_folder
    from app.data.discovery import discover_cases
    from app.inference.pipeline import check_output_path
    from app.networks.weights import read_state_dict

    out = f"{tmp_path}/out\r"
    windows = r"ends with a carriage return \(\\r\): the job script has Windows line endings; convert it with dos2unix"
    with pytest.raises(ValueError, match=rf"^--output_dir {tmp_path}/out\\r: the path '{tmp_path}/out\\r' {windows}"):
        check_writable_folder(out, f"--output_dir {out}")
    with pytest.raises(ValueError, match=rf"^--out {tmp_path}/seg.nii.gz\\r: the path .* {windows}"):
        check_output_path(f"{tmp_path}/seg.nii.gz\r", "--out", (".nii.gz",))
    with pytest.raises(ValueError, match=r"^--out x\\ty.nii.gz: the path 'x\\ty.nii.gz' holds a control or "
                                         r"invisible character"):
        check_output_path("x\ty.nii.gz", "--out", (".nii.gz",))
    assert os.listdir(tmp_path) == []
    (tmp_path / "model.pt").write_bytes(b"")  # the file the path means is there
    hint = r"\(the path ends with a carriage return, \\r: the job script has Windows line endings"
    with pytest.raises(FileNotFoundError, match=rf"^Checkpoint {tmp_path}/model.pt\r not found {hint}"):
        read_state_dict(f"{tmp_path}/model.pt\r")
    with pytest.raises(ValueError, match=rf"^Data folder {tmp_path}\r does not exist or is not a folder {hint}"):
        discover_cases(f"{tmp_path}\r")


def test_a_bare_home_folder_is_read_as_home(tmp_path, monkeypatch):
    """--output_dir=~ (no slash after it) is the home folder as much as ~/runs: the output went into a folder
    named '~' where the job ran, and an input --dataset_dir=~ was 'not found' without the path meant."""
    from app.atomic import check_path_text, missing_hint

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"^--output_dir ~: '~' is not expanded here .*: give {tmp_path}/home "
                                         r"instead of a folder named '~'"):
        check_path_text("~", "--output_dir ~")
    assert missing_hint("~") == (" ('~' is not expanded here: the shell expands it only unquoted and not after '='; "
                                 f"give {tmp_path}/home)")
    live = tmp_path / "link"
    live.symlink_to(tmp_path)
    assert missing_hint(live) == ""  # a link to an existing file or folder is no cause of a missing input


def test_outputs_take_the_umask_and_replace_a_link_under_their_name(tmp_path):
    """The permissions and link handling the Security section of the README states for every atomic output
    (reports, datalists, checkpoints, exports): the process's umask decides who may read them (nothing is
    ever made wider), and a symbolic link at the output's name is replaced, never written through."""
    victim = tmp_path / "notes.txt"
    victim.write_text("someone else's file")
    out = tmp_path / "run" / "subset_dice.json"
    out.parent.mkdir()
    out.symlink_to(victim)
    previous = os.umask(0o027)
    try:
        atomic_write_text(out, "{}")
        atomic_write_text(tmp_path / "run" / "models" / "model.pt", "weights")
    finally:
        os.umask(previous)
    assert victim.read_text() == "someone else's file" and not out.is_symlink() and out.read_text() == "{}"
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "run" / "models").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "run" / "models" / "model.pt").stat().st_mode) == 0o640


def test_remove_abandoned_temporaries_removes_only_those_of_dead_writers(tmp_path):
    """A kill mid-write leaves a hidden temporary; it goes once its writer is gone, never while it writes."""
    import os
    import subprocess
    import sys

    from app.atomic import remove_abandoned_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    abandoned = tmp_path / f".subset_dice.json.{dead_pid}.0123abcd.tmp"
    live = tmp_path / f".subset_dice.md.{os.getpid()}.89abcdef.tmp"
    other = tmp_path / ".notes.tmp"  # not a name atomic_write gives
    for path in (abandoned, live, other):
        path.write_text("x")
    assert remove_abandoned_temporaries(tmp_path) == [abandoned]
    assert not abandoned.exists() and live.exists() and other.exists()
    assert remove_abandoned_temporaries(tmp_path / "missing") == []


@pytest.mark.parametrize("char", ["\t", "\x1b", "\x9b", "\u202e", "\u200b", "\u2028", "\udcff"])
def test_an_output_path_is_refused_for_each_character_a_case_id_is_refused_for(tmp_path, char):
    """Output paths were refused for C0 controls and DEL only, while case ids (the same names, in the same messages
    and report rows) were refused for C1 controls, bidi overrides, zero-width characters, line separators and the
    bytes of a name that are not UTF-8 too: such an output folder was created, and printed as another name. One
    definition now serves both, and the message shows the path escaped."""
    import os

    from app.atomic import check_path_text, check_writable_folder
    from app.inference.pipeline import check_output_path

    out = f"{tmp_path}/out{char}1"
    shown = repr(out)[1:-1]  # the character as its escape: printable, and spelt as it is
    message = f"--output_dir {shown}: the path {out!r} holds a control or invisible character: retype the path."
    with pytest.raises(ValueError) as err:
        check_writable_folder(out, f"--output_dir {out}")
    assert str(err.value) == message and str(err.value).isprintable()
    with pytest.raises(ValueError, match="holds a control or invisible character"):
        check_output_path(f"{tmp_path}/seg{char}.nii.gz", "--out", (".nii.gz",))
    assert os.listdir(tmp_path) == []
    check_path_text(f"{tmp_path}/Größe Fall\u00a01", "--output_dir")  # accents and spaces stay accepted
    check_path_text(f"{tmp_path}/\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "--output_dir")  # a Persian ZWNJ
    check_path_text(f"{tmp_path}/\u0915\u094d\u200d\u0937", "--output_dir")  # a Devanagari ZWJ


def test_ctrl_c_while_a_command_imports_ends_with_one_line(monkeypatch, capsys):
    """`python -m app ablate` imports torch for seconds before its work starts: Ctrl-C then printed an import
    traceback instead of the one line and status 130 of a stop."""
    import importlib

    from app.__main__ import main

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib, "import_module", interrupted)
    assert main(["ablate", "--help"]) == 130
    assert capsys.readouterr().err.startswith("error: stopped by SIGINT")


def test_a_forked_child_keeps_the_file_that_took_the_number_of_a_lock_its_caller_closed(tmp_path):
    """A caller of lock_folder may close the lock's descriptor itself; the number then goes to the next file the
    process opens. A forked child closed that file too (a test's forked writer lost the file it reported to)."""
    from app.atomic import lock_folder

    fd = lock_folder(tmp_path / "locked")
    os.close(fd)
    other = os.open(tmp_path / "report.txt", os.O_WRONLY | os.O_CREAT)
    try:
        assert other == fd  # the lowest free number: the case to check
        child = os.fork()
        if child == 0:
            try:
                os.write(other, b"written by the child")
                os._exit(0)
            except OSError:
                os._exit(1)
        _, status = os.waitpid(child, 0)
    finally:
        os.close(other)
    assert os.waitstatus_to_exitcode(status) == 0
    assert (tmp_path / "report.txt").read_bytes() == b"written by the child"


def test_a_forked_child_does_not_keep_the_folder_locked_after_the_parent_lets_go(tmp_path):
    """Data-loader workers are forked while training holds its output folder's lock: when a stopped run's
    workers outlived it by a second or two, the resume a scheduler starts at once was refused as a second run."""
    import signal

    from app.atomic import lock_folder, locked_folder

    started, ready = os.pipe()
    with locked_folder(tmp_path, "busy"):
        worker = os.fork()
        if worker == 0:  # a worker still shutting down after its parent ended
            os.write(ready, b"1")
            signal.pause()
            os._exit(0)
        os.read(started, 1)  # the child runs past fork(), where its fork handlers run
    os.close(started)
    os.close(ready)
    try:
        fd = lock_folder(tmp_path)  # BlockingIOError while the worker shares the parent's lock
        os.close(fd)
    finally:
        os.kill(worker, signal.SIGKILL)
        os.waitpid(worker, 0)

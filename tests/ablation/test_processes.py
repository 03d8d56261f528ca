"""The ablation's processes and files: a busy output folder, stages' logs, stops and kills passed to the running stage,
a full disk."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app.data.phantoms import write_phantoms
from tests.ablation.helpers import ablate
from tests.bundles.helpers import REPO, TINY
from tests.fakes import FullDiskFile


@pytest.mark.parametrize("seeds", [[], ["--seeds", "0,1"]])
def test_a_second_ablation_on_a_busy_output_dir_stops_before_writing(seeds, tmp_path):
    """A job started twice: while one ablation runs in --output_dir, a second one stops with one line and
    writes nothing (it used to record its own settings over the first's and train and score beside it)."""
    import fcntl
    import os

    data, out = tmp_path / "phantoms", tmp_path / "ablation"
    write_phantoms(data, cases=4, size=32, seed=0)
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)  # what the running ablation holds (the kernel releases it when it dies)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = ablate("--bundle", "bundles/brats_gmd", "--strategies", "plain", "--max_epochs", "1", "--output_dir",
                      str(out), "--dataset_dir", str(data), "--epoch_length", "1", *seeds, *TINY)
    finally:
        os.close(fd)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: --output_dir {out} is in use by another run that is still writing into it (a job started twice?): "
        "wait for it to end, or pass another --output_dir (bench/mosi_compare.py: --out_dir)."]
    assert list(out.iterdir()) == []


def test_a_failed_bundle_run_reports_its_error_line(tmp_path):
    from app.ablation import _run_bundle

    bundle = REPO / "bundles" / "brats_gmd"
    log = tmp_path / "train.log"
    with pytest.raises(RuntimeError, match=r"exit code 1: error: --patch_sizes is not a setting .*\(its output is in"):
        _run_bundle([bundle / "configs" / "train.yaml"], bundle, ["--patch_sizes", "[32,32,32]"], log)
    assert "error: --patch_sizes" in log.read_text()


def test_a_bundle_log_replaces_a_link_under_its_name_instead_of_writing_through_it(tmp_path, monkeypatch):
    """open(log, "w") follows a symbolic link: a link planted under a stage's log name (a shared output folder)
    had the ablation truncate and overwrite the file it named with the training's output."""
    from app.ablation import _run_bundle

    victim = tmp_path / "notes.txt"
    victim.write_text("someone else's file")
    log = tmp_path / "plain" / "train.log"
    log.parent.mkdir()
    log.symlink_to(victim)
    class _Trained:
        def __init__(self, cmd, stdout, **kwargs):
            stdout.write("trained\n")

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", _Trained)
    bundle = REPO / "bundles" / "brats_gmd"
    _run_bundle([bundle / "configs" / "train.yaml"], bundle, [], log)
    assert victim.read_text() == "someone else's file"
    assert not log.is_symlink() and log.read_text().endswith("trained\n")


_PARENT = """
import sys
from pathlib import Path
from app.ablation import _run_bundle
_run_bundle([Path(sys.argv[1])], Path(sys.argv[2]), [], Path(sys.argv[3]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_bundle_run_ends_when_the_ablation_is_killed(tmp_path):
    """An ablation killed outright (SIGKILL: the OOM killer, timeout -s KILL) used to leave its
    training running on its own, and the ablation run again to resume then trained a second model
    into the same stage folder at the same time."""
    import os
    import signal
    import time

    from tests.bundles.helpers import repo_env

    pid_file = tmp_path / "child.pid"
    config = tmp_path / "stage.yaml"  # a stage that records its process id, then trains for a minute
    config.write_text(f"run:\n  - \"$open({str(pid_file)!r}, 'w').write(str(__import__('os').getpid()))\"\n"
                      "  - \"$__import__('time').sleep(60)\"\n")
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(config), str(tmp_path), str(tmp_path / "stage.log")],
                              cwd=REPO, env=repo_env(OMP_NUM_THREADS="1"))
    child = None
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
            assert parent.poll() is None, (tmp_path / "stage.log").read_text()
            time.sleep(0.2)
        child = int(pid_file.read_text())
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
                with open(f"/proc/{child}/stat") as f:  # a zombie: ended, waiting for a reaper
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break
            except (ProcessLookupError, FileNotFoundError):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the bundle run {child} kept running after the ablation was killed")
    finally:
        if parent.poll() is None:
            parent.kill()
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals and process groups")
def test_a_stop_of_the_ablation_lets_the_running_stage_stop_cleanly(tmp_path):
    """Ctrl-C or SIGTERM reaching the ablation killed its bundle run (SIGKILL) a quarter of a second later, so a
    training stage never wrote its checkpoint at the stop; one stopped by `kill PID` was not told at all. The stop
    is passed on once and the stage's own clean stop (here: half a second) ends the run."""
    import signal
    import threading
    import time

    from app.ablation import _run_logged

    code = ("import os, signal, sys, time\n"
            "got = []\n"
            "signal.signal(signal.SIGINT, lambda s, f: got.append(s))\n"
            "print('ready', os.getpgid(0) == os.getpid(), flush=True)\n"
            "deadline = time.monotonic() + 60\n"
            "while not got and time.monotonic() < deadline: time.sleep(0.02)  # never a hang: a failure\n"
            "time.sleep(0.5)  # the end of its iteration and its checkpoint\n"
            "print('stopped cleanly after', len(got), 'signal(s)', flush=True)\n"
            "sys.exit(130)\n")
    log = tmp_path / "train.log"
    log.write_text("the log of the run stopped before\n")

    def interrupt() -> None:
        for _ in range(600):
            if "\nready " in log.read_text():  # the child's line (the command line above it holds the word too)
                os.kill(os.getpid(), signal.SIGINT)  # to the ablation alone (kill -INT PID)
                return
            time.sleep(0.05)

    # Python's own Ctrl-C behaviour, also where the test process started with SIGINT ignored (a background job's)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            _run_logged([sys.executable, "-c", code], log, append=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    text = log.read_text()
    assert text.startswith("the log of the run stopped before\n")
    assert "ready True" in text  # its own process group: the terminal's Ctrl-C reaches it once, through the ablation
    assert "stopped cleanly after 1 signal(s)" in text, text


def test_a_stage_is_told_it_runs_in_the_ablation_so_its_hints_name_the_ablation_command(tmp_path, monkeypatch):
    """A stopped stage's log said "run the same command with --resume true": its bundle command, run again by hand,
    trains the stage outside the ablation, which resumes it itself when its own command is run again."""
    from app.ablation import _run_logged
    from app.engines.checkpoint import ABLATION_STAGE_ENV, resume_hint

    monkeypatch.delenv(ABLATION_STAGE_ENV, raising=False)
    log = tmp_path / "train.log"
    code = ("from app.engines.checkpoint import resume_hint; print('hint:', resume_hint())")
    assert _run_logged([sys.executable, "-c", code], log) == 0
    assert "hint: run the same python -m app ablate command again (it resumes this stage from its checkpoint)" in \
        log.read_text(), log.read_text()
    assert resume_hint() == "run the same command with --resume true"  # a training started by hand


def test_a_full_disk_is_one_error_line_naming_the_file_and_the_fix(tmp_path, monkeypatch, capsys):
    """The runner's own files (a stage's settings record, its log, the tables) on a full disk ended the ablation
    with an OSError traceback, which `python -m app ablate` did not turn into its one error line."""
    import app.ablation as ablation
    import app.atomic as atomic

    out = tmp_path / "out"
    real_fdopen = os.fdopen
    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: FullDiskFile(real_fdopen(fd, mode)))
    rc = ablation.main(["--bundle", str(REPO / "bundles" / "brats_gmd"), "--strategies", "plain", "--max_epochs", "1",
                        "--output_dir", str(out), "--dataset_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and err == (f"error: Cannot write {out / 'plain' / 'train_settings.json'} (No space left on device): "
                               "free space on that disk (or raise the quota), or write to another folder.\n"), err
    assert not [p for p in out.rglob("*") if p.is_file()]  # nor a temporary file
    monkeypatch.undo()
    # the stage's log, written before its training starts: no training runs
    monkeypatch.setattr(ablation, "open", lambda path, mode: FullDiskFile(real_fdopen(os.open(path, os.O_WRONLY | os.O_CREAT),
                                                                                   mode)), raising=False)
    monkeypatch.setattr(ablation.subprocess, "Popen", lambda *a, **k: pytest.fail("the stage ran"))
    log = out / "plain" / "train.log"
    with pytest.raises(OSError, match=rf"^Cannot write {log} \(No space left on device\): free space"):
        ablation._run_bundle([REPO / "bundles" / "brats_gmd" / "configs" / "train.yaml"], REPO / "bundles" / "brats_gmd",
                             [], log)


@pytest.mark.parametrize("seeds", [None, [0, 1]])
def test_an_output_dir_that_cannot_be_made_is_refused_before_any_stage(seeds, tmp_path, monkeypatch):
    """A read-only place stopped the ablation with a PermissionError traceback; --output_dir=~/runs (a '~' the
    shell leaves alone after '=') made a folder named '~' where the job ran, which the first training refused."""
    import os

    from app.ablation import run_ablation, run_ablation_seeds

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    bundle = REPO / "bundles" / "brats_gmd"

    def ablate(out):
        if seeds:
            return run_ablation_seeds(bundle, "plain", out, 1, seeds, bundle_args=["--dataset_dir", str(tmp_path)])
        return run_ablation(bundle, "plain", out, 1, bundle_args=["--dataset_dir", str(tmp_path)])

    with pytest.raises(ValueError, match=r"^--output_dir ~/runs: '~' is not expanded here .*: give "
                                         f"{tmp_path / 'home' / 'runs'} instead"):
        ablate("~/runs")
    assert os.listdir(tmp_path) == []  # no folder named '~' here, nor the home folder
    if sys.platform.startswith("linux"):  # /proc takes no new files, whoever runs the test (root included)
        with pytest.raises(ValueError, match=r"^--output_dir /proc/brats_gmd_ablation: cannot write in /proc"):
            ablate("/proc/brats_gmd_ablation")

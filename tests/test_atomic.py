"""Atomic writes (``app.atomic``): a write or its check that fails leaves the destination as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.atomic import atomic_write, atomic_write_text
from tests.bundles.helpers import REPO, repo_env


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

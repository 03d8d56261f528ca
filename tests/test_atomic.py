"""Atomic writes (``app.atomic``): a write or its check that fails leaves the destination as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.atomic import atomic_write, atomic_write_text


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

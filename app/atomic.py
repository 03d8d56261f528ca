"""Atomic file writes: readers see the previous file or the complete new one, never a partial write.

Every writer of results, datalists, checkpoints and exported models goes through
:func:`atomic_write`: the data goes to a temporary file ``.<name>.<pid>.<random>.tmp`` in the same
folder (a rename is atomic only within one file system), is flushed and fsynced, optionally
checked, then ``os.replace`` moves it over the destination. On an error (or a failed check) the
temporary file is removed and the destination is untouched; after a kill it stays behind, and
:func:`stale_temporaries` finds it. :func:`run_interruptible` makes SIGTERM (``docker stop``, a
scheduler's cancel) unwind like Ctrl-C, so the command-line tools remove their temporaries then too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, NoReturn

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "exit_with", "fsync_dir", "run_interruptible",
           "stale_temporaries"]


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries to disk, so a rename in it survives a power loss (POSIX; a no-op
    where folders cannot be opened, e.g. on Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[BinaryIO], None],
    sync_dir: bool = False,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``path`` atomically with ``write(binary_file)``.

    Parent folders are created; the file gets the usual ``0o666 & ~umask`` permissions.

    Args:
        path: the destination.
        write: writes the whole content into the open binary file it is given.
        sync_dir: also fsync the folder after the rename (checkpoints: the new file survives a
            power loss, not only a killed process).
        check: called with the path of the complete temporary file before it replaces ``path``
            (e.g. reload and verify an exported model); whatever it raises is raised with ``path``
            left as it was.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files :func:`atomic_write` left next to ``path`` when its process was killed mid-write."""
    target = Path(path)
    if not target.parent.is_dir():
        return []
    return sorted(target.parent.glob(f".{target.name}.*.tmp"))


class _Stopped(KeyboardInterrupt):
    """A stop request by signal, raised in the main thread so that cleanup code runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def run_interruptible(work: Callable[[], int]) -> int:
    """Run a command-line tool's ``work`` so that SIGTERM and Ctrl-C stop it cleanly.

    Python ignores SIGTERM's default action only as PID 1 (a container's entrypoint), and otherwise
    dies without unwinding, leaving temporaries behind. Here both signals raise in the main thread:
    every write in progress removes its temporary file, and the tool prints one line and returns
    128 + the signal number (130 for Ctrl-C, 143 for SIGTERM), which :func:`exit_with` turns back
    into death by that signal. Outputs finished before the stop stay.
    """
    def stop(signum: int, frame: object) -> None:
        raise _Stopped(signum)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
    try:
        return work()
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"error: stopped by {signal.Signals(signum).name}: the file being written was removed; what was "
              "finished before the stop is kept.", file=sys.stderr)
        return 128 + int(signum)
    finally:
        if main_thread:
            # None: a handler installed outside Python, which cannot be put back; the default then
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def exit_with(status: int) -> NoReturn:
    """End the process with ``status``; a :func:`run_interruptible` stop (130, 143) ends it by that
    signal instead, so that a calling shell sees the signal (a loop over cases stops at Ctrl-C).
    As PID 1 (a container) the signal's default action would be ignored, so the status is used."""
    signum = status - 128
    if signum in (signal.SIGINT, signal.SIGTERM) and os.getpid() != 1:
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    sys.exit(status)

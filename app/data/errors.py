"""The error type of the data layer, kept in its own module so every data module (and the model
loaders) can raise it, and the check that tells a file this process may not read from a damaged one."""

from __future__ import annotations

import os
import stat

__all__ = ["CaseError", "WorkerCaseError", "check_readable", "check_regular_file", "one_line", "special_file_kind",
           "too_large_to_read", "unreadable"]


class CaseError(ValueError):
    """A case on disk cannot be used as it is; the message names the file or folder and the fix."""


class WorkerCaseError(CaseError):
    """A :class:`CaseError` found in a data-loader worker process, as the main process receives it.

    PyTorch passes a worker's exception to the main process as its type and the text of its whole
    traceback, and raises ``type(text)`` there: the message that names the file and the fix would end
    a long traceback (``--num_workers 2``, the default) instead of being the one line it is with
    ``--num_workers 0``. Built from that text, this error keeps only the message, which the worker
    raised last; with ``APP_TRACEBACK=1`` the worker's traceback is kept as a note.

    Args:
        message: the message, or PyTorch's ``Caught ... Original Traceback ...`` text ending with it.
    """

    def __init__(self, message: str = "") -> None:
        full = str(message)
        marker = f"{WorkerCaseError.__module__}.{WorkerCaseError.__qualname__}: "
        if "Traceback" in full and marker in full:  # PyTorch's re-raise: the worker's traceback, then the message
            message = full.rpartition(marker)[2].strip()
        super().__init__(message)
        if full != message and os.environ.get("APP_TRACEBACK") == "1":
            self.add_note(full)


def one_line(text: object) -> str:
    """``text`` with its line breaks and runs of spaces made single spaces, for a one-line error message."""
    return " ".join(str(text).split())


def unreadable(path: str | os.PathLike) -> CaseError:
    """The error for a file this process may not read: a permission problem, not a damaged file."""
    who = f"user id {os.getuid()}" if hasattr(os, "getuid") else "this user"
    return CaseError(f"{os.fspath(path)} is not readable by {who}: make it readable (e.g. chmod a+r), or run as a user "
                     "who may read it (Docker: --user with the file owner's id).")


def too_large_to_read(path: str | os.PathLike, shape: tuple[int, ...], itemsize: int = 4) -> CaseError:
    """The error for an intact file whose voxels do not fit in the memory left (a container's memory
    limit, a very large scan): not a damaged file, whose fix (re-export it) would be wrong."""
    mib = itemsize / 2**20
    for n in shape:
        mib *= int(n)
    return CaseError(f"Not enough memory to read {os.fspath(path)} (shape {tuple(int(n) for n in shape)}, {mib:.0f} MiB "
                     "in memory): the file is not damaged; run on a machine (or container) with more free memory.")


def special_file_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it exists but is neither a regular file nor a folder (after following links):
    ``"named pipe"``, ``"device"`` or ``"socket"``; else None."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISFIFO(mode):
        return "named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return None


def check_regular_file(path: str | os.PathLike, fix: str = "Replace it with the scan's file, or remove it.") -> None:
    """Refuse a path that is a named pipe, a device or a socket (a data folder from an archive may hold one,
    under a scan's name): opening a pipe waits for a writer forever, and a device never ends, so training,
    evaluation and inference hung on such a "scan" instead of stopping. Files given directly (a datalist,
    an MMSA feature file, a recipe) are checked here too, each with its own fix.

    Args:
        path: the file about to be opened.
        fix: the sentence that ends the message (a scan's by default).

    Raises:
        CaseError: naming the path, what it is and the fix.
    """
    kind = special_file_kind(path)
    if kind is not None:
        raise CaseError(f"{os.fspath(path)} is a {kind}, not a file: it is not read (reading it would wait or run "
                        f"forever). {fix}")


def check_readable(path: str | os.PathLike) -> None:
    """Raise :func:`unreadable` when ``path`` exists but may not be opened; other problems are left to
    the loader. Readers such as nibabel report a refused open as an unreadable format, whose fix
    (re-export the file) would be wrong. A named pipe, device or socket is refused first
    (:func:`check_regular_file`): opening a pipe would wait forever."""
    check_regular_file(path)
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise unreadable(path) from None
    except OSError:
        pass

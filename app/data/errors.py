"""The error type of the data layer, kept in its own module so every data module (and the model
loaders) can raise it, and the check that tells a file this process may not read from a damaged one."""

from __future__ import annotations

import os

__all__ = ["CaseError", "WorkerCaseError", "check_readable", "too_large_to_read", "unreadable"]


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


def check_readable(path: str | os.PathLike) -> None:
    """Raise :func:`unreadable` when ``path`` exists but may not be opened; other problems are left to
    the loader. Readers such as nibabel report a refused open as an unreadable format, whose fix
    (re-export the file) would be wrong."""
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise unreadable(path) from None
    except OSError:
        pass

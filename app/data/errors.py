"""The error type of the data layer, kept in its own module so every data module (and the model
loaders) can raise it, and the check that tells a file this process may not read from a damaged one."""

from __future__ import annotations

import os

__all__ = ["CaseError", "check_readable", "too_large_to_read", "unreadable"]


class CaseError(ValueError):
    """A case on disk cannot be used as it is; the message names the file or folder and the fix."""


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

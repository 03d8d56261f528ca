"""Stand-ins shared by tests of how the product meets a failing system."""

from __future__ import annotations

import errno
from typing import Any


class FullDiskFile:
    """An open file on a disk that fills up after ``room`` bytes: writes beyond it raise ``ENOSPC``."""

    def __init__(self, file: Any, room: int = 0) -> None:
        self.file, self.room = file, room

    def write(self, data: Any) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)

    def __enter__(self) -> FullDiskFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.file.close()

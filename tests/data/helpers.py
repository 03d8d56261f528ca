"""Helpers shared by the data-layer tests: a call that might block on a named pipe, peak memory of a call."""

from __future__ import annotations

import os
import threading
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import pytest

from app.data.errors import CaseError


def errors_of_call_on_pipe(call: Callable[[], Any], pipe: Path, what: str) -> list[str]:
    """The ``CaseError`` messages of ``call()`` run in a thread; fails the test if it waits on ``pipe`` (a named
    pipe it should refuse to open), after releasing it."""
    outcome: list[str] = []

    def run() -> None:
        try:
            call()
        except CaseError as err:
            outcome.append(str(err))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=20)
    if worker.is_alive():  # release the call stuck on the pipe
        os.close(os.open(pipe, os.O_WRONLY))
        worker.join(timeout=20)
        pytest.fail(f"{what} waited on the named pipe")
    return outcome


def case_error_and_peak(call: Callable[[], Any]) -> tuple[str, int]:
    """The message of the ``CaseError`` that ``call()`` raises, and the peak bytes Python allocated meanwhile."""
    tracemalloc.start()
    try:
        with pytest.raises(CaseError) as info:
            call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return str(info.value), peak

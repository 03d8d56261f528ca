"""Settings of the whole test suite.

One OpenMP thread per test process and per run it starts (bundle runs, ablations and torchrun ranks inherit this
process's environment), unless the caller set ``OMP_NUM_THREADS``: ``make test`` runs two test processes on two
cores, and torch's default of one thread per core put four OpenMP threads on the two cores, which wait for each other
at every barrier: a tiny training step took about 3 times the CPU time of one thread. The networks of the tests are
too small to gain from a second thread (tests/inference/conftest.py pins its package's tests the same way).

``make test``'s processes take the longest test files first (tests/scheduling.py). The bundle and ablation runs the
tests start are forked from a process that has imported torch and MONAI once (tests/warm.py): each is still a
process of its own, without the 5 s of imports a fresh one spends.

Every test must leave the process as it found it (:func:`_process_state_unchanged`, tests/process_state.py):
``make test`` runs the tests of several files in one process, and a stop-signal handler, an environment variable,
the working directory or a torch setting left behind by one test changed what a later one saw (a Ctrl-C that did
nothing, a hang).
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest

# before torch is imported: OpenMP reads it when torch loads it
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.process_state import changes, restore, restored, snapshot  # noqa: E402

_FIX = ("Restore it in the test (monkeypatch, try/finally), or use the process_state_restored fixture (or "
        "tests.process_state.restored) where the test runs, in this process, the setup of a process of its own.")


@pytest.fixture
def process_state_restored():
    """For a test that runs, in this process, code made for a process of its own: a bundle's ``initialize`` (its
    error-line hook, cuDNN determinism, its thread count, the SIGTERM handler that removes a half-made output
    folder) or MONAI's ``StatsHandler(name=None)`` (the root logger at INFO). What it set is put back afterwards,
    so the next test of the process runs as in a fresh one (see tests.process_state.restored)."""
    with restored():
        yield


def _unchanged(what: str) -> Iterator[None]:
    before = snapshot()
    yield
    found = changes(before, snapshot())
    if found:
        restore(before)
        pytest.fail(f"{what} left process-wide state changed (put back now): {'; '.join(found)}. {_FIX}",
                    pytrace=False)


@pytest.fixture(autouse=True)
def _process_state_unchanged() -> Iterator[None]:
    """Fail a test that leaves a stop-signal handler, an environment variable, the working directory, ``sys.path``,
    ``sys.excepthook``, the root logger or a torch setting changed (and put it back): ``make test`` runs several
    test files in one process, where such a leak changes what a later test sees, far from its cause (a test of the
    ablation's Ctrl-C hung on the SIGINT handler a failed in-process training had left). About 0.2 ms a test."""
    yield from _unchanged("The test")


@pytest.fixture(autouse=True, scope="module")
def _module_state_unchanged() -> Iterator[None]:
    """The same for a test file's module-scoped fixtures (an in-process training shared by its tests), whose changes
    the check of each test does not see."""
    yield from _unchanged("The module's fixtures")


def pytest_addoption(parser) -> None:
    parser.addoption("--record-file-durations", action="store_true",
                     help="write each test file's time to tests/file_durations.json, which orders the files of "
                          "`make test` (tests/scheduling.py)")


def pytest_configure(config) -> None:
    if config.getoption("record_file_durations") and not hasattr(config, "workerinput"):
        from tests.scheduling import FileDurations

        config.pluginmanager.register(FileDurations(), "file-durations")


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from tests.scheduling import costliest_first_scheduler

    return costliest_first_scheduler(config, log)

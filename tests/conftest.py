"""Settings of the whole test suite.

One OpenMP thread per test process and per run it starts (bundle runs, ablations and torchrun ranks inherit this
process's environment), unless the caller set ``OMP_NUM_THREADS``: ``make test`` runs two test processes on two
cores, and torch's default of one thread per core put four OpenMP threads on the two cores, which wait for each other
at every barrier: a tiny training step took about 3 times the CPU time of one thread. The networks of the tests are
too small to gain from a second thread (tests/inference/conftest.py pins its package's tests the same way).
"""

from __future__ import annotations

import os

import pytest

# before torch is imported: OpenMP reads it when torch loads it
os.environ.setdefault("OMP_NUM_THREADS", "1")


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

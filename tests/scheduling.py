"""The order in which ``make test``'s test processes take the test files: the longest first.

pytest-xdist's ``--dist loadfile`` keeps each file in one process (its module fixtures train once) and hands out the
files with the most tests first. The files that train models hold few tests, so they came last, and the suite ended
with one process running the last of them while the other had nothing left. Here each file's cost is its time in a
recorded run (``tests/file_durations.json``, written by ``pytest -n 2 --dist loadfile --record-file-durations``), or,
for a file that run did not see, its number of tests times the median time of one test then; the costliest file goes
first, which leaves the short ones to even out the end.
"""

from __future__ import annotations

import json
import statistics
from collections import OrderedDict, defaultdict
from pathlib import Path

DURATIONS = Path(__file__).with_name("file_durations.json")

__all__ = ["DURATIONS", "costliest_first_scheduler", "FileDurations"]


def _recorded() -> tuple[dict[str, float], float]:
    """The record, read once: the seconds per file (none without a readable record) and per test (the median; 1 s
    without one)."""
    try:
        record = json.loads(DURATIONS.read_text())
    except (OSError, ValueError):  # no record, or a damaged one: test counts
        return {}, 1.0
    try:
        files = {str(k): float(v) for k, v in record["files"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        files = {}
    try:
        per_test = float(record["median_test_seconds"])
    except (KeyError, TypeError, ValueError):
        per_test = 1.0
    return files, per_test


class _CostliestFirst(OrderedDict):
    """The scheduler's queue of files: ``popitem(last=False)``, the scheduler's only way to take a file, takes the
    costliest one left."""

    def __init__(self, recorded: dict[str, float], per_test: float) -> None:
        super().__init__()
        self._recorded, self._per_test = recorded, per_test

    def cost(self, scope: str) -> float:
        if scope in self._recorded:
            return self._recorded[scope]
        return len(self[scope]) * self._per_test

    def popitem(self, last: bool = True):  # type: ignore[override]
        if last or not self:
            return super().popitem(last)
        scope = max(self, key=self.cost)
        return scope, self.pop(scope)


def costliest_first_scheduler(config, log):
    """xdist's per-file scheduler, taking the costliest file first (see the module docstring)."""
    from xdist.scheduler import LoadFileScheduling

    recorded, per_test = _recorded()
    scheduler = LoadFileScheduling(config, log)
    scheduler.workqueue = _CostliestFirst(recorded, per_test)
    return scheduler


class FileDurations:
    """Sums the reported time of every test phase per file in the process that runs the session (xdist's controller
    receives each worker's reports) and writes ``tests/file_durations.json`` at the end."""

    def __init__(self, path: Path = DURATIONS) -> None:
        self.path = path
        self.files: dict[str, float] = defaultdict(float)
        self.tests: dict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report) -> None:
        self.files[report.nodeid.split("::", 1)[0]] += report.duration
        self.tests[report.nodeid] += report.duration

    def pytest_sessionfinish(self, session, exitstatus) -> None:
        if not self.files:
            return
        record = {
            "note": "seconds per test file in one run of the suite (setup, call and teardown of its tests); "
                    "written by pytest --record-file-durations, read by tests/scheduling.py to start the longest "
                    "files first",
            "median_test_seconds": round(statistics.median(self.tests.values()), 3),
            "files": {k: round(v, 1) for k, v in sorted(self.files.items(), key=lambda kv: -kv[1])},
        }
        self.path.write_text(json.dumps(record, indent=1) + "\n")

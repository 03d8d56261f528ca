"""The order in which the test processes take the test files (tests/scheduling.py)."""

from __future__ import annotations

import json

from tests.scheduling import FileDurations, _CostliestFirst


def test_the_costliest_file_is_taken_first_and_unrecorded_ones_by_their_test_count():
    queue = _CostliestFirst({"tests/a.py": 5.0, "tests/slow.py": 300.0}, per_test=2.0)
    queue["tests/a.py"] = {"tests/a.py::t1": False}  # as xdist fills it: the most tests first
    queue["tests/new.py"] = {f"tests/new.py::t{i}": False for i in range(4)}  # not recorded: 4 tests of 2 s
    queue["tests/slow.py"] = {"tests/slow.py::t1": False}
    assert [queue.popitem(last=False)[0] for _ in range(3)] == ["tests/slow.py", "tests/new.py", "tests/a.py"]
    queue["tests/a.py"] = {}
    queue["tests/b.py"] = {}
    assert queue.popitem()[0] == "tests/b.py"  # the last one, as a plain ordered dict gives it


def test_the_record_sums_every_phase_of_a_files_tests(tmp_path):
    class Report:
        def __init__(self, nodeid, duration):
            self.nodeid, self.duration = nodeid, duration

    record = FileDurations(tmp_path / "durations.json")
    for nodeid, duration in [("tests/a.py::t1", 1.0), ("tests/a.py::t1", 0.5), ("tests/a.py::t2[x]", 2.0),
                             ("tests/b.py::t", 7.0)]:
        record.pytest_runtest_logreport(Report(nodeid, duration))
    record.pytest_sessionfinish(None, 0)
    written = json.loads((tmp_path / "durations.json").read_text())
    assert written["files"] == {"tests/b.py": 7.0, "tests/a.py": 3.5} and list(written["files"]) == ["tests/b.py",
                                                                                                   "tests/a.py"]
    assert written["median_test_seconds"] == 2.0  # of 1.5, 2 and 7

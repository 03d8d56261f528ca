"""The tests' warm runner (tests/warm.py) ends a run as a fresh interpreter does: the same exit status, standard
streams, working directory, environment and end of the process, for each way a module can end."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import warm

PROBE = '''
import atexit, os, sys, threading, time
print("name", __name__, "argv", sys.argv[1:], "path0", sys.path[0], "cwd", os.getcwd())
print("env", os.environ.get("PROBE_VALUE"), "threads", os.environ.get("OMP_NUM_THREADS"))
print("to stderr", file=sys.stderr)
how = sys.argv[1]
if how == "code":
    sys.exit(3)
if how == "message":
    sys.exit("the run stops here")
if how == "raise":
    raise ValueError("a bad value")
if how == "atexit":
    atexit.register(lambda: print("atexit ran"))
if how == "thread":
    def late():
        time.sleep(0.3)
        print("thread ended")
    threading.Thread(target=late).start()
if how == "sleep":
    time.sleep(30)
print("end of module", end="")
'''


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """A module ``probe`` on ``PYTHONPATH``, beside the working directory, that ends as its first argument says;
    run warm, by a server that imported ``json`` first."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "probe.py").write_text(PROBE)
    monkeypatch.setitem(warm.PRELOAD, ("probe",), ("json",))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "lib"), "PROBE_VALUE": "seen"}
    yield tmp_path, env
    warm._stop_servers(("probe",))  # noqa: SLF001 - its server ran a module of this test's folder


def _without_runpy_frames(text: str) -> str:
    lines = text.splitlines()
    return "\n".join(line for i, line in enumerate(lines)
                     if "<frozen runpy>" not in line and "tests/warm.py" not in line
                     and not (i and ("<frozen runpy>" in lines[i - 1] or "tests/warm.py" in lines[i - 1])))


@pytest.mark.parametrize("how", ["plain", "code", "message", "raise", "atexit", "thread"])
def test_a_warm_run_ends_as_a_fresh_interpreter_does(probe, how):
    folder, env = probe
    cmd = [sys.executable, "-m", "probe", how]
    fresh = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=60)
    forked = warm.run(cmd, cwd=folder, env=env, timeout=60)
    assert warm._kind(cmd) == ("probe",)  # noqa: SLF001 - it was forked, not run fresh
    assert (forked.returncode, forked.stdout) == (fresh.returncode, fresh.stdout)
    assert _without_runpy_frames(forked.stderr) == _without_runpy_frames(fresh.stderr)
    assert "seen" in forked.stdout and str(folder) in forked.stdout


def test_a_warm_run_past_its_time_is_killed_as_subprocess_run_does(probe):
    folder, env = probe
    with pytest.raises(subprocess.TimeoutExpired) as info:
        warm.run([sys.executable, "-m", "probe", "sleep"], cwd=folder, env=env, timeout=1)
    assert "to stderr" in info.value.stderr


def test_a_run_starts_warm_only_where_its_start_is_a_fresh_ones(probe):
    folder, env = probe
    assert warm._kind([sys.executable, "-c", "pass"]) is None  # noqa: SLF001
    assert warm._kind(["python3", "-m", "probe"]) is None  # noqa: SLF001 - another interpreter
    assert warm._kind([sys.executable, "-m", "app", "infer"]) is None  # noqa: SLF001
    assert warm._kind([sys.executable, "-m", "app", "ablate", "--help"]) == ("app", "ablate")  # noqa: SLF001
    # a thread count is read when torch loads OpenMP: a run with another one gets a server of its own
    one = warm.run([sys.executable, "-m", "probe", "plain"], cwd=folder, env={**env, "OMP_NUM_THREADS": "1"})
    two = warm.run([sys.executable, "-m", "probe", "plain"], cwd=folder, env={**env, "OMP_NUM_THREADS": "2"})
    assert "threads 1" in one.stdout and "threads 2" in two.stdout
    assert len({key for key in warm._servers if key[0] == ("probe",)}) == 2  # noqa: SLF001


def test_a_server_that_ended_and_cannot_start_again_says_so_each_time_and_leaves_no_folder(probe, monkeypatch):
    """A server that ended was stopped again at the next run when its replacement had failed to start: that run, and
    the clean-up at exit, stopped on a FileNotFoundError for its folder instead of naming the server that did not
    start, and the replacement's own folder (socket, server.log) was left in the temporary folder."""
    import tempfile

    folder, env = probe
    cmd = [sys.executable, "-m", "probe", "plain"]
    assert warm.run(cmd, cwd=folder, env=env).returncode == 0
    (server,) = [s for key, s in warm._servers.items() if key[0] == ("probe",)]  # noqa: SLF001
    server.proc.kill()
    server.proc.wait()
    made = []
    real_mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *args, **kwargs: made.append(real_mkdtemp(*args, **kwargs)) or made[-1])
    monkeypatch.setitem(warm.PRELOAD, ("probe",), ("probe_no_such_module",))
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"(?s)the warm server for probe did not start:.*probe_no_such_module"):
            warm.run(cmd, cwd=folder, env=env)
    warm._stop_servers(("probe",))  # noqa: SLF001 - as at exit
    assert len(made) == 2 and not [path for path in made if os.path.exists(path)]

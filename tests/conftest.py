"""Settings of the whole test suite.

One OpenMP thread per test process and per run it starts (bundle runs, ablations and torchrun ranks inherit this
process's environment), unless the caller set ``OMP_NUM_THREADS``: ``make test`` runs two test processes on two
cores, and torch's default of one thread per core put four OpenMP threads on the two cores, which wait for each other
at every barrier: a tiny training step took about 3 times the CPU time of one thread. The networks of the tests are
too small to gain from a second thread (tests/inference/conftest.py pins its package's tests the same way).

Every test must leave the process as it found it (:func:`_process_state_unchanged`): ``make test`` runs the tests
of several files in one process, and a stop-signal handler, an environment variable, the working directory or a
torch setting left behind by one test changed what a later one saw (a Ctrl-C that did nothing, a hang).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

import pytest

# before torch is imported: OpenMP reads it when torch loads it
os.environ.setdefault("OMP_NUM_THREADS", "1")

#: the stop signals: a handler left installed makes a later test's Ctrl-C, SIGTERM or hang-up do something else
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
#: variables pytest and torch set for the whole process by themselves (the test being run; the compile cache folder)
_OWN_VARIABLES = frozenset({"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR"})


def _process_state() -> dict[str, Any]:
    """The process-wide settings a test could leave changed for the next test of its process (tens of microseconds)."""
    root = logging.getLogger()
    state: dict[str, Any] = {
        "signal handlers": {signal.Signals(s).name: signal.getsignal(s) for s in _STOP_SIGNALS},
        "environment": {k: v for k, v in os.environ.items() if k not in _OWN_VARIABLES},
        "working directory": os.getcwd(),
        "sys.path": list(sys.path),
        "sys.excepthook": sys.excepthook,
        "root logger level": root.level,
        # pytest's capturing handlers are its own, one set per test phase
        "root logger handlers": [h for h in root.handlers if not type(h).__module__.startswith("_pytest")],
    }
    torch = sys.modules.get("torch")
    if torch is not None:  # a test that imports torch first sees its defaults
        state["torch settings"] = {
            "threads": torch.get_num_threads(),
            "default dtype": torch.get_default_dtype(),
            "grad enabled": torch.is_grad_enabled(),
            "deterministic algorithms": (torch.are_deterministic_algorithms_enabled(),
                                         torch.is_deterministic_algorithms_warn_only_enabled()),
            "cudnn deterministic": torch.backends.cudnn.deterministic,
            "cudnn benchmark": torch.backends.cudnn.benchmark,
        }
    return state


def _restore(state: dict[str, Any]) -> None:
    """Put back what :func:`_process_state` returned."""
    for name, handler in state["signal handlers"].items():
        if handler is not None:  # None: installed outside Python, cannot be put back
            signal.signal(signal.Signals[name], handler)
    kept = {k: v for k, v in os.environ.items() if k in _OWN_VARIABLES}
    os.environ.clear()
    os.environ.update({**state["environment"], **kept})
    os.chdir(state["working directory"])
    sys.path[:] = state["sys.path"]
    sys.excepthook = state["sys.excepthook"]
    root = logging.getLogger()
    root.setLevel(state["root logger level"])
    root.propagate = True  # MONAI's get_logger(None) turns it off; the root logger has no parent anyway
    for handler in [h for h in root.handlers if not type(h).__module__.startswith("_pytest")]:
        if handler not in state["root logger handlers"]:
            root.removeHandler(handler)
    for handler in state["root logger handlers"]:
        root.addHandler(handler)  # a no-op for one still there
    torch_settings = state.get("torch settings")
    if torch_settings is not None:
        import torch

        torch.set_num_threads(torch_settings["threads"])
        torch.set_default_dtype(torch_settings["default dtype"])
        torch.set_grad_enabled(torch_settings["grad enabled"])
        enabled, warn_only = torch_settings["deterministic algorithms"]
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.backends.cudnn.deterministic = torch_settings["cudnn deterministic"]
        torch.backends.cudnn.benchmark = torch_settings["cudnn benchmark"]


def _changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    out = []
    for key, old in before.items():
        new = after.get(key)
        if new == old:
            continue
        if isinstance(old, dict):
            out += [f"{key}: {name} {old.get(name)!r} -> {new.get(name)!r}" for name in sorted({*old, *new})
                    if old.get(name) != new.get(name)]
        elif isinstance(old, list):
            out.append(f"{key}: added {[x for x in new if x not in old]!r}, removed {[x for x in old if x not in new]!r}")
        else:
            out.append(f"{key}: {old!r} -> {new!r}")
    return out


@pytest.fixture
def process_state_restored():
    """For a test that runs, in this process, code made for a process of its own: a bundle's ``initialize`` (its
    error-line hook, cuDNN determinism, its thread count, the SIGTERM handler that removes a half-made output
    folder) or MONAI's ``StatsHandler(name=None)`` (the root logger at INFO). What it set is put back afterwards,
    so the next test of the process runs as in a fresh one."""
    state = _process_state()
    yield
    _restore(state)


@pytest.fixture(autouse=True)
def _process_state_unchanged():
    """Fail a test that leaves a stop-signal handler, an environment variable, the working directory, ``sys.path``,
    ``sys.excepthook``, the root logger or a torch setting changed (and put it back): ``make test`` runs several
    test files in one process, where such a leak changes what a later test sees, far from its cause. A test that
    changes one restores it itself (``monkeypatch``, ``try``/``finally``), or requests
    :func:`process_state_restored` when the change is the product's own setup of a process of its own."""
    before = _process_state()
    yield
    after = _process_state()
    changes = _changes(before, after)
    if changes:
        _restore(before)
        pytest.fail("The test left process-wide state changed (put back now): " + "; ".join(changes)
                    + ". Restore it in the test (monkeypatch, try/finally), or request the process_state_restored "
                    "fixture where it runs a process's own setup in this one.", pytrace=False)

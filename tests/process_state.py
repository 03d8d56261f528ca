"""The process-wide state a test could leave changed for the next test of its process, and how to put it back.

``make test`` runs the tests of several files in one process (pytest-xdist, ``--dist loadfile``): a stop-signal
handler, an environment variable, the working directory or a torch setting that one test leaves behind changes what
a later one sees, far from its cause. tests/conftest.py checks every test and every test file against it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from typing import Any, Iterator

__all__ = ["snapshot", "restore", "changes", "restored"]

#: the stop signals: a handler left installed makes a later test's Ctrl-C, SIGTERM or hang-up do something else
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
#: variables the libraries set for the whole process by themselves, in whichever test first needs them: pytest (the
#: test being run), torch (its compile cache folder), MONAI when first imported (cuBLAS's deterministic workspace)
_OWN_VARIABLES = frozenset({"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR", "CUBLAS_WORKSPACE_CONFIG"})


def snapshot() -> dict[str, Any]:
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


def restore(state: dict[str, Any]) -> None:
    """Put back what :func:`snapshot` returned."""
    for name, handler in state["signal handlers"].items():
        if handler is not None:  # None: installed outside Python, cannot be put back
            signal.signal(signal.Signals[name], handler)
    kept = {k: v for k, v in os.environ.items() if k in _OWN_VARIABLES}
    os.environ.clear()
    os.environ.update({**state["environment"], **kept})
    os.chdir(state["working directory"])
    sys.path[:] = state["sys.path"]
    root = logging.getLogger()
    for handler in [h for h in root.handlers if not type(h).__module__.startswith("_pytest")]:
        if handler not in state["root logger handlers"]:
            root.removeHandler(handler)
    for handler in state["root logger handlers"]:
        root.addHandler(handler)  # a no-op for one still there
    _restore_process_setup(state)


def _restore_process_setup(state: dict[str, Any]) -> None:
    """Put back the settings a bundle run makes for its whole process (see :func:`restored`)."""
    sys.excepthook = state["sys.excepthook"]
    root = logging.getLogger()
    root.setLevel(state["root logger level"])
    root.propagate = True  # MONAI's get_logger(None) turns it off; the root logger has no parent anyway
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


def changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What differs between two :func:`snapshot` results, one line each."""
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


@contextlib.contextmanager
def restored() -> Iterator[None]:
    """Put back, at the end of the block, what a bundle run made in it sets up for its whole process, for code made
    for a process of its own run in this one (a bundle's ``initialize`` and ``run``, MONAI's
    ``StatsHandler(name=None)``): the error-line hook (``sys.excepthook``), the root logger's level, the torch
    settings (cuDNN determinism, the thread count) and the SIGTERM handler that removes an output folder the run
    made and left half-made. Anything else the block changes (a Ctrl-C handler left by a failed training, the
    environment) is still the leak the suite's check reports."""
    state = snapshot()
    try:
        yield
    finally:
        _restore_process_setup(state)
        if getattr(signal.getsignal(signal.SIGTERM), "_removes_made_folders", False):
            signal.signal(signal.SIGTERM, state["signal handlers"]["SIGTERM"])

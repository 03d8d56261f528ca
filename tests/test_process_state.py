"""The suite's check that a test leaves the process as it found it (tests/process_state.py, tests/conftest.py)."""

from __future__ import annotations

import logging
import signal
import sys

import torch

from tests.process_state import changes, restore, restored, snapshot


def test_a_stop_signal_handler_left_installed_is_named_and_put_back(monkeypatch):
    """A test of the ablation's Ctrl-C hung in the test process that an in-process training, failed before it
    gave its handlers back, had left with a SIGINT handler that only noted the signal."""
    before = snapshot()
    noted = []
    try:
        signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
        monkeypatch.setenv("APP_TRACEBACK", "leaked")
        found = changes(before, snapshot())
    finally:
        restore(before)
    assert [line.split(" ")[:3] for line in found if line.startswith("signal handlers")] == [
        ["signal", "handlers:", "SIGINT"]], found
    assert any(line.startswith("environment: APP_TRACEBACK") for line in found), found
    assert signal.getsignal(signal.SIGINT) is before["signal handlers"]["SIGINT"]
    assert changes(before, snapshot()) == []  # the environment too (monkeypatch's own undo then changes nothing)


def test_restored_puts_back_a_bundles_process_setup_and_leaves_other_leaks_to_the_check():
    """What a bundle's initialize sets for its process (the error-line hook, the root logger's level, cuDNN
    determinism) is no leak of a test that runs it in-process; a SIGINT handler left behind still is."""
    before = snapshot()
    try:
        with restored():
            sys.excepthook = lambda *exc: None
            logging.getLogger().setLevel(logging.INFO)
            torch.backends.cudnn.deterministic = not torch.backends.cudnn.deterministic
            # another handler than the one found: a shell starts a background job with SIGINT ignored already
            other = signal.SIG_DFL if before["signal handlers"]["SIGINT"] is signal.SIG_IGN else signal.SIG_IGN
            signal.signal(signal.SIGINT, other)
        found = changes(before, snapshot())
    finally:
        restore(before)
    assert found == [f"signal handlers: SIGINT {before['signal handlers']['SIGINT']!r} -> {other!r}"], found

"""Test driver: ``python -m monai.bundle ...`` that freezes inside the N-th write of checkpoint_last.pt.

Usage: ``PAUSE_AT_WRITE=N PAUSE_MARKER=FILE python tests/reliability/pause_driver.py run --config_file ...``.
When the N-th temporary checkpoint is complete and about to be renamed over ``checkpoint_last.pt``,
the driver writes ``FILE`` and sleeps, so a test can SIGKILL the process at exactly that point.
"""

from __future__ import annotations

import os
import runpy
import sys
import time

_real_replace = os.replace
_writes = 0


def _pausing_replace(src, dst, *args, **kwargs):
    global _writes
    if os.path.basename(os.fspath(dst)) == "checkpoint_last.pt":
        _writes += 1
        if _writes == int(os.environ["PAUSE_AT_WRITE"]):
            with open(os.environ["PAUSE_MARKER"], "w") as f:
                f.write(os.fspath(src))
            time.sleep(3600)  # the test kills the process here
    return _real_replace(src, dst, *args, **kwargs)


if __name__ == "__main__":
    os.replace = _pausing_replace  # app.engines.checkpoint calls os.replace through the module attribute
    sys.argv = ["monai.bundle", *sys.argv[1:]]
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)

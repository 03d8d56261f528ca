"""Test driver: ``python -m monai.bundle ...`` that sends itself SIGTERM during a given training iteration.

Usage: ``SIGTERM_AT_ITERATION=N python tests/reliability/signal_driver.py run --config_file ...``. The signal
arrives inside iteration N, as a scheduler's would at any moment, so a test can check what the run leaves.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

from app.engines import trainer

_real_iteration = trainer.SubsetTrainer._iteration


def _iteration_then_sigterm(self, engine, batchdata):
    output = _real_iteration(self, engine, batchdata)
    if engine.state.iteration == int(os.environ["SIGTERM_AT_ITERATION"]):
        os.kill(os.getpid(), signal.SIGTERM)
    return output


if __name__ == "__main__":
    trainer.SubsetTrainer._iteration = _iteration_then_sigterm
    sys.argv = ["monai.bundle", *sys.argv[1:]]
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)

"""Settings of the whole test suite.

One OpenMP thread per test process and per run it starts (bundle runs, ablations and torchrun ranks inherit this
process's environment), unless the caller set ``OMP_NUM_THREADS``: ``make test`` runs two test processes on two
cores, and torch's default of one thread per core put four OpenMP threads on the two cores, which wait for each other
at every barrier: a tiny training step took about 3 times the CPU time of one thread. The networks of the tests are
too small to gain from a second thread (tests/inference/conftest.py pins its package's tests the same way).
"""

from __future__ import annotations

import os

# before torch is imported: OpenMP reads it when torch loads it
os.environ.setdefault("OMP_NUM_THREADS", "1")

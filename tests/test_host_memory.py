"""A CPU training step's freed memory stays with the process instead of being mapped and zeroed again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# a training step's kind of allocations: 16 blocks of 16 MiB (below the mmap threshold, as a 48^3 step's activations
# and their gradients), each written, all freed at the step's end (through glibc's malloc, as torch's CPU tensors are);
# prints the page faults of the third step. Transparent huge pages are turned off for the process: where the kernel
# backs the heap with them (THP "always", the default of some distributions, or glibc.malloc.hugetlb=1) a 2 MiB page
# faults once, and the 256 MiB given back and faulted in again counted 128 faults, far below the bound below
_STEPS = """
import ctypes, resource, sys
libc = ctypes.CDLL(None)
libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, one fault each
if sys.argv[1] == "keep":
    from app.host_memory import keep_freed_host_memory
    assert keep_freed_host_memory()
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
size = 16 << 20
def step():
    blocks = [libc.malloc(size) for _ in range(16)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    for block in reversed(blocks):
        libc.free(block)
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_of_a_later_step(mode: str) -> int:
    # glibc's malloc as it is by default: no tunables or MALLOC_* settings of the environment, no other allocator
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    proc = subprocess.run([sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, cwd=REPO,
                          env={**env, "PYTHONPATH": str(REPO)}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().splitlines()[-1])


def test_a_later_step_reuses_the_memory_an_earlier_step_freed():
    if not _glibc():
        pytest.skip("glibc's malloc only")
    # glibc gave the freed blocks back at the end of each step, and the next step faulted every page of them in again
    default, kept = _faults_of_a_later_step("default"), _faults_of_a_later_step("keep")
    assert default > 256 * 1024 // 4 // 2, default  # over half the 256 MiB (4 KiB pages) faulted in again
    assert kept * 10 < default, (kept, default)


def _glibc() -> bool:
    import ctypes

    return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


def test_the_setting_is_made_where_glibc_is_and_reported():
    proc = subprocess.run([sys.executable, "-c", "from app.host_memory import keep_freed_host_memory as k; "
                           "print(k(), k())"], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert proc.stdout.split() == [str(_glibc())] * 2, proc.stderr


_RELEASE = """
import ctypes, sys
libc = ctypes.CDLL(None)
libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE, as above
from app.host_memory import keep_freed_host_memory, release_kept_host_memory
assert not release_kept_host_memory()  # nothing kept: nothing done
assert keep_freed_host_memory()
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
size = 16 << 20
blocks = [libc.malloc(size) for _ in range(16)]
for block in blocks:
    ctypes.memset(block, 1, size)
for block in reversed(blocks):
    libc.free(block)
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
kept = resident()
print(release_kept_host_memory(), kept - resident())
"""


def test_the_kept_memory_is_given_back_on_request():
    if not _glibc():
        pytest.skip("glibc's malloc only")
    # a validation in the training asks for it as it starts: the 256 MiB a step freed leave the process
    proc = subprocess.run([sys.executable, "-c", _RELEASE], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    released, given_back = proc.stdout.split()
    assert released == "True" and int(given_back) > 200, proc.stdout

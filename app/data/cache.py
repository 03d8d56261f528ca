"""How many cases the in-memory caches of training may hold.

A cached full-resolution BraTS case (four sequences cropped to the head, float32, plus boolean
regions) takes about 57 MiB, so a 1,251-case release needs some 70 GiB (on a multi-GPU node, each
process caches its own share of the cases). ``cache_rate: auto`` measures one preprocessed case,
scales it by the other cases' grid sizes (read from their headers) and caches the share that fits
in part of the memory this machine, or its container or batch job, still has.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset
from torch.utils.data import get_worker_info

from app.data.errors import WorkerCaseError

__all__ = [
    "CACHE_MEMORY_FRACTION", "CaseCacheDataset", "available_memory", "estimate_cache_bytes", "resolve_cache_rate",
]

logger = logging.getLogger(__name__)

#: Share of the available memory that ``cache_rate: auto`` lets the caches of one machine take: the
#: rest is for data-loader workers, augmentation, the network and the operating system.
CACHE_MEMORY_FRACTION = 0.5

MEMINFO = "/proc/meminfo"
#: Where this process's cgroups are listed, and where the cgroup v2 and v1 (memory controller)
#: hierarchies are mounted: a container's or a batch job's limit, not the host's memory, is what counts.
PROC_CGROUP = "/proc/self/cgroup"
CGROUP_V2_ROOT = "/sys/fs/cgroup"
CGROUP_V1_ROOT = "/sys/fs/cgroup/memory"
_UNLIMITED = 1 << 60  # cgroup v1 writes a huge number instead of "max"


def _size(n: float) -> str:
    if 0 < n < 1 << 19:  # rounds to 0 MiB: small cases (phantoms, a 2 mm case's labels) need some memory still
        return "under 1 MiB"
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _stat(path: str, key: str) -> int:
    """A field of a cgroup ``memory.stat`` file (0 when absent)."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key and value.strip().isdigit():
                    return int(value)
    except (OSError, UnicodeDecodeError):
        pass
    return 0


def _cgroup_folders() -> list[tuple[str, str, str, str]]:
    """(folder, limit file, usage file, reclaimable-cache key) for this process's memory cgroup and
    each of its parents, v2 and v1: a limit set on any of them applies."""
    paths: dict[str, str] = {}
    try:
        with open(PROC_CGROUP, encoding="utf-8") as f:
            for line in f:
                parts = line.rstrip("\n").split(":", 2)
                if len(parts) == 3 and parts[0] == "0" and parts[1] == "":
                    paths.setdefault("v2", parts[2])
                elif len(parts) == 3 and "memory" in parts[1].split(","):
                    paths.setdefault("v1", parts[2])
    except (OSError, UnicodeDecodeError):
        pass
    layouts = {"v2": (CGROUP_V2_ROOT, "memory.max", "memory.current", "inactive_file"),
               "v1": (CGROUP_V1_ROOT, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}
    folders = []
    for version, (root, limit, usage, cache_key) in layouts.items():
        rel = paths.get(version, "/").strip("/")
        parts = rel.split("/") if rel else []
        for depth in range(len(parts), -1, -1):  # own cgroup first, the hierarchy's root last
            folder = os.path.join(root, *parts[:depth])
            folders.append((folder, os.path.join(folder, limit), os.path.join(folder, usage), cache_key))
    return folders


def available_memory() -> int | None:
    """Bytes this process can still allocate, or ``None`` when the system does not say.

    The smallest of the kernel's ``MemAvailable`` and the room left under the memory limit of this
    process's cgroup and of each of its parents (a container, a batch job). Usage counts without the
    inactive file cache, which the kernel frees when memory runs short.
    """
    room: list[int] = []
    try:
        with open(MEMINFO, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    room.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, UnicodeDecodeError, ValueError, IndexError):
        pass
    for folder, limit_file, usage_file, cache_key in _cgroup_folders():
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < _UNLIMITED:
            in_use = max(0, usage - _stat(os.path.join(folder, "memory.stat"), cache_key))
            room.append(max(0, limit - in_use))
    return min(room) if room else None


def _header_voxels(record: Mapping[str, Any]) -> int:
    """Voxels of a case's grid, from the header of its first image; 0 when no header can be read."""
    from app.data.datalist import first_image_header

    img = first_image_header(dict(record))
    return 0 if img is None else int(np.prod(img.shape[:3]))


def _nbytes(sample: Any) -> int:
    if isinstance(sample, (list, tuple)):
        return sum(_nbytes(s) for s in sample)
    if isinstance(sample, Mapping):
        return sum(_nbytes(v) for v in sample.values())
    if isinstance(sample, torch.Tensor):
        return sample.element_size() * sample.numel()
    if isinstance(sample, np.ndarray):
        return int(sample.nbytes)
    return 0


def estimate_cache_bytes(
    records: Sequence[Mapping[str, Any]], preprocess: Callable[[Any], Any]
) -> int:
    """Bytes of the cached samples of ``records``: one case preprocessed, scaled by grid size.

    Args:
        records: case records (see :func:`app.data.discover_cases`); the first one is preprocessed.
        preprocess: the deterministic transforms whose output the cache keeps.

    Returns:
        ``bytes(first) * sum(voxels) / voxels(first)``, voxels from the image headers (cases whose
        size cannot be read from a header count as large as the first).
    """
    if not records:
        return 0
    measured = _nbytes(preprocess(dict(records[0])))
    voxels = [_header_voxels(r) for r in records]
    if voxels[0] <= 0:
        return measured * len(records)
    return int(measured * sum(v if v > 0 else voxels[0] for v in voxels) / voxels[0])


def _local_processes() -> int:
    import ignite.distributed as idist

    if idist.get_world_size() > 1:
        return max(1, int(idist.get_nproc_per_node()))
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def resolve_cache_rate(
    cache_rate: float | str,
    records: Sequence[Mapping[str, Any]],
    preprocess: Callable[[Any], Any] | Sequence[Callable[[Any], Any]],
    fraction: float = CACHE_MEMORY_FRACTION,
    local_processes: int | None = None,
) -> float:
    """``cache_rate`` as a number for MONAI's ``CacheDataset``.

    Args:
        cache_rate: a share of the cases in ``[0, 1]``, returned as is, or ``"auto"``: every case when
            their estimated size (:func:`estimate_cache_bytes`) fits in ``fraction`` of
            :func:`available_memory`, divided by the processes on this machine (each caches the cases
            it is given); otherwise the share that fits, rounded down to a hundredth. The choice is
            logged.
        records: all the cases that will be cached (training and validation together).
        preprocess: the cached transforms, one callable or a list applied in order.
        fraction: share of the available memory the caches may take.
        local_processes: processes on this machine; default: from the distributed context.

    Raises:
        ValueError: ``cache_rate`` is neither ``"auto"`` nor a number in ``[0, 1]``.
    """
    if isinstance(cache_rate, str) and cache_rate.strip().lower() == "auto":
        pass
    else:
        try:
            rate = float(cache_rate)
        except (TypeError, ValueError):
            rate = math.nan
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"cache_rate must be auto or a share of the cases in [0, 1], got {cache_rate!r}: "
                             "pass --cache_rate auto, or e.g. --cache_rate 0.5.")
        return rate
    if not records:
        return 1.0
    if not callable(preprocess):
        steps = list(preprocess)

        def preprocess(sample: Any) -> Any:
            for step in steps:
                sample = step(sample)
            return sample

    room = available_memory()
    if room is None:
        logger.warning("cache_rate auto: this system does not report its free memory; caching every case. "
                       "Pass --cache_rate to choose.")
        return 1.0
    procs = local_processes or _local_processes()
    need = estimate_cache_bytes(records, preprocess)
    budget = fraction * room / procs
    rate = 1.0 if need <= budget else math.floor(100.0 * budget / need) / 100.0
    kept = int(len(records) * rate)
    about = "about " if need >= 1 << 19 else ""
    message = (f"cache_rate auto: {len(records)} case(s) need {about}{_size(need)} in memory; "
               f"{_size(room)} available, {procs} process(es) on this machine: caching {kept} of them "
               f"(cache_rate {rate:g}).")
    if rate < 1.0:
        logger.warning("%s The others are read from disk every epoch. Pass --cache_rate to choose.", message)
    else:
        logger.info(message)
    return rate


class CaseCacheDataset(CacheDataset):
    """MONAI's ``CacheDataset`` that stops cleanly at a bad case, before the first iteration.

    MONAI fills the cache from a thread pool and, when a case raises (a corrupt file, unknown label
    values), leaves the pool's other threads running while the error ends the process: the C++
    runtime then aborted it (exit 134) in about half of the runs, after the error message. Here the
    cases not yet started are cancelled and the running ones finish before the error is raised, so
    a bad case exits with the error alone.

    With ``cache_rate < 1`` (chosen, or ``auto`` on a machine too small for every case) the cases
    left out of the cache are preprocessed once too, and the result dropped: a bad one would
    otherwise be read first during training, after epochs of work, and end the run mid-epoch with
    a traceback. Other arguments and results are ``CacheDataset``'s.

    Args:
        check_uncached: preprocess the cases the cache leaves out once, to find bad files up front.
        args: positional arguments of ``CacheDataset``.
        kwargs: keyword arguments of ``CacheDataset``.
    """

    def __init__(self, *args: Any, check_uncached: bool = True, **kwargs: Any) -> None:
        # set before CacheDataset.__init__, which fills the cache through set_data
        self.check_uncached = check_uncached
        super().__init__(*args, **kwargs)

    def set_data(self, data: Sequence) -> None:
        """Fill the cache as ``CacheDataset`` does, then check the cases left out of it (``check_uncached``)."""
        super().set_data(data)
        if self.check_uncached and not self.hash_as_key and self.cache_num < len(self.data):
            unchecked = range(self.cache_num, len(self.data))
            self._run_pool(unchecked, keep=False)
            logger.info("Checked the %d case(s) not kept in memory: they are read from disk every epoch.",
                        len(unchecked))

    def _transform(self, index: int) -> Any:
        """``CacheDataset``'s, with bad input found in a data-loader worker raised as :class:`WorkerCaseError`.

        A case read from disk during an epoch (one the cache left out, or a file replaced since the
        start) is read in a worker process when ``num_workers > 0``; PyTorch hands its error to the
        main process as the text of the worker's traceback, so the run ended with that traceback
        instead of the one-line error it gives with ``num_workers 0``.
        """
        try:
            return super()._transform(index)
        except Exception as err:
            if get_worker_info() is None:  # the main process: the error's chain reaches the reporter intact
                raise
            from app.engines.utils import _input_error

            found = _input_error(err)
            if found is None:  # a bug, not bad input: the whole traceback is what helps
                raise
            raise WorkerCaseError(" ".join(str(found).split())) from err

    def _fill_cache(self, indices: Sequence[int] | None = None) -> list:
        if self.cache_num <= 0:
            return []
        return self._run_pool(list(range(self.cache_num)) if indices is None else indices, keep=True)

    def _run_pool(self, indices: Sequence[int], keep: bool) -> list:
        """Preprocess ``indices`` in a thread pool; the results when ``keep``, else none (only the check)."""
        workers = self.num_workers or os.cpu_count() or 1
        executor = ThreadPoolExecutor(max_workers=max(1, int(workers)))

        def check(i: int) -> None:
            self._load_cache_item(i)  # the result is dropped at once: only a bad case matters here

        try:
            futures = [executor.submit(self._load_cache_item if keep else check, i) for i in indices]
            results = [f.result() for f in futures]
            return results if keep else []
        finally:
            executor.shutdown(wait=True, cancel_futures=True)

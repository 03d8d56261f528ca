"""The memory budget of the training caches: available memory, size estimate and cache_rate auto."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import app.data.cache as cache
from app.data.cache import available_memory, estimate_cache_bytes, resolve_cache_rate
from app.data.discovery import discover_cases

GIB = 1 << 30


@pytest.fixture
def memory_files(tmp_path, monkeypatch):
    """A fake /proc and cgroup tree: ``write(meminfo_kb, proc_cgroup, files={relative path: text})``."""

    def write(meminfo_kb=None, proc_cgroup="", files=None):
        root = tmp_path / f"sys{len(list(tmp_path.iterdir()))}"
        root.mkdir()
        if meminfo_kb is not None:
            (root / "meminfo").write_text(f"MemTotal: 1 kB\nMemAvailable: {meminfo_kb} kB\n")
        (root / "cgroup").write_text(proc_cgroup)
        for rel, text in (files or {}).items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(f"{text}\n")
        monkeypatch.setattr(cache, "MEMINFO", str(root / "meminfo"))
        monkeypatch.setattr(cache, "PROC_CGROUP", str(root / "cgroup"))
        monkeypatch.setattr(cache, "CGROUP_V2_ROOT", str(root / "v2"))
        monkeypatch.setattr(cache, "CGROUP_V1_ROOT", str(root / "v1"))
        return available_memory()

    return write


def test_available_memory_is_the_smallest_room_of_system_and_cgroups(memory_files):
    host = 8 * 1024 * 1024  # kB
    assert memory_files(meminfo_kb=host) == 8 * GIB
    # a container (cgroup v2 namespace: its own cgroup is the root): limit 4, 1 used
    assert memory_files(host, "0::/\n", {"v2/memory.max": 4 * GIB, "v2/memory.current": GIB}) == 3 * GIB
    assert memory_files(2 * 1024 * 1024, "0::/\n", {"v2/memory.max": 4 * GIB, "v2/memory.current": GIB}) == 2 * GIB
    assert memory_files(host, "0::/\n", {"v2/memory.max": "max", "v2/memory.current": GIB}) == 8 * GIB
    # the kernel frees inactive file cache: it is not counted as used
    assert memory_files(host, "0::/\n", {"v2/memory.max": 4 * GIB, "v2/memory.current": 4 * GIB,
                                          "v2/memory.stat": f"anon 1\ninactive_file {3 * GIB}\n"}) == 3 * GIB
    # a batch job's limit on its own sub-cgroup, and a tighter one on a parent, both apply
    job = {"v2/slurm/job_1/memory.max": 6 * GIB, "v2/slurm/job_1/memory.current": GIB,
           "v2/slurm/memory.max": 5 * GIB, "v2/slurm/memory.current": 3 * GIB}
    assert memory_files(host, "0::/slurm/job_1\n", job) == 2 * GIB
    # cgroup v1, with the memory controller listed among others; "unlimited" is a huge number
    v1 = {"v1/docker/abc/memory.limit_in_bytes": 4 * GIB, "v1/docker/abc/memory.usage_in_bytes": 2 * GIB,
          "v1/docker/abc/memory.stat": f"total_inactive_file {GIB}\n",
          "v1/memory.limit_in_bytes": 9223372036854771712, "v1/memory.usage_in_bytes": GIB}
    assert memory_files(host, "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n", v1) == 3 * GIB
    assert memory_files(None, "4:memory:/\n", {"v1/memory.limit_in_bytes": 4 * GIB,
                                                 "v1/memory.usage_in_bytes": 5 * GIB}) == 0  # over the limit
    assert memory_files() is None


def test_estimate_scales_one_measured_case_by_header_voxels(tmp_path, make_case):
    make_case(tmp_path, "A_1", shape=(16, 16, 12))
    make_case(tmp_path, "B_1", shape=(32, 16, 12))  # twice the voxels
    make_case(tmp_path, "C_1", shape=(16, 8, 12), seqs=("t2",))  # half, one sequence
    records = discover_cases(tmp_path)
    seen = []

    def preprocess(record):
        seen.append(record["case"])
        return {"image": torch.zeros(250), "label": torch.zeros(10, dtype=torch.uint8), "case": record["case"]}

    assert estimate_cache_bytes(records, preprocess) == int(1010 * (1 + 2 + 0.5))
    assert seen == ["A_1"]  # only the first case is read
    # a corrupt file is left to the loader, whose error names the fix: here it counts as large as the first
    from app.data.datalist import median_spacing

    Path(records[1]["images"]["flair"]).write_bytes(b"not a NIfTI file")
    assert estimate_cache_bytes(records, preprocess) == int(1010 * (1 + 1 + 0.5))
    assert median_spacing(records) == [1.0, 1.0, 1.0]
    assert estimate_cache_bytes([], preprocess) == 0


def test_numbers_pass_and_bad_values_name_the_option():
    assert resolve_cache_rate(0, [], []) == 0.0
    assert resolve_cache_rate("0.25", [], []) == 0.25
    for bad in (1.5, -0.1, "most", None):
        with pytest.raises(ValueError, match=r"cache_rate must be auto or a share.*--cache_rate auto"):
            resolve_cache_rate(bad, [], [])


def test_auto_caches_the_share_that_fits(tmp_path, make_case, monkeypatch, caplog):
    for case in ("A_1", "B_1", "C_1", "D_1"):
        make_case(tmp_path, case)
    records = discover_cases(tmp_path)
    steps = [lambda r: {**r, "image": torch.zeros(1000, dtype=torch.uint8)}, lambda r: {"image": r["image"][:500]}]
    need = 4 * 500  # the list of transforms is applied in order: 500 bytes per case
    monkeypatch.setattr(cache, "available_memory", lambda: 4 * need)
    assert resolve_cache_rate("auto", records, steps, local_processes=2) == 1.0  # 0.5 * 8000 / 2 = 2000 fits
    monkeypatch.setattr(cache, "available_memory", lambda: 3 * need)
    with caplog.at_level(logging.WARNING, logger="app.data.cache"):
        assert resolve_cache_rate("auto", records, steps, local_processes=2) == 0.75  # 1500 of 2000 bytes
    # 2000 bytes: not "about 0 MiB", which read as if the cases took no memory
    assert "4 case(s) need under 1 MiB in memory" in caplog.text and "caching 3 of them (cache_rate 0.75)" in caplog.text
    assert "2 process(es)" in caplog.text and "--cache_rate" in caplog.text
    monkeypatch.setattr(cache, "available_memory", lambda: None)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="app.data.cache"):
        assert resolve_cache_rate("AUTO", records, steps) == 1.0
    assert "does not report its free memory" in caplog.text
    assert resolve_cache_rate("auto", [], steps) == 1.0


def test_bundle_caches_boolean_regions_and_trains_on_float(tmp_path, make_case):
    import os

    from monai.bundle import ConfigParser

    for case in ("A_1", "B_1", "C_1"):
        make_case(tmp_path / "data", case)
    parser = ConfigParser()
    parser.read_config(os.path.join(os.path.dirname(__file__), "..", "..", "bundles", "brats_gmd", "configs", "train.yaml"))
    parser.update({"dataset_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "out"),
                   "patch_size": [8, 8, 8], "num_workers": 0})
    assert parser.get_parsed_content("cache_rate_used") == 1.0  # three tiny cases fit
    train = parser.get_parsed_content("train#dataset")
    validate = parser.get_parsed_content("validate#dataset")
    assert len(train._cache) == 2 and len(validate._cache) == 1
    assert train._cache[0]["label"].dtype == torch.bool and validate._cache[0]["label"].dtype == torch.bool
    # the crop's background must exclude the tumour: with uint8 regions MONAI's ~label made every voxel background
    from monai.transforms.utils import map_binary_to_indices

    fg, bg = map_binary_to_indices(train._cache[0]["label"], None, 0.0)
    assert len(fg) > 0 and len(fg) + len(bg) == train._cache[0]["label"][0].numel()
    crops = train[0]
    assert all(c["label"].dtype == torch.float32 and c["image"].dtype == torch.float32 for c in crops)
    assert set(torch.unique(crops[0]["label"]).tolist()) <= {0.0, 1.0}


def test_cache_stops_at_a_bad_case_with_no_thread_left_running():
    """MONAI's pool left threads running after the error, and the process aborted (exit 134)."""
    import threading
    import time

    from monai.transforms import Lambda

    from app.data.cache import CaseCacheDataset
    from app.data.errors import CaseError

    started = []

    def load(item):
        started.append(item)
        if item == 1:
            raise CaseError("Label case_1_seg.nii.gz contains values [7]")
        time.sleep(0.05)
        return {"image": torch.full((2,), float(item))}

    threads = threading.active_count()
    with pytest.raises(RuntimeError) as err:  # MONAI names the transform, the case error is the cause
        # a Transform, not a bare function: MONAI caches only up to the first non-Transform
        CaseCacheDataset(data=list(range(40)), transform=Lambda(load), cache_rate=1.0, num_workers=2, progress=False)
    assert isinstance(err.value.__cause__, CaseError) and "contains values [7]" in str(err.value.__cause__)
    assert threading.active_count() == threads  # every worker finished before the error was raised
    assert len(started) < 40  # the cases not yet started were cancelled
    good = CaseCacheDataset(data=list(range(5)), transform=Lambda(lambda i: {"image": torch.full((2,), float(i))}),
                            cache_rate=1.0, num_workers=2, progress=False)
    assert [float(item["image"][0]) for item in good._cache] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [float(good[i]["image"][0]) for i in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]  # in order


@pytest.mark.parametrize("cache_rate", [0.0, 0.5])
def test_a_bad_case_left_out_of_the_cache_stops_before_training(cache_rate):
    """With cache_rate < 1 a bad uncached case was first read during training, epochs later."""
    from monai.transforms import Lambda

    from app.data.cache import CaseCacheDataset
    from app.data.errors import CaseError

    def load(item):
        if item == 3:  # the last case: outside the cache at either rate
            raise CaseError("Label case_3_seg.nii.gz contains values [7]")
        return {"image": torch.full((2,), float(item))}

    with pytest.raises(RuntimeError) as err:
        CaseCacheDataset(data=list(range(4)), transform=Lambda(load), cache_rate=cache_rate, num_workers=1,
                         progress=False)
    assert isinstance(err.value.__cause__, CaseError) and "case_3_seg" in str(err.value.__cause__)
    good = CaseCacheDataset(data=list(range(3)), transform=Lambda(load), cache_rate=cache_rate, num_workers=1,
                            progress=False)
    assert len(good._cache) == int(3 * cache_rate)  # checked, not kept
    assert [float(good[i]["image"][0]) for i in range(3)] == [0.0, 1.0, 2.0]
    unchecked = CaseCacheDataset(data=list(range(4)), transform=Lambda(load), cache_rate=cache_rate, num_workers=1,
                                 progress=False, check_uncached=False)
    assert len(unchecked) == 4


def test_uncached_case_with_unknown_label_values_fails_at_construction(tmp_path, make_case):
    """The case loader as the bundle uses it: the file and its fix are known before any iteration."""
    import nibabel as nib
    import numpy as np

    from app.data.cache import CaseCacheDataset
    from app.data.datalist import prepare_datalist
    from app.data.transforms import LoadCased

    for i in range(3):
        make_case(tmp_path / "data", f"case{i}")
    seg = tmp_path / "data" / "case1" / "case1_seg.nii.gz"
    img = nib.load(str(seg))
    values = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(np.where(values == 4, 3, values).astype(np.uint8), img.affine), str(seg))
    records = prepare_datalist(tmp_path / "data", tmp_path / "out")
    with pytest.raises(RuntimeError) as err:
        CaseCacheDataset(data=records["training"] + records["validation"], transform=LoadCased(), cache_rate=0.0,
                         num_workers=0, progress=False)
    assert "case1_seg.nii.gz" in str(err.value.__cause__) and "brats2023" in str(err.value.__cause__)


def test_auto_rounds_the_share_down_to_a_hundredth(monkeypatch, caplog):
    # 2000 bytes of budget (0.5 * 4000, one process) for 3000 bytes of cases: 0.666.. -> 0.66, never 0.67
    monkeypatch.setattr(cache, "available_memory", lambda: 4000)
    monkeypatch.setattr(cache, "estimate_cache_bytes", lambda records, preprocess: 3000)
    with caplog.at_level(logging.WARNING, logger=cache.logger.name):
        assert resolve_cache_rate("auto", [{}] * 100, lambda s: s, fraction=0.5, local_processes=1) == 0.66
    assert "caching 66 of them" in caplog.text


def test_a_bad_case_read_by_a_data_loader_worker_is_one_error_line(tmp_path, make_case, monkeypatch):
    """A case read from disk during an epoch (cache_rate < 1, or a file replaced since the start) in a worker
    process (--num_workers 2, the default) ended the run with the worker's whole traceback, where --num_workers 0
    gives the one-line error naming the file and the fix."""
    from torch.utils.data import DataLoader

    import app.engines.utils as utils
    from app.data.cache import CaseCacheDataset
    from app.data.datalist import prepare_datalist
    from app.data.errors import CaseError
    from app.data.transforms import LoadCased

    for i in range(3):
        make_case(tmp_path / "data", f"case{i}")
    records = prepare_datalist(tmp_path / "data", tmp_path / "out")
    data = records["training"] + records["validation"]
    dataset = CaseCacheDataset(data=data, transform=LoadCased(), cache_rate=0.0, num_workers=0, progress=False)
    bad = data[0]["images"]["flair"]
    Path(bad).write_bytes(Path(bad).read_bytes()[:300])  # truncated after the run started
    with pytest.raises(CaseError) as err:
        next(iter(DataLoader(dataset, batch_size=1, num_workers=1)))
    message = str(err.value)
    from app.data.errors import WorkerCaseError

    assert isinstance(err.value, WorkerCaseError)
    assert bad in message and message.endswith("re-download or re-export it.")
    assert "Traceback" not in message and "\n" not in message
    # as MONAI's bundle runner raises it again: the run ends with 'error: <message>' alone
    import monai.bundle.config_item as config_item

    namespace: dict = {}
    exec(compile("def evaluate(err):\n    try:\n        raise err\n    except BaseException as inner:\n"
                 "        raise RuntimeError('Failed to evaluate ConfigExpression') from inner\n",
                 config_item.__file__, "exec"), namespace)
    with pytest.raises(RuntimeError) as wrapped:
        namespace["evaluate"](err.value)
    assert utils._input_error(wrapped.value) is err.value
    # in the main process (--num_workers 0) the error is the loader's own, as before
    with pytest.raises(RuntimeError) as main:
        next(iter(DataLoader(dataset, batch_size=1, num_workers=0)))
    assert type(main.value.__cause__) is CaseError and str(main.value.__cause__) == message
    # APP_TRACEBACK=1 keeps the worker's traceback
    text = f"Caught WorkerCaseError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n" \
           f"  File \"x.py\", line 1, in f\napp.data.errors.WorkerCaseError: {message}\n"
    monkeypatch.setenv("APP_TRACEBACK", "1")
    noted = WorkerCaseError(text)
    assert str(noted) == message and noted.__notes__ == [text]


def _divide_by_zero(record):
    return 1 / 0


def test_a_worker_error_that_is_no_bad_input_keeps_its_traceback_and_bad_input_is_one_line(monkeypatch):
    """A bug in a data-loader worker (here a ZeroDivisionError) is shown whole, as with --num_workers 0, not as a
    one-line input error; a bad-input message spread over lines is one line, as the run's last line is."""
    from torch.utils.data import DataLoader

    import app.engines.utils as utils
    from app.data.cache import CaseCacheDataset
    from app.data.errors import CaseError, WorkerCaseError

    dataset = CaseCacheDataset(data=[{"case": "x"}], transform=_divide_by_zero, cache_rate=0.0, num_workers=0,
                               progress=False)
    with pytest.raises(RuntimeError, match=r"(?s)Original Traceback.*ZeroDivisionError: division by zero") as err:
        next(iter(DataLoader(dataset, batch_size=1, num_workers=1)))
    assert not isinstance(err.value, CaseError)
    monkeypatch.setattr(utils, "_input_error", lambda err: CaseError("case x: the file is cut short,\n  re-export it."))
    with pytest.raises(WorkerCaseError) as bad:
        next(iter(DataLoader(dataset, batch_size=1, num_workers=1)))
    assert str(bad.value) == "case x: the file is cut short, re-export it."
    # built from its message alone (not PyTorch's traceback text), it gets no note repeating that message
    monkeypatch.setenv("APP_TRACEBACK", "1")
    assert not getattr(WorkerCaseError("case x: the file is cut short."), "__notes__", None)

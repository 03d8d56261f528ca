"""Helpers of the reliability tests: tiny bundle settings, in-process bundle runs, weight comparison."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
from monai.bundle import ConfigParser

from tests.bundles.helpers import BRATS, REPO, TRAIN, repo_env
from tests.process_state import restored

__all__ = ["MULTI_GPU", "PEER_TIMEOUT", "TINY", "TRAIN", "REPO", "BRATS", "cli_args", "subprocess_env", "start_bundle",
           "run_in_process", "load", "assert_same_tensors"]

MULTI_GPU = str(BRATS / "configs" / "multi_gpu_train.yaml")

#: process-group timeout of the tests' own gloo workers: when one rank fails a check and leaves, its peer's next
#: collective fails within this time instead of waiting out gloo's default of 30 minutes
PEER_TIMEOUT = timedelta(seconds=120)

#: 16^3 patches and features [4, 8, 16]: a training iteration takes a fraction of a second on one core.
TINY: dict[str, Any] = {
    "patch_size": [16, 16, 16], "features": [4, 8, 16], "num_workers": 0, "batch_size": 1, "num_samples": 1,
}


def cli_args(settings: dict[str, Any]) -> list[str]:
    """``--key value`` pairs for ``python -m monai.bundle run`` (lists without spaces, as fire parses them)."""
    out = []
    for key, value in settings.items():
        out += [f"--{key}", str(value).replace(" ", "") if isinstance(value, list) else str(value)]
    return out


def subprocess_env() -> dict[str, str]:
    """Environment for bundle subprocesses: the repository importable and the thread count of this process,
    so that their arithmetic matches in-process runs bit for bit."""
    return repo_env(OMP_NUM_THREADS=str(torch.get_num_threads()))


def start_bundle(args: list[str], driver: list[str] | None = None, env: dict[str, str] | None = None,
                 log: Path | None = None) -> subprocess.Popen:
    """Start ``python -m monai.bundle run ARGS`` (or ``python DRIVER run ARGS``) from the repository root."""
    cmd = [sys.executable, *(driver or ["-m", "monai.bundle"]), "run", "--bundle_root", str(BRATS), *args]
    env = {**subprocess_env(), **(env or {})}
    if log is None:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def run_in_process(config_files: list[str], before_run: Callable[[ConfigParser], None] | None = None,
                   **overrides: Any) -> ConfigParser:
    """Run a bundle like ``monai.bundle run`` does (initialize, then run), inside this process; what the run sets up
    for its process (the error-line hook, cuDNN determinism, the root logger's level) is put back afterwards."""
    parser = ConfigParser()
    parser.read_config(config_files)
    parser.update({"bundle_root": str(BRATS), **overrides})
    with restored():
        try:
            parser.get_parsed_content("initialize")
            if before_run is not None:
                before_run(parser)
            parser.get_parsed_content("run")
        finally:
            if "summary_writer" in parser.ref_resolver.resolved_content:
                parser.get_parsed_content("summary_writer").close()
    return parser


def load(path: str | os.PathLike) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts/lists of tensors and numbers are identical (``torch.equal`` for every tensor)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"

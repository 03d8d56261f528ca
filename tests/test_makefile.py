"""The Makefile's GPU targets refuse clearly where no GPU can be used."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _make(target: str, python: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", str(REPO), target, f"PYTHON={python}"], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("target", ["test-gpu", "bench-gpu"])
def test_gpu_targets_refuse_a_python_without_torch_in_one_line(target):
    """The default PYTHON (python3) usually has no torch: that ended in a ModuleNotFoundError traceback
    instead of the line saying what the target needs."""
    proc = _make(target, f"{sys.executable} -S")  # -S: no site-packages, so no torch
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"{target} needs a visible GPU and the CUDA build of torch" in proc.stderr, proc.stderr
    assert "pytest" not in proc.stdout and "gmd_step" not in proc.stdout, proc.stdout  # nothing else ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
@pytest.mark.parametrize("target", ["test-gpu", "bench-gpu"])
def test_gpu_targets_refuse_the_cpu_build_of_torch(target):
    proc = _make(target, sys.executable)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"{target} needs a visible GPU" in proc.stderr, proc.stderr


def test_the_demo_passes_its_config_files_from_one_folder():
    """MONAI logs 'Not all config files are in bundles/brats_gmd/configs ...' as a warning when the files of one
    --config_file lie in different folders: make demo printed it before its training and its evaluation."""
    import ast
    import re

    proc = subprocess.run(["make", "-n", "-C", str(REPO), "demo", "DEMO=outputs/demo_dry_run"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lists = [ast.literal_eval(m) for m in re.findall(r"--config_file \"(\[[^\]]*\])\"", proc.stdout)]
    assert len(lists) == 2 and all(len(files) >= 2 for files in lists), proc.stdout  # training, evaluation
    for files in lists:
        assert {str(Path(f).parent) for f in files} == {"bundles/brats_gmd/configs"}, files
        assert all((REPO / f).is_file() for f in files), files

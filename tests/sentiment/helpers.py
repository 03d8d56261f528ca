"""Shared helpers of the sentiment-branch tests: paths and a ``python -m monai.bundle`` runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests import warm
from tests.bundles.helpers import SHARED_DATA, repo_env

REPO = Path(__file__).resolve().parents[2]
MOSI_BUNDLE = REPO / "bundles" / "mosi_gmd"
TRAIN = str(MOSI_BUNDLE / "configs" / "train.yaml")
EVALUATE = str(MOSI_BUNDLE / "configs" / "evaluate.yaml")
#: the shared real features (read-only), or MOSI_PKL
REAL_PKL = Path(os.environ.get("MOSI_PKL", SHARED_DATA / "mosi_utterance" / "mosi_utterance_trainval.pkl"))


def run_mosi_bundle(config_files: list[str], *args: str, check: bool = True, timeout: int = 300
                    ) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle run`` for the mosi_gmd bundle from the repository root."""
    config = config_files[0] if len(config_files) == 1 else str(config_files)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config, "--bundle_root", "bundles/mosi_gmd",
           *args]
    proc = warm.run(cmd, cwd=REPO, timeout=timeout, env=repo_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc

"""``bench/hd95_cost.py``, whose figures the README quotes: it times the 45 HD95 of a case, of known value."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from app.data.phantoms import write_phantoms
from tests.bundles.helpers import REPO, repo_env


def test_hd95_cost_times_the_45_distances_of_a_case_shifted_by_known_voxels(tmp_path):
    write_phantoms(tmp_path, cases=1, size=32, seed=0)
    case = next(p for p in tmp_path.iterdir() if p.is_dir())
    proc = subprocess.run([sys.executable, "bench/hd95_cost.py", "--case", str(case), "--shift", "1", "--workers", "2",
                           "--repeats", "1"], cwd=REPO, capture_output=True, text=True, timeout=300, env=repo_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["n_hd95"] == 45 and line["seconds"] >= 0 and line["spacing_mm"] == [1.0, 1.0, 1.0]
    # every subset's prediction is rolled differently: no search is a repeat that the scorer would skip
    assert line["workers"] == 2 and line["searches"] == 45, line
    # a region shifted by one voxel along each axis at 1 mm: no surface voxel is farther than sqrt(3) mm away
    assert all(0.0 < v <= 3 ** 0.5 + 1e-6 for v in line["hd95_mm"]), line
    assert line["hd95_mm"][0] == pytest.approx(3 ** 0.5, abs=1e-3)  # the 5% farthest of WT's do reach it

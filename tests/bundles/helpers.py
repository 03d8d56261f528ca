"""Shared helpers of the bundle integration tests: run ``python -m monai.bundle`` in a process of its own
(forked from a warm server where it can be: tests/warm.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests import warm

REPO = Path(__file__).resolve().parents[2]
#: the read-only real data beside the repository (or SHARED_DATA_DIR); BRATS_DEV_DIR names other full-size cases
SHARED_DATA = Path(os.environ.get("SHARED_DATA_DIR", REPO.parent / "shared" / "data"))
BRATS_DEV = Path(os.environ.get("BRATS_DEV_DIR") or SHARED_DATA / "brats18_dev")
BRATS = REPO / "bundles" / "brats_gmd"
TRAIN = str(BRATS / "configs" / "train.yaml")
EVALUATE = str(BRATS / "configs" / "evaluate.yaml")
TINY = ["--patch_size", "[32,32,32]", "--features", "[8,16,32,64]", "--num_workers", "0"]


def repo_env(**extra: str) -> dict[str, str]:
    """This process's environment for a subprocess, with the repository first on ``PYTHONPATH``; the entries
    already there stay (dependencies installed into a target folder, say)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_bundle(config_files: list[str], *args: str, timeout: int = 600,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle run`` from the repository root (in ``env``: this process's environment when
    None); fail with its output on error."""
    config = config_files[0] if len(config_files) == 1 else str(config_files)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config, "--bundle_root", str(BRATS), *args]
    proc = warm.run(cmd, cwd=REPO, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def refused_line(config_files: list[str], *args: str, output_dir: Path | None = None,
                 env: dict[str, str] | None = None) -> str:
    """Run a bundle that must refuse its input: exit status 1 with no traceback, nothing written under
    ``output_dir`` (when given); returns the run's last stderr line, its ``error:`` line. ``env`` as in
    :func:`run_bundle`."""
    config = config_files[0] if len(config_files) == 1 else str(config_files)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config, "--bundle_root", str(BRATS), *args]
    proc = warm.run(cmd, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 1, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-6000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
    if output_dir is not None:
        assert not output_dir.exists() or not any(output_dir.rglob("*")), sorted(output_dir.rglob("*"))
    return proc.stderr.strip().splitlines()[-1]


def run_setting_checks(config_files: list[str], setting: str, **overrides) -> int:
    """Evaluate, in this process, the checks among the configs' ``initialize`` steps that name ``@setting``, with the
    settings in ``overrides`` replaced as the command line replaces them; returns how many there were.

    These are the checks a run makes before it reads a case (a subprocess costs seconds of imports); the
    exception MONAI raises wraps the check's own ``ValueError``. What the steps set up for the run's process (the
    error-line hook, the thread count) is put back afterwards.
    """
    from monai.bundle import ConfigParser

    from tests.process_state import restored

    parser = ConfigParser(ConfigParser.load_config_files(list(config_files)))
    parser.update(overrides)
    # not the steps that set process state (set_determinism, set_cudnn): they would stay set in the tests
    steps = [i for i, step in enumerate(parser.get("initialize"))
             if re.search(rf"@{setting}\b", str(step)) and not re.search(r"set_determinism|set_cudnn", str(step))]
    with restored():
        for i in steps:
            parser.get_parsed_content(f"initialize#{i}")
    return len(steps)


def error_messages(exc: BaseException | None) -> list[str]:
    """Messages of an exception and of its causes (the bundle parser wraps the original error)."""
    out = []
    while exc is not None:
        out.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return out

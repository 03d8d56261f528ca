"""Static checks of the Docker image definition (no Docker engine runs on the development machines).

Every path the Dockerfile copies exists in the build context (the repository), the torch pin is the
project's, the image runs as a non-root user, the entrypoint's Python module imports and prints
its ``--help``, and compose.yaml reserves a GPU and mounts /input and /output.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"


def instructions(path: Path) -> list[tuple[str, str]]:
    """``[(INSTRUCTION, arguments)]`` of a Dockerfile, with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends with a continuation line"
    return out


def args_of(rest: str) -> list[str]:
    """Arguments in JSON (exec) form or shell form."""
    return json.loads(rest) if rest.startswith("[") else shlex.split(rest)


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    path = DOCKER / "Dockerfile"
    assert path.is_file()
    return instructions(path)


def test_every_copied_path_exists(dockerfile):
    copies = [(i, r) for i, r in dockerfile if i in ("COPY", "ADD")]
    assert copies
    for instr, rest in copies:
        parts = [p for p in args_of(rest) if not p.startswith("--")]
        if any(p.startswith("--from") for p in args_of(rest)):
            continue  # multi-stage copy, not from the context
        sources = parts[:-1]
        assert sources, f"{instr} {rest}"
        for src in sources:
            matches = glob.glob(str(REPO / src))
            assert matches, f"{instr} source {src!r} does not exist in the repository (build context)"


def test_copied_paths_are_not_dockerignored(dockerfile):
    lines = (REPO / ".dockerignore").read_text().splitlines()
    ignored = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    for instr, rest in dockerfile:
        if instr == "COPY":
            for src in [p for p in args_of(rest) if not p.startswith("--")][:-1]:
                top = src.rstrip("/").split("/")[0]
                assert top not in ignored, f"{src} is excluded by .dockerignore"


def test_cuda_base_and_project_torch(dockerfile):
    args = dict(re.match(r"(\w+)=(\S+)", r).groups() for i, r in dockerfile if i == "ARG" and "=" in r)
    base = next(r for i, r in dockerfile if i == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert "nvidia/cuda" in base and "runtime" in base
    pinned = re.search(r"^torch==(\S+)$", (REPO / "requirements.txt").read_text(), re.M).group(1)
    assert args["TORCH_VERSION"] == pinned
    assert "download.pytorch.org/whl/cu" in args["TORCH_INDEX_URL"]
    runs = " ".join(r for i, r in dockerfile if i == "RUN")
    assert 'torch==${TORCH_VERSION}' in runs and "requirements" in runs


def test_runs_as_non_root_user(dockerfile):
    users = [r for i, r in dockerfile if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_entrypoint_module_imports_and_prints_help(dockerfile):
    entry = args_of(next(r for i, r in dockerfile if i == "ENTRYPOINT"))
    script = next(args_of(r)[-1] for i, r in dockerfile if i == "COPY" and args_of(r)[-1] == entry[0])
    source = next(args_of(r)[0] for i, r in dockerfile if i == "COPY" and args_of(r)[-1] == entry[0])
    assert script == entry[0]
    text = (REPO / source).read_text()
    module = re.search(r"exec python -m (\S+)", text).group(1)
    assert os.access(REPO / source, os.X_OK), f"{source} must be executable"
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert "--input-dir" in proc.stdout and "--output-dir" in proc.stdout
    env = " ".join(r for i, r in dockerfile if i == "ENV")
    assert "BRATS_INPUT=/input" in env and "BRATS_OUTPUT=/output" in env
    bundle = re.search(r"BRATS_BUNDLE=/opt/brats/(\S+)", env).group(1)
    assert (REPO / bundle / "configs" / "train.yaml").is_file()


def test_compose_reserves_a_gpu_and_mounts_input_output():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    service = next(iter(compose["services"].values()))
    build = service["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == (DOCKER / "Dockerfile").resolve()
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    targets = {re.sub(r"\$\{[^}]*\}", "HOST", v).split(":")[1] for v in service["volumes"]}
    assert {"/input", "/output"} <= targets
    assert not str(service.get("user", "")).startswith("0")

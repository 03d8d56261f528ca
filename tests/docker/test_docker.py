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

from tests.bundles.helpers import repo_env

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


def dockerignore_patterns(text: str) -> list[tuple[bool, re.Pattern]]:
    """``[(re-includes, regex)]`` of a .dockerignore, as Docker reads it.

    Comment lines (``#``) and blank lines are skipped; ``!`` re-includes; a pattern is relative to the
    context root (a leading ``/`` and a trailing ``/`` change nothing, the pattern is path-cleaned);
    ``*`` is any run of characters but ``/``, ``?`` one such character, ``[...]`` a class, ``**`` any
    number of folders (zero included) and ``\\`` escapes the next character.
    """
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = os.path.normpath(line[1:].strip() if include else line).lstrip("/") or "."
        regex, i = "", 0
        while i < len(pattern):
            ch = pattern[i]
            if pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i):
                    i += 1
                regex += ".*" if i == len(pattern) else "(.*/)?"
                continue
            if ch == "*":
                regex += "[^/]*"
            elif ch == "?":
                regex += "[^/]"
            elif ch == "[":
                end = pattern.find("]", i + 1)
                regex += pattern[i : end + 1] if end > i else re.escape(ch)
                i = end if end > i else i
            elif ch == "\\" and i + 1 < len(pattern):
                i += 1
                regex += re.escape(pattern[i])
            else:
                regex += re.escape(ch)
            i += 1
        out.append((include, re.compile(f"^{regex}$")))
    return out


def is_dockerignored(path: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether the context path ``path`` (e.g. ``app/cli.py``) is left out of the build context.

    A pattern matches a path when it matches the path or one of its parent folders; the last matching
    pattern decides (a ``!`` pattern re-includes).
    """
    parts = os.path.normpath(path).lstrip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for include, regex in patterns:
        if any(regex.match(c) for c in candidates):
            excluded = not include
    return excluded


def copy_sources(dockerfile) -> list[str]:
    """Context paths of the COPY/ADD sources (multi-stage copies left out)."""
    sources = []
    for instr, rest in dockerfile:
        args = args_of(rest)
        if instr in ("COPY", "ADD") and not any(a.startswith("--from") for a in args):
            sources += [p for p in args if not p.startswith("--")][:-1]
    return sources


def dockerignored_copies(dockerfile, patterns) -> list[str]:
    """The copied paths, and the tracked files under copied folders, that ``patterns`` leave out."""
    hits = []
    for src in copy_sources(dockerfile):
        files = [src]
        if (REPO / src).is_dir():
            tracked = subprocess.run(["git", "ls-files", "--", src], cwd=REPO, capture_output=True, text=True,
                                     check=True).stdout.split()
            assert tracked, f"no tracked file under the copied folder {src}"
            files += tracked
        hits += [f for f in files if is_dockerignored(f, patterns)]
    return hits


def test_dockerignore_matcher_follows_docker_rules():
    def ignored(path, *lines):
        return is_dockerignored(path, dockerignore_patterns("\n".join(lines)))

    assert ignored("app/cli.py", "app/") and ignored("app/cli.py", "/app") and ignored("app", "app/")
    assert not ignored("bundles/app/x.py", "app") and not ignored("apps/x.py", "app")  # relative to the root
    assert ignored("docker/entrypoint.sh", "docker/*.sh") and not ignored("entrypoint.sh", "docker/*.sh")
    assert not ignored("docker/entrypoint.sh", "entrypoint.sh") and not ignored("docker/a/b.sh", "docker/*.sh")
    assert ignored("a/b/__pycache__/c.pyc", "**/__pycache__") and ignored("__pycache__/c.pyc", "**/__pycache__")
    assert ignored("a/b/c.pyc", "**/*.pyc") and ignored("a/x/y/b", "a/**/b") and ignored("a/b", "a/**/b")
    assert ignored("x.pt", "*.pt") and not ignored("models/x.pt", "*.pt")  # * stops at a folder
    assert ignored("ab.txt", "a?.txt") and not ignored("a/.txt", "a?.txt") and ignored("b1", "b[0-9]")
    assert not ignored("app/cli.py", "app", "!app/cli.py") and ignored("app/cli.py", "!app/cli.py", "app")
    assert not ignored("app/cli.py", "# app", "") and not ignored("README.md", "app")


def test_copied_paths_are_not_dockerignored(dockerfile):
    text = (REPO / ".dockerignore").read_text(encoding="utf-8")
    assert copy_sources(dockerfile)
    assert dockerignored_copies(dockerfile, dockerignore_patterns(text)) == []
    # the check sees an exclusion anywhere in a copied folder, as Docker would apply it
    for extra in ("app/", "docker/*.sh", "bundles/**/*.yaml", "requirements.txt", "app/*/__init__.py"):
        assert dockerignored_copies(dockerfile, dockerignore_patterns(f"{text}\n{extra}\n")), extra
    assert dockerignored_copies(dockerfile, dockerignore_patterns(f"{text}\napp/\n!app/\n")) == []


def test_cuda_base_and_project_torch(dockerfile):
    args = dict(re.match(r"(\w+)=(\S+)", r).groups() for i, r in dockerfile if i == "ARG" and "=" in r)
    base = next(r for i, r in dockerfile if i == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert "nvidia/cuda" in base and "runtime" in base
    pinned = re.search(r"^torch==(\S+)$", (REPO / "requirements.txt").read_text(encoding="utf-8"), re.M).group(1)
    assert args["TORCH_VERSION"] == pinned
    assert "download.pytorch.org/whl/cu" in args["TORCH_INDEX_URL"]
    runs = " ".join(r for i, r in dockerfile if i == "RUN")
    assert 'torch==${TORCH_VERSION}' in runs and "requirements" in runs


def test_runs_as_non_root_user(dockerfile):
    users = [r for i, r in dockerfile if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    # Ubuntu 24.04 images have a user 'ubuntu' with uid 1000: useradd --uid 1000 fails unless it goes first
    runs = " ".join(r for i, r in dockerfile if i == "RUN")
    created = re.search(r"useradd [^&;]*(?:--uid[ =]|-u ?)(\d+)[^&;]* (\S+)\s*(?:&&|;|$)", runs)
    assert created and created.group(2) == users[-1].split(":")[0], "the image creates the user it runs as"
    if created.group(1) == "1000":
        assert re.search(r"userdel [^&;]*ubuntu", runs) and runs.index("userdel") < runs.index("useradd")
    # its home is not writable under --user, and MONAI imports matplotlib, which wants a cache folder
    env = " ".join(r for i, r in dockerfile if i == "ENV")
    assert "MPLCONFIGDIR=/tmp/" in env


def test_documented_commands_do_not_assign_bash_readonly_uid():
    # "UID=$(id -u) docker compose ..." fails in bash (UID is read-only), so compose reads HOST_UID/HOST_GID
    compose = (DOCKER / "compose.yaml").read_text(encoding="utf-8")
    assert "${HOST_UID:-1000}:${HOST_GID:-1000}" in compose and "${UID" not in compose
    for path in (REPO / "README.md", REPO / "docs" / "inference.md", DOCKER / "compose.yaml", DOCKER / "Dockerfile"):
        assert not re.search(r"(^|[\s#])UID=\$\(id -u\)", path.read_text(encoding="utf-8")), path


def test_entrypoint_module_imports_and_prints_help(dockerfile):
    entry = args_of(next(r for i, r in dockerfile if i == "ENTRYPOINT"))
    script = next(args_of(r)[-1] for i, r in dockerfile if i == "COPY" and args_of(r)[-1] == entry[0])
    source = next(args_of(r)[0] for i, r in dockerfile if i == "COPY" and args_of(r)[-1] == entry[0])
    assert script == entry[0]
    text = (REPO / source).read_text(encoding="utf-8")
    module = re.search(r"exec python -m (\S+)", text).group(1)
    assert os.access(REPO / source, os.X_OK), f"{source} must be executable"
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=repo_env())
    assert proc.returncode == 0, proc.stderr
    assert "--input-dir" in proc.stdout and "--output-dir" in proc.stdout
    env = " ".join(r for i, r in dockerfile if i == "ENV")
    assert "BRATS_INPUT=/input" in env and "BRATS_OUTPUT=/output" in env
    bundle = re.search(r"BRATS_BUNDLE=/opt/brats/(\S+)", env).group(1)
    assert (REPO / bundle / "configs" / "train.yaml").is_file()


def test_compose_reserves_a_gpu_and_mounts_input_output():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))
    service = next(iter(compose["services"].values()))
    build = service["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == (DOCKER / "Dockerfile").resolve()
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    targets = {re.sub(r"\$\{[^}]*\}", "HOST", v).split(":")[1] for v in service["volumes"]}
    assert {"/input", "/output"} <= targets
    assert not str(service.get("user", "")).startswith("0")


def _entrypoint_checkpoint(tmp_path: Path, env: dict[str, str]) -> str:
    """The ``BRATS_CKPT`` the entrypoint hands to the batch, through a stand-in ``python`` on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python"
    fake.write_text('#!/bin/sh\nprintf "%s" "$BRATS_CKPT"\n', encoding="utf-8")
    fake.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith("BRATS_")}
    proc = subprocess.run(["sh", str(DOCKER / "entrypoint.sh")], capture_output=True, text=True, timeout=30,
                          env={**base, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_entrypoint_keeps_an_explicit_checkpoint_that_is_missing(tmp_path):
    # a misspelt BRATS_CKPT must reach the batch (which refuses it), not be swapped for model.pt
    models = tmp_path / "models"
    models.mkdir()
    (models / "model.pt").write_bytes(b"x")
    wanted = str(models / "model_v2.ts")
    assert _entrypoint_checkpoint(tmp_path, {"BRATS_CKPT": wanted, "BRATS_MODELS": str(models)}) == wanted


def test_entrypoint_default_model_ts_else_model_pt(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "model.pt").write_bytes(b"x")
    assert _entrypoint_checkpoint(tmp_path, {"BRATS_MODELS": str(models)}) == str(models / "model.pt")
    (models / "model.ts").write_bytes(b"x")
    assert _entrypoint_checkpoint(tmp_path, {"BRATS_MODELS": str(models)}) == str(models / "model.ts")
    assert _entrypoint_checkpoint(tmp_path, {"BRATS_MODELS": str(tmp_path / "none")}) == str(tmp_path / "none/model.ts")

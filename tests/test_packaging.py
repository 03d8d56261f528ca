"""pyproject.toml's dependency ranges admit the versions requirements.txt pins and tests."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_declared_ranges_admit_the_pinned_versions():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pins = _pins()
    names = {canonicalize_name(r.name) for r in declared}
    assert names == set(pins), f"declared but not pinned: {names - set(pins)}; pinned but not declared: {set(pins) - names}"
    for req in declared:
        assert req.specifier.contains(pins[canonicalize_name(req.name)]), f"{req} excludes the pinned version"
    core = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    assert {"torch", "monai", "pytorch-ignite", "numpy", "nibabel", "pyyaml", "fire"} <= core

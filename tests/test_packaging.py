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


def test_pyproject_builds_without_setuptools_deprecations(tmp_path, monkeypatch):
    """``make install`` printed setuptools' warning that ``project.license`` as a TOML table is deprecated
    (builds will stop being supported): the project metadata must apply without any such warning."""
    import sys
    import warnings

    # importing setuptools appends its _vendor folder to sys.path, which would stay for the process's later tests
    monkeypatch.setattr(sys, "path", list(sys.path))
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(REPO)  # license-files and readme are relative to the project root
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), REPO / "pyproject.toml")
    messages = [f"{w.category.__name__}: {w.message}" for w in caught]
    assert not [m for m in messages if "eprecat" in m], messages
    assert dist.metadata.get_name() == "brats-gmd" and "LICENSE" in (dist.metadata.license_files or [])

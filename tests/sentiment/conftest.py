"""Fixtures of the sentiment-branch tests: tiny synthetic MMSA files."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.data.mmsa import write_synthetic_mmsa


@pytest.fixture(scope="session")
def synthetic_pkl(tmp_path_factory) -> Path:
    """Utterance-level MMSA pickle with train/valid/test splits (48/24/24 samples)."""
    path = tmp_path_factory.mktemp("mmsa") / "synthetic.pkl"
    return write_synthetic_mmsa(path, splits={"train": 48, "valid": 24, "test": 24}, seed=0)


@pytest.fixture(scope="session")
def trainval_pkl(tmp_path_factory) -> Path:
    """Like the shared MOSI file: train and valid splits only."""
    path = tmp_path_factory.mktemp("mmsa_tv") / "trainval.pkl"
    return write_synthetic_mmsa(path, splits={"train": 32, "valid": 16}, seed=1)

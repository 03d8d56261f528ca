"""The sentiment baselines and the seed summary of ``bench/``: ridge by hand, late fusion, tables."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from app.data.mmsa import MMSA_MODALITIES, load_mmsa, mmsa_split, write_synthetic_mmsa
from app.metrics.sentiment import sentiment_metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from mosi_baselines import LAMBDAS, fit_ridge, pooled_features, ridge_baselines  # noqa: E402
from mosi_compare import seed_summary  # noqa: E402


def test_fit_ridge_by_hand():
    x = np.array([[1.0], [2.0], [3.0]])
    y = np.array([2.0, 4.0, 6.0])
    np.testing.assert_allclose(fit_ridge(x, y, 0.0), [2.0, 0.0], atol=1e-12)
    # unpenalised intercept: slope = Sxy / (Sxx + lam) = 4 / (2 + 2), intercept = mean(y) - slope * mean(x)
    np.testing.assert_allclose(fit_ridge(x, y, 2.0), [1.0, 2.0], atol=1e-12)


@pytest.fixture(scope="module")
def mmsa(tmp_path_factory):
    path = write_synthetic_mmsa(tmp_path_factory.mktemp("ridge") / "s.pkl", splits={"train": 60, "valid": 30}, seed=3)
    return load_mmsa(path, trust_pickle=True)


def _single_prediction(data, modality: str, lam: float) -> np.ndarray:
    train, valid = mmsa_split(data, "train"), mmsa_split(data, "valid")
    xt, xv = pooled_features(train, modality), pooled_features(valid, modality)
    mean, std = xt.mean(0), xt.std(0)
    std = np.where(std > 1e-8, std, 1.0)
    w = fit_ridge((xt - mean) / std, train["regression_labels"].astype(np.float64), lam)
    return (xv - mean) / std @ w[:-1] + w[-1]


def test_late_fusion_is_the_mean_of_the_single_modality_ridges(mmsa):
    out = ridge_baselines(mmsa)
    late, dedicated = out["late"]["valid"]["subsets"], out["results"]["valid"]["subsets"]
    for m in MMSA_MODALITIES:  # one modality: late fusion is the dedicated model itself
        assert late[m] == dedicated[m]
    preds = {m: _single_prediction(mmsa, m, out["lambdas"][m]) for m in MMSA_MODALITIES}
    labels = mmsa_split(mmsa, "valid")["regression_labels"]
    expected = sentiment_metrics((preds["text"] + preds["vision"]) / 2, labels)
    for key in ("Acc2", "MAE", "Corr"):
        assert late["text+vision"][key] == pytest.approx(expected[key], abs=1e-9)


def test_profile_lists_every_penalty_and_the_choice_has_the_lowest_mae(mmsa):
    out = ridge_baselines(mmsa)
    assert set(out["profile"]) == set(out["lambdas"]) and len(out["profile"]) == 7
    for name, rows in out["profile"].items():
        assert [r["lambda"] for r in rows] == list(LAMBDAS)
        best = min(rows, key=lambda r: r["MAE"])
        assert out["lambdas"][name] == best["lambda"]
        assert out["results"]["valid"]["subsets"][name]["MAE"] == pytest.approx(best["MAE"], abs=1e-9)


def _report(acc2: dict, mae: dict) -> dict:
    subsets = {n: {"Acc2": acc2[n], "MAE": mae[n]} for n in acc2}
    return {"subsets": subsets, "mean_over_subsets": {"Acc2": float(np.mean(list(acc2.values()))),
                                                      "MAE": float(np.mean(list(mae.values())))}}


def test_seed_summary_means_deviations_and_win_counts():
    ridge = _report({"text": 0.9, "audio": 0.5}, {"text": 0.7, "audio": 1.4})
    per_seed = {
        0: {"gmd": _report({"text": 0.95, "audio": 0.5}, {"text": 0.6, "audio": 1.5}), "ridge": ridge},
        1: {"gmd": _report({"text": 0.85, "audio": 0.6}, {"text": 0.8, "audio": 1.3}), "ridge": ridge},
    }
    table = seed_summary(per_seed).splitlines()
    text = next(line for line in table if line.startswith("| text |"))
    # mean 0.9, sample sd sqrt(((0.05)^2 + (0.05)^2) / 1) = 0.0707; one win of two in Acc2 (0.95 > 0.9; 0.85 < 0.9)
    assert "0.9000 ± 0.0707" in text and "0.7000 ± 0.1414" in text
    assert text.rstrip(" |").endswith("1/2 | 1/2")
    audio = next(line for line in table if line.startswith("| audio |"))
    # 0.5 ties the ridge (not a win), 0.6 wins; MAE 1.5 loses, 1.3 wins
    assert audio.rstrip(" |").endswith("1/2 | 1/2")
    mean = next(line for line in table if line.startswith("| **mean** |"))
    assert "0.7250 ± 0.0000" in mean  # the gmd mean over subsets is 0.725 on both seeds

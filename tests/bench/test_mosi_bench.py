"""The sentiment baselines and the seed summary of ``bench/``: ridge by hand, late fusion, tables."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from app.data.mmsa import MMSA_MODALITIES, load_mmsa, mmsa_split, write_synthetic_mmsa
from app.metrics.sentiment import sentiment_metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from mosi_baselines import LAMBDAS, fit_ridge, pooled_features, ridge_baselines, video_of  # noqa: E402
from mosi_compare import checks, comparison_table, win_counts  # noqa: E402


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


def test_samples_without_a_modality_are_left_out_of_its_subsets(mmsa):
    import copy

    data = copy.deepcopy(mmsa)
    for split in ("train", "valid"):
        lengths = data[split]["audio_lengths"].copy()
        lengths[::3] = 0  # no audio for every third sample
        data[split]["audio_lengths"] = lengths
    clean = ridge_baselines(data)
    for split in ("train", "valid"):  # what an absent modality holds must not matter
        data[split]["audio"][data[split]["audio_lengths"] == 0] = 1e6
    out = ridge_baselines(data)
    n_audio = int((data["valid"]["audio_lengths"] > 0).sum())
    subsets = out["results"]["valid"]["subsets"]
    assert subsets["audio"]["n"] == subsets["text+audio"]["n"] == n_audio < subsets["text"]["n"] == 30
    for name, metrics in subsets.items():
        assert metrics == pytest.approx(clean["results"]["valid"]["subsets"][name]), name
    assert out["late"]["valid"]["subsets"]["audio+vision"]["n"] == n_audio


def test_profile_lists_every_penalty_and_the_choice_has_the_lowest_mae(mmsa):
    out = ridge_baselines(mmsa)
    assert set(out["profile"]) == set(out["lambdas"]) and len(out["profile"]) == 7
    for name, rows in out["profile"].items():
        assert [r["lambda"] for r in rows] == list(LAMBDAS)
        best = min(rows, key=lambda r: r["MAE"])
        assert out["lambdas"][name] == best["lambda"]
        assert out["results"]["valid"]["subsets"][name]["MAE"] == pytest.approx(best["MAE"], abs=1e-9)


def _report(acc2: dict, mae: dict) -> dict:
    return {"subsets": {n: {"Acc2": acc2[n], "MAE": mae[n]} for n in acc2}}


def test_win_counts_are_strict():
    ridge = _report({"text": 0.9, "audio": 0.5}, {"text": 0.7, "audio": 1.4})
    per_seed = {
        0: {"gmd": _report({"text": 0.95, "audio": 0.5}, {"text": 0.6, "audio": 1.5}), "ridge": ridge},
        1: {"gmd": _report({"text": 0.85, "audio": 0.6}, {"text": 0.7, "audio": 1.3}), "ridge": ridge},
    }
    table = win_counts(per_seed).splitlines()
    # text: Acc2 0.95 wins, 0.85 loses; MAE 0.6 wins, 0.7 ties (not a win)
    assert "| text | 1/2 | 1/2 |" in table
    # audio: Acc2 0.5 ties, 0.6 wins; MAE 1.5 loses, 1.3 wins
    assert "| audio | 1/2 | 1/2 |" in table
    per_seed[1]["gmd"]["subsets"]["text"]["Acc2"] = 0.91
    assert "| text | 2/2 | 1/2 |" in win_counts(per_seed).splitlines()


def test_a_null_metric_is_no_win_and_prints_as_n_a():
    """Reports write a non-finite metric as null; the comparison must still be written."""
    ridge = _report({"text": 0.9, "audio": 0.5}, {"text": 0.7, "audio": 1.4})
    gmd = _report({"text": None, "audio": 0.6}, {"text": None, "audio": 1.3})
    for report, mean in ((ridge, (0.7, 1.05)), (gmd, (None, None))):
        report["mean_over_subsets"] = {"Acc2": mean[0], "MAE": mean[1]}
    table = comparison_table({"gmd": gmd, "ridge": ridge})
    assert "| text | n/a | n/a | 0.9000 | 0.7000 |" in table and "| **mean** | **n/a** | **n/a** |" in table
    lines = checks({"gmd": gmd, "ridge": ridge})
    assert lines[0].endswith("FAIL: text (n/a vs 0.9000)") and lines[1].endswith("FAIL: text (n/a vs 0.7000)")
    assert "| text | 0/1 | 0/1 |" in win_counts({0: {"gmd": gmd, "ridge": ridge}}).splitlines()


def test_compare_without_gmd_over_several_seeds_writes_its_tables(mmsa, tmp_path, monkeypatch):
    """The strict-win table counts GMD's wins; comparing other strategies over seeds must not end in a
    KeyError after every run has trained, with no compare.md written."""
    import json

    import mosi_compare

    ridge = ridge_baselines(mmsa)["results"]["valid"]

    def fake_runs(bundle, strategies, out_dir, max_epochs, seeds, **kwargs):
        per_seed = {}
        for seed in seeds:
            runs = {}
            for strategy in strategies:
                path = Path(out_dir) / f"seed_{seed}" / strategy / "subset_metrics.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(ridge))
                runs[strategy] = {"report": str(path), "train_seconds": 1.0}
            per_seed[seed] = {"runs": runs}
        return {"per_seed": per_seed}

    monkeypatch.setattr(mosi_compare, "run_ablation_seeds", fake_runs)
    out = tmp_path / "cmp"
    code = mosi_compare.main(["--data_path", mmsa.source, "--trust_pickle", "true", "--out_dir", str(out), "--strategies", "plain", "dropout",
                              "--seeds", "0", "1", "--max_epochs", "1"])
    assert code == 0
    text = (out / "compare.md").read_text()
    assert "## Over 2 seeds" in text and "Strict wins" not in text
    assert json.loads((out / "compare.json").read_text())["seeds"] == [0, 1]


def test_compare_refusal_of_the_runner_is_one_line_not_a_traceback(mmsa, tmp_path, capsys):
    """A folder trained with other settings (here another --max_epochs) is refused by the runner; the
    compare script must print that refusal as one ``error:`` line and exit 2, as ``app ablate`` does."""
    import mosi_compare

    out = tmp_path / "cmp"
    (out / "seed_0" / "plain" / "train" / "models").mkdir(parents=True)
    (out / "seed_0" / "plain" / "train" / "models" / "model.pt").write_bytes(b"x")
    (out / "seed_0" / "plain" / "train_settings.json").write_text('{"args": ["--max_epochs", "7"]}')
    (out / "seed_0" / "plain" / "train_seconds.json").write_text("{}")  # that training ran to its end
    code = mosi_compare.main(["--data_path", mmsa.source, "--trust_pickle", "true", "--out_dir", str(out),
                              "--strategies", "plain", "--seeds", "0", "--max_epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "other settings" in err
    assert not (out / "compare.md").exists()


def test_compare_with_an_unknown_strategy_writes_nothing(mmsa, tmp_path, capsys):
    """The output folder was made before the runner checked --strategies, so a misspelt strategy left an
    empty folder behind its error."""
    import mosi_compare

    out = tmp_path / "cmp"
    code = mosi_compare.main(["--data_path", mmsa.source, "--trust_pickle", "true", "--out_dir", str(out),
                              "--strategies", "gmdd", "--seeds", "0", "--max_epochs", "1"])
    assert code == 2 and "Unknown strategy 'gmdd'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("overrides", [["--task", "classification"], ["--task=classification", "--out_channels", "3"],
                                       ["--config_file", "RECIPE"]])
def test_compare_refuses_classification_before_training(mmsa, tmp_path, capsys, monkeypatch, overrides):
    """The comparison is on Acc-2 and MAE against a ridge regression; a classification run (asked for on the
    command line or by a recipe) trained every strategy and seed, then stopped on its Acc/F1 reports with
    ``KeyError: 'Acc2'``."""
    import mosi_compare

    recipe = tmp_path / "iemocap.yaml"
    recipe.write_text("task: classification\nout_channels: 3\n")
    overrides = [str(recipe) if arg == "RECIPE" else arg for arg in overrides]

    def no_training(*args, **kwargs):
        raise AssertionError("nothing may train for a comparison that cannot be made")

    monkeypatch.setattr(mosi_compare, "run_ablation_seeds", no_training)
    out = tmp_path / "cmp"
    code = mosi_compare.main(["--data_path", mmsa.source, "--trust_pickle", "true", "--out_dir", str(out),
                              "--strategies", "plain", "--max_epochs", "1", "--", *overrides,
                              "--label_key", "classification_labels"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert "--task classification" in err and "python -m app ablate" in err and "ridge" in err
    assert not out.exists()


@pytest.mark.parametrize("script", ["mosi_baselines", "mosi_compare"])
def test_a_damaged_feature_file_is_one_error_line_and_writes_nothing(script, tmp_path, capsys):
    """The bench scripts answer a damaged MMSA file as convert-mmsa does: exit 2, one line, nothing written."""
    import importlib

    bad = tmp_path / "text.pkl"
    bad.write_text("garbage\n")
    out = tmp_path / "out"
    code = importlib.import_module(script).main(["--data_path", str(bad), "--trust_pickle", "true",
                                                 "--out_dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {bad} cannot be read as a pickle") and "download or export it again" in err
    assert not out.exists()


def test_video_of_reads_both_id_layouts():
    assert video_of("03bSnISJMiM$_$11") == "03bSnISJMiM"  # MMSA
    assert video_of("2iD-tVS8NPw_10") == "2iD-tVS8NPw"  # bc-LSTM release: the video id may hold "_" and "-"
    assert video_of("a_b_c_3") == "a_b_c"
    assert video_of("utt7") == "utt7"  # no separator: each utterance is its own group


def test_video_held_out_score_keeps_a_video_out_of_the_fit_that_scores_it(mmsa):
    """Features that only identify the video, and a sentiment sign per video: a fit that saw the scored
    videos separates them perfectly, while videos held out of the fit are no better than a guess."""
    import copy

    data = copy.deepcopy(mmsa)
    rng = np.random.default_rng(0)
    train = data["train"]
    n_videos, per_video = 12, 5
    video = np.repeat(np.arange(n_videos), per_video)
    train["id"] = np.array([f"vid-{v}_{k}" for v, k in zip(video, np.tile(np.arange(per_video), n_videos))])
    sign = np.where(np.arange(n_videos) % 2 == 0, 1.0, -1.0)
    train["regression_labels"] = (2.0 * sign[video]).astype(train["regression_labels"].dtype)
    for m in MMSA_MODALITIES:
        d = train[m].shape[-1]
        signature = rng.normal(size=(n_videos, d)) * 10.0
        train[m] = (signature[video][:, None, :] + 0.01 * rng.normal(size=(len(video), 1, d))).astype(train[m].dtype)
        train[f"{m}_lengths"] = np.ones(len(video), dtype=train[f"{m}_lengths"].dtype)
    cv = ridge_baselines(data, lambdas=(1e-2,))["video_cv"]["text"]
    assert (cv["videos"], cv["folds"], cv["n"]) == (12, 5, 60)
    x = pooled_features(train, "text")
    x = (x - x.mean(0)) / x.std(0)
    w = fit_ridge(x, train["regression_labels"], 1e-2)
    in_sample = sentiment_metrics(x @ w[:-1] + w[-1], train["regression_labels"])
    assert in_sample["Acc2"] == 1.0
    assert cv["Acc2"] <= 0.75, cv  # 12 videos: a guess gets 0.5 give or take a few videos


def test_a_single_video_has_no_held_out_score(mmsa):
    import copy

    data = copy.deepcopy(mmsa)
    data["train"]["id"] = np.array([f"onevideo_{k}" for k in range(len(data["train"]["id"]))])
    assert all(v is None for v in ridge_baselines(data)["video_cv"].values())

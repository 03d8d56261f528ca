"""Ablations of the sentiment bundle on a tiny synthetic MMSA file: tables, seeds, reuse, and the splits and labels
refused before any strategy trains."""

from __future__ import annotations

import json

import pytest

from app.data.mmsa import write_synthetic_mmsa
from app.subsets import MOSI_MODALITIES
from tests.ablation.helpers import ablate, check_tables
from tests.bundles.helpers import REPO


def test_sentiment_bundle_ablation_and_failure_names_the_log(tmp_path):
    pkl = write_synthetic_mmsa(tmp_path / "syn.pkl", splits={"train": 48, "valid": 24}, seed=0)
    out = tmp_path / "ablation"
    proc = ablate("--bundle", "bundles/mosi_gmd", "--strategies", "plain,predict", "--max_epochs", "1",
                  "--output_dir", str(out), "--data_path", str(pkl), "--trust_pickle", "true")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    table = check_tables(out, ["plain", "predict"], MOSI_MODALITIES, "Acc2")
    assert table["paired"]["cases"] == 24 and "predict - plain" in (out / "ablation.md").read_text()
    assert table["tables"]["MAE"]["plain"]["worst"]["value"] == max(table["tables"]["MAE"]["plain"]["subsets"].values())
    report = json.loads((out / "plain" / "eval" / "subset_metrics.json").read_text())
    assert report["subsets"]["text"]["n"] == 24  # scored on the valid split
    # an unknown strategy is refused before anything runs
    bad = ablate("--bundle", "bundles/mosi_gmd", "--strategies", "plain,nosuch", "--max_epochs", "1",
                 "--output_dir", str(tmp_path / "bad"), "--data_path", str(pkl), "--trust_pickle", "true")
    assert bad.returncode == 1 and "Unknown strategy 'nosuch'" in bad.stderr and not (tmp_path / "bad").exists()
    # a failed run: its error line and its log are named
    bad = ablate("--bundle", "bundles/mosi_gmd", "--strategies", "plain", "--max_epochs", "1", "--output_dir",
                 str(tmp_path / "bad"), "--data_path", str(pkl), "--trust_pickle", "true", "--hiden", "8")
    assert bad.returncode == 1 and "error: --hiden is not a setting" in bad.stderr
    assert "--hiden" in (tmp_path / "bad" / "plain" / "train.log").read_text()
    assert "train.log" in bad.stderr and not (tmp_path / "bad" / "ablation.json").exists()


def test_sentiment_classification_ablation_tabulates_accuracy_and_f1(tmp_path):
    """The documented IEMOCAP-style settings: the default table columns follow --task, instead of the
    regression ones stopping the ablation ('no Acc2 ... choose --metrics') after every run trained."""
    pkl = write_synthetic_mmsa(tmp_path / "syn.pkl", splits={"train": 32, "valid": 16}, seed=3)
    out = tmp_path / "cls"
    proc = ablate("--bundle", "bundles/mosi_gmd", "--strategies", "plain", "--max_epochs", "1",
                  "--output_dir", str(out), "--data_path", str(pkl), "--trust_pickle", "true",
                  "--task", "classification", "--out_channels", "3", "--label_key", "classification_labels")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    table = json.loads((out / "ablation.json").read_text())
    assert table["metrics"] == ["Acc", "F1"]
    report = json.loads((out / "plain" / "eval" / "subset_metrics.json").read_text())
    assert table["tables"]["Acc"]["plain"]["subsets"]["text"] == report["subsets"]["text"]["Acc"]
    assert "## F1 (higher is better)" in (out / "ablation.md").read_text()


def test_sentiment_ablation_over_seeds(tmp_path):
    pkl = write_synthetic_mmsa(tmp_path / "syn.pkl", splits={"train": 32, "valid": 16}, seed=2)
    out = tmp_path / "seeds"
    proc = ablate("--bundle", "bundles/mosi_gmd", "--strategies", "plain", "--max_epochs", "1", "--seeds", "0,1",
                  "--output_dir", str(out), "--data_path", str(pkl), "--trust_pickle", "true")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    combined = json.loads((out / "ablation_seeds.json").read_text())
    assert combined["seeds"] == [0, 1]
    per_seed = [json.loads((out / f"seed_{s}" / "ablation.json").read_text()) for s in (0, 1)]
    assert [t["settings"]["seed"] for t in per_seed] == [0, 1]
    for name in combined["subsets"]:
        values = [t["tables"]["MAE"]["plain"]["subsets"][name] for t in per_seed]
        spread = combined["tables"]["MAE"]["plain"]["subsets"][name]
        assert spread["values"] == values and spread["mean"] == pytest.approx(sum(values) / 2)
    assert "+/-" in (out / "ablation_seeds.md").read_text()
    bad = ablate("--bundle", "bundles/mosi_gmd", "--strategies", "plain", "--max_epochs", "1", "--seeds", "0,x",
                 "--output_dir", str(tmp_path / "bad"), "--data_path", str(pkl), "--trust_pickle", "true")
    assert bad.returncode == 2 and "--seeds takes comma-separated integers" in bad.stderr
    both = ablate("--bundle", "bundles/mosi_gmd", "--strategies", "plain", "--max_epochs", "1", "--seeds", "0,1",
                  "--seed", "3", "--output_dir", str(tmp_path / "bad"), "--data_path", str(pkl))
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    assert not (tmp_path / "bad").exists()


def test_a_sentiment_ablation_reuses_an_old_finished_stage_and_refuses_a_changed_loss(tmp_path):
    """Two reruns of a sentiment ablation. A stage of an ablation before 0.5.0 has no train_seconds.json: its training
    checkpoint or the trainer's completion line in its log tells that it finished, so it is reused, not trained again. And a sentiment training
    wrote no checkpoint recording its loss, so a stage finished before train.yaml's loss changed (L1 to MSE) was
    reused beside a stage trained with the new one, in one table, without a word."""
    import shutil

    bundle = tmp_path / "mosi_gmd"
    shutil.copytree(REPO / "bundles" / "mosi_gmd", bundle)
    pkl = write_synthetic_mmsa(tmp_path / "syn.pkl", splits={"train": 32, "valid": 16}, seed=4)
    out = tmp_path / "ablation"
    args = ["--bundle", str(bundle), "--max_epochs", "1", "--output_dir", str(out), "--data_path", str(pkl),
            "--trust_pickle", "true"]
    first = ablate("--strategies", "plain", *args)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    (out / "plain" / "train_seconds.json").unlink()  # as a version before 0.5.0 left the stage
    again = ablate("--strategies", "plain", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Reusing the finished training of plain" in again.stdout and "Training plain" not in again.stdout
    train = bundle / "configs" / "train.yaml"
    train.write_text(train.read_text().replace("torch.nn.L1Loss()", "torch.nn.MSELoss()"))
    mixed = ablate("--strategies", "plain,dropout", *args)
    assert mixed.returncode == 1 and "Traceback" not in mixed.stderr, mixed.stderr[-3000:]
    line = mixed.stderr.strip().splitlines()[-1]
    assert ("Strategy 'dropout' would be trained with another loss than 'plain' (_target_ "
            "'torch.nn.modules.loss.L1Loss' in 'plain', 'torch.nn.modules.loss.MSELoss' in 'dropout')") in line, line
    assert not (out / "dropout" / "train").exists()  # refused before it trained


def test_a_sentiment_eval_split_the_file_lacks_is_refused_before_any_strategy_trains(tmp_path):
    """A misspelt --eval_split was read only by the first evaluation, after that strategy had trained."""
    npz = write_synthetic_mmsa(tmp_path / "syn.npz", splits={"train": 8, "valid": 4, "test": 4}, dims=(4, 3, 4))
    out = tmp_path / "ablation"
    bad = ablate("--bundle", "bundles/mosi_gmd", "--strategies", "plain,gmd", "--max_epochs", "1",
                 "--output_dir", str(out), "--data_path", str(npz), "--eval_split", "tset")
    assert bad.returncode == 1, bad.stderr[-2000:]
    assert bad.stderr.strip().splitlines() == [
        f"error: Split 'tset' is not in {npz}: available splits are ['test', 'train', 'valid']. Pass one of them "
        "(the bundles' --train_split, --val_split and --eval_split) or a file that has a 'tset' split."]
    assert not out.exists()


@pytest.mark.parametrize("label", ["absent", "hidden", "beyond"])
def test_a_sentiment_eval_split_whose_labels_cannot_be_scored_is_refused_before_any_strategy_trains(tmp_path, label):
    """Only a missing split was checked up front: a test split without the run's classification labels, with
    hidden (NaN) labels or with a class id beyond --out_channels stopped the ablation at the first evaluation,
    after that strategy had trained, leaving its folder behind."""
    import pickle

    import numpy as np

    from app.data.mmsa import make_synthetic_mmsa

    data = make_synthetic_mmsa(splits={"train": 8, "valid": 4, "test": 4}, dims=(4, 3, 4))
    classes = np.asarray(data["test"]["classification_labels"], dtype=np.float64)
    if label == "absent":
        del data["test"]["classification_labels"]
    else:
        classes[1] = np.nan if label == "hidden" else 5
        data["test"]["classification_labels"] = classes
    pkl = tmp_path / "iemocap.pkl"
    pkl.write_bytes(pickle.dumps(data))
    out = tmp_path / "ablation"
    bad = ablate("--bundle", "bundles/mosi_gmd", "--strategies", "plain,gmd", "--max_epochs", "1",
                 "--output_dir", str(out), "--data_path", str(pkl), "--trust_pickle", "true", "--eval_split", "test",
                 "--task", "classification", "--out_channels", "3", "--label_key", "classification_labels")
    assert bad.returncode == 1, bad.stderr[-2000:]
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "test" in lines[0] and str(pkl) in lines[0]
    expected = {"absent": "has no 'classification_labels'", "hidden": "missing or infinite label",
                "beyond": "class id 5, but the network has 3 classes"}[label]
    assert expected in lines[0]
    assert not out.exists()


def test_table_metrics_the_reports_lack_are_refused_before_any_strategy_trains(tmp_path):
    """--metrics MAE for a classification ablation (whose reports have Acc and F1) was found missing only when
    the tables were made, after every strategy had trained."""
    from app.ablation import REPORT_METRICS, SENTIMENT_CLASSIFICATION_METRICS
    from app.metrics.sentiment import SENTIMENT_METRICS
    from app.metrics.sentiment_metric import CLASSIFICATION_METRICS

    # the choices are the reports' own columns
    assert REPORT_METRICS["sentiment"] == SENTIMENT_METRICS
    assert SENTIMENT_CLASSIFICATION_METRICS == CLASSIFICATION_METRICS
    npz = write_synthetic_mmsa(tmp_path / "syn.npz", splits={"train": 8, "valid": 4}, dims=(4, 3, 4))
    out = tmp_path / "ablation"
    bad = ablate("--bundle", "bundles/mosi_gmd", "--strategies", "plain,gmd", "--max_epochs", "1",
                 "--output_dir", str(out), "--data_path", str(npz), "--task", "classification", "--out_channels", "3",
                 "--label_key", "classification_labels", "--metrics", "Acc,MAE")
    assert bad.returncode == 1, bad.stderr[-2000:]
    assert bad.stderr.strip().splitlines() == [
        "error: --metrics Acc,MAE: the reports of these runs have no ['MAE']; choose among Acc,F1."]
    assert not out.exists()


def test_hd95_is_refused_for_a_sentiment_bundle_before_anything_trains(tmp_path):
    npz = write_synthetic_mmsa(tmp_path / "syn.npz", splits={"train": 8, "valid": 4}, dims=(4, 3, 4))
    out = tmp_path / "ablation"
    bad = ablate("--bundle", "bundles/mosi_gmd", "--strategies", "plain", "--max_epochs", "1",
                 "--output_dir", str(out), "--data_path", str(npz), "--hd95", "true")
    assert bad.returncode == 1 and "HD95 is a distance between segmentations" in bad.stderr, bad.stderr[-2000:]
    assert not out.exists()

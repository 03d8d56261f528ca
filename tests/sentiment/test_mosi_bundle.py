"""Integration: the mosi_gmd bundle's two documented commands on a tiny synthetic MMSA pickle, its
model selection (the lowest validation MAE), its errors (untrusted pickle, missing split) and its
metadata."""

from __future__ import annotations

import hashlib
import json

import jsonschema
import monai
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from app.data import convert_mmsa
from app.metrics.sentiment import sentiment_metrics
from tests.bundles.helpers import error_messages, run_setting_checks
from tests.sentiment.helpers import EVALUATE, MOSI_BUNDLE, REPO, TRAIN, run_mosi_bundle

NAMES = ["text", "audio", "vision", "text+audio", "text+vision", "audio+vision", "text+audio+vision"]
METRICS = {"Acc2", "Acc2_has0", "F1", "Acc7", "MAE", "Corr", "n"}


@pytest.fixture(scope="module")
def trained(synthetic_pkl, tmp_path_factory):
    out = tmp_path_factory.mktemp("mosi_train")
    # the exact training command of the issue
    run_mosi_bundle([TRAIN], "--data_path", str(synthetic_pkl), "--trust_pickle", "true", "--output_dir", str(out),
                    "--max_epochs", "1", "--strategy", "gmd")
    return out


def test_train_writes_best_and_final_models_and_validation_report(trained):
    assert (trained / "models" / "model.pt").is_file()
    assert (trained / "models" / "model_final.pt").is_file()
    report = json.loads((trained / "validation" / "subset_metrics.json").read_text())
    assert list(report["subsets"]) == NAMES
    assert all(row["n"] == 24 for row in report["subsets"].values())  # the valid split


def test_evaluate_test_split_writes_subset_metrics(trained, synthetic_pkl, tmp_path):
    # the exact evaluation command of the issue
    proc = run_mosi_bundle([TRAIN, EVALUATE], "--data_path", str(synthetic_pkl), "--trust_pickle", "true",
                           "--ckpt_path", str(trained / "models" / "model.pt"), "--eval_split", "test",
                           "--output_dir", str(tmp_path))
    report = json.loads((tmp_path / "subset_metrics.json").read_text())
    assert set(report) == {"subsets", "mean_over_subsets", "worst_subset", "subsets_without_cases", "checkpoint",
                           "per_case"}
    # every figure can be recomputed from the per-utterance predictions the report keeps
    for name in NAMES:
        rows = [r for r in report["per_case"] if r["subset"] == name]
        assert len({r["case"] for r in rows}) == len(rows) == 24
        recomputed = sentiment_metrics([r["pred"] for r in rows], [r["label"] for r in rows])
        assert report["subsets"][name] == pytest.approx(recomputed)
    ckpt = trained / "models" / "model.pt"  # the report names the model it scored
    assert report["checkpoint"] == {"path": str(ckpt), "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest()}
    assert f"of model.pt (sha256 {report['checkpoint']['sha256'][:12]})" in (tmp_path / "subset_metrics.md").read_text()
    assert list(report["subsets"]) == NAMES
    for row in report["subsets"].values():
        assert set(row) == METRICS and row["n"] == 24 and 0.0 <= row["Acc2"] <= 1.0 and row["MAE"] >= 0.0
    assert report["worst_subset"]["name"] in NAMES and set(report["mean_over_subsets"]) == METRICS - {"n"}
    for ext in ("csv", "md", "png"):
        assert (tmp_path / f"subset_metrics.{ext}").stat().st_size > 0
    assert "mean_over_subsets" in proc.stdout
    assert "this checkpoint" not in proc.stdout + proc.stderr  # the test split is held out: no warning


def test_evaluating_on_the_training_or_selection_split_is_flagged(trained, synthetic_pkl, tmp_path):
    """The run records its utterance ids (splits.json); scoring them again warns, and still scores."""
    record = json.loads((trained / "splits.json").read_text())
    assert (record["train_split"], record["val_split"]) == ("train", "valid") and len(record["val_ids"]) == 24
    for split, expected in (("valid", "24 of the 24 utterances of split 'valid' selected this checkpoint"),
                            ("train", "of split 'train' trained this checkpoint")):
        proc = run_mosi_bundle([TRAIN, EVALUATE], "--data_path", str(synthetic_pkl), "--trust_pickle", "true",
                               "--ckpt_path", str(trained / "models" / "model.pt"), "--eval_split", split,
                               "--output_dir", str(tmp_path / split))
        assert expected in proc.stdout + proc.stderr, proc.stdout[-3000:]
        assert (tmp_path / split / "subset_metrics.json").is_file()


def test_classification_with_the_documented_settings_trains_and_evaluates(synthetic_pkl, tmp_path):
    # docs/sentiment.md: task, label_key and out_channels are all it takes (the key metric follows the task)
    settings = ["--data_path", str(synthetic_pkl), "--trust_pickle", "true", "--task", "classification",
                "--label_key", "classification_labels", "--out_channels", "3"]
    run_mosi_bundle([TRAIN], *settings, "--output_dir", str(tmp_path / "train"), "--max_epochs", "1")
    run_mosi_bundle([TRAIN, EVALUATE], *settings, "--ckpt_path", str(tmp_path / "train" / "models" / "model.pt"),
                    "--eval_split", "test", "--output_dir", str(tmp_path / "eval"))
    report = json.loads((tmp_path / "eval" / "subset_metrics.json").read_text())
    assert list(report["subsets"]) == NAMES
    assert all(set(row) == {"Acc", "F1", "n"} and 0.0 <= row["Acc"] <= 1.0 for row in report["subsets"].values())
    assert all(row["n"] == 24 for row in report["subsets"].values())  # every utterance of the test split
    # Acc is a whole number of utterances out of 24, and the mean is over the 7 subsets
    assert all(abs(row["Acc"] * 24 - round(row["Acc"] * 24)) < 1e-6 for row in report["subsets"].values())
    mean = sum(row["Acc"] for row in report["subsets"].values()) / 7
    assert report["mean_over_subsets"]["Acc"] == pytest.approx(mean)


def test_a_second_evaluation_into_the_same_output_dir_stops_before_scoring(trained, synthetic_pkl, tmp_path):
    """Two evaluations started into one folder (a job started twice) both wrote subset_metrics.*: the second
    now stops with one line while the first holds the folder, and leaves the first's files as they were."""
    import fcntl
    import os
    import sys

    if sys.platform == "win32":
        pytest.skip("folder locks (flock) are POSIX")
    out = tmp_path / "eval"
    out.mkdir()
    (out / "subset_metrics.json").write_text("{}\n")  # the first evaluation's report
    fd = os.open(out, os.O_RDONLY)  # what the running evaluation holds
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = run_mosi_bundle([TRAIN, EVALUATE], "--data_path", str(synthetic_pkl), "--trust_pickle", "true",
                               "--ckpt_path", str(trained / "models" / "model.pt"), "--output_dir", str(out),
                               check=False)
    finally:
        os.close(fd)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --output_dir {out} is in use by another run that is still writing into it (a job started twice?): "
        "wait for it to end, or pass another --output_dir.")
    assert [p.name for p in out.iterdir()] == ["subset_metrics.json"]
    assert (out / "subset_metrics.json").read_text() == "{}\n"


@pytest.mark.usefixtures("process_state_restored")  # the bundle's setup of its process, run in this one
def test_evaluate_missing_split_names_the_available_ones(trained, trainval_pkl, tmp_path):
    # the same config evaluation as the command line, in-process (a subprocess costs seconds of imports)
    parser = _parser(TRAIN, EVALUATE, data_path=str(trainval_pkl), trust_pickle="true", eval_split="test",
                     ckpt_path=str(trained / "models" / "model.pt"), output_dir=str(tmp_path))
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("initialize")
    assert any("Split 'test' is not in" in text and "available splits are ['train', 'valid']" in text
               for text in error_messages(err.value))
    assert not (tmp_path / "subset_metrics.json").exists()


@pytest.mark.parametrize("configs, setting, value, message", [
    pytest.param(configs, setting, value, message, id=f"{configs[-1].rsplit('/', 1)[-1]}-{setting}={value}")
    for configs in ([TRAIN], [TRAIN, str(MOSI_BUNDLE / "configs" / "multi_gpu_train.yaml")], [TRAIN, EVALUATE])
    for setting, value, message in [
        ("num_workers", -1, "--num_workers -1 must be a whole number >= 0, e.g. --num_workers 1."),   # a traceback
        # trained with no time limit at all; a word stopped in a traceback after the output folder was made
        ("time_limit_minutes", -5, "--time_limit_minutes -5 must be a number >= 0, e.g. --time_limit_minutes 0.01."),
        ("time_limit_minutes", "abc",
         "--time_limit_minutes 'abc' must be a number >= 0, e.g. --time_limit_minutes 0.01."),
    ] if not (configs[-1] == EVALUATE and setting == "time_limit_minutes")   # evaluation has no time limit
])
def test_a_worker_count_or_time_budget_out_of_range_is_refused_before_any_output(configs, setting, value, message):
    assert run_setting_checks(configs, setting) > 0  # the defaults pass
    with pytest.raises(Exception) as err:
        run_setting_checks(configs, setting, **{setting: value})
    assert message in error_messages(err.value), error_messages(err.value)


def test_evaluate_refuses_a_misspelt_setting(trained, synthetic_pkl, tmp_path):
    """evaluate.yaml replaces train.yaml's initialize: without its own check, --missng skip scored a predict
    checkpoint with --missing predict, silently."""
    proc = run_mosi_bundle([TRAIN, EVALUATE], "--data_path", str(synthetic_pkl), "--trust_pickle", "true",
                           "--ckpt_path", str(trained / "models" / "model.pt"), "--output_dir", str(tmp_path),
                           "--missng", "skip", check=False)
    assert proc.returncode != 0
    assert "error: --missng is not a setting of" in proc.stderr and "--missing" in proc.stderr
    assert not (tmp_path / "subset_metrics.json").exists()


def _parser(*files: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(list(files))
    parser.update({"bundle_root": str(MOSI_BUNDLE), **overrides})
    return parser


def test_untrusted_pickle_is_refused_and_npz_needs_no_trust(synthetic_pkl, tmp_path):
    parser = _parser(TRAIN, data_path=str(synthetic_pkl), output_dir=str(tmp_path))
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("train#dataset")
    assert any("unpickling runs" in text and "convert-mmsa" in text for text in error_messages(err.value))

    npz = convert_mmsa(synthetic_pkl, tmp_path / "synthetic.npz")
    parser = _parser(TRAIN, data_path=str(npz), output_dir=str(tmp_path))
    assert len(parser.get_parsed_content("train#dataset")) == 48
    assert parser.get_parsed_content("network_def").in_features == (100, 73, 100)


def test_validation_batch_size_is_a_setting(synthetic_pkl, tmp_path):
    """Validation and evaluation batches held 256 utterances whatever the sequence length: about 7 GB
    for MOSEI-style 500-step sequences, with no documented setting to lower it."""
    for files in ([TRAIN], [TRAIN, EVALUATE]):
        parser = _parser(*files, data_path=str(synthetic_pkl), trust_pickle=True, output_dir=str(tmp_path),
                         val_batch_size=8)
        assert parser.get_parsed_content("validate#dataloader").batch_size == 8
    assert _parser(TRAIN, data_path=str(synthetic_pkl), trust_pickle=True).get_parsed_content(
        "validate#dataloader").batch_size == 256
    proc = run_mosi_bundle([TRAIN], "--data_path", str(synthetic_pkl), "--trust_pickle", "true", "--output_dir",
                           str(tmp_path / "bad"), "--val_batch_size", "0", check=False)
    assert proc.returncode != 0 and "--val_batch_size 0 must be a whole number >= 1" in proc.stderr
    assert not (tmp_path / "bad" / "splits.json").exists()


def test_an_unknown_strategy_or_strategy_option_writes_nothing(synthetic_pkl, tmp_path):
    """The strategy was built only when training started, after splits.json was written, and a misspelt
    strategy option (strategy_def#subset) was left out silently."""
    for bad, line in ((["--strategy", "nosuch"], "Unknown strategy 'nosuch'"),
                      (["--strategy_def#subset", "3"], "'subset' (strategy_def#subset in the bundle config) is an "
                                                        "option of no strategy: did you mean 'subsets'?")):
        out = tmp_path / bad[0].strip("-").replace("#", "_")
        proc = run_mosi_bundle([TRAIN], "--data_path", str(synthetic_pkl), "--trust_pickle", "true", "--output_dir",
                               str(out), "--max_epochs", "1", *bad, check=False)
        assert proc.returncode == 1 and line in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and not out.exists()


def test_a_key_metric_the_task_lacks_writes_nothing(synthetic_pkl, tmp_path):
    """The selection metric was built with the evaluator, when training started: --key_metric MAE for a
    classification run stopped with its one-line error after splits.json was written."""
    out = tmp_path / "run"
    proc = run_mosi_bundle([TRAIN], "--data_path", str(synthetic_pkl), "--trust_pickle", "true", "--output_dir",
                           str(out), "--max_epochs", "1", "--task", "classification", "--out_channels", "3",
                           "--label_key", "classification_labels", "--key_metric", "MAE", check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "key 'MAE' is not a classification metric: choose one of ['Acc', 'F1'], or auto." in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_a_negative_weight_decay_writes_nothing(synthetic_pkl, tmp_path):
    """AdamW refused --weight_decay -1 only when the trainer was built: a traceback, with splits.json left in
    the output folder."""
    out = tmp_path / "run"
    proc = run_mosi_bundle([TRAIN], "--data_path", str(synthetic_pkl), "--trust_pickle", "true", "--output_dir",
                           str(out), "--max_epochs", "1", "--weight_decay", "-1", check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: --weight_decay -1 must be a number >= 0, e.g. --weight_decay 0.01." in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.parametrize("configs", ["train", "evaluate"])
def test_a_seed_that_is_no_whole_number_writes_nothing(configs):
    """--seed abc reached set_determinism, which stopped training and evaluation with a traceback. Checked in this
    process, among the steps a run takes before it reads the data (a whole run's one-line refusal:
    test_a_negative_weight_decay_writes_nothing)."""
    files = [TRAIN] if configs == "train" else [TRAIN, EVALUATE]
    assert run_setting_checks(files, "seed") > 0  # the default passes
    with pytest.raises(Exception) as err:
        run_setting_checks(files, "seed", seed="abc")
    assert "--seed 'abc' must be a whole number >= 0, e.g. --seed 1." in error_messages(err.value)


def test_a_bad_validation_split_is_refused_before_anything_is_written(tmp_path):
    """The validation split was read only at the first validation: a --val_split the file lacks left an
    empty output folder, and one with a NaN label a splits.json, behind its one-line error."""
    import numpy as np

    from app.data import make_synthetic_mmsa, save_mmsa_npz

    data = make_synthetic_mmsa({"train": 8, "valid": 4, "bad": 4}, dims=(4, 3, 4))
    data["bad"]["regression_labels"][1] = np.nan
    npz = save_mmsa_npz(data, tmp_path / "data.npz")
    for split, line in (("nosuch", "Split 'nosuch' is not in"), ("bad", "bad/regression_labels has 1 missing")):
        out = tmp_path / f"run_{split}"
        proc = run_mosi_bundle([TRAIN], "--data_path", str(npz), "--output_dir", str(out), "--max_epochs", "1",
                               "--val_split", split, check=False)
        assert proc.returncode == 1 and line in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and not out.exists()


def test_metadata_matches_the_schema():
    schema = json.loads((REPO / "bundles" / "meta_schema.json").read_text())
    metadata = json.loads((MOSI_BUNDLE / "configs" / "metadata.json").read_text())
    jsonschema.validate(metadata, schema)
    assert (MOSI_BUNDLE / "LICENSE").is_file() and (MOSI_BUNDLE / "docs" / "README.md").is_file()


@pytest.mark.parametrize("shape, valid", [(["*"], True), (["32*n", "16*n+16", "2**p"], True), ([96], True),
                                          (["L_t"], False), (["any"], False), ([0], False)])
def test_the_shipped_schema_holds_shapes_to_monais_grammar(shape, valid):
    """verify_metadata accepted "L_t" as a spatial shape, which MONAI's bundle tools then refuse."""
    schema = json.loads((REPO / "bundles" / "meta_schema.json").read_text())
    metadata = json.loads((MOSI_BUNDLE / "configs" / "metadata.json").read_text())
    metadata["network_data_format"]["inputs"]["text"]["spatial_shape"] = shape
    if valid:
        jsonschema.validate(metadata, schema)
    else:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(metadata, schema)


def test_metadata_input_shapes_are_in_the_bundle_grammar_and_feed_the_network():
    """The feature sequences' lengths were declared as "L_t", "L_a", "L_v", which MONAI's shape grammar (n, p, *)
    refuses: a tool deriving inputs from the metadata stopped with "Only variables `p` and `n`"."""
    from monai.bundle.scripts import _get_fake_spatial_shape

    from app.networks import DSTransformer

    fmt = json.loads((MOSI_BUNDLE / "configs" / "metadata.json").read_text())["network_data_format"]
    modalities = ("text", "audio", "vision")
    torch.manual_seed(0)
    net = DSTransformer(in_features=[fmt["inputs"][m]["num_channels"] for m in modalities]).eval()
    for length in (1, 3):
        inputs = {m: torch.randn(2, *_get_fake_spatial_shape(fmt["inputs"][m]["spatial_shape"], any=length),
                                 fmt["inputs"][m]["num_channels"]) for m in modalities}
        assert all(x.shape[1] == length for x in inputs.values())
        with torch.no_grad():
            out = net(inputs)
        assert tuple(out.shape) == (2, fmt["outputs"]["pred"]["num_channels"])


def test_metadata_declares_no_bound_the_network_output_does_not_keep():
    """The prediction's value_range was declared [-3, 3], the labels' scale; the head is linear and nothing
    clips its output, so a consumer trusting the metadata met scores beyond it."""
    from app.networks import DSTransformer

    metadata = json.loads((MOSI_BUNDLE / "configs" / "metadata.json").read_text())
    pred = metadata["network_data_format"]["outputs"]["pred"]
    fmt = metadata["network_data_format"]["inputs"]
    torch.manual_seed(0)
    net = DSTransformer(in_features=[fmt[m]["num_channels"] for m in ("text", "audio", "vision")]).eval()
    with torch.no_grad():
        net.trunk.head.bias.fill_(4.0)  # a score the linear head can give, as a trained one may
        out = net({m: torch.randn(2, 1, fmt[m]["num_channels"]) for m in ("text", "audio", "vision")})
    assert out.shape == (2, pred["num_channels"]) and float(out.max()) > 3
    if pred["value_range"]:
        low, high = pred["value_range"]
        assert low <= float(out.min()) and float(out.max()) <= high, pred["value_range"]


def test_train_cggm_writes_models_and_its_diagnostics(synthetic_pkl, tmp_path):
    # 48 training samples in batches of 24: two iterations
    run_mosi_bundle([TRAIN], "--data_path", str(synthetic_pkl), "--trust_pickle", "true", "--output_dir", str(tmp_path),
                    "--max_epochs", "1", "--batch_size", "24", "--strategy", "cggm", "--diagnostics_interval", "1")
    assert (tmp_path / "models" / "model.pt").is_file() and (tmp_path / "models" / "model_final.pt").is_file()
    rows = [json.loads(line) for line in (tmp_path / "cggm_diagnostics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2] and rows[0]["modalities"] == ["text", "audio", "vision"]
    assert all(e <= 0.0 for e in rows[0]["eps"])  # minus MAE
    assert all(-1.0 <= c <= 1.0 for r in rows for c in r["cos"] if c is not None)
    assert not (tmp_path / "gmd_diagnostics.jsonl").exists()


@pytest.mark.usefixtures("process_state_restored")  # the bundle's setup of its process, run in this one
def test_model_pt_is_the_epoch_with_the_lowest_validation_mae_not_the_last(synthetic_pkl, tmp_path):
    """The bundle's selection as configured (key metric MAE, lower is better): three epochs whose
    validation sees constant predictions 6, 0 and 3, so the middle one has the lowest MAE."""
    constants, maes = [6.0, 0.0, 3.0], []
    parser = _parser(TRAIN, data_path=str(synthetic_pkl), trust_pickle="true", output_dir=str(tmp_path),
                     max_epochs=len(constants), batch_size=24, strategy="plain", diagnostics_interval=0)
    parser.get_parsed_content("initialize")
    network, evaluator = parser.get_parsed_content("network"), parser.get_parsed_content("validate#evaluator")
    metric = parser.get_parsed_content("validate#key_metric#val_score")
    assert metric.key == "MAE"  # key_metric auto: MAE for the regression task

    @evaluator.on(Events.STARTED)
    def _constant_prediction(engine):
        head = network.trunk.head  # every modality and so every fusion predicts the bias
        with torch.no_grad():
            head.weight.zero_()
            head.bias[0] = constants[len(maes)]

    @evaluator.on(Events.COMPLETED)
    def _record(engine):
        maes.append(metric.last_result["mean_over_subsets"]["MAE"])

    try:
        parser.get_parsed_content("run")
    finally:
        parser.get_parsed_content("summary_writer").close()
    assert len(maes) == 3 and maes[1] < maes[2] < maes[0]  # best in the middle, worst first
    best = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert best["trunk.head.bias"][0].item() == 0.0 and not best["trunk.head.weight"].any()
    assert evaluator.state.best_metric_epoch == 2 and evaluator.state.best_metric == pytest.approx(-maes[1])


def test_training_logs_its_data_progress_validation_and_end_and_puts_them_on_tensorboard(synthetic_pkl, tmp_path):
    """A sentiment run logged a loss per iteration and val_score alone: no data or settings line, no learning rate,
    pace or time left, no per-metric means or worst subset, and no line saying why it ended; TensorBoard had the
    loss and val_score only."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    proc = run_mosi_bundle([TRAIN], "--data_path", str(synthetic_pkl), "--trust_pickle", "true", "--output_dir",
                           str(out), "--max_epochs", "2", "--strategy", "plain", "--time_limit_minutes", "30")
    log = proc.stdout + proc.stderr
    assert "Data: 48 training and 24 validation utterance(s); every utterance has all 3 modalities." in log
    assert "Run: strategy plain, task regression, loss L1Loss, key_metric MAE, seed 0, batch_size 32" in log
    assert "Epoch 2/2 done (iteration 4 of 4): train_loss mean " in log and "learning rate 0.0005" in log
    assert "Validation after epoch 2: mean MAE over 7 subsets " in log and "; worst subset " in log
    assert "Training finished: all 2 epoch(s) trained (4 iterations), in " in log and "; best val_score " in log
    events = EventAccumulator(str(next((out / "tensorboard").iterdir())))
    events.Reload()
    assert {"val_MAE", "val_Acc2", "val_Corr", "val_worst_subset_Acc2", "learning_rate", "train_loss_epoch",
            "seconds_per_iteration"} <= set(events.Tags()["scalars"])


def test_evaluating_a_checkpoint_with_another_task_is_one_line_naming_the_file_and_its_settings(trained, synthetic_pkl,
                                                                                               tmp_path):
    """A regression model.pt evaluated as a 2-class model with mean fusion loaded without an error (its head has 2
    rows either way: the score and its confidence logit) and scored the score as class logits."""
    ckpt = trained / "models" / "model.pt"
    proc = run_mosi_bundle([TRAIN, EVALUATE], "--data_path", str(synthetic_pkl), "--trust_pickle", "true",
                           "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "eval"), "--task", "classification",
                           "--label_key", "classification_labels", "--out_channels", "3", "--fusion", "mean",
                           check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (f"error: Checkpoint {ckpt} was trained for regression (confidence fusion), but classification into 3 "
            "classes (mean fusion) is configured: pass the settings it was trained with (--task regression "
            "--label_key regression_labels --out_channels 1 --fusion confidence)") in proc.stderr
    assert not (tmp_path / "eval").exists()


def test_sigterm_writes_the_resumable_checkpoint_ends_by_the_signal_and_the_run_resumes(synthetic_pkl, tmp_path):
    """A scheduler's SIGTERM killed a sentiment training at once: no line in its log said why it ended, the epochs
    since the last better model.pt were lost and nothing could be resumed (only the multi-process override had the
    checkpoint)."""
    import signal
    import subprocess
    import sys

    from tests.bundles.helpers import repo_env

    out = tmp_path / "run"
    args = ["run", "--config_file", TRAIN, "--bundle_root", "bundles/mosi_gmd", "--data_path", str(synthetic_pkl),
            "--trust_pickle", "true", "--output_dir", str(out), "--max_epochs", "3", "--strategy", "plain"]
    driver = str(REPO / "tests" / "reliability" / "signal_driver.py")
    proc = subprocess.run([sys.executable, driver, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**repo_env(), "SIGTERM_AT_ITERATION": "3"})  # 2 iterations per epoch: epoch 2
    log = proc.stdout + proc.stderr
    assert proc.returncode == -signal.SIGTERM and "Traceback" not in log, log[-4000:]
    assert ("Training stopped by SIGTERM at epoch 2, iteration 3, after writing the resumable checkpoint: exit status "
            "143; run the same command with --resume true to continue.") in log
    assert torch.load(out / "models" / "checkpoint_last.pt", weights_only=True)["iteration"] == 3
    assert not (out / "models" / "model_final.pt").exists()  # the run did not finish
    resumed = run_mosi_bundle([TRAIN], *args[5:], "--resume", "true")
    assert (f"Resumed from {out / 'models' / 'checkpoint_last.pt'} at iteration 3 (epoch 2, 1 of its 2 iterations "
            "done), with ") in resumed.stdout + resumed.stderr
    assert "Training finished: all 3 epoch(s) trained (6 iterations)" in resumed.stdout + resumed.stderr
    assert (out / "models" / "model_final.pt").is_file()



@pytest.mark.parametrize("multi_gpu", [False, True], ids=["train", "multi_gpu_train"])
def test_training_starts_from_the_same_global_generator_whatever_the_number_of_workers(
        multi_gpu, synthetic_pkl, tmp_path, monkeypatch, process_state_restored):
    """MONAI's DataLoader rewinds torch's global generator to the seed when built without workers, not with
    them: the dropout masks and the shuffle, drawn from it, differed, and the same --seed trained other weights
    with --num_workers 1 than with 0."""
    files, extra = [TRAIN], {}
    if multi_gpu:  # one rank, resolved without a process group (its initialize joins torchrun's)
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "1")
        files.append(str(MOSI_BUNDLE / "configs" / "multi_gpu_train.yaml"))
        extra = {"dist_backend": "gloo", "train#sampler#num_replicas": 1, "train#sampler#rank": 0,
                 "validate#sampler#num_replicas": 1, "validate#sampler#rank": 0}
    states = []
    for workers in (0, 1):
        parser = _parser(*files, data_path=str(synthetic_pkl), trust_pickle=True, output_dir=str(tmp_path / str(workers)),
                         num_workers=workers, strategy="dropout", **extra)
        if multi_gpu:
            monai.utils.set_determinism(seed=0)
        else:
            parser.get_parsed_content("initialize")
        # the generator's state where training would start (no batch is drawn, so no worker process starts)
        parser.get_parsed_content("train#trainer").run = lambda: states.append(torch.get_rng_state())
        parser.get_parsed_content("run")
        writer = parser.get_parsed_content("summary_writer")
        if writer is not None:
            writer.close()
    assert len(states) == 2 and torch.equal(states[0], states[1])

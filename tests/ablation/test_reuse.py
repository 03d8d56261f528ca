"""Reusing, resuming or redoing a finished or interrupted stage: one finished plain stage, copied per test, and the
records that decide."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.ablation import _reusable, _stage_settings
from tests.ablation.helpers import ablate, finished_plain_stage, copy_of
from tests.bundles.helpers import REPO, TINY


@pytest.fixture(scope="module")
def plain_stage(tmp_path_factory):
    """One finished plain stage for the tests that only alter its output folder (each works on a copy)."""
    return finished_plain_stage(tmp_path_factory.mktemp("plain_stage"))


def test_a_resumed_ablation_whose_loss_changed_is_refused_instead_of_mixing_objectives(plain_stage, tmp_path):
    """A stage finished before the bundle's loss changed (brats_gmd 0.6.0 replaced MONAI's softmax cross-entropy) was
    reused beside stages trained with the new loss, in one table, silently: its settings record the command, which
    had not changed, not train.yaml. It was then refused only after the next stage had trained (hours at real
    budgets); now before, whichever of the two comes first."""
    from app.ablation import _planned_loss

    out, args = copy_of(plain_stage, tmp_path)
    path = out / "plain" / "train" / "models" / "checkpoint_last.pt"
    state = torch.load(path, weights_only=True)
    assert state["loss_config"]["_target_"] == "app.losses.DiceCELoss"
    # the loss a stage would train with, built up front, is the one a trained stage records: no false refusal
    assert _planned_loss([REPO / "bundles" / "brats_gmd" / "configs" / "train.yaml"], TINY) == state["loss_config"]
    state["loss_config"]["_target_"] = "monai.losses.dice.DiceCELoss"  # as trained by the bundle before 0.6.0
    torch.save(state, path)
    for strategies in ("plain,dropout", "dropout,plain"):  # the finished stage before or after the one to train
        again = ablate("--strategies", strategies, *args)
        assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr[-3000:]
        line = again.stderr.strip().splitlines()[-1]
        assert ("Strategy 'dropout' would be trained with another loss than 'plain' (_target_ "
                "'monai.losses.dice.DiceCELoss' in 'plain', 'app.losses.DiceCELoss' in 'dropout')") in line, line
        assert f"Delete {out / 'plain'}" in line and "--output_dir" in line
        assert "Training dropout" not in again.stdout and not (out / "dropout" / "train").exists()
    # a stage trained by a version that recorded no loss cannot be told apart: refused too, naming it, and before
    # another stage trains
    del state["loss_config"]
    torch.save(state, path)
    older = ablate("--strategies", "plain,dropout", *args)
    assert older.returncode == 1 and f"{out / 'plain'} was trained by an earlier version, which recorded no loss" in \
        older.stderr, older.stderr[-3000:]
    assert not (out / "dropout" / "train" / "models").exists()  # refused before the new stage trained


def test_a_stage_finished_by_a_version_without_the_finish_mark_is_reused_not_trained_again(plain_stage, tmp_path):
    """Ablations of brats_gmd before 0.5.0 recorded a stage's settings but wrote no train_seconds.json (its time was
    in ablation.json only): rerunning the command to tabulate them again trained every stage again, replacing the
    models and reports."""
    out, args = copy_of(plain_stage, tmp_path)
    seconds = json.loads((out / "plain" / "train_seconds.json").read_text())
    (out / "plain" / "train_seconds.json").unlink()  # as that version left the stage
    model = out / "plain" / "train" / "models" / "model_final.pt"
    before = (model.read_bytes(), model.stat().st_mtime_ns)
    again = ablate("--strategies", "plain", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "was trained by an earlier version, which did not mark finished stages" in again.stdout
    assert "Reusing the finished training of plain" in again.stdout and "Training plain" not in again.stdout
    assert (model.read_bytes(), model.stat().st_mtime_ns) == before
    assert json.loads((out / "ablation.json").read_text())["runs"]["plain"]["train_seconds"] == seconds
    # such a stage whose log shows no end (stopped by Ctrl-C or a scheduler before ablation.json was written) is
    # resumed from its checkpoint_last.pt under the same settings, with a note: it was trained again from its first
    # iteration, and the log of the stopped run was overwritten
    (out / "plain" / "train_seconds.json").unlink()
    (out / "ablation.json").unlink()
    log = out / "plain" / "train.log"
    assert "Train completed, saved final checkpoint" in log.read_text()
    stopped = "".join(line for line in log.read_text().splitlines(True) if "Train completed" not in line)
    log.write_text(stopped)
    resumed = ablate("--strategies", "plain", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming the interrupted training of plain" in resumed.stdout and "Training plain" not in resumed.stdout
    text = log.read_text()
    assert text.startswith(stopped) and "--resume true" in text and "Resumed from" in text  # the log goes on
    assert "Starting a new run" not in text
    assert json.loads((out / "plain" / "train_seconds.json").read_text()) > 0


def test_a_report_scored_by_a_version_before_the_evaluator_fix_is_scored_again(plain_stage, tmp_path):
    """Ablations of brats_gmd before 0.3.0 recorded no settings, and their evaluator decoded only the first sliding
    window of each batch: rerunning the command reused those reports, with a note, beside the models they mis-scored."""
    out, args = copy_of(plain_stage, tmp_path)
    report = out / "plain" / "eval" / "subset_dice.json"
    scored = json.loads(report.read_text())
    (out / "plain" / "eval_settings.json").unlink()  # as that version left the stage
    old = {**scored, "mean_over_subsets": {**scored["mean_over_subsets"], "mean": 0.5}}
    report.write_text(json.dumps(old))
    again = ablate("--strategies", "plain", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"note: {report} was scored by an earlier version, whose evaluator gave other values" in again.stdout
    assert "Training plain" not in again.stdout  # the model is kept
    assert json.loads(report.read_text())["mean_over_subsets"] == scored["mean_over_subsets"]
    table = json.loads((out / "ablation.json").read_text())
    assert table["tables"]["mean"]["plain"]["mean"] == scored["mean_over_subsets"]["mean"]


def test_hd95_goes_to_the_evaluations_only_and_adds_its_tables(plain_stage, tmp_path):
    """``--hd95 true`` went to the training commands too, which refuse it (a setting of evaluate.yaml only), so an
    ablation could not report HD95; an ablation already trained is scored again with it, not trained again."""
    out, args = copy_of(plain_stage, tmp_path)  # an ablation of plain, trained and scored without --hd95
    args = ["--strategies", "plain", *args]
    before = json.loads((out / "ablation.json").read_text())
    assert before["metrics"] == ["mean", "WT", "TC", "ET"] and before["settings"]["hd95"] is False
    trained = {p: p.stat().st_mtime_ns for p in (out / "plain" / "train").rglob("*") if p.is_file()}
    # the HD95 tables without --hd95 would be found missing after training: refused first
    bad = ablate(*args, "--metrics", "mean,HD95_WT")
    assert bad.returncode == 1 and "the HD95 columns need --hd95 true" in bad.stderr, bad.stderr[-2000:]
    proc = ablate(*args, "--hd95", "true", "--hd95_workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (out / "plain" / "train").rglob("*") if p.is_file()} == trained
    table = json.loads((out / "ablation.json").read_text())
    assert table["metrics"] == ["mean", "WT", "TC", "ET", "HD95_WT", "HD95_TC", "HD95_ET"]
    assert table["settings"]["hd95"] is True and "--hd95" not in table["settings"]["bundle_args"]
    assert table["tables"]["mean"] == before["tables"]["mean"]  # the same model, the same Dice
    report = json.loads((out / "plain" / "eval" / "subset_dice.json").read_text())
    hd = table["tables"]["HD95_ET"]["plain"]
    assert hd["subsets"] == {name: row["HD95_ET"] for name, row in report["subsets"].items()}
    assert hd["worst"]["value"] == max(hd["subsets"].values())  # a distance: the worst subset is the largest
    assert "## HD95_WT (mm, lower is better)" in (out / "ablation.md").read_text()
    assert "--hd95" not in (out / "plain" / "train.log").read_text().splitlines()[0]
    assert "--hd95 true" in (out / "plain" / "eval.log").read_text().splitlines()[0]
    assert "--hd95_workers 2" in (out / "plain" / "eval.log").read_text().splitlines()[0]
    # the threads change no value: another count keeps the finished evaluation instead of refusing or redoing it
    scored = (out / "plain" / "eval" / "subset_dice.json").stat().st_mtime_ns
    again = ablate(*args, "--hd95", "true", "--hd95_workers", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "plain" / "eval" / "subset_dice.json").stat().st_mtime_ns == scored
    bad = ablate(*args, "--hd95", "true", "--hd95_workers", "0")
    assert bad.returncode == 1 and "--hd95_workers 0 must be a whole number >= 1" in bad.stderr, bad.stderr[-2000:]


def test_an_interrupted_stage_resumes_only_under_its_own_settings(tmp_path, monkeypatch, capsys):
    """The decision to resume a stopped stage, and the fix a refused resume names (no training: the bundle run is
    replaced by one that fails as a refused resume does)."""
    import app.ablation as ablation

    out, bundle = tmp_path / "out", REPO / "bundles" / "brats_gmd"
    run_dir, stamp, done = out / "plain" / "train", out / "plain" / "train_settings.json", out / "plain" / "train_seconds.json"
    settings = _stage_settings(bundle, ["--seed", "0"], out)
    stamp.parent.mkdir(parents=True)
    stamp.write_text(json.dumps(settings))
    assert ablation._interrupted_training(run_dir, stamp, settings, done) is None  # no checkpoint: trains
    (run_dir / "models").mkdir(parents=True)
    torch.save({"iteration": 3, "time_limit": {"elapsed_seconds": 12.5, "expired": False}},
               run_dir / "models" / "checkpoint_last.pt")
    assert ablation._interrupted_training(run_dir, stamp, settings, done) == 12.5  # resumed, its time counted
    other = _stage_settings(bundle, ["--seed", "1"], out)
    assert ablation._interrupted_training(run_dir, stamp, other, done) is None  # another seed: from the start
    assert "interrupted under other settings than this command's (--seed 0): it trains again from the start" in \
        capsys.readouterr().out
    assert ablation._interrupted_training(run_dir, stamp, _stage_settings(bundle, ["--seed", "0", "--resume", "true"],
                                                                          out), done) is None  # the user's own resume
    done.write_text("12.5")
    assert ablation._interrupted_training(run_dir, stamp, settings, done) is None  # finished: reused, not resumed

    def refused(cmd, log, append=False):
        with open(log, "a" if append else "w") as f:
            f.write("error: Cannot resume: the checkpoint was written with --max_epochs 2, not 1.\n")
        return 1

    monkeypatch.setattr(ablation, "_run_logged", refused)
    log = out / "plain" / "train.log"
    log.write_text("the stopped run's log\n")
    with pytest.raises(RuntimeError) as err:
        ablation._run_bundle([bundle / "configs" / "train.yaml"], bundle, ["--resume", "true"], log, append=True,
                             fix=f"To train plain again from the start instead, delete {out / 'plain'}.")
    assert str(err.value).endswith(f"error: Cannot resume: the checkpoint was written with --max_epochs 2, not 1. "
                                   f"(its output is in {log}). To train plain again from the start instead, delete "
                                   f"{out / 'plain'}.")
    assert log.read_text().startswith("the stopped run's log\n")


def test_finished_stages_are_reused_only_with_their_own_settings(tmp_path, capsys):
    out, bundle = tmp_path / "out", REPO / "bundles" / "brats_gmd"
    result, stamp = out / "plain" / "train" / "models" / "model_final.pt", out / "plain" / "train_settings.json"
    settings = _stage_settings(bundle, ["--seed", "0", "--output_dir", str(out / "plain" / "train")], out)
    assert settings["args"] == ["--seed", "0"]  # where the run went does not decide its result
    assert not _reusable(result, stamp, settings) and json.loads(stamp.read_text()) == settings
    result.parent.mkdir(parents=True)
    result.write_bytes(b"weights")
    assert _reusable(result, stamp, settings)
    with pytest.raises(ValueError, match="other settings.*--seed 0.*new output folder \\(--output_dir; bench/mosi_compare.py: --out_dir\\)"):
        _reusable(result, stamp, _stage_settings(bundle, ["--seed", "1"], out))
    # paths inside the output folder are recorded relative to it, so a moved folder still resumes
    moved = _stage_settings(bundle, ["--ckpt_path", str(result)], out)
    assert moved["args"] == ["--ckpt_path", "<output_dir>/plain/train/models/model_final.pt"]
    # one folder however it is spelt, existing or not yet
    (tmp_path / "data").mkdir()
    spellings = [["--dataset_dir", str(tmp_path / "data")], [f"--dataset_dir={tmp_path}/./data"],
                 ["--dataset_dir", f"{tmp_path}/out/../data/"]]
    assert len({json.dumps(_stage_settings(bundle, s, out)) for s in spellings}) == 1
    later = _stage_settings(bundle, ["--cache_dir", str(out / "cache")], out)
    assert later["args"] == ["--cache_dir", "<output_dir>/cache"]
    stamp.unlink()  # a stage finished by an earlier version, with no record: reused, with a note, and recorded
    assert _reusable(result, stamp, settings) and "no record of its settings" in capsys.readouterr().out
    assert json.loads(stamp.read_text()) == settings


def test_an_interrupted_training_stage_is_trained_again_not_reused(tmp_path):
    # training writes model.pt at its first validation (and model_final.pt when it raises): a stage
    # killed after that leaves the checkpoint of a partial run under its recorded settings
    out, bundle = tmp_path / "out", REPO / "bundles" / "brats_gmd"
    result, stamp = out / "plain" / "train" / "models" / "model.pt", out / "plain" / "train_settings.json"
    done = out / "plain" / "train_seconds.json"
    settings = _stage_settings(bundle, ["--seed", "0"], out)
    assert not _reusable(result, stamp, settings, done)
    result.parent.mkdir(parents=True)
    result.write_bytes(b"weights of epoch 1 of 6")
    assert not _reusable(result, stamp, settings, done)  # killed: trained again
    assert not _reusable(result, stamp, _stage_settings(bundle, ["--seed", "1"], out), done)  # not "other settings"
    assert not _reusable(result, stamp, settings, done)
    done.write_text("12.5")
    assert _reusable(result, stamp, settings, done)


def test_a_record_cut_short_by_a_kill_runs_its_stage_again(tmp_path, capsys):
    """The settings record and the end marker of a stage used to be written in place: a kill during the
    write left them empty or cut short, and every resume then stopped at 'Expecting value: line 1 column 1'."""
    out, bundle = tmp_path / "out", REPO / "bundles" / "brats_gmd"
    result, stamp = out / "plain" / "train" / "models" / "model.pt", out / "plain" / "train_settings.json"
    done = out / "plain" / "train_seconds.json"
    settings = _stage_settings(bundle, ["--seed", "0"], out)
    result.parent.mkdir(parents=True)
    result.write_bytes(b"weights")
    stamp.write_text('{\n "args": [\n  "--se')  # killed while the stage's settings were written
    done.write_text("12.5")
    assert not _reusable(result, stamp, settings, done)
    assert f"{stamp} cannot be read (a run was stopped while writing it): the stage runs again" in capsys.readouterr().out
    assert json.loads(stamp.read_text()) == settings
    stamp.write_text("")  # the same for an evaluation stage, which has no end marker
    assert not _reusable(result, stamp, settings) and json.loads(stamp.read_text()) == settings
    done.write_text("")  # killed while the end of the training was recorded
    assert not _reusable(result, stamp, settings, done) and f"{done} cannot be read" in capsys.readouterr().out
    done.write_text("12.5")
    assert _reusable(result, stamp, settings, done)


def test_a_write_cut_off_half_way_leaves_the_previous_record_whole(tmp_path):
    """A record written in place was cut short by whatever stopped its write; now the previous one stays.

    The stop is a file-size limit of 16 bytes (a write beyond it fails), which cuts every write off at
    the same point whatever the writer, like a kill or a full disk does."""
    out, bundle = tmp_path / "out", REPO / "bundles" / "brats_gmd"
    stamp = out / "plain" / "train_settings.json"
    assert not _reusable(out / "model.pt", stamp, _stage_settings(bundle, ["--seed", "0"], out))
    before = stamp.read_bytes()
    code = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from app.ablation import _reusable, _stage_settings\n"
        "out = Path(sys.argv[1])\n"
        "settings = _stage_settings(Path(sys.argv[2]), ['--seed', '1'], out)\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write beyond the limit fails instead of killing\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "_reusable(out / 'model.pt', out / 'plain' / 'train_settings.json', settings)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(out), str(bundle)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "File too large" in proc.stderr, proc.stderr[-2000:]
    assert stamp.read_bytes() == before
    assert [p.name for p in stamp.parent.iterdir()] == [stamp.name]  # no temporary file left either


def test_a_seed_trained_with_another_loss_is_refused_before_the_seeds_are_averaged(tmp_path, monkeypatch):
    """--seeds: a seed folder finished before the loss changed (kept, as every finished stage) was averaged with seeds
    trained with the new loss into one mean +/- deviation."""
    import app.ablation

    losses = {0: {"_target_": "monai.losses.dice.DiceCELoss"}, 1: {"_target_": "app.losses.DiceCELoss"}}

    def fake_run(bundle, strategies, out, max_epochs, seed, **kwargs):  # one finished stage per seed
        models = Path(out) / "plain" / "train" / "models"
        models.mkdir(parents=True)
        torch.save({"iteration": 1, "loss_config": losses[seed]}, models / "checkpoint_last.pt")
        return {"runs": {"plain": {}}}

    monkeypatch.setattr(app.ablation, "run_ablation", fake_run)
    out = tmp_path / "seeds"
    with pytest.raises(ValueError, match=r"Strategy 'seed_1/plain' is trained with another loss than 'seed_0/plain' "
                                         r"\(_target_ 'monai\.losses\.dice\.DiceCELoss' in 'seed_0/plain', "
                                         rf"'app\.losses\.DiceCELoss' in 'seed_1/plain'\).*Delete {out / 'seed_0' / 'plain'}"):
        app.ablation.run_ablation_seeds(REPO / "bundles" / "brats_gmd", "plain", out, 1, seeds=[0, 1])
    assert not (out / "ablation_seeds.json").exists()


def test_the_progress_lines_of_a_training_log_do_not_pass_for_a_time_limit_stop(tmp_path):
    """The iterations of a stage come from the time-limit handler's line when the limit stopped it: the per-epoch
    estimate, which names the time limit, must not be read as one."""
    from app.ablation import _iterations

    log = tmp_path / "train.log"
    log.write_text(
        "... - INFO - Run: strategy plain, seed 0, time_limit_minutes 6, val_interval 1, 4 epoch(s) of 3 iteration(s) "
        "(12 in all); device cpu; torch 2, monai 1.\n"
        "... - INFO - Epoch 1/4 done (iteration 3 of 12): train_loss mean 1.5, learning rate 0.001, 1.00 s per "
        "iteration; 0:00:03 trained, about 0:00:02 left, when the time limit of 6 min stops it (at about epoch 2 of 4)."
        "\n... - INFO - Training finished: all 4 epoch(s) trained (12 iterations), in 0:00:12.\n")
    assert _iterations(log, tmp_path / "no_checkpoint.pt") is None
    with open(log, "a") as f:
        f.write("... - INFO - Time limit of 6 min reached at epoch 2, iteration 5: stopping.\n"
                "... - INFO - Training finished: the time limit of 6 min was reached at epoch 2 of 4, iteration 5, in "
                "0:06:00; best val_mean_dice 0.1 at epoch 2.\n")
    assert _iterations(log, tmp_path / "no_checkpoint.pt") == 5

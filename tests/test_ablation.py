"""The ablation runner: every strategy of a bundle at one seed and budget, tabulated per subset.

Runs ``python -m app ablate`` end to end on tiny phantoms (segmentation) and a tiny synthetic MMSA
pickle (sentiment), checks the tables, the resume of finished stages and the error on a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import monai
import pytest
import torch

from app.ablation import _environment, _reusable, _stage_settings, bundle_layout, parse_strategies
from app.data.mmsa import write_synthetic_mmsa
from app.data.phantoms import write_phantoms
from app.subsets import BRATS_MODALITIES, MOSI_MODALITIES, all_subsets, subset_name
from tests.bundles.helpers import REPO, TINY
from tests.fakes import FullDiskFile


def _ablate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", "ablate", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900)


def test_parse_strategies_and_layouts():
    assert parse_strategies("plain, gmd:5,cggm") == [("plain", "plain", None), ("gmd_k5", "gmd", "5"),
                                                     ("cggm", "cggm", None)]
    with pytest.raises(ValueError, match="twice"):
        parse_strategies("plain,plain")
    with pytest.raises(ValueError, match="empty"):
        parse_strategies(" , ")
    with pytest.raises(ValueError, match=r"Unknown strategy 'gmd-approx' in --strategies: choose from \[.*'gmd_approx'"):
        parse_strategies("plain,gmd-approx")  # refused before plain trains
    assert bundle_layout(REPO / "bundles" / "brats_gmd").kind == "segmentation"
    assert bundle_layout(REPO / "bundles" / "mosi_gmd").kind == "sentiment"
    with pytest.raises(FileNotFoundError, match="configs/train.yaml"):
        bundle_layout(REPO / "bundles")


def test_a_subset_count_is_refused_where_it_would_change_nothing_or_fail_later():
    # cggm:5 used to train plain cggm under the column "cggm_k5"; gmd:x failed only when its turn came
    with pytest.raises(ValueError, match="only GMD strategies take a subset count .* write cggm without ':5'"):
        parse_strategies("plain,cggm:5")
    for bad in ("gmd:0", "gmd:x", "gmd_approx:-1"):
        with pytest.raises(ValueError, match="must be a positive integer, e.g. gmd:5"):
            parse_strategies(f"plain,{bad}")
    assert parse_strategies("gmd_approx: 3") == [("gmd_approx_k3", "gmd_approx", "3")]


def test_a_strategy_the_bundle_network_cannot_train_is_refused_before_anything_trains(tmp_path):
    """``--strategies plain,dropout,gmd,cggm,predict`` on the BraTS bundle trained and scored the four
    others (hours at real budgets) and then failed at predict, which is sentiment only, with no table."""
    with pytest.raises(ValueError, match=r"Strategy 'predict' in --strategies trains only sentiment networks, and "
                                         r"this bundle is segmentation: remove it, or choose from \[.*'cggm'"):
        parse_strategies("plain,predict", "segmentation")
    assert [n for _, n, _ in parse_strategies("plain,predict", "sentiment")] == ["plain", "predict"]
    for seeds in ([], ["--seeds", "0,1"]):
        out = tmp_path / f"ablation{len(seeds)}"
        proc = _ablate("--bundle", "bundles/brats_gmd", "--strategies", "plain,predict", "--max_epochs", "1",
                       "--output_dir", str(out), "--dataset_dir", str(tmp_path), *seeds)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert "'predict' in --strategies trains only sentiment networks" in proc.stderr.strip().splitlines()[-1]
        assert not out.exists()


def _check_tables(out, strategies, modalities, headline):
    table = json.loads((out / "ablation.json").read_text())
    names = [subset_name(s, modalities) for s in all_subsets(len(modalities))]
    assert table["subsets"] == names and table["strategies"] == strategies
    for strategy in strategies:
        entry = table["tables"][headline][strategy]
        report = json.loads((out / strategy / "eval" / table["runs"][strategy]["report"].split("/")[-1]).read_text())
        values = [report["subsets"][n][headline] for n in names]
        assert entry["subsets"] == dict(zip(names, values))
        assert entry["worst"]["value"] == min(values)
    # the paired comparison, from the evaluations' per-case rows, gives the tables' own differences
    paired = table["paired"]
    assert paired["metric"] == headline
    if "strategies" in paired:
        for strategy in strategies[1:]:
            for name in names:
                got = paired["strategies"][strategy]["subsets"][name]
                assert got["difference"] == pytest.approx(table["tables"][headline][strategy]["subsets"][name]
                                                          - table["tables"][headline][strategies[0]]["subsets"][name])
                assert got["low"] <= got["high"]
    else:
        assert "held-out cases" in paired["unavailable"], paired
    md = (out / "ablation.md").read_text()
    assert md.count("| subset | " + " | ".join(strategies) + " |") == len(table["metrics"])
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    return table


def test_segmentation_bundle_ablation_resumes_and_scores_held_out_cases(tmp_path):
    data = tmp_path / "phantoms"
    write_phantoms(data, cases=5, size=32, seed=0)
    for path in list(data.glob("*/*.nii.gz")):  # flat: every case's files in one folder, as BraTS allows
        path.rename(data / path.name)
    out = tmp_path / "ablation"
    args = ["--bundle", "bundles/brats_gmd", "--strategies", "plain,gmd:2", "--max_epochs", "1",
            "--output_dir", str(out), "--dataset_dir", str(data), "--epoch_length", "2", *TINY]
    proc = _ablate(*args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    table = _check_tables(out, ["plain", "gmd_k2"], BRATS_MODALITIES, "mean")
    held_out = json.loads((out / "plain" / "train" / "datalist.json").read_text())["validation"]
    report = json.loads((out / "plain" / "eval" / "subset_dice.json").read_text())
    assert report["subsets"]["flair"]["n_cases"] == len(held_out) > 0
    assert {r["case"] for r in report["per_case"]} == {r["case"] for r in held_out}
    assert table["settings"]["seed"] == 0 and table["runs"]["gmd_k2"]["gmd_subsets"] == "2"
    assert table["runs"]["plain"]["iterations"] == 2  # 1 epoch of 2, no time limit: from the checkpoint
    # each stage trains with its log in a file: the ablation's own output says which runs, and where it logs
    assert f"Training gmd_k2 (strategy 2 of 2); log: {out / 'gmd_k2' / 'train.log'}\n" in proc.stdout
    assert f"Evaluating plain; log: {out / 'plain' / 'eval.log'}\n" in proc.stdout
    env = table["runs"]["plain"]["environment"]  # where the stage trained
    assert env["torch"] == torch.__version__ and env["monai"] == monai.__version__ and env["cpu_count"] >= 1
    assert env["device"] == _environment([])["device"]
    assert _environment(["--device", "cuda:1"])["device"] == "cuda:1"  # the bundle's override wins
    # a second run reuses the finished stages and gives the same table
    logs = {p: p.stat().st_mtime_ns for p in out.glob("*/*.log")}
    again = _ablate(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Reusing the finished training of plain (strategy 1 of 2): {out / 'plain' / 'train' / 'models'}" \
        in again.stdout and "Training plain" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*.log")} == logs
    rerun = json.loads((out / "ablation.json").read_text())
    assert rerun["tables"] == table["tables"]
    seconds = {k: r["train_seconds"] for k, r in table["runs"].items()}
    assert all(t > 0 for t in seconds.values()) and {k: r["train_seconds"] for k, r in rerun["runs"].items()} == seconds
    # another seed into the same folder is refused before anything is trained or overwritten
    before = (out / "ablation.json").read_bytes()
    other = _ablate(*args, "--seed", "1")
    assert other.returncode == 1 and "other settings" in other.stderr and "--output_dir" in other.stderr
    assert (out / "ablation.json").read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*.log")} == logs


def test_an_ablation_of_a_recipe_trains_and_scores_every_strategy_with_it(tmp_path):
    """A recipe given as --config_file went to both bundle commands unchanged: it replaced the runner's own
    config files, so training used it but evaluation lost evaluate.yaml and failed after the first
    strategy had trained."""
    data = tmp_path / "phantoms"
    write_phantoms(data, cases=5, size=32, seed=0)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("patch_size: [32, 32, 32]\nfeatures: [4, 8, 16, 32]\nnum_workers: 0\n")
    out = tmp_path / "ablation"
    args = ["--bundle", "bundles/brats_gmd", "--strategies", "plain", "--max_epochs", "1", "--output_dir", str(out),
            "--dataset_dir", str(data), "--epoch_length", "1",
            "--config_file", str(["bundles/brats_gmd/configs/train.yaml", str(recipe)])]
    proc = _ablate(*args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    weights = torch.load(out / "plain" / "train" / "models" / "model_final.pt", weights_only=True)
    assert weights["encoders.0.levels.0.conv1.conv.weight"].shape[0] == 4  # the recipe's network trained
    assert (out / "plain" / "eval" / "subset_dice.json").is_file()
    assert json.loads((out / "ablation.json").read_text())["settings"]["config_files"] == [str(recipe)]
    # an edited recipe is another setting: the finished stage is not reused for it
    recipe.write_text("patch_size: [32, 32, 32]\nfeatures: [8, 16, 32, 64]\nnum_workers: 0\n")
    again = _ablate(*args)
    assert again.returncode == 1 and "other settings" in again.stderr, again.stderr[-3000:]
    missing = _ablate(*args[:-1], str(tmp_path / "nosuch.yaml"))
    assert missing.returncode == 1 and f"--config_file: {tmp_path / 'nosuch.yaml'} not found" in missing.stderr
    # a recipe with a strategy of its own would train it under every label: refused before anything runs
    own = tmp_path / "own.yaml"
    own.write_text("strategy_def:\n  _target_: my_strategies.Mine\n  seed: '@seed'\n")
    mine = _ablate(*args[:-1], str(own), "--output_dir", str(tmp_path / "mine"))
    assert mine.returncode == 1 and f"--config_file: {own} replaces strategy_def" in mine.stderr
    assert not (tmp_path / "mine").exists()


def _finished_plain_stage(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """An ablation of plain alone, finished on 5 phantoms: ``(data folder, output folder, its arguments)``."""
    data = tmp_path / "data"
    write_phantoms(data, cases=5, size=32, seed=0)
    out = tmp_path / "ablation"
    args = ["--bundle", "bundles/brats_gmd", "--max_epochs", "1", "--output_dir", str(out), "--dataset_dir",
            str(data), "--epoch_length", "1", *TINY]
    first = _ablate("--strategies", "plain", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    return data, out, args


@pytest.fixture(scope="module")
def plain_stage(tmp_path_factory):
    """One finished plain stage for the tests that only alter its output folder (each works on a copy)."""
    return _finished_plain_stage(tmp_path_factory.mktemp("plain_stage"))


def _copy_of(stage: tuple[Path, Path, list[str]], tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of ``stage``'s output folder in ``tmp_path`` (the ablation records paths inside it relative to it), on
    the same data: ``(output folder, its arguments)``."""
    import shutil

    _, out, args = stage
    copy = shutil.copytree(out, tmp_path / "ablation")
    return copy, [str(copy) if a == str(out) else a for a in args]


def test_a_resumed_ablation_whose_data_changed_is_refused_instead_of_mixing_splits(tmp_path):
    """Cases added to --dataset_dir between an interrupted ablation and its rerun: the finished stage
    was reused and the next trained and was scored on another split, in one table, silently."""
    data, out, args = _finished_plain_stage(tmp_path)
    write_phantoms(data, cases=10, size=32, seed=0)  # the same 5 cases and 5 more
    again = _ablate("--strategies", "plain,dropout", *args)
    assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr[-3000:]
    line = again.stderr.strip().splitlines()[-1]
    assert "Strategy 'dropout' trained and is scored on other cases than 'plain'" in line, line
    assert f"Delete {out / 'plain'}" in line and "--output_dir" in line
    assert not (out / "dropout" / "eval").exists()  # nothing of the mixed split was scored
    assert json.loads((out / "ablation.json").read_text())["strategies"] == ["plain"]


def test_a_resumed_ablation_whose_loss_changed_is_refused_instead_of_mixing_objectives(plain_stage, tmp_path):
    """A stage finished before the bundle's loss changed (brats_gmd 0.6.0 replaced MONAI's softmax cross-entropy) was
    reused beside stages trained with the new loss, in one table, silently: its settings record the command, which
    had not changed, not train.yaml."""
    out, args = _copy_of(plain_stage, tmp_path)
    path = out / "plain" / "train" / "models" / "checkpoint_last.pt"
    state = torch.load(path, weights_only=True)
    assert state["loss_config"]["_target_"] == "app.losses.DiceCELoss"
    state["loss_config"]["_target_"] = "monai.losses.dice.DiceCELoss"  # as trained by the bundle before 0.6.0
    torch.save(state, path)
    again = _ablate("--strategies", "plain,dropout", *args)
    assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr[-3000:]
    line = again.stderr.strip().splitlines()[-1]
    assert ("Strategy 'dropout' is trained with another loss than 'plain' (_target_ 'monai.losses.dice.DiceCELoss' in "
            "'plain', 'app.losses.DiceCELoss' in 'dropout')") in line, line
    assert f"Delete {out / 'plain'}" in line and "--output_dir" in line
    assert not (out / "dropout" / "eval").exists()  # nothing trained with the other loss was scored
    # a stage trained by a version that recorded no loss cannot be told apart: refused too, naming it, and before
    # another stage trains
    import shutil

    shutil.rmtree(out / "dropout")
    del state["loss_config"]
    torch.save(state, path)
    older = _ablate("--strategies", "plain,dropout", *args)
    assert older.returncode == 1 and f"{out / 'plain'} was trained by an earlier version, which recorded no loss" in \
        older.stderr, older.stderr[-3000:]
    assert not (out / "dropout" / "train" / "models").exists()  # refused before the new stage trained


def test_a_stage_finished_by_a_version_without_the_finish_mark_is_reused_not_trained_again(plain_stage, tmp_path):
    """Ablations of brats_gmd before 0.5.0 recorded a stage's settings but wrote no train_seconds.json (its time was
    in ablation.json only): rerunning the command to tabulate them again trained every stage again, replacing the
    models and reports."""
    out, args = _copy_of(plain_stage, tmp_path)
    seconds = json.loads((out / "plain" / "train_seconds.json").read_text())
    (out / "plain" / "train_seconds.json").unlink()  # as that version left the stage
    model = out / "plain" / "train" / "models" / "model_final.pt"
    before = (model.read_bytes(), model.stat().st_mtime_ns)
    again = _ablate("--strategies", "plain", *args)
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
    resumed = _ablate("--strategies", "plain", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming the interrupted training of plain" in resumed.stdout and "Training plain" not in resumed.stdout
    text = log.read_text()
    assert text.startswith(stopped) and "--resume true" in text and "Resumed from" in text  # the log goes on
    assert "Starting a new run" not in text
    assert json.loads((out / "plain" / "train_seconds.json").read_text()) > 0


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


def test_a_report_scored_by_a_version_before_the_evaluator_fix_is_scored_again(plain_stage, tmp_path):
    """Ablations of brats_gmd before 0.3.0 recorded no settings, and their evaluator decoded only the first sliding
    window of each batch: rerunning the command reused those reports, with a note, beside the models they mis-scored."""
    out, args = _copy_of(plain_stage, tmp_path)
    report = out / "plain" / "eval" / "subset_dice.json"
    scored = json.loads(report.read_text())
    (out / "plain" / "eval_settings.json").unlink()  # as that version left the stage
    old = {**scored, "mean_over_subsets": {**scored["mean_over_subsets"], "mean": 0.5}}
    report.write_text(json.dumps(old))
    again = _ablate("--strategies", "plain", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"note: {report} was scored by an earlier version, whose evaluator gave other values" in again.stdout
    assert "Training plain" not in again.stdout  # the model is kept
    assert json.loads(report.read_text())["mean_over_subsets"] == scored["mean_over_subsets"]
    table = json.loads((out / "ablation.json").read_text())
    assert table["tables"]["mean"]["plain"]["mean"] == scored["mean_over_subsets"]["mean"]


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


@pytest.mark.parametrize("seeds", [[], ["--seeds", "0,1"]])
def test_a_second_ablation_on_a_busy_output_dir_stops_before_writing(seeds, tmp_path):
    """A job started twice: while one ablation runs in --output_dir, a second one stops with one line and
    writes nothing (it used to record its own settings over the first's and train and score beside it)."""
    import fcntl
    import os

    data, out = tmp_path / "phantoms", tmp_path / "ablation"
    write_phantoms(data, cases=4, size=32, seed=0)
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)  # what the running ablation holds (the kernel releases it when it dies)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = _ablate("--bundle", "bundles/brats_gmd", "--strategies", "plain", "--max_epochs", "1", "--output_dir",
                       str(out), "--dataset_dir", str(data), "--epoch_length", "1", *seeds, *TINY)
    finally:
        os.close(fd)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: --output_dir {out} is in use by another run that is still writing into it (a job started twice?): "
        "wait for it to end, or pass another --output_dir (bench/mosi_compare.py: --out_dir)."]
    assert list(out.iterdir()) == []


def test_a_killed_ablation_trains_the_unfinished_stage_again(tmp_path):
    data = tmp_path / "phantoms"
    write_phantoms(data, cases=4, size=32, seed=0)
    out = tmp_path / "ablation"
    args = ["--bundle", "bundles/brats_gmd", "--strategies", "plain", "--max_epochs", "1", "--checkpoint", "best",
            "--output_dir", str(out), "--dataset_dir", str(data), "--epoch_length", "1", *TINY]
    # what a run killed after its first validation leaves: the settings and a best-model checkpoint
    stamp = _stage_settings(REPO / "bundles" / "brats_gmd",
                            [*args[args.index("--dataset_dir"):], "--output_dir", str(out / "plain" / "train"),
                             "--strategy", "plain", "--seed", "0", "--max_epochs", "1", "--time_limit_minutes", "0.0"],
                            out)
    (out / "plain" / "train" / "models").mkdir(parents=True)
    (out / "plain" / "train_settings.json").write_text(json.dumps(stamp, indent=1))
    (out / "plain" / "train" / "models" / "model.pt").write_bytes(b"partial")
    # and the evaluation of that partial model, under the very settings the new one is scored with: it
    # scored the model the stage replaces, so it must not stand in for the new model's report
    run_dir, eval_dir = out / "plain" / "train", out / "plain" / "eval"
    eval_stamp = _stage_settings(REPO / "bundles" / "brats_gmd",
                                 [*args[args.index("--dataset_dir"):], "--eval_datalist", str(run_dir / "datalist.json"),
                                  "--ckpt_path", str(run_dir / "models" / "model.pt"), "--output_dir", str(eval_dir),
                                  "--seed", "0"], out)
    (out / "plain" / "eval_settings.json").write_text(json.dumps(eval_stamp, indent=1))
    eval_dir.mkdir(parents=True)
    (eval_dir / "subset_dice.json").write_text(json.dumps({"stale": True}))
    proc = _ablate(*args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (out / "plain" / "train.log").is_file()  # it trained
    table = json.loads((out / "ablation.json").read_text())
    assert table["runs"]["plain"]["train_seconds"] > 0 and table["runs"]["plain"]["iterations"] == 1
    assert "stale" not in json.loads((eval_dir / "subset_dice.json").read_text())  # scored again
    assert json.loads((out / "plain" / "eval_settings.json").read_text()) == eval_stamp


def test_sentiment_bundle_ablation_and_failure_names_the_log(tmp_path):
    pkl = write_synthetic_mmsa(tmp_path / "syn.pkl", splits={"train": 48, "valid": 24}, seed=0)
    out = tmp_path / "ablation"
    proc = _ablate("--bundle", "bundles/mosi_gmd", "--strategies", "plain,predict", "--max_epochs", "1",
                   "--output_dir", str(out), "--data_path", str(pkl), "--trust_pickle", "true")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    table = _check_tables(out, ["plain", "predict"], MOSI_MODALITIES, "Acc2")
    assert table["paired"]["cases"] == 24 and "predict - plain" in (out / "ablation.md").read_text()
    assert table["tables"]["MAE"]["plain"]["worst"]["value"] == max(table["tables"]["MAE"]["plain"]["subsets"].values())
    report = json.loads((out / "plain" / "eval" / "subset_metrics.json").read_text())
    assert report["subsets"]["text"]["n"] == 24  # scored on the valid split
    # an unknown strategy is refused before anything runs
    bad = _ablate("--bundle", "bundles/mosi_gmd", "--strategies", "plain,nosuch", "--max_epochs", "1",
                  "--output_dir", str(tmp_path / "bad"), "--data_path", str(pkl), "--trust_pickle", "true")
    assert bad.returncode == 1 and "Unknown strategy 'nosuch'" in bad.stderr and not (tmp_path / "bad").exists()
    # a failed run: its error line and its log are named
    bad = _ablate("--bundle", "bundles/mosi_gmd", "--strategies", "plain", "--max_epochs", "1", "--output_dir",
                  str(tmp_path / "bad"), "--data_path", str(pkl), "--trust_pickle", "true", "--hiden", "8")
    assert bad.returncode == 1 and "error: --hiden is not a setting" in bad.stderr
    assert "--hiden" in (tmp_path / "bad" / "plain" / "train.log").read_text()
    assert "train.log" in bad.stderr and not (tmp_path / "bad" / "ablation.json").exists()


def test_sentiment_classification_ablation_tabulates_accuracy_and_f1(tmp_path):
    """The documented IEMOCAP-style settings: the default table columns follow --task, instead of the
    regression ones stopping the ablation ('no Acc2 ... choose --metrics') after every run trained."""
    pkl = write_synthetic_mmsa(tmp_path / "syn.pkl", splits={"train": 32, "valid": 16}, seed=3)
    out = tmp_path / "cls"
    proc = _ablate("--bundle", "bundles/mosi_gmd", "--strategies", "plain", "--max_epochs", "1",
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
    proc = _ablate("--bundle", "bundles/mosi_gmd", "--strategies", "plain", "--max_epochs", "1", "--seeds", "0,1",
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
    bad = _ablate("--bundle", "bundles/mosi_gmd", "--strategies", "plain", "--max_epochs", "1", "--seeds", "0,x",
                  "--output_dir", str(tmp_path / "bad"), "--data_path", str(pkl), "--trust_pickle", "true")
    assert bad.returncode == 2 and "--seeds takes comma-separated integers" in bad.stderr
    both = _ablate("--bundle", "bundles/mosi_gmd", "--strategies", "plain", "--max_epochs", "1", "--seeds", "0,1",
                   "--seed", "3", "--output_dir", str(tmp_path / "bad"), "--data_path", str(pkl))
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    assert not (tmp_path / "bad").exists()


def test_a_failed_bundle_run_reports_its_error_line(tmp_path):
    from app.ablation import _run_bundle

    bundle = REPO / "bundles" / "brats_gmd"
    log = tmp_path / "train.log"
    with pytest.raises(RuntimeError, match=r"exit code 1: error: --patch_sizes is not a setting .*\(its output is in"):
        _run_bundle([bundle / "configs" / "train.yaml"], bundle, ["--patch_sizes", "[32,32,32]"], log)
    assert "error: --patch_sizes" in log.read_text()


def test_a_bundle_log_replaces_a_link_under_its_name_instead_of_writing_through_it(tmp_path, monkeypatch):
    """open(log, "w") follows a symbolic link: a link planted under a stage's log name (a shared output folder)
    had the ablation truncate and overwrite the file it named with the training's output."""
    from app.ablation import _run_bundle

    victim = tmp_path / "notes.txt"
    victim.write_text("someone else's file")
    log = tmp_path / "plain" / "train.log"
    log.parent.mkdir()
    log.symlink_to(victim)
    class _Trained:
        def __init__(self, cmd, stdout, **kwargs):
            stdout.write("trained\n")

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", _Trained)
    bundle = REPO / "bundles" / "brats_gmd"
    _run_bundle([bundle / "configs" / "train.yaml"], bundle, [], log)
    assert victim.read_text() == "someone else's file"
    assert not log.is_symlink() and log.read_text().endswith("trained\n")


_PARENT = """
import sys
from pathlib import Path
from app.ablation import _run_bundle
_run_bundle([Path(sys.argv[1])], Path(sys.argv[2]), [], Path(sys.argv[3]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_bundle_run_ends_when_the_ablation_is_killed(tmp_path):
    """An ablation killed outright (SIGKILL: the OOM killer, timeout -s KILL) used to leave its
    training running on its own, and the ablation run again to resume then trained a second model
    into the same stage folder at the same time."""
    import os
    import signal
    import time

    from tests.bundles.helpers import repo_env

    pid_file = tmp_path / "child.pid"
    config = tmp_path / "stage.yaml"  # a stage that records its process id, then trains for a minute
    config.write_text(f"run:\n  - \"$open({str(pid_file)!r}, 'w').write(str(__import__('os').getpid()))\"\n"
                      "  - \"$__import__('time').sleep(60)\"\n")
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(config), str(tmp_path), str(tmp_path / "stage.log")],
                              cwd=REPO, env=repo_env(OMP_NUM_THREADS="1"))
    child = None
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
            assert parent.poll() is None, (tmp_path / "stage.log").read_text()
            time.sleep(0.2)
        child = int(pid_file.read_text())
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
                with open(f"/proc/{child}/stat") as f:  # a zombie: ended, waiting for a reaper
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break
            except (ProcessLookupError, FileNotFoundError):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the bundle run {child} kept running after the ablation was killed")
    finally:
        if parent.poll() is None:
            parent.kill()
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_sentiment_eval_split_the_file_lacks_is_refused_before_any_strategy_trains(tmp_path):
    """A misspelt --eval_split was read only by the first evaluation, after that strategy had trained."""
    npz = write_synthetic_mmsa(tmp_path / "syn.npz", splits={"train": 8, "valid": 4, "test": 4}, dims=(4, 3, 4))
    out = tmp_path / "ablation"
    bad = _ablate("--bundle", "bundles/mosi_gmd", "--strategies", "plain,gmd", "--max_epochs", "1",
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
    bad = _ablate("--bundle", "bundles/mosi_gmd", "--strategies", "plain,gmd", "--max_epochs", "1",
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
    bad = _ablate("--bundle", "bundles/mosi_gmd", "--strategies", "plain,gmd", "--max_epochs", "1",
                  "--output_dir", str(out), "--data_path", str(npz), "--task", "classification", "--out_channels", "3",
                  "--label_key", "classification_labels", "--metrics", "Acc,MAE")
    assert bad.returncode == 1, bad.stderr[-2000:]
    assert bad.stderr.strip().splitlines() == [
        "error: --metrics Acc,MAE: the reports of these runs have no ['MAE']; choose among Acc,F1."]
    assert not out.exists()


@pytest.mark.parametrize("seeds", [[], ["--seeds", "0,1"]], ids=["seed", "seeds"])
def test_an_eval_split_for_a_segmentation_bundle_is_refused_before_anything_is_made(tmp_path, capsys, seeds):
    """--eval_split test with bundles/brats_gmd was dropped without a word: every stage trained and was scored on
    its datalist's validation cases, and the tables read as scores on the test split."""
    from app.ablation import main

    out = tmp_path / "ablation"
    assert main(["--bundle", "bundles/brats_gmd", "--strategies", "plain", "--max_epochs", "1", "--output_dir", str(out),
                 "--eval_split", "test", *seeds, "--dataset_dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --eval_split test applies to sentiment bundles only: a segmentation ablation scores each run on the "
        "validation cases of its own datalist.json (split by --seed). Leave --eval_split out."]
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--strategy", "gmd"], "--strategy gmd would be replaced in every stage: each stage trains the strategy "
                            "--strategies names for it: give --strategies gmd instead."),
    (["--ckpt_path", "m.pt"], "--ckpt_path m.pt would be replaced in every stage: each stage scores the checkpoint its "
                              "own training wrote (--checkpoint final or best): leave it out."),
    (["--", "--seed", "3"], "--seed 3 would be replaced in every stage: it is an option of the runner itself: give "
                            "--seed 3 before any '--'."),
])
def test_a_bundle_argument_each_stage_replaces_is_refused_before_anything_is_made(tmp_path, capsys, args, message):
    """--strategy gmd among the arguments passed on was replaced by each stage's own --strategy (its commands put
    theirs last): the ablation trained plain and tabulated plain, without a word."""
    from app.ablation import main

    out = tmp_path / "ablation"
    assert main(["--bundle", "bundles/brats_gmd", "--strategies", "plain", "--max_epochs", "1", "--output_dir", str(out),
                 "--dataset_dir", str(tmp_path), *args]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]
    assert not out.exists()


def test_a_subset_count_outside_strategies_is_refused_before_anything_trains(tmp_path):
    """``--strategies gmd --gmd_subsets 3`` trained the gmd stage on 3 subsets per iteration, tabulated as
    ``gmd`` with ``gmd_subsets: null`` in ablation.json, i.e. as the all-subset method."""
    out = tmp_path / "ablation"
    base = ["--bundle", "bundles/brats_gmd", "--max_epochs", "1", "--output_dir", str(out), "--dataset_dir",
            str(tmp_path)]
    proc = _ablate(*base, "--strategies", "plain,gmd,gmd_approx:5", "--gmd_subsets", "3")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: --gmd_subsets 3 would train the gmd stage(s) of --strategies on 3 subsets per iteration under the "
        "name of the all-subset method: give the count in --strategies instead (gmd:3) and leave gmd_subsets out."]
    assert not out.exists()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("gmd_subsets: 4\n")
    proc = _ablate(*base, "--strategies", "gmd_approx", "--config_file", str(recipe), "--seeds", "0,1")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: gmd_subsets: 4 in --config_file {recipe} would train the gmd_approx stage(s)")
    assert "(gmd_approx:4)" in proc.stderr and not out.exists()


def test_a_recipes_time_limit_and_seed_are_the_ablations_defaults(tmp_path):
    """Every stage's command sets --time_limit_minutes and --seed, so the budget of a recipe
    (bundles/brats_gmd/configs/demo.yaml's 4 minutes, the README's example recipe for ablate) and its seed were replaced by the runner's defaults, no
    limit and seed 0, without a word."""
    data = tmp_path / "phantoms"
    write_phantoms(data, cases=5, size=32, seed=0)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("patch_size: [32, 32, 32]\nfeatures: [4, 8, 16, 32]\nnum_workers: 0\ntime_limit_minutes: 0.5\n"
                      "seed: 3\n")
    out = tmp_path / "ablation"
    args = ["--bundle", "bundles/brats_gmd", "--strategies", "plain", "--max_epochs", "1", "--epoch_length", "1",
            "--dataset_dir", str(data), "--config_file", str(recipe)]
    proc = _ablate(*args, "--output_dir", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    settings = json.loads((out / "ablation.json").read_text())["settings"]
    assert (settings["time_limit_minutes"], settings["seed"]) == (0.5, 3)
    assert "seed 3, 1 epoch or 0.5 min per strategy" in (out / "ablation.md").read_text()
    log = (out / "plain" / "train.log").read_text()
    assert "time_limit_minutes: 0.5" in log and "seed: 3" in log
    # given on the command line, they win over the recipe
    given = _ablate(*args, "--output_dir", str(tmp_path / "given"), "--time_limit_minutes", "0", "--seed", "1")
    assert given.returncode == 0, given.stderr[-4000:]
    settings = json.loads((tmp_path / "given" / "ablation.json").read_text())["settings"]
    assert (settings["time_limit_minutes"], settings["seed"]) == (0.0, 1)


@pytest.mark.parametrize("seeds", [None, [0, 1]])
def test_an_output_dir_that_cannot_be_made_is_refused_before_any_stage(seeds, tmp_path, monkeypatch):
    """A read-only place stopped the ablation with a PermissionError traceback; --output_dir=~/runs (a '~' the
    shell leaves alone after '=') made a folder named '~' where the job ran, which the first training refused."""
    import os

    from app.ablation import run_ablation, run_ablation_seeds

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    bundle = REPO / "bundles" / "brats_gmd"

    def ablate(out):
        if seeds:
            return run_ablation_seeds(bundle, "plain", out, 1, seeds, bundle_args=["--dataset_dir", str(tmp_path)])
        return run_ablation(bundle, "plain", out, 1, bundle_args=["--dataset_dir", str(tmp_path)])

    with pytest.raises(ValueError, match=r"^--output_dir ~/runs: '~' is not expanded here .*: give "
                                         f"{tmp_path / 'home' / 'runs'} instead"):
        ablate("~/runs")
    assert os.listdir(tmp_path) == []  # no folder named '~' here, nor the home folder
    if sys.platform.startswith("linux"):  # /proc takes no new files, whoever runs the test (root included)
        with pytest.raises(ValueError, match=r"^--output_dir /proc/brats_gmd_ablation: cannot write in /proc"):
            ablate("/proc/brats_gmd_ablation")


def test_check_subset_count_names_only_the_gmd_stages_without_their_own_count(tmp_path):
    """The count outside --strategies is refused only where a gmd or gmd_approx stage would read it: 'all' is
    the method's own value, and a stage given as gmd:K keeps its K."""
    from app.ablation import _check_subset_count

    planned = parse_strategies("plain,gmd,gmd_approx:5,cggm")
    with pytest.raises(ValueError, match=r"^--gmd_subsets 3 would train the gmd stage\(s\) .*\(gmd:3\) and leave"):
        _check_subset_count(["--gmd_subsets", "3"], [], planned)
    with pytest.raises(ValueError, match=r"^--gmd_subsets 2 would train the gmd, gmd_approx stage\(s\) .*"
                                         r"\(gmd:2,gmd_approx:2\)"):
        _check_subset_count(["--gmd_subsets=2"], [], parse_strategies("gmd,gmd_approx"))
    _check_subset_count(["--gmd_subsets", " All "], [], planned)
    _check_subset_count(["--gmd_subsets", "3"], [], parse_strategies("plain,gmd:5,gmd_approx:4,cggm"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("gmd_subsets: all\n")
    _check_subset_count([], [recipe], planned)
    recipe.write_text("gmd_subsets: 4\n")
    with pytest.raises(ValueError, match=rf"^gmd_subsets: 4 in --config_file {recipe} would train the gmd stage"):
        _check_subset_count([], [recipe], planned)
    recipe.write_text("gmd_subsets: 0\n")  # no count at all: not to be spelt gmd:0
    with pytest.raises(ValueError, match=rf"^gmd_subsets: 0 in --config_file {recipe} is no subset count: .*"
                                         r"\(e\.g\. gmd:5\)"):
        _check_subset_count([], [recipe], planned)
    with pytest.raises(ValueError, match=r"^--gmd_subsets x is no subset count"):
        _check_subset_count(["--gmd_subsets", "x"], [], planned)


def test_budget_and_seed_take_the_given_values_then_the_recipes(tmp_path):
    from app.ablation import _budget_and_seed

    recipe = tmp_path / "recipe.yaml"
    assert _budget_and_seed({}, [], None, None) == (0.0, 0)
    assert _budget_and_seed({"time_limit_minutes": 4, "seed": 3}, [recipe], None, None) == (4.0, 3)
    assert _budget_and_seed({"time_limit_minutes": 4, "seed": 3}, [recipe], 0, 1) == (0.0, 1)
    assert _budget_and_seed({"time_limit_minutes": 4, "seed": 3}, [recipe], None, 0) == (4.0, 0)  # --seed 0 given
    for bad in (True, "x", None):
        with pytest.raises(ValueError, match=rf"^seed: {bad!r} in {recipe} is not a number: give --seed"):
            _budget_and_seed({"seed": bad}, [recipe], 2.0, None)


@pytest.mark.parametrize("bundle, strategies, setting, message", [
    ("bundles/brats_gmd", "plain,gmd,cggm", ["--cggm_rho", "0"], "stage cggm of --strategies: --cggm_rho 0 must be"),
    ("bundles/mosi_gmd", "plain,predict", ["--vicreg_variance", "-1"],
     "stage predict of --strategies: --vicreg_variance -1 must be"),
])
def test_a_stage_setting_its_strategy_refuses_stops_the_ablation_before_any_stage_trains(
        tmp_path, bundle, strategies, setting, message):
    """``plain,gmd,cggm --cggm_rho 0`` trained plain and gmd for their whole budgets before the cggm stage
    stopped on its setting: each stage's strategy is now built, and its settings checked, up front."""
    out = tmp_path / "ablation"
    proc = _ablate("--bundle", bundle, "--strategies", strategies, "--max_epochs", "1", "--output_dir", str(out),
                   "--dataset_dir", str(tmp_path), "--data_path", str(tmp_path / "none.pkl"), *setting)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), proc.stderr[-2000:]
    assert not out.exists()


def test_the_up_front_strategy_check_builds_each_stage_with_its_own_count_and_passes_good_settings(caplog,
                                                                                                  monkeypatch):
    from app.ablation import _check_strategy_settings, _configs

    train, _ = _configs(REPO / "bundles/brats_gmd")
    planned = parse_strategies("plain,gmd:5,gmd_approx,cggm", "segmentation")
    with caplog.at_level("INFO"):
        _check_strategy_settings([train], ["--cggm_rho", "2.5", "--gmd_sync", "global"], planned)  # nothing refused
    # an option meant for another stage is each stage's own log's to say, once, as the stage trains
    assert not [r for r in caplog.records if r.name.startswith("app.strategies") and r.levelno >= 30], caplog.text
    with pytest.raises(ValueError, match=r"^stage gmd:0 of --strategies: --gmd_subsets 0 must be"):
        _check_strategy_settings([train], [], [("gmd:0", "gmd", "0")])
    # an error that is no refused setting (a strategy that builds only with what its stage provides) is the
    # stage's own to report as it trains: the check does not stop the ablation on it
    import app.strategies

    build = app.strategies.build_strategy

    def build_or_fail(name, *args, **kwargs):
        if name == "cggm":
            raise RuntimeError("built only by its stage")
        return build(name, *args, **kwargs)

    monkeypatch.setattr(app.strategies, "build_strategy", build_or_fail)
    _check_strategy_settings([train], [], planned)


def test_an_ablation_recipe_that_is_a_named_pipe_is_named_as_one(tmp_path):
    """``ablate --config_file PIPE`` said the recipe was not found, although ``ls`` lists it; it is refused as
    what it is, before it is opened (a read would wait for a writer forever)."""
    from app.ablation import _override_files

    pipe = tmp_path / "recipe.yaml"
    os.mkfifo(pipe)
    train, evaluate = Path("bundles/brats_gmd/configs/train.yaml"), Path("bundles/brats_gmd/configs/evaluate.yaml")
    with pytest.raises(ValueError) as err:
        _override_files(["--config_file", str(pipe)], train, evaluate)
    assert str(err.value) == (f"{pipe} is a named pipe, not a file: it is not read (reading it would wait or run "
                              "forever). Pass a YAML or JSON file as --config_file.")


def test_hd95_goes_to_the_evaluations_only_and_adds_its_tables(plain_stage, tmp_path):
    """``--hd95 true`` went to the training commands too, which refuse it (a setting of evaluate.yaml only), so an
    ablation could not report HD95; an ablation already trained is scored again with it, not trained again."""
    out, args = _copy_of(plain_stage, tmp_path)  # an ablation of plain, trained and scored without --hd95
    args = ["--strategies", "plain", *args]
    before = json.loads((out / "ablation.json").read_text())
    assert before["metrics"] == ["mean", "WT", "TC", "ET"] and before["settings"]["hd95"] is False
    trained = {p: p.stat().st_mtime_ns for p in (out / "plain" / "train").rglob("*") if p.is_file()}
    # the HD95 tables without --hd95 would be found missing after training: refused first
    bad = _ablate(*args, "--metrics", "mean,HD95_WT")
    assert bad.returncode == 1 and "the HD95 columns need --hd95 true" in bad.stderr, bad.stderr[-2000:]
    proc = _ablate(*args, "--hd95", "true", "--hd95_workers", "2")
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
    again = _ablate(*args, "--hd95", "true", "--hd95_workers", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "plain" / "eval" / "subset_dice.json").stat().st_mtime_ns == scored
    bad = _ablate(*args, "--hd95", "true", "--hd95_workers", "0")
    assert bad.returncode == 1 and "--hd95_workers 0 must be a whole number >= 1" in bad.stderr, bad.stderr[-2000:]


def test_hd95_is_refused_for_a_sentiment_bundle_before_anything_trains(tmp_path):
    npz = write_synthetic_mmsa(tmp_path / "syn.npz", splits={"train": 8, "valid": 4}, dims=(4, 3, 4))
    out = tmp_path / "ablation"
    bad = _ablate("--bundle", "bundles/mosi_gmd", "--strategies", "plain", "--max_epochs", "1",
                  "--output_dir", str(out), "--data_path", str(npz), "--hd95", "true")
    assert bad.returncode == 1 and "HD95 is a distance between segmentations" in bad.stderr, bad.stderr[-2000:]
    assert not out.exists()



@pytest.mark.parametrize("args, hd95, passed_on", [
    (["--dataset_dir", "d", "--hd95"], True, ["--dataset_dir", "d"]),  # a bare flag, last
    (["--hd95", "--num_workers", "0"], True, ["--num_workers", "0"]),  # a bare flag before another option
    (["--hd95", "true", "--num_workers", "0"], True, ["--num_workers", "0"]),
    (["--hd95=false"], False, []),
    (["--hd95", "true", "--hd95", "false"], False, []),  # the last one wins, as on the bundle's command line
    (["--hd95", "false", "--hd95"], True, []),
    (["--num_workers", "0"], False, ["--num_workers", "0"]),
])
def test_a_bare_hd95_flag_scores_hd95_as_the_bundle_reads_it(args, hd95, passed_on):
    # monai.bundle run reads a flag without a value as true: the evaluation scores HD95 with a bare --hd95, which
    # the ablation dropped from both commands, its evaluations then scored without HD95 and no word said
    from app.ablation import SEGMENTATION, _hd95_option, _without

    assert _hd95_option(args, SEGMENTATION) is hd95
    assert _without(args, "hd95") == passed_on  # to the bundle commands: every --hd95 gone, the other options kept


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
    first = _ablate("--strategies", "plain", *args)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    (out / "plain" / "train_seconds.json").unlink()  # as a version before 0.5.0 left the stage
    again = _ablate("--strategies", "plain", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Reusing the finished training of plain" in again.stdout and "Training plain" not in again.stdout
    train = bundle / "configs" / "train.yaml"
    train.write_text(train.read_text().replace("torch.nn.L1Loss()", "torch.nn.MSELoss()"))
    mixed = _ablate("--strategies", "plain,dropout", *args)
    assert mixed.returncode == 1 and "Traceback" not in mixed.stderr, mixed.stderr[-3000:]
    line = mixed.stderr.strip().splitlines()[-1]
    assert ("Strategy 'dropout' is trained with another loss than 'plain' (_target_ 'torch.nn.modules.loss.L1Loss' in "
            "'plain', 'torch.nn.modules.loss.MSELoss' in 'dropout')") in line, line
    assert not (out / "dropout" / "eval").exists()  # nothing trained with the other loss was scored


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals and process groups")
def test_a_stop_of_the_ablation_lets_the_running_stage_stop_cleanly(tmp_path):
    """Ctrl-C or SIGTERM reaching the ablation killed its bundle run (SIGKILL) a quarter of a second later, so a
    training stage never wrote its checkpoint at the stop; one stopped by `kill PID` was not told at all. The stop
    is passed on once and the stage's own clean stop (here: half a second) ends the run."""
    import signal
    import threading
    import time

    from app.ablation import _run_logged

    code = ("import os, signal, sys, time\n"
            "got = []\n"
            "signal.signal(signal.SIGINT, lambda s, f: got.append(s))\n"
            "print('ready', os.getpgid(0) == os.getpid(), flush=True)\n"
            "deadline = time.monotonic() + 60\n"
            "while not got and time.monotonic() < deadline: time.sleep(0.02)  # never a hang: a failure\n"
            "time.sleep(0.5)  # the end of its iteration and its checkpoint\n"
            "print('stopped cleanly after', len(got), 'signal(s)', flush=True)\n"
            "sys.exit(130)\n")
    log = tmp_path / "train.log"
    log.write_text("the log of the run stopped before\n")

    def interrupt() -> None:
        for _ in range(600):
            if "\nready " in log.read_text():  # the child's line (the command line above it holds the word too)
                os.kill(os.getpid(), signal.SIGINT)  # to the ablation alone (kill -INT PID)
                return
            time.sleep(0.05)

    # Python's own Ctrl-C behaviour, also where the test process started with SIGINT ignored (a background job's)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            _run_logged([sys.executable, "-c", code], log, append=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    text = log.read_text()
    assert text.startswith("the log of the run stopped before\n")
    assert "ready True" in text  # its own process group: the terminal's Ctrl-C reaches it once, through the ablation
    assert "stopped cleanly after 1 signal(s)" in text, text


def test_a_full_disk_is_one_error_line_naming_the_file_and_the_fix(tmp_path, monkeypatch, capsys):
    """The runner's own files (a stage's settings record, its log, the tables) on a full disk ended the ablation
    with an OSError traceback, which `python -m app ablate` did not turn into its one error line."""
    import app.ablation as ablation
    import app.atomic as atomic

    out = tmp_path / "out"
    real_fdopen = os.fdopen
    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: FullDiskFile(real_fdopen(fd, mode)))
    rc = ablation.main(["--bundle", str(REPO / "bundles" / "brats_gmd"), "--strategies", "plain", "--max_epochs", "1",
                        "--output_dir", str(out), "--dataset_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and err == (f"error: Cannot write {out / 'plain' / 'train_settings.json'} (No space left on device): "
                               "free space on that disk (or raise the quota), or write to another folder.\n"), err
    assert not [p for p in out.rglob("*") if p.is_file()]  # nor a temporary file
    monkeypatch.undo()
    # the stage's log, written before its training starts: no training runs
    monkeypatch.setattr(ablation, "open", lambda path, mode: FullDiskFile(real_fdopen(os.open(path, os.O_WRONLY | os.O_CREAT),
                                                                                   mode)), raising=False)
    monkeypatch.setattr(ablation.subprocess, "Popen", lambda *a, **k: pytest.fail("the stage ran"))
    log = out / "plain" / "train.log"
    with pytest.raises(OSError, match=rf"^Cannot write {log} \(No space left on device\): free space"):
        ablation._run_bundle([REPO / "bundles" / "brats_gmd" / "configs" / "train.yaml"], REPO / "bundles" / "brats_gmd",
                             [], log)

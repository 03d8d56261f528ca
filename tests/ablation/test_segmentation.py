"""Ablations of the segmentation bundle end to end on tiny phantoms: the tables, held-out cases, recipes, budgets, and
reruns over changed data or a killed stage."""

from __future__ import annotations

import json

import monai
import torch

from app.ablation import _environment, _stage_settings
from app.data.phantoms import write_phantoms
from app.subsets import BRATS_MODALITIES
from tests.ablation.helpers import ablate, check_tables, finished_plain_stage
from tests.bundles.helpers import REPO, TINY


def test_segmentation_bundle_ablation_resumes_and_scores_held_out_cases(tmp_path):
    data = tmp_path / "phantoms"
    write_phantoms(data, cases=5, size=32, seed=0)
    for path in list(data.glob("*/*.nii.gz")):  # flat: every case's files in one folder, as BraTS allows
        path.rename(data / path.name)
    out = tmp_path / "ablation"
    args = ["--bundle", "bundles/brats_gmd", "--strategies", "plain,gmd:2", "--max_epochs", "1",
            "--output_dir", str(out), "--dataset_dir", str(data), "--epoch_length", "2", *TINY]
    proc = ablate(*args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    table = check_tables(out, ["plain", "gmd_k2"], BRATS_MODALITIES, "mean")
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
    again = ablate(*args)
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
    other = ablate(*args, "--seed", "1")
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
    proc = ablate(*args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    weights = torch.load(out / "plain" / "train" / "models" / "model_final.pt", weights_only=True)
    assert weights["encoders.0.levels.0.conv1.conv.weight"].shape[0] == 4  # the recipe's network trained
    assert (out / "plain" / "eval" / "subset_dice.json").is_file()
    assert json.loads((out / "ablation.json").read_text())["settings"]["config_files"] == [str(recipe)]
    # an edited recipe is another setting: the finished stage is not reused for it
    recipe.write_text("patch_size: [32, 32, 32]\nfeatures: [8, 16, 32, 64]\nnum_workers: 0\n")
    again = ablate(*args)
    assert again.returncode == 1 and "other settings" in again.stderr, again.stderr[-3000:]
    missing = ablate(*args[:-1], str(tmp_path / "nosuch.yaml"))
    assert missing.returncode == 1 and f"--config_file: {tmp_path / 'nosuch.yaml'} not found" in missing.stderr
    # a recipe with a strategy of its own would train it under every label: refused before anything runs
    own = tmp_path / "own.yaml"
    own.write_text("strategy_def:\n  _target_: my_strategies.Mine\n  seed: '@seed'\n")
    mine = ablate(*args[:-1], str(own), "--output_dir", str(tmp_path / "mine"))
    assert mine.returncode == 1 and f"--config_file: {own} replaces strategy_def" in mine.stderr
    assert not (tmp_path / "mine").exists()


def test_a_resumed_ablation_whose_data_changed_is_refused_instead_of_mixing_splits(tmp_path):
    """Cases added to --dataset_dir between an interrupted ablation and its rerun: the finished stage
    was reused and the next trained and was scored on another split, in one table, silently."""
    data, out, args = finished_plain_stage(tmp_path)
    write_phantoms(data, cases=10, size=32, seed=0)  # the same 5 cases and 5 more
    again = ablate("--strategies", "plain,dropout", *args)
    assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr[-3000:]
    line = again.stderr.strip().splitlines()[-1]
    assert "Strategy 'dropout' trained and is scored on other cases than 'plain'" in line, line
    assert f"Delete {out / 'plain'}" in line and "--output_dir" in line
    assert not (out / "dropout" / "eval").exists()  # nothing of the mixed split was scored
    assert json.loads((out / "ablation.json").read_text())["strategies"] == ["plain"]


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
    proc = ablate(*args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (out / "plain" / "train.log").is_file()  # it trained
    table = json.loads((out / "ablation.json").read_text())
    assert table["runs"]["plain"]["train_seconds"] > 0 and table["runs"]["plain"]["iterations"] == 1
    assert "stale" not in json.loads((eval_dir / "subset_dice.json").read_text())  # scored again
    assert json.loads((out / "plain" / "eval_settings.json").read_text()) == eval_stamp


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
    proc = ablate(*args, "--output_dir", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    settings = json.loads((out / "ablation.json").read_text())["settings"]
    assert (settings["time_limit_minutes"], settings["seed"]) == (0.5, 3)
    assert "seed 3, 1 epoch or 0.5 min per strategy" in (out / "ablation.md").read_text()
    log = (out / "plain" / "train.log").read_text()
    assert "time_limit_minutes: 0.5" in log and "seed: 3" in log
    # that values given on the command line win over the recipe is checked in test_checks.py, without training

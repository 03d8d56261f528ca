"""The ablation's up-front checks: strategies, subset counts, arguments and recipes refused before any stage trains."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.ablation import bundle_layout, parse_strategies
from tests.ablation.helpers import ablate
from tests.bundles.helpers import REPO


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
        proc = ablate("--bundle", "bundles/brats_gmd", "--strategies", "plain,predict", "--max_epochs", "1",
                      "--output_dir", str(out), "--dataset_dir", str(tmp_path), *seeds)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert "'predict' in --strategies trains only sentiment networks" in proc.stderr.strip().splitlines()[-1]
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
    proc = ablate(*base, "--strategies", "plain,gmd,gmd_approx:5", "--gmd_subsets", "3")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: --gmd_subsets 3 would train the gmd stage(s) of --strategies on 3 subsets per iteration under the "
        "name of the all-subset method: give the count in --strategies instead (gmd:3) and leave gmd_subsets out."]
    assert not out.exists()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("gmd_subsets: 4\n")
    proc = ablate(*base, "--strategies", "gmd_approx", "--config_file", str(recipe), "--seeds", "0,1")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: gmd_subsets: 4 in --config_file {recipe} would train the gmd_approx stage(s)")
    assert "(gmd_approx:4)" in proc.stderr and not out.exists()


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
    # refused by every stage's training, after the output folder and the first stage's log were made: refused here
    with pytest.raises(ValueError, match=r"^--time_limit_minutes -2\.0 must be a number >= 0"):
        _budget_and_seed({}, [], -2, None)
    with pytest.raises(ValueError, match=r"^--seed -1 must be a whole number >= 0"):
        _budget_and_seed({"seed": -1}, [recipe], None, None)


def test_a_bad_epoch_count_is_refused_before_the_output_folder_is_made(tmp_path):
    from app.ablation import run_ablation

    with pytest.raises(ValueError, match=r"^--max_epochs 0 must be a whole number >= 1"):
        run_ablation(REPO / "bundles" / "mosi_gmd", "plain", tmp_path / "out", 0)
    assert not (tmp_path / "out").exists()


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
    proc = ablate("--bundle", bundle, "--strategies", strategies, "--max_epochs", "1", "--output_dir", str(out),
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

"""The ``python -m monai.bundle run`` command line checked against the bundle settings (app/bundle_args.py)."""

from __future__ import annotations

import os

import pytest


def test_check_overrides_refuses_a_misspelt_key_and_names_the_setting(tmp_path):
    from app.bundle_args import _MONAI_DIR, check_overrides

    main = os.path.join(_MONAI_DIR, "bundle", "__main__.py")
    configs = os.path.join(os.path.dirname(__file__), "..", "bundles", "brats_gmd", "configs")
    train = os.path.join(configs, "train.yaml")
    both = str([train, os.path.join(configs, "evaluate.yaml")])
    # known settings, nested ids, hyphenated keys, MONAI's own arguments: accepted
    check_overrides([main, "run", "--config_file", train, "--patch_size", "[32,32,32]", "--max-epochs=1",
                     "--validate#inferer#overlap", "0.3", "--bundle_root", "bundles/brats_gmd", "--run_id", "run"])
    check_overrides([main, "run", "--config_file", both, "--eval_datalist", "O/datalist.json"])
    with pytest.raises(ValueError, match=r"--patch_sizes is not a setting of .*did you mean --patch_size"):
        check_overrides([main, "run", "--config_file", train, "--patch_sizes", "[32,32,32]"])
    with pytest.raises(ValueError, match="--max_epoch is not a setting.*--max_epochs"):
        check_overrides([main, "run", f"--config_file={train}", "--max_epoch=1"])
    with pytest.raises(ValueError, match="--eval_datalist is not a setting"):  # evaluate.yaml's key, train.yaml alone
        check_overrides([main, "run", "--config_file", train, "--eval_datalist", "d.json"])
    args = tmp_path / "args.yaml"
    args.write_text(f"config_file: {train}\nmax_epoch: 1\n")
    with pytest.raises(ValueError, match="--max_epoch is not a setting"):  # overrides from an args_file too
        check_overrides([main, "run", "--args_file", str(args)])
    inference = os.path.join(configs, "inference.yaml")  # the batch inference bundle, standalone
    check_overrides([main, "run", "--config_file", inference, "--labels", "2023", "--input_dir", "D"])
    with pytest.raises(ValueError, match="--label is not a setting.*did you mean --labels"):
        check_overrides([main, "run", "--config_file", inference, "--label", "2023"])
    # another program's command line (an in-process monai.bundle.run) is not checked
    check_overrides(["pytest", "--patch_sizes", "1", "--config_file", train])


def test_a_key_with_no_close_setting_gets_a_sentence_of_its_own():
    from app.bundle_args import _MONAI_DIR, check_overrides

    main = os.path.join(_MONAI_DIR, "bundle", "__main__.py")
    train = os.path.join(os.path.dirname(__file__), "..", "bundles", "mosi_gmd", "configs", "train.yaml")
    with pytest.raises(ValueError, match=r"--zzzz is not a setting of .*: check its spelling\. The run would ignore"):
        check_overrides([main, "run", "--config_file", train, "--zzzz", "1"])



def test_a_setting_of_another_config_of_the_bundle_names_that_file():
    """--dist_backend is a setting of the sentiment bundle's multi_gpu_train.yaml: "check its spelling" misled."""
    from app.bundle_args import _MONAI_DIR, check_overrides

    main = os.path.join(_MONAI_DIR, "bundle", "__main__.py")
    bundles = os.path.join(os.path.dirname(__file__), "..", "bundles")
    mosi_train = os.path.join(bundles, "mosi_gmd", "configs", "train.yaml")
    with pytest.raises(ValueError, match=r"--dist_backend is not a setting of .*: it is a setting of "
                                         r"multi_gpu_train\.yaml in the same folder, not of the files given: add that file"):
        check_overrides([main, "run", "--config_file", mosi_train, "--dist_backend", "gloo"])
    check_overrides([main, "run", "--config_file", mosi_train, "--resume", "true"])  # single-process training resumes
    brats_train = os.path.join(bundles, "brats_gmd", "configs", "train.yaml")
    with pytest.raises(ValueError, match=r"--eval_datalist is not a setting of .*: it is a setting of evaluate\.yaml"):
        check_overrides([main, "run", "--config_file", brats_train, "--eval_datalist", "d.json"])

@pytest.mark.parametrize("bundle, config, key, fix", [
    # a segmentation epoch may be a count of iterations; a sentiment epoch is the whole training split
    ("mosi_gmd", "train.yaml", "epoch_length", "set the training's length with --max_epochs or --time_limit_minutes"),
    ("mosi_gmd", "train.yaml", "patch_size", "an utterance is read whole"),  # was "did you mean --batch_size?"
    ("mosi_gmd", "train.yaml", "dataset_dir", "given as --data_path"),
    ("mosi_gmd", "train.yaml", "cache_rate", None),  # no counterpart: the other bundle's setting, named as such
    ("mosi_gmd", "evaluate.yaml", "eval_datalist", "scores the --eval_split"),  # was "did you mean --eval_split?"
    ("brats_gmd", "train.yaml", "data_path", "given as --dataset_dir"),  # was "did you mean --ckpt_path?"
    ("brats_gmd", "train.yaml", "hidden", "set by --features"),
    ("brats_gmd", "evaluate.yaml", "eval_split", "scores --eval_datalist"),
])
def test_a_setting_of_the_other_bundle_is_named_as_one_with_what_this_bundle_does_instead(bundle, config, key, fix):
    """"check its spelling" (or a close setting of this bundle) sent a user who carried a setting over from the
    segmentation bundle to the sentiment one, or back, the wrong way: its spelling is right."""
    from app.bundle_args import _MONAI_DIR, check_overrides

    main = os.path.join(_MONAI_DIR, "bundle", "__main__.py")
    configs = os.path.join(os.path.dirname(__file__), "..", "bundles", bundle, "configs")
    files = [os.path.join(configs, "train.yaml")] + ([os.path.join(configs, config)] if config != "train.yaml" else [])
    other = "mosi_gmd" if bundle == "brats_gmd" else "brats_gmd"
    with pytest.raises(ValueError) as err:
        check_overrides([main, "run", "--config_file", str(files), f"--{key}", "1"])
    message = str(err.value)
    assert f"--{key} is not a setting of" in message and f"it is a setting of another bundle, " in message, message
    assert os.path.join("bundles", other) in message and "did you mean" not in message, message
    assert "check its spelling" not in message, message
    if fix:
        assert fix in message, message


def test_what_a_setting_of_the_other_bundle_is_done_with_names_settings_this_bundle_has():
    """The hints name settings of the bundle the key was given to: one renamed there would send the user to a
    setting that is refused in turn."""
    import re

    from monai.bundle import ConfigParser

    from app.bundle_args import _COUNTERPARTS

    bundles = os.path.join(os.path.dirname(__file__), "..", "bundles")
    settings = {}
    for name in ("brats_gmd", "mosi_gmd"):
        folder = os.path.join(bundles, name, "configs")
        settings[name] = {k for f in os.listdir(folder) if f.endswith(".yaml")
                          for k in ConfigParser.load_config_file(os.path.join(folder, f))}
    for key, text in _COUNTERPARTS.items():
        owner = [name for name, keys in settings.items() if key in keys]
        assert len(owner) == 1, (key, owner)  # a setting of exactly one bundle
        given_to = "mosi_gmd" if owner == ["brats_gmd"] else "brats_gmd"
        named = re.findall(r"--(\w+)", text)
        assert set(named) <= settings[given_to], (key, named)


def test_a_misspelt_key_in_an_override_file_is_refused(tmp_path):
    """A recipe's keys were merged into train.yaml unchecked: ``learning_rat: 0.01`` trained at the default."""
    from app.bundle_args import _MONAI_DIR, check_override_files, check_overrides

    main = os.path.join(_MONAI_DIR, "bundle", "__main__.py")
    repo = os.path.join(os.path.dirname(__file__), "..")
    configs = os.path.join(repo, "bundles", "brats_gmd", "configs")
    train = os.path.join(configs, "train.yaml")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("strategy: plain\nlearning_rat: 0.01\n")
    with pytest.raises(ValueError, match=r"'learning_rat' in .*recipe.yaml is not a setting of .*train.yaml and no "
                                         r"setting refers to it: did you mean learning_rate\? The run would ignore it"):
        check_overrides([main, "run", "--config_file", str([train, str(recipe)]), "--max_epochs", "1"])
    with pytest.raises(ValueError, match="'learning_rat' in"):  # paths joined by a comma, as MONAI also reads them
        check_override_files(f"{train},{recipe}")
    # a nested override of a known setting, and a new setting that another one refers to: accepted
    recipe.write_text("strategy_def#subsets: 5\naux_weight: 0.5\nloss:\n  _target_: DiceFocalLoss\n"
                      "  sigmoid: true\n  gamma: '@aux_weight'\n")
    check_overrides([main, "run", "--config_file", str([train, str(recipe)])])
    # the shipped override files, alone and stacked
    for files in (["evaluate.yaml"], ["multi_gpu_train.yaml"], ["demo.yaml", "evaluate.yaml"]):
        check_override_files([train, *(os.path.join(configs, f) for f in files)])
    mosi = os.path.join(repo, "bundles", "mosi_gmd", "configs")
    for files in (["evaluate.yaml"], ["multi_gpu_train.yaml"], ["predict.yaml", "evaluate.yaml"]):
        check_override_files([os.path.join(mosi, f) for f in ("train.yaml", *files)])
    tests_override = os.path.join(os.path.dirname(__file__), "reliability", "configs", "save_rank_weights.yaml")
    check_override_files([train, os.path.join(configs, "multi_gpu_train.yaml"), tests_override])


def test_a_misspelt_argument_of_a_component_is_refused_before_any_work(tmp_path):
    """--loss#lambda_dce (or a recipe's loss with 'gama') stopped the run only when the trainer was built: a
    traceback, after every case had been read and datalist.json written."""
    from app.bundle_args import _MONAI_DIR, check_overrides

    main = os.path.join(_MONAI_DIR, "bundle", "__main__.py")
    configs = os.path.join(os.path.dirname(__file__), "..", "bundles", "brats_gmd", "configs")
    train = os.path.join(configs, "train.yaml")
    with pytest.raises(ValueError, match=r"--loss#lambda_dce: app.losses.DiceCELoss \(the 'loss' setting\) takes no argument "
                                         r"'lambda_dce': did you mean lambda_dice or lambda_ce\? Fix the key"):
        check_overrides([main, "run", "--config_file", train, "--loss#lambda_dce", "0.5"])
    with pytest.raises(ValueError, match=r"--optimizer#weight_decy: torch.optim.AdamW .* did you mean weight_decay"):
        check_overrides([main, "run", "--config_file", train, "--optimizer#weight_decy", "0.1"])
    with pytest.raises(ValueError, match=r"--validate#inferer#overlp: SlidingWindowInferer \(the 'validate#inferer' "
                                         r"setting\) takes no argument 'overlp': did you mean overlap"):
        check_overrides([main, "run", "--config_file", train, "--validate#inferer#overlp", "0.3"])
    recipe = tmp_path / "focal.yaml"
    recipe.write_text("loss:\n  _target_: DiceFocalLoss\n  sigmoid: true\n  gama: 2.0\n")
    with pytest.raises(ValueError, match=r"'gama' under 'loss' in .*focal.yaml: DiceFocalLoss .*did you mean gamma"):
        check_overrides([main, "run", "--config_file", str([train, str(recipe)])])
    recipe.write_text("network_def#featurs: [8, 16, 32, 64]\n")
    with pytest.raises(ValueError, match=r"'network_def#featurs' in .*: app.networks.DSUNet .*did you mean features"):
        check_overrides([main, "run", "--config_file", str([train, str(recipe)])])
    # real arguments, a new target's arguments, and factories taking **kwargs (checked by the factory): accepted
    recipe.write_text("loss:\n  _target_: DiceFocalLoss\n  sigmoid: true\n  gamma: 2.0\nnetwork_def#norm_name: batch\n")
    check_overrides([main, "run", "--config_file", str([train, str(recipe)]), "--loss#lambda_focal", "0.5",
                     "--strategy_def#rho", "2", "--train#handlers#0#print_lr", "true"])
    check_overrides([main, "run", "--config_file", train, "--loss#_target_", "DiceFocalLoss", "--loss#gamma", "2"])
    with pytest.raises(ValueError, match="DiceCELoss .* takes no argument 'gamma'"):
        check_overrides([main, "run", "--config_file", train, "--loss#gamma", "2"])


def test_a_list_or_number_for_an_argument_that_takes_a_tensor_only_is_refused_with_the_tensor_to_write(tmp_path):
    """MONAI's own DiceCELoss (and torch's losses) register weight as a buffer: --loss#weight "[1,1,2]", or any number,
    stopped the run with "cannot assign 'list' object to buffer 'weight'" at the bottom of a traceback."""
    from monai.bundle import ConfigParser

    from app.bundle_args import _MONAI_DIR, check_overrides

    main = os.path.join(_MONAI_DIR, "bundle", "__main__.py")
    train = os.path.join(os.path.dirname(__file__), "..", "bundles", "brats_gmd", "configs", "train.yaml")
    monai_loss = ["--loss#_target_", "monai.losses.DiceCELoss"]
    with pytest.raises(ValueError) as err:
        check_overrides([main, "run", "--config_file", train, *monai_loss, "--loss#weight", "[1,1,2]"])
    assert str(err.value) == (
        "--loss#weight [1, 1, 2]: monai.losses.DiceCELoss (the 'loss' setting) takes weight as a torch tensor only, so "
        "the run would stop when it builds it: pass --loss#weight '$torch.tensor([1.0,1.0,2.0])', or use the bundle's "
        "own loss, app.losses.DiceCELoss, which takes a list or a number.")
    with pytest.raises(ValueError, match=r"--loss#weight '\$torch\.tensor\(\[2\.0,2\.0,2\.0\]\)'"):  # one per channel
        check_overrides([main, "run", "--config_file", train, *monai_loss, "--loss#weight", "2"])
    recipe = tmp_path / "bce.yaml"
    recipe.write_text("loss:\n  _target_: torch.nn.BCEWithLogitsLoss\n  pos_weight: [1.0, 2.0, 2.0]\n")
    with pytest.raises(ValueError, match=r"'pos_weight' under 'loss' in .*bce\.yaml = \[1\.0, 2\.0, 2\.0\]: .* write "
                                         r"pos_weight: \"\$torch\.tensor\(\[1\.0,2\.0,2\.0\]\)\" there\.$"):
        check_overrides([main, "run", "--config_file", str([train, str(recipe)])])
    # the fix it names: the tensor, which builds; and the bundle's own loss, which takes the list
    tensor = "$torch.tensor([1.0,1.0,2.0])"
    check_overrides([main, "run", "--config_file", train, *monai_loss, "--loss#weight", tensor])
    recipe.write_text(f"loss:\n  _target_: monai.losses.DiceCELoss\n  sigmoid: true\n  weight: '{tensor}'\n")
    check_overrides([main, "run", "--config_file", str([train, str(recipe)])])
    parser = ConfigParser(ConfigParser.load_config_files([train, str(recipe)]))
    assert parser.get_parsed_content("loss").cross_entropy.weight.tolist() == [1.0, 1.0, 2.0]
    check_overrides([main, "run", "--config_file", train, "--loss#weight", "[1,1,2]"])


def test_a_setting_the_command_does_not_use_gets_a_warning(caplog):
    """--ckpt_path on a training command (evaluate.yaml reads it) was accepted without a word: training from
    scratch while the user meant to start from those weights."""
    from app.bundle_args import _MONAI_DIR, check_overrides

    main = os.path.join(_MONAI_DIR, "bundle", "__main__.py")
    repo = os.path.join(os.path.dirname(__file__), "..")
    configs = os.path.join(repo, "bundles", "brats_gmd", "configs")
    train, evaluate = os.path.join(configs, "train.yaml"), os.path.join(configs, "evaluate.yaml")
    with caplog.at_level("WARNING", logger="app.bundle_args"):
        check_overrides([main, "run", "--config_file", train, "--ckpt_path", "m.pt", "--max_epochs", "1"])
    assert [r.getMessage() for r in caplog.records] == [
        f"--ckpt_path is a setting of {train} that this command does not use (no setting refers to it): it has no "
        "effect here."]
    caplog.clear()
    with caplog.at_level("WARNING", logger="app.bundle_args"):  # evaluation reads it, and the shared settings
        check_overrides([main, "run", "--config_file", str([train, evaluate]), "--ckpt_path", "m.pt", "--seed", "1",
                         "--patch_size", "[32,32,32]", "--bundle_root", "bundles/brats_gmd"])
        mosi = os.path.join(repo, "bundles", "mosi_gmd", "configs", "train.yaml")
        check_overrides([main, "run", "--config_file", mosi, "--eval_split", "test"])
    assert [r.getMessage().split(" is a setting")[0] for r in caplog.records] == ["--eval_split"]


def test_a_training_setting_passed_to_an_evaluation_gets_a_warning(caplog):
    """evaluate.yaml merges train.yaml, whose training sections refer to --max_epochs, --val_fraction or
    --learning_rate: an evaluation given them (a training command with evaluate.yaml added) ignored them without
    a word, although it never builds those sections."""
    from app.bundle_args import _MONAI_DIR, check_overrides

    main = os.path.join(_MONAI_DIR, "bundle", "__main__.py")
    repo = os.path.join(os.path.dirname(__file__), "..")
    brats, mosi = (os.path.join(repo, "bundles", name, "configs") for name in ("brats_gmd", "mosi_gmd"))
    evaluation = str([os.path.join(brats, "train.yaml"), os.path.join(brats, "evaluate.yaml")])
    with caplog.at_level("WARNING", logger="app.bundle_args"):
        check_overrides([main, "run", "--config_file", evaluation, "--max_epochs", "5", "--val_fraction", "0.3",
                         "--train#handlers#0#print_lr", "true",
                         # what an evaluation reads: no warning
                         "--seed", "1", "--sw_batch_size", "4", "--num_workers", "0", "--amp", "false",
                         "--deterministic", "false", "--cache_rate", "1", "--label_convention", "auto",
                         "--features", "[8,16,32,64]", "--hd95", "true"])
    files = evaluation.strip("[]").replace("'", "")
    assert [r.getMessage() for r in caplog.records] == [
        f"--max_epochs is a setting of {files} that this command does not use (only 'lr_scheduler' and 'train' refer "
        "to it, which it does not run): it has no effect here.",
        f"--val_fraction is a setting of {files} that this command does not use (only 'datalist' and 'train' refer "
        "to it, which it does not run): it has no effect here.",
        f"--train#handlers#0#print_lr is a setting of {files} that this command does not use (it does not build "
        "'train'): it has no effect here."]
    caplog.clear()
    with caplog.at_level("WARNING", logger="app.bundle_args"):
        check_overrides([main, "run", "--config_file", str([os.path.join(mosi, "train.yaml"),
                                                            os.path.join(mosi, "evaluate.yaml")]),
                         "--learning_rate", "0.1", "--hidden", "32", "--strategy", "predict", "--missing", "skip"])
    assert [r.getMessage().split(" is a setting")[0] for r in caplog.records] == ["--learning_rate"]


def test_a_misspelt_entry_of_a_plain_section_is_refused():
    """--train#dataloder 3 added a new, unread entry to the train section: the run ignored it without a word."""
    from app.bundle_args import _MONAI_DIR, check_overrides

    main = os.path.join(_MONAI_DIR, "bundle", "__main__.py")
    repo = os.path.join(os.path.dirname(__file__), "..")
    train = os.path.join(repo, "bundles", "brats_gmd", "configs", "train.yaml")
    with pytest.raises(ValueError, match=r"--train#dataloder is not a setting of 'train': did you mean "
                                         r"--train#dataloader or --train#dataset\? The run would ignore it"):
        check_overrides([main, "run", "--config_file", train, "--train#dataloder", "3"])
    with pytest.raises(ValueError, match=r"--validate#report_dirr is not a setting of 'validate': did you mean "
                                         r"--validate#report_dir\?"):
        check_overrides([main, "run", "--config_file", train, "--validate#report_dirr", "x"])
    # existing entries, and a new one that a setting refers to (the sentiment multi-GPU override's train#sampler)
    check_overrides([main, "run", "--config_file", train, "--validate#report_dir", "x", "--train#handlers#0#print_lr",
                     "true"])
    mosi = os.path.join(repo, "bundles", "mosi_gmd", "configs")
    check_overrides([main, "run", "--config_file", str([os.path.join(mosi, "train.yaml"),
                                                       os.path.join(mosi, "multi_gpu_train.yaml")]),
                     "--train#sampler#shuffle", "false"])


def test_a_path_holding_a_hash_is_refused_instead_of_becoming_another_path(tmp_path):
    """MONAI turns '#' in every text value into '::': --output_dir /data/site#1/out trained into /data/site::1/out
    without a word. References, expressions and a value nothing reads (train.yaml's bundle_root) keep theirs."""
    from app.bundle_args import _MONAI_DIR, check_overrides

    main = os.path.join(_MONAI_DIR, "bundle", "__main__.py")
    configs = os.path.join(os.path.dirname(__file__), "..", "bundles", "brats_gmd", "configs")
    train = os.path.join(configs, "train.yaml")
    with pytest.raises(ValueError, match=r"--output_dir /data/site#1/out: .*'/data/site::1/out'.*without '#'"):
        check_overrides([main, "run", "--config_file", train, "--output_dir", "/data/site#1/out"])
    with pytest.raises(ValueError, match=r"--dataset_dir /data/case#1: .*'/data/case::1'"):
        check_overrides([main, "run", "--config_file", train, "--dataset_dir=/data/case#1"])
    inference = os.path.join(configs, "inference.yaml")  # the batch bundle reads bundle_root
    with pytest.raises(ValueError, match=r"--bundle_root /opt/x#2/brats_gmd: "):
        check_overrides([main, "run", "--config_file", inference, "--bundle_root", "/opt/x#2/brats_gmd"])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("dataset_dir: /data/site#1\n")
    with pytest.raises(ValueError, match=r"'dataset_dir' in .*recipe.yaml: .*'/data/site::1'"):
        check_overrides([main, "run", "--config_file", str([train, str(recipe)])])
    # '@' and '$' inside a path, MONAI's own syntax, and an unread bundle_root: accepted
    check_overrides([main, "run", "--config_file", train, "--dataset_dir", "/data/@site/a$b", "--output_dir", "O",
                     "--bundle_root", "/opt/x#2/brats_gmd", "--strategy_def#_target_", "app.strategies.build_strategy",
                     "--ckpt_path", "$@output_dir + '/models/model.pt'", "--patch_size", "[32,32,32]"])
    # a macro names another file's setting with '#' as MONAI means it
    check_overrides([main, "run", "--config_file", train, "--network_def", f"%{train}#network_def"])
    # a path inside a list or a mapping (a recipe's list of folders) is turned as well
    recipe.write_text("dataset_dir: [/data/a, /data/site#1]\n")
    with pytest.raises(ValueError, match=r"'dataset_dir' in .*recipe.yaml: .*'/data/site#1' into '/data/site::1'"):
        check_overrides([main, "run", "--config_file", str([train, str(recipe)])])
    recipe.write_text("network_def:\n  _target_: app.networks.build\n  weights: /data/site#1/w.pt\n")
    with pytest.raises(ValueError, match=r"'network_def' in .*recipe.yaml: .*'/data/site::1/w.pt'"):
        check_overrides([main, "run", "--config_file", str([train, str(recipe)])])


def test_an_unexpanded_shell_variable_or_a_bare_at_name_is_refused_in_one_line(monkeypatch):
    """'$HOME/runs' (single quotes in a job script) was evaluated as Python and '@site' read as a reference:
    both stopped with MONAI's traceback (NameError, 'the referring item @site is not defined')."""
    from app.bundle_args import _MONAI_DIR, check_overrides

    monkeypatch.setenv("SCRATCH", "/scratch/me")
    main = os.path.join(_MONAI_DIR, "bundle", "__main__.py")
    train = os.path.join(os.path.dirname(__file__), "..", "bundles", "brats_gmd", "configs", "train.yaml")
    with pytest.raises(ValueError, match=r"--output_dir \$SCRATCH/runs: the shell did not expand \$SCRATCH .*"
                                         r"\"\$SCRATCH/runs\"\), or give the path itself \(/scratch/me/runs\)"):
        check_overrides([main, "run", "--config_file", train, "--output_dir", "$SCRATCH/runs"])
    with pytest.raises(ValueError, match=r"--dataset_dir \$\{SCRATCH\}: the shell did not expand"):
        check_overrides([main, "run", "--config_file", train, "--dataset_dir", "${SCRATCH}"])
    with pytest.raises(ValueError, match=r"--dataset_dir @site: .*no setting 'site'.*--dataset_dir ./@site\."):
        check_overrides([main, "run", "--config_file", train, "--dataset_dir", "@site"])
    # expressions and references of MONAI's own: accepted
    check_overrides([main, "run", "--config_file", train, "--device", "$torch.device('cpu')", "--dataset_dir",
                     "./@site", "--output_dir", "@dataset_dir", "--learning_rate", "$1e-3 * 2"])
    # '$' and a Python name that is no environment variable: an expression, not an unexpanded variable
    monkeypatch.delenv("False", raising=False)
    check_overrides([main, "run", "--config_file", train, "--amp", "$False"])


def test_a_command_line_setting_a_recipe_cut_off_is_refused(tmp_path):
    """A recipe with ``strategy_def#subsets: 3`` replaced train.yaml's '@gmd_subsets' there, so --gmd_subsets 5
    (and ablate's gmd:5) trained on 3 subsets without a word."""
    from app.bundle_args import _MONAI_DIR, check_overrides

    main = os.path.join(_MONAI_DIR, "bundle", "__main__.py")
    configs = os.path.join(os.path.dirname(__file__), "..", "bundles", "brats_gmd", "configs")
    train = os.path.join(configs, "train.yaml")
    entry, component = tmp_path / "entry.yaml", tmp_path / "component.yaml"
    entry.write_text("strategy_def#subsets: 3\n")
    component.write_text("strategy_def:\n  _target_: app.strategies.build_strategy\n  name: gmd\n  subsets: 2\n")
    for recipe, key in ((entry, "strategy_def#subsets"), (component, "strategy_def")):
        with pytest.raises(ValueError, match=rf"^--gmd_subsets would be ignored: {recipe} sets '{key}' itself, which "
                                             rf".*train\.yaml fills from '@gmd_subsets'.*Set 'gmd_subsets' in {recipe}"):
            check_overrides([main, "run", "--config_file", str([train, str(recipe)]), "--gmd_subsets", "5"])
        check_overrides([main, "run", "--config_file", str([train, str(recipe)]), "--max_epochs", "2"])  # not given
    # an expression that still reads the setting, and the bundle's own override files, are fine
    expression = tmp_path / "expression.yaml"
    expression.write_text("strategy_def#subsets: '$@gmd_subsets + 1'\n")
    check_overrides([main, "run", "--config_file", str([train, str(expression)]), "--gmd_subsets", "3"])
    multi = os.path.join(configs, "multi_gpu_train.yaml")  # replaces train#sampler#seed with an expression of @seed
    check_overrides([main, "run", "--config_file", str([train, multi]), "--seed", "3"])
    demo = os.path.join(configs, "demo.yaml")
    check_overrides([main, "run", "--config_file", str([train, demo]), "--gmd_subsets", "5", "--strategy", "gmd"])


@pytest.mark.parametrize("setting", ["--args_file", "--config_file"])
def test_a_recipe_that_is_a_named_pipe_is_refused_instead_of_waited_on(tmp_path, setting):
    """A named pipe given as ``--args_file`` or among ``--config_file`` made the run wait for a writer forever
    before it started, without a word."""
    from app.bundle_args import _MONAI_DIR, check_overrides
    from tests.data.helpers import errors_of_call_on_pipe

    main = os.path.join(_MONAI_DIR, "bundle", "__main__.py")
    train = os.path.join(os.path.dirname(__file__), "..", "bundles", "brats_gmd", "configs", "train.yaml")
    pipe = tmp_path / "recipe.yaml"
    os.mkfifo(pipe)
    argv = [main, "run", "--args_file", str(pipe)] if setting == "--args_file" else \
        [main, "run", "--config_file", str([train, str(pipe)])]
    assert errors_of_call_on_pipe(lambda: check_overrides(argv), pipe, setting) == [
        f"{pipe} is a named pipe, not a file: it is not read (reading it would wait or run forever). Pass a YAML or "
        f"JSON file as {setting}."]


def test_ckpt_export_file_is_the_exporters_ckpt_file_only(tmp_path):
    """MONAI's ckpt_export loads --ckpt_file into the network it builds from the config without passing the
    path on: the brats bundle's export network reads its widths from this."""
    from app.bundle_args import _MONAI_DIR, ckpt_export_file

    main = os.path.join(_MONAI_DIR, "bundle", "__main__.py")
    assert ckpt_export_file([main, "ckpt_export", "--net_id", "export_network", "--ckpt_file", "a/m.pt"]) == "a/m.pt"
    assert ckpt_export_file([main, "ckpt_export", "export_network", "--ckpt-file=b.pt", "--filepath", "m.ts"]) == "b.pt"
    args = tmp_path / "args.yaml"
    args.write_text("ckpt_file: c.pt\n")
    assert ckpt_export_file([main, "ckpt_export", "--args_file", str(args)]) == "c.pt"
    assert ckpt_export_file([main, "ckpt_export", "--args_file", str(args), "--ckpt_file", "d.pt"]) == "d.pt"
    assert ckpt_export_file([main, "ckpt_export", "--filepath", "m.ts"]) is None  # MONAI's default: bundle_root's
    assert ckpt_export_file([main, "run", "--ckpt_file", "a.pt"]) is None
    assert ckpt_export_file(["other.py", "ckpt_export", "--ckpt_file", "a.pt"]) is None

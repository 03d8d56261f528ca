"""``--resume`` of :class:`app.engines.ResumableCheckpoint`: when a run continues and when it starts afresh."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from app.engines import ResumableCheckpoint, load_training_checkpoint, transform_settings
from tests.bundles.helpers import REPO

DATA = [0, 1, 2]  # three iterations per epoch


def _train(folder, resume, max_epochs=2):
    """Run a tiny trainer with the handler; returns (iterations it ran, network)."""
    net = torch.nn.Linear(2, 1)
    torch.nn.init.zeros_(net.bias)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    seen = []

    def step(engine, batch):
        seen.append(engine.state.iteration)
        with torch.no_grad():
            net.bias += 1.0  # the bias counts the iterations the weights went through

    engine = Engine(step)
    ResumableCheckpoint(folder, net, optimizer, resume=resume).attach(engine)
    engine.run(DATA, max_epochs=max_epochs)
    return seen, net


def test_auto_starts_afresh_in_an_empty_folder(tmp_path):
    seen, net = _train(tmp_path, "auto")
    assert seen == [1, 2, 3, 4, 5, 6] and net.bias.item() == 6.0
    assert load_training_checkpoint(tmp_path / "checkpoint_last.pt")["iteration"] == 6


@pytest.mark.parametrize("resume", ["auto", "true", True])
def test_auto_and_true_continue_from_the_checkpoint(tmp_path, resume):
    _train(tmp_path, False, max_epochs=1)
    seen, net = _train(tmp_path, resume)
    assert seen == [4, 5, 6]  # epoch 2 only, from the weights the checkpoint holds
    assert net.bias.item() == 6.0
    assert load_training_checkpoint(tmp_path / "checkpoint_last.pt")["iteration"] == 6


@pytest.mark.parametrize("resume", ["false", False])
def test_false_over_an_existing_checkpoint_starts_at_zero_and_overwrites_it(tmp_path, resume):
    _train(tmp_path, False)  # a finished run of 6 iterations
    seen, net = _train(tmp_path, resume, max_epochs=1)
    assert seen == [1, 2, 3]  # from iteration 1 and the initial weights, not the checkpoint's
    assert net.bias.item() == 3.0
    state = load_training_checkpoint(tmp_path / "checkpoint_last.pt")
    assert state["iteration"] == 3 and state["network"]["bias"].item() == 3.0


def test_a_damaged_checkpoint_is_refused_instead_of_resumed(tmp_path):
    """A model.pt with a byte changed since it was written is refused (its zip checksums); the training
    checkpoint was read with torch.load alone, which does not check them: the run resumed from a wrong weight."""
    _train(tmp_path, False, max_epochs=1)
    path = tmp_path / "checkpoint_last.pt"
    state = load_training_checkpoint(path)
    data = bytearray(path.read_bytes())
    at = data.index(state["network"]["weight"].numpy().tobytes())  # the weight's bytes, stored as they are
    data[at] ^= 0x40
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=True)["network"]["weight"], state["network"]["weight"])
    with pytest.raises(ValueError, match=r"checkpoint_last\.pt is damaged \(entry .*CRC.*--resume false"):
        load_training_checkpoint(path)
    with pytest.raises(ValueError, match=r"checkpoint_last\.pt is damaged"):
        _train(tmp_path, True)
    # NaN weights (written before training stopped at a NaN step) are refused too
    state["network"]["weight"][0, 0] = float("nan")
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"checkpoint_last\.pt holds NaN or infinite weights.*--resume false"):
        load_training_checkpoint(path)


@pytest.mark.parametrize("value, mode", [("auto", "auto"), (" AUTO ", "auto"), ("true", "true"), (False, "false"),
                                         ("0", "false")])
def test_resume_reads_true_false_or_auto(tmp_path, value, mode):
    assert ResumableCheckpoint(tmp_path, network=torch.nn.Linear(1, 1), optimizer=None, resume=value).resume == mode


def test_resume_names_the_fix_for_a_bad_value(tmp_path):
    with pytest.raises(ValueError, match="--resume must be true, false or auto"):
        ResumableCheckpoint(tmp_path, network=torch.nn.Linear(1, 1), optimizer=None, resume="yes")


def test_a_longer_run_with_a_learning_rate_schedule_is_refused(tmp_path):
    """The scheduler's horizon comes back from the checkpoint: a resume with more epochs would train
    the extra ones at the end of the old cosine (learning rate 0), so it is refused with the fix."""
    def run(max_epochs):
        net = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
        engine = Engine(lambda e, b: None)
        ResumableCheckpoint(tmp_path, net, optimizer, lr_scheduler=scheduler, resume="auto").attach(engine)
        engine.run(DATA, max_epochs=max_epochs)

    run(1)
    with pytest.raises(ValueError, match="a run of 1 epochs, this run asks for 2: .*resume with --max_epochs 1"):
        run(2)
    run(1)  # the same length resumes (a finished run: nothing to do)


def test_a_resume_with_another_learning_rate_or_weight_decay_is_refused(tmp_path):
    """Loading the optimizer's state brings back its hyperparameters: --learning_rate 0.05 on a resume
    trained on silently at the first run's rate (the scheduler's base rates come back too)."""
    def run(lr, weight_decay=0.0, scheduled=True, resume="auto"):
        net = torch.nn.Linear(2, 1)
        optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2) if scheduled else None
        engine = Engine(lambda e, b: optimizer.step())
        if scheduler is not None:
            engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: scheduler.step())
        ResumableCheckpoint(tmp_path, net, optimizer, lr_scheduler=scheduler, resume=resume).attach(engine)
        engine.run(DATA, max_epochs=2)
        return optimizer

    assert run(0.1, 0.01, resume="false").param_groups[0]["lr"] < 0.1  # the schedule has moved the learning rate
    with pytest.raises(ValueError, match=r"other optimizer settings \(--learning_rate 0.1 there, 0.05 here\): a resume "
                                         r"continues the saved optimizer.*Resume with the original settings "
                                         r"\(--learning_rate 0.1\), or start a new run"):
        run(0.05, 0.01)
    with pytest.raises(ValueError, match=r"--weight_decay 0.01 there, 0.1 here.*\(--weight_decay 0.01\)"):
        run(0.1, 0.1)
    # the same settings resume, although the scheduled learning rate is no longer the configured one
    assert run(0.1, 0.01).param_groups[0]["initial_lr"] == 0.1
    run(0.1, 0.01, scheduled=False, resume="false")
    with pytest.raises(ValueError, match="--learning_rate 0.1 there, 0.2 here"):  # no scheduler: lr itself
        run(0.2, 0.01, scheduled=False)


def test_a_resume_with_another_optimizer_is_refused(tmp_path):
    """--optimizer#_target_ torch.optim.SGD (the README's CGGM setting) on a resume of an AdamW run loaded
    AdamW's state into SGD and stopped at the first step with KeyError: 'momentum'; into Adam it trained on
    silently with AdamW's decoupled weight decay."""
    def run(cls, resume="auto", **kwargs):
        net = torch.nn.Linear(2, 1)
        optimizer = cls(net.parameters(), lr=0.1, weight_decay=0.01, **kwargs)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2)
        engine = Engine(lambda e, b: (net(torch.ones(1, 2)).sum().backward(), optimizer.step()))
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: scheduler.step())
        ResumableCheckpoint(tmp_path, net, optimizer, lr_scheduler=scheduler, resume=resume).attach(engine)
        engine.run(DATA, max_epochs=2)
        return optimizer

    run(torch.optim.AdamW, resume="false")
    path = tmp_path / "checkpoint_last.pt"
    for cls, name, extra in ((torch.optim.SGD, "torch.optim.SGD", {"momentum": 0.9}), (torch.optim.Adam, "torch.optim.Adam", {})):
        with pytest.raises(ValueError, match=rf"{path} was written by a run training with torch.optim.AdamW, this run is "
                                             rf"configured with {name} \(--optimizer#_target_\): a resume continues the "
                                             r"saved optimizer, so resume with the original --optimizer#_target_"):
            run(cls, **extra)
    assert isinstance(run(torch.optim.AdamW), torch.optim.AdamW)  # the same optimizer resumes
    # a checkpoint written before the class was recorded: told apart by its hyperparameters' names
    state = torch.load(path, weights_only=False)
    del state["optimizer_class"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"training with another optimizer, this run is configured with torch.optim.SGD"):
        run(torch.optim.SGD, momentum=0.9)
    run(torch.optim.AdamW)


def test_a_resume_with_another_learning_rate_scheduler_is_refused(tmp_path):
    """A recipe replacing the cosine lr_scheduler by StepLR on a resume loaded the cosine state into StepLR and
    trained on silently: the run switched schedules half-way (and --lr_scheduler#eta_min was ignored)."""
    def run(make, resume="auto"):
        net = torch.nn.Linear(2, 1)
        optimizer = torch.optim.AdamW(net.parameters(), lr=0.1)
        scheduler = make(optimizer)
        engine = Engine(lambda e, b: optimizer.step())
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: scheduler.step())
        ResumableCheckpoint(tmp_path, net, optimizer, lr_scheduler=scheduler, resume=resume).attach(engine)
        engine.run(DATA, max_epochs=2)
        return scheduler

    def cosine(o):
        return torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=2)

    def step(o):
        return torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)

    run(cosine, resume="false")
    path = tmp_path / "checkpoint_last.pt"
    with pytest.raises(ValueError, match=rf"{path} was written by a run scheduled by "
                                         r"torch.optim.lr_scheduler.CosineAnnealingLR, this run is configured with "
                                         r"torch.optim.lr_scheduler.StepLR \(lr_scheduler\): a resume continues the "
                                         r"saved schedule"):
        run(step)
    assert isinstance(run(cosine), torch.optim.lr_scheduler.CosineAnnealingLR)
    state = torch.load(path, weights_only=False)  # written before the class was recorded: told by its entries
    del state["lr_scheduler_class"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"scheduled by another learning-rate scheduler, this run is configured with "
                                         r"torch.optim.lr_scheduler.StepLR"):
        run(step)
    run(cosine)
    # its settings come back with the saved state, so a new value would be ignored
    with pytest.raises(ValueError, match=r"other learning-rate scheduler settings \(eta_min 0.0 there, 0.001 here\): a "
                                         r"resume continues the saved schedule.*\(--lr_scheduler#eta_min 0.0\)"):
        run(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=2, eta_min=1e-3))


def test_a_resume_with_other_training_settings_is_refused(tmp_path):
    """A resume that forgot --patch_size "[32,32,32]" trained on at the default patch size, the weights, optimizer
    and data order carrying on as if nothing had changed."""
    def run(**settings):
        net = torch.nn.Linear(2, 1)
        engine = Engine(lambda e, b: None)
        ResumableCheckpoint(tmp_path, net, torch.optim.SGD(net.parameters(), lr=0.1), resume="auto",
                            settings=settings).attach(engine)
        engine.run(DATA, max_epochs=1)

    run(patch_size=(32, 32, 32), batch_size=2)
    assert load_training_checkpoint(tmp_path / "checkpoint_last.pt")["settings"] == {"patch_size": [32, 32, 32],
                                                                                      "batch_size": 2}
    with pytest.raises(ValueError, match=r"other training settings \(--patch_size \[32, 32, 32\] there, \[96, 96, 96\] "
                                         r"here\): resume with --patch_size \"\[32,32,32\]\", or start a new run"):
        run(patch_size=[96, 96, 96], batch_size=2)
    run(patch_size=[32, 32, 32], batch_size=2)  # the same settings, as a list: resumes
    run()  # a checkpoint compared with a handler that records nothing (and the reverse, an earlier checkpoint)


def test_the_segmentation_bundle_records_its_sample_settings():
    from monai.bundle import ConfigParser

    bundle = REPO / "bundles" / "brats_gmd" / "configs"
    parser = ConfigParser(ConfigParser.load_config_files([str(bundle / "train.yaml")]))
    handler = next(h for h in parser.get("train#handlers") if h["_target_"] == "app.engines.ResumableCheckpoint")
    assert set(handler["settings"]) == {"patch_size", "batch_size", "num_samples", "label_convention", "amp",
                                        "deterministic", "sw_overlap", "torchrun --nproc_per_node", "preprocessing",
                                        "augmentation", "dataset_dir", "seed", "val_fraction", "features",
                                        "strategy"}
    assert handler["warn"] == ["deterministic", "dataset_dir", "val_fraction"]
    # each transform setting is named by the override that sets it (MONAI writes "#" as "::" in expressions)
    parser["amp"] = "false"
    settings = parser.get_parsed_content("train#handlers#3#settings")
    assert settings["augmentation"]["train#augmentation#2#prob"] == 0.5 and settings["amp"] is False
    assert settings["preprocessing"]["preprocessing#4#nonzero"] is True
    multi = ConfigParser.load_config_files([str(bundle / "train.yaml"), str(bundle / "multi_gpu_train.yaml")])
    assert multi["train"]["handlers"][3]["settings"]["torchrun --nproc_per_node"] == "@world_size"


def test_the_sentiment_multi_gpu_config_records_its_number_of_processes():
    """A resume of a 4-process sentiment run with 2 processes only warned: each rank's share and the global batch
    changed."""
    from monai.bundle import ConfigParser

    bundle = REPO / "bundles" / "mosi_gmd" / "configs"
    config = ConfigParser.load_config_files([str(bundle / "train.yaml"), str(bundle / "multi_gpu_train.yaml")])
    parser = ConfigParser(config)
    assert parser["train#handlers#3#_target_"] == "app.engines.ResumableCheckpoint"
    assert parser["train#handlers#3#settings#torchrun --nproc_per_node"] == "@world_size"
    assert parser["train#handlers#3#settings#batch_size"] == "@batch_size"
    single = ConfigParser(ConfigParser.load_config_files([str(bundle / "train.yaml")]))
    assert single["train#handlers#3#settings#torchrun --nproc_per_node"] == 1
    assert ConfigParser(config).get_parsed_content("world_size") == 1  # outside torchrun


def _settings_run(folder, warn=(), digests=None, **settings):
    net = torch.nn.Linear(2, 1)
    engine = Engine(lambda e, b: None)
    ResumableCheckpoint(folder, net, torch.optim.SGD(net.parameters(), lr=0.1), resume="auto", settings=settings,
                        warn=warn, digests=digests).attach(engine)
    engine.run(DATA, max_epochs=1)


@pytest.fixture(scope="module")
def synthetic_mmsa_files(tmp_path_factory):
    """A tiny MMSA pickle, its .npz conversion and another pickle."""
    from app.data import convert_mmsa
    from app.data.mmsa import write_synthetic_mmsa

    folder = tmp_path_factory.mktemp("mmsa")
    splits = {"train": 8, "valid": 4}
    pkl = write_synthetic_mmsa(folder / "mosi.pkl", splits=splits, seed=0)
    return pkl, convert_mmsa(pkl, folder / "mosi.npz"), write_synthetic_mmsa(folder / "other.pkl", splits=splits, seed=1)


def test_the_sentiment_bundle_records_the_settings_the_segmentation_bundle_records(synthetic_mmsa_files):
    """A sentiment resume compared the batch size, processes, loss and head only: --amp, --seed, the network's
    settings, the splits and model selection changed without a word, and so did --data_path: another file trained on
    where the run left off. The data is recorded by a digest of its utterance ids and labels, which its .npz
    conversion shares; its path changes with a warning only."""
    from monai.bundle import ConfigParser

    bundle = REPO / "bundles" / "mosi_gmd" / "configs"
    pkl, npz, other = synthetic_mmsa_files

    def settings(path, **overrides):
        parser = ConfigParser(ConfigParser.load_config_files([str(bundle / "train.yaml")]))
        parser.update({"data_path": str(path), "trust_pickle": True, **overrides})
        handler = parser.get("train#handlers#3")
        return parser.get_parsed_content("train#handlers#3#settings"), handler["warn"], handler["digests"]

    recorded, warn, digests = settings(pkl, amp="false")
    assert {"amp", "seed", "strategy", "hidden", "num_heads", "dropout", "input_dropout", "head_dropout", "train_split",
            "val_split", "label_key", "key_metric", "data", "data_path", "batch_size",
            "torchrun --nproc_per_node"} <= set(recorded)
    assert recorded["amp"] is False and recorded["key_metric"] == "MAE" and recorded["data_path"] == str(pkl)
    assert warn == ["data_path"] and digests == {"data": "data_path"}
    assert settings(npz)[0]["data"] == recorded["data"]  # the converted file: the same data
    assert settings(other)[0]["data"] != recorded["data"]
    # --missing (predicted or skipped absent modalities) shows in no weight: recorded where it acts, for predict only
    assert settings(pkl, strategy="predict", missing="skip")[0]["missing"] == "skip"
    assert recorded["missing"] is None and settings(pkl, missing="skip")[0]["missing"] is None


def test_a_resume_on_other_data_is_refused_naming_the_path_and_on_a_copy_warned_about(tmp_path, caplog):
    def run(path, digest):
        _settings_run(tmp_path, warn=["data_path"], digests={"data": "data_path"}, data=digest, data_path=path)

    run("/d/mosi.pkl", "1a2b")
    with pytest.raises(ValueError, match=r"other training settings \(--data_path '/d/mosi.pkl' there, '/d/other.pkl' "
                                         r"here, whose data differ: digest 1a2b there, 3c4d here\): resume with "
                                         r"--data_path /d/mosi.pkl, or start a new run"):
        run("/d/other.pkl", "3c4d")
    # the same file rewritten: no flag restores it
    with pytest.raises(ValueError, match=r"\(--data_path '/d/mosi.pkl', whose data differ: digest 1a2b there, 3c4d "
                                         r"here\): resume with the original settings, or"):
        run("/d/mosi.pkl", "3c4d")
    with caplog.at_level("WARNING", logger="app.engines.checkpoint"):
        run("/d/mosi.npz", "1a2b")  # converted: the same data
    assert "other settings (--data_path '/d/mosi.pkl' there, '/d/mosi.npz' here): the resumed run continues" in caplog.text
    # a checkpoint written before the data was recorded resumes, saying so
    _settings_run(tmp_path / "old", batch_size=2)
    caplog.clear()
    with caplog.at_level("WARNING", logger="app.engines.checkpoint"):
        _settings_run(tmp_path / "old", warn=["data_path"], digests={"data": "data_path"}, batch_size=2, data="3c4d",
                      data_path="/d/other.pkl")
    assert ("records no digest of the --data_path data, --data_path (it was written by an earlier version)"
            in caplog.text), caplog.text


def test_a_resume_with_another_amp_or_number_of_processes_is_refused_naming_the_flag(tmp_path):
    """--amp false on a resume of a bf16 run, or another torchrun --nproc_per_node (each rank's share of the cases
    and the global batch), resumed without a word: the run went on with other numerics or other batches."""
    processes = "torchrun --nproc_per_node"
    _settings_run(tmp_path, amp=True, **{processes: 2})
    with pytest.raises(ValueError, match=r"other training settings \(--amp True there, False here\): resume with "
                                         r"--amp True, or start a new run"):
        _settings_run(tmp_path, amp=False, **{processes: 2})
    with pytest.raises(ValueError, match=r"\(torchrun --nproc_per_node 2 there, 1 here\): resume with torchrun "
                                         r"--nproc_per_node 2, or"):
        _settings_run(tmp_path, amp=True, **{processes: 1})
    _settings_run(tmp_path, amp=True, **{processes: 2})  # the same: resumes


def test_a_resume_with_other_features_names_the_flag_and_value_before_comparing_the_weights(tmp_path):
    """A resume that forgot --features "[8,16,32,64]" was refused for 'a different network configuration' naming
    --features but not the value to pass; the recorded setting names it (and is checked before the weights)."""
    def run(features, width):
        net = torch.nn.Linear(2, width)
        engine = Engine(lambda e, b: None)
        ResumableCheckpoint(tmp_path, net, torch.optim.SGD(net.parameters(), lr=0.1), resume="auto",
                            settings={"features": features, "strategy": "gmd"}).attach(engine)
        engine.run(DATA, max_epochs=1)

    run([8, 16, 32, 64], 4)
    with pytest.raises(ValueError, match=r"\(--features \[8, 16, 32, 64\] there, \[16, 32, 64, 128, 256\] here\): "
                                         r"resume with --features \"\[8,16,32,64\]\", or"):
        run([16, 32, 64, 128, 256], 5)


def test_a_checkpoint_that_records_fewer_settings_resumes_with_a_warning_naming_them(tmp_path, caplog):
    """The checkpoint of a run under way when the package was upgraded records none of the new settings: they
    cannot be compared, and the resume says so instead of implying they were checked."""
    _settings_run(tmp_path, patch_size=[32, 32, 32])
    with caplog.at_level("WARNING", logger="app.engines.checkpoint"):
        _settings_run(tmp_path, patch_size=[32, 32, 32], amp=True, augmentation={"train#augmentation#0#prob": 0.5})
    assert any("records no --amp, the augmentation transforms (it was written by an earlier version): those are not "
               "compared" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_a_resume_without_deterministic_kernels_is_warned_about_not_refused(tmp_path, caplog):
    _settings_run(tmp_path, warn=["deterministic"], deterministic=True)
    with caplog.at_level("WARNING", logger="app.engines.checkpoint"):
        _settings_run(tmp_path, warn=["deterministic"], deterministic=False)
    assert any("other settings (--deterministic True there, False here): the resumed run continues the same "
               "experiment with the new value(s) (pass --deterministic True to keep the original)" in r.getMessage()
               for r in caplog.records)


def test_a_resume_with_other_augmentation_settings_is_refused_naming_the_override(tmp_path):
    """--train#augmentation#2#prob 0.1 (or a recipe's extra transform) on a resume trained on differently
    augmented samples than the run it continues, without a word."""
    from monai.transforms import OneOf, RandFlipd, RandGaussianNoised, RandScaleIntensityd, RandSpatialCropd

    def augmentation(prob=0.5, factors=0.1, extra=()):
        return [RandFlipd(keys="image", prob=0.5, spatial_axis=0), RandFlipd(keys="image", prob=prob, spatial_axis=1),
                RandScaleIntensityd(keys="image", factors=factors, prob=0.5), *extra]

    def run(**kwargs):
        _settings_run(tmp_path, augmentation=transform_settings(augmentation(**kwargs), "train#augmentation"))

    run()
    with pytest.raises(ValueError, match=r"\(--train#augmentation#1#prob 0.5 there, 0.1 here\): resume with "
                                         r"--train#augmentation#1#prob 0.5, or"):
        run(prob=0.1)
    with pytest.raises(ValueError, match=r"--train#augmentation#2#factors \[-0.1, 0.1\] there, \[-0.3, 0.3\] here"):
        run(factors=0.3)
    with pytest.raises(ValueError, match=r"--train#augmentation#3#_target_ \(none\) there, "
                                         r"'monai.transforms.intensity.dictionary.RandGaussianNoised' here"):
        run(extra=[RandGaussianNoised(keys="image", prob=0.1)])
    with pytest.raises(ValueError, match=r"here and \d+ more\): resume with --train#augmentation#0#_target_ "):
        _settings_run(tmp_path, augmentation=transform_settings(augmentation(), "recipe#augmentation"))
    # a transform setting that follows another setting (a crop's spatial_size is --patch_size) is named once
    run()  # the same transforms, built again: resumes
    # the transforms inside OneOf (or a nested Compose) too
    one_of = [OneOf([RandFlipd(keys="image", prob=0.5, spatial_axis=0)])]
    assert transform_settings(one_of, "aug")["aug#0#transforms#0#prob"] == 0.5
    _settings_run(tmp_path / "crop", patch_size=[32, 32, 32],
                  augmentation=transform_settings([RandSpatialCropd(keys="image", roi_size=[32, 32, 32])], "aug"))
    with pytest.raises(ValueError) as err:
        _settings_run(tmp_path / "crop", patch_size=[96, 96, 96],
                      augmentation=transform_settings([RandSpatialCropd(keys="image", roi_size=[96, 96, 96])], "aug"))
    assert "(--patch_size [32, 32, 32] there, [96, 96, 96] here): resume with --patch_size" in str(err.value)


def test_a_resume_on_cases_of_another_voxel_size_is_refused(tmp_path):
    """The same case ids at full resolution instead of 2 mm passed the split check; loading the checkpoint put the
    first run's training_spacing back, so the run trained on at 1 mm while the model said 2 mm."""
    from app.networks import DSUNet

    def run(spacing, data="/data/brats_2mm"):
        net = DSUNet(modalities=("flair", "t1"), out_channels=1, features=(2, 4))
        net.set_training_spacing(spacing)
        engine = Engine(lambda e, b: None)
        ResumableCheckpoint(tmp_path, net, torch.optim.SGD(net.parameters(), lr=0.1), resume="auto",
                            settings={"dataset_dir": data}, warn=["dataset_dir"]).attach(engine)
        engine.run(DATA, max_epochs=1)

    run([2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match=r"trained on cases of median voxel size \[2.0, 2.0, 2.0\] mm, this run's "
                                         r"training cases have \[1.0, 1.0, 1.0\] mm: resume with the data the run "
                                         r"trained on \(--dataset_dir /data/brats_2mm\)"):
        run([1.0, 1.0, 1.0], data="/data/brats_1mm")
    run([2.0, 2.0, 2.0], data="/scratch/brats_2mm")  # a moved copy of the same cases: resumes (with a warning)
    run(None)  # unknown (zeros) on one side: not compared


def test_a_stop_at_an_epochs_last_iteration_is_saved(tmp_path):
    """A time limit that stops the run exactly at an epoch end fires no EPOCH_COMPLETED: the
    checkpoint must still hold that iteration, or a resume repeats the epoch."""
    from ignite.engine import Events

    net = torch.nn.Linear(2, 1)
    engine = Engine(lambda e, b: None)
    engine.add_event_handler(Events.ITERATION_COMPLETED(once=6), lambda e: e.terminate())
    ResumableCheckpoint(tmp_path, net, torch.optim.SGD(net.parameters(), lr=0.1), resume=False).attach(engine)
    engine.run(DATA, max_epochs=5)
    assert engine.state.iteration == 6
    assert load_training_checkpoint(tmp_path / "checkpoint_last.pt")["iteration"] == 6


def _timed_run(folder, resume, minutes, clock, max_epochs=100):
    """A trainer whose every iteration takes 10 s of ``clock``; returns the iterations it ran."""
    from app.engines import TimeLimitHandler

    net = torch.nn.Linear(2, 1)
    seen = []

    def step(engine, batch):
        seen.append(engine.state.iteration)
        clock[0] += 10.0

    engine = Engine(step)
    limit = TimeLimitHandler(minutes)
    limit.attach(engine)
    ResumableCheckpoint(folder, net, torch.optim.SGD(net.parameters(), lr=0.1), resume=resume,
                        time_limit=limit).attach(engine)
    engine.run(DATA, max_epochs=max_epochs)
    return seen


def test_a_resumed_run_continues_its_time_budget(tmp_path, monkeypatch):
    """--time_limit_minutes is the budget of the whole run: a resume must not grant a new one."""
    import app.engines.handlers as handlers

    clock = [0.0]
    monkeypatch.setattr(handlers.time, "monotonic", lambda: clock[0])
    assert _timed_run(tmp_path, False, 1.0, clock) == [1, 2, 3, 4, 5, 6]  # 60 s: 6 iterations, then stopped
    assert load_training_checkpoint(tmp_path / "checkpoint_last.pt")["time_limit"]["elapsed_seconds"] == 60.0
    # the run had stopped on its limit: a resume (e.g. a requeued --resume auto job) trains no more
    assert _timed_run(tmp_path, "auto", 1.0, clock) == []
    assert load_training_checkpoint(tmp_path / "checkpoint_last.pt")["iteration"] == 6
    # a larger budget continues from what was spent: 90 s in all
    assert _timed_run(tmp_path, True, 1.5, clock) == [7, 8, 9]


def test_a_run_killed_mid_budget_trains_only_what_is_left(tmp_path, monkeypatch):
    import app.engines.handlers as handlers

    clock = [0.0]
    monkeypatch.setattr(handlers.time, "monotonic", lambda: clock[0])
    assert _timed_run(tmp_path, False, 1.0, clock, max_epochs=1) == [1, 2, 3]  # "killed" after 30 s (epoch end)
    clock[0] += 3600.0  # the time between the kill and the resume is not training
    assert _timed_run(tmp_path, True, 1.0, clock) == [4, 5, 6]


def test_a_resume_says_once_where_it_continues_and_the_time_trained_before_or_that_it_is_unknown(
        tmp_path, monkeypatch, caplog):
    """A resumed run said where it resumed in two lines (the checkpoint's and the progress handler's); one from before
    the time trained was recorded (brats_gmd before 0.5.0), without a time limit, said "0:00:00 trained before"."""
    import app.engines.handlers as handlers
    from app.engines import TimeLimitHandler, TrainingProgressHandler

    clock = [0.0]
    monkeypatch.setattr(handlers.time, "monotonic", lambda: clock[0])

    def run(resume):
        net = torch.nn.Linear(2, 1)
        engine = Engine(lambda e, b: clock.__setitem__(0, clock[0] + 10.0))
        limit = TimeLimitHandler(0)  # no budget: the clock still runs
        limit.attach(engine)
        ResumableCheckpoint(tmp_path, net, torch.optim.SGD(net.parameters(), lr=0.1), resume=resume,
                            time_limit=limit).attach(engine)
        TrainingProgressHandler(time_limit=limit).attach(engine)
        engine.run(DATA, max_epochs=2 if resume else 1)

    run(False)
    path = tmp_path / "checkpoint_last.pt"
    state = load_training_checkpoint(path)
    with caplog.at_level("INFO"):
        run(True)
    resumed = [r.getMessage() for r in caplog.records if "esumed" in r.getMessage()]
    assert resumed == [f"Resumed from {path} at iteration 3 (epoch 2, 0 of its 3 iterations done), with 0:00:30 "
                       "trained before."], resumed
    torch.save({k: v for k, v in state.items() if k != "time_limit"}, path)  # as brats_gmd 0.4.0 wrote it
    caplog.clear()
    with caplog.at_level("INFO"):
        run(True)
    resumed = [r.getMessage() for r in caplog.records if "esumed" in r.getMessage()]
    assert resumed == [f"Resumed from {path} at iteration 3 (epoch 2, 0 of its 3 iterations done), the time trained "
                       "before it unknown (the checkpoint was written by an earlier version)."], resumed


def test_the_bundles_keep_the_time_budget_in_their_checkpoints():
    from monai.bundle import ConfigParser

    from tests.bundles.helpers import REPO

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "brats_gmd" / "configs" / "train.yaml"))
    handlers = parser.get("train#handlers")
    checkpoint = next(h for h in handlers if h.get("_target_", "").endswith("ResumableCheckpoint"))
    assert handlers[int(checkpoint["time_limit"].split("#")[-1])]["_target_"].endswith("TimeLimitHandler")
    for files in (["train.yaml"], ["train.yaml", "multi_gpu_train.yaml"]):
        parser = ConfigParser()
        parser.read_config([str(REPO / "bundles" / "mosi_gmd" / "configs" / f) for f in files])
        handlers = parser.get("train#handlers")
        checkpoint = next(h for h in handlers if h.get("_target_", "").endswith("ResumableCheckpoint"))
        assert handlers[int(checkpoint["time_limit"].split("#")[-1])]["_target_"].endswith("TimeLimitHandler")


def test_a_resume_with_another_strategy_is_refused(tmp_path):
    """The strategy's state loads into another strategy without complaint: the run would silently mix
    two methods (e.g. plain epochs, then GMD epochs) under the second one's name."""
    from app.strategies import build_strategy

    def run(name, **settings):
        net = torch.nn.Linear(2, 1)
        engine = Engine(lambda e, b: None)
        ResumableCheckpoint(tmp_path, net, torch.optim.SGD(net.parameters(), lr=0.1), resume="auto",
                            strategy=build_strategy(name, **settings)).attach(engine)
        engine.run(DATA, max_epochs=1)
        return engine.state.iteration

    assert run("plain") == 3
    assert load_training_checkpoint(tmp_path / "checkpoint_last.pt")["strategy_config"] == "PlainStrategy(seed=0)"
    with pytest.raises(ValueError, match=r"written by a run training with PlainStrategy\(seed=0\), this run trains with "
                                         r"GMDStrategy\(subsets=5.*resume with the original --strategy"):
        run("gmd", subsets=5)
    assert run("plain") == 3  # the same strategy resumes (a finished run: nothing to do)
    # the same strategy with other settings: the flags (and values) that restore them
    with pytest.raises(ValueError, match=r"this run trains with PlainStrategy\(seed=1\): resume with --seed 0, or"):
        run("plain", seed=1)


def test_a_resume_with_other_gmd_or_cggm_settings_names_the_flags_that_restore_them(tmp_path):
    """--gmd_subsets 2 on a resume of a --gmd_subsets 3 run was refused with 'resume with the original --strategy and
    its settings (--gmd_subsets, --seed, the cggm_* and predict knobs)': the values were in the repr, not the fix."""
    from app.strategies import build_strategy

    for name, first, second, fix in (
            ("gmd", {"subsets": 3}, {"subsets": 2}, "--gmd_subsets 3"),
            ("cggm", {"rho": 1.2}, {"rho": 1.5, "b_clip": 2.0}, "--cggm_rho 1.2 --cggm_b_clip None")):
        folder = tmp_path / name
        _train_one_epoch(folder, build_strategy(name, **first))
        with pytest.raises(ValueError, match=rf": resume with {fix}, or start a new run"):
            _train_one_epoch(folder, build_strategy(name, **second))


def test_a_resume_names_the_flag_that_reaches_a_strategy_option_a_recipe_sets(tmp_path, monkeypatch):
    """A recipe that sets a built-in strategy's option itself (strategy_def#subsets: 2) cuts it off from
    --gmd_subsets: the refusal named --gmd_subsets 3, which the bundle then refused as a flag the run would ignore."""
    import os
    import sys

    import monai

    from app.bundle_args import check_overrides
    from app.strategies import build_strategy

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("strategy: gmd\nstrategy_def#subsets: 2\n")
    command = [os.path.join(os.path.dirname(monai.__file__), "bundle", "__main__.py"), "run", "--config_file",
               f"['{REPO / 'bundles/brats_gmd/configs/train.yaml'}','{recipe}']"]
    folder = tmp_path / "run"
    _train_one_epoch(folder, build_strategy("gmd", subsets=3))
    monkeypatch.setattr(sys, "argv", command)
    with pytest.raises(ValueError, match=r": resume with --strategy_def#subsets 3, or start a new run") as refused:
        _train_one_epoch(folder, build_strategy("gmd", subsets=2))
    fix = str(refused.value).split("resume with ")[1].split(",")[0].split()
    check_overrides(command + fix)  # the bundle takes the flag named
    with pytest.raises(ValueError, match=r"--gmd_subsets would be ignored"):
        check_overrides(command + ["--gmd_subsets", "3"])
    # without the recipe, train.yaml's wiring: the bundle setting
    monkeypatch.setattr(sys, "argv", command[:3] + [str(REPO / "bundles/brats_gmd/configs/train.yaml")])
    with pytest.raises(ValueError, match=r": resume with --gmd_subsets 3, or start a new run"):
        _train_one_epoch(folder, build_strategy("gmd", subsets=2))
    # a recipe gone since the run started: still the refusal with its fix, not the recipe's error
    monkeypatch.setattr(sys, "argv", command[:3] + [f"['{REPO / 'bundles/brats_gmd/configs/train.yaml'}','{recipe}']"])
    recipe.unlink()
    with pytest.raises(ValueError, match=r": resume with --gmd_subsets 3, or start a new run"):
        _train_one_epoch(folder, build_strategy("gmd", subsets=2))


def _train_one_epoch(folder, strategy) -> None:
    """One (empty) epoch of a resumable run in ``folder`` with ``strategy``: it records the strategy's settings."""
    net = torch.nn.Linear(2, 1)
    engine = Engine(lambda e, b: None)
    ResumableCheckpoint(folder, net, torch.optim.SGD(net.parameters(), lr=0.1), resume="auto",
                        strategy=strategy).attach(engine)
    engine.run(DATA, max_epochs=1)


def test_a_resume_checks_the_settings_of_a_strategy_of_ones_own(tmp_path):
    """A strategy written outside the package (given as strategy_def's _target_) recorded only its seed,
    so a resume with another setting of its own mixed two methods without a word. The refusal then named
    --aux_weight 0.5 as the fix, a flag the bundles refuse as a setting they lack: only strategy_def#aux_weight
    reaches the option, while the seed, wired to the bundle's --seed as the built-in strategies' is, keeps it."""
    from app.strategies import GradientStrategy

    class WeightedPlain(GradientStrategy):
        def __init__(self, seed: int = 0, aux_weight: float = 0.5, diagnostics_interval: int = 0) -> None:
            super().__init__(seed)
            self.aux_weight = aux_weight
            self.diagnostics_interval = diagnostics_interval

    def run(**settings):
        _train_one_epoch(tmp_path, WeightedPlain(**settings))

    run(aux_weight=0.5)
    assert load_training_checkpoint(tmp_path / "checkpoint_last.pt")["strategy_config"] == \
        "WeightedPlain(seed=0, aux_weight=0.5)"
    with pytest.raises(ValueError, match=r"WeightedPlain\(seed=0, aux_weight=0.5\), this run trains with "
                                         r"WeightedPlain\(seed=1, aux_weight=0.25\): resume with --seed 0 "
                                         r"--strategy_def#aux_weight 0.5, or start a new run"):
        run(seed=1, aux_weight=0.25)
    run(aux_weight=0.5, diagnostics_interval=10)  # what is recorded may change


def test_a_resume_checks_the_settings_of_a_variant_of_a_builtin_strategy(tmp_path):
    """A small variant of GMD (a subclass with a knob of its own) recorded GMD's settings only."""
    from app.strategies import GMDStrategy

    class ScaledGMD(GMDStrategy):
        def __init__(self, alpha: float = 1.0, **kwargs) -> None:
            super().__init__(**kwargs)
            self.alpha = alpha

    def run(**settings):
        _train_one_epoch(tmp_path, ScaledGMD(**settings))

    run(alpha=0.5, subsets=3)
    assert load_training_checkpoint(tmp_path / "checkpoint_last.pt")["strategy_config"] == \
        "ScaledGMD(alpha=0.5, subsets=3, seed=0, sync='local')"
    with pytest.raises(ValueError, match=r"ScaledGMD\(alpha=0.5, .*\), this run trains with ScaledGMD\(alpha=2.0, "):
        run(alpha=2.0, subsets=3)
    run(alpha=0.5, subsets=3, vjp_chunk=4, diagnostics_interval=5)  # batching and records may change


def _scheduled_run(folder, resume, minutes, clock, limit_class):
    """``_timed_run`` with an epoch-level LR schedule before the time limit, as in train.yaml.

    Returns (iterations run, scheduler epochs stepped at the end)."""
    from monai.handlers import LrScheduleHandler

    net = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    seen = []

    def step(engine, batch):
        seen.append(engine.state.iteration)
        optimizer.step()  # (no gradients: the weights stay) the scheduler then steps after it, as in training
        clock[0] += 10.0

    engine = Engine(step)
    LrScheduleHandler(scheduler, print_lr=False).attach(engine)
    limit = limit_class(minutes)
    limit.attach(engine)
    ResumableCheckpoint(folder, net, optimizer, lr_scheduler=scheduler, resume=resume, time_limit=limit).attach(engine)
    engine.run(DATA, max_epochs=10)
    return seen, scheduler.last_epoch


@pytest.mark.parametrize("limit_name", ["TimeLimitHandler", "DistributedTimeLimitHandler"])
def test_a_time_limit_at_an_epoch_end_keeps_the_schedule_of_an_uninterrupted_run(tmp_path, monkeypatch, limit_name):
    """A budget spent at an epoch's last iteration must let the epoch-end handlers run: the checkpoint
    counts the epoch as done, so a resume with a larger budget would otherwise train one LR step behind."""
    import app.engines as engines
    import app.engines.handlers as handlers

    limit_class = getattr(engines, limit_name)
    clock = [0.0]
    monkeypatch.setattr(handlers.time, "monotonic", lambda: clock[0])
    assert _scheduled_run(tmp_path / "whole", False, 1.5, clock, limit_class) == ([1, 2, 3, 4, 5, 6, 7, 8, 9], 3)
    # stops at epoch 2's end
    assert _scheduled_run(tmp_path / "split", False, 1.0, clock, limit_class) == ([1, 2, 3, 4, 5, 6], 2)
    assert load_training_checkpoint(tmp_path / "split" / "checkpoint_last.pt")["lr_scheduler"]["last_epoch"] == 2
    assert _scheduled_run(tmp_path / "split", True, 1.5, clock, limit_class) == ([7, 8, 9], 3)


def test_the_sampler_resumes_at_the_sample_after_the_last_batch_in_the_pass_it_was_in():
    """6 samples, batches of 2 (3 per pass): each pass has its own order; a resume after 4 batches
    continues pass 1 at its third sample (batch 2 of the pass), then pass 2 as an uninterrupted run."""
    from app.engines import ResumableSampler

    fresh = ResumableSampler(range(6), shuffle=True, seed=3, num_replicas=1, rank=0)
    passes = [list(fresh) for _ in range(3)]
    assert all(sorted(i for i, _ in p) == list(range(6)) for p in passes)
    assert passes[0] != passes[1]  # a new order (and new augmentation seeds) in each pass
    resumed = ResumableSampler(range(6), shuffle=True, seed=3, num_replicas=1, rank=0)
    resumed.resume(batches_done=4, batches_per_pass=3, batch_size=2)
    assert list(resumed) == passes[1][2:]
    assert list(resumed) == passes[2]


def test_a_resume_keeps_the_validators_best_score(tmp_path):
    """Otherwise the first validation after a resume would replace a better models/model.pt."""
    from types import SimpleNamespace

    def run(validator, resume):
        net = torch.nn.Linear(2, 1)
        engine = Engine(lambda e, b: None)
        ResumableCheckpoint(tmp_path, net, torch.optim.SGD(net.parameters(), lr=0.1), validator=validator,
                            resume=resume).attach(engine)
        engine.run(DATA, max_epochs=2 if resume else 1)

    run(SimpleNamespace(state=SimpleNamespace(best_metric=0.8, best_metric_epoch=1)), resume=False)
    resumed = SimpleNamespace(state=SimpleNamespace(best_metric=-1.0, best_metric_epoch=-1))
    run(resumed, resume=True)
    assert (resumed.state.best_metric, resumed.state.best_metric_epoch) == (0.8, 1)


def _bundle_model_savers():
    """The bundles' handlers that write models/model.pt and model_final.pt, as their configs name them."""
    from monai.bundle import ConfigParser

    from tests.bundles.helpers import REPO

    for bundle in ("brats_gmd", "mosi_gmd"):
        parser = ConfigParser()
        parser.read_config(str(REPO / "bundles" / bundle / "configs" / "train.yaml"))
        for section in ("train#handlers", "validate#handlers"):
            for entry in parser.get(section):
                if "key_metric_filename" in entry or "final_filename" in entry:
                    yield pytest.param(entry, id=f"{bundle}-{entry.get('key_metric_filename') or entry['final_filename']}")


@pytest.mark.parametrize("entry", list(_bundle_model_savers()))
def test_a_run_killed_while_saving_a_model_keeps_the_earlier_file(entry, tmp_path, monkeypatch):
    """A kill while model.pt (a better model) or model_final.pt is written leaves the earlier file
    whole: MONAI's saver removed the old model.pt and wrote the new one in place, so a kill in
    between left no model, or a truncated one that no evaluation can read."""
    from ignite.engine import Events
    from monai.bundle.config_item import ConfigComponent

    net = torch.nn.Linear(1, 1)
    name = entry.get("key_metric_filename") or entry["final_filename"]
    real_save, saves = torch.save, []

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        saves.append(1)
        if len(saves) > 1:  # killed while writing the second model: only part of it reached the file
            if hasattr(f, "truncate"):
                f.truncate(100)
            else:
                with open(f, "r+b") as g:
                    g.truncate(100)
            raise KeyboardInterrupt  # SIGTERM/Ctrl-C unwinds like this; SIGKILL stops at the same point

    def run(epochs: int) -> None:
        """Epoch e trains weight e and scores e / 10: each validation finds a better model."""
        config = {**entry, "save_dir": str(tmp_path), "save_dict": {"model": net}}
        if "key_metric_filename" in entry:
            config["key_metric_name"] = "score"
        saver = ConfigComponent(config=config).instantiate()
        engine = Engine(lambda e, b: None)

        @engine.on(Events.EPOCH_STARTED)
        def train(e):
            torch.nn.init.constant_(net.weight, float(e.state.epoch))
            e.state.metrics = {"score": e.state.epoch / 10}

        saver.attach(engine)
        engine.run(DATA, max_epochs=epochs)

    monkeypatch.setattr(torch, "save", save)
    if "key_metric_filename" in entry:
        with pytest.raises(KeyboardInterrupt):
            run(epochs=2)  # model.pt of epoch 1, then a better one killed mid-write
    else:
        run(epochs=1)  # an earlier run's model_final.pt
        with pytest.raises(KeyboardInterrupt):
            run(epochs=2)
    monkeypatch.undo()
    assert torch.load(tmp_path / name, weights_only=True)["weight"].item() == 1.0  # one model: its state dict
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_checkpoint_without_its_optimizer_class_resumes_under_an_added_schedule(tmp_path):
    """A checkpoint written before the optimizer class was recorded is told apart by its hyperparameters'
    names; ``initial_lr``, which a learning-rate scheduler adds to them, names no other optimizer."""
    def run(scheduled, resume="auto"):
        net = torch.nn.Linear(2, 1)
        optimizer = torch.optim.AdamW(net.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2) if scheduled else None
        engine = Engine(lambda e, b: optimizer.step())
        if scheduled:
            engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: scheduler.step())
        ResumableCheckpoint(tmp_path, net, optimizer, lr_scheduler=scheduler, resume=resume).attach(engine)
        engine.run(DATA, max_epochs=2)
        return optimizer

    run(False, resume="false")
    path = tmp_path / "checkpoint_last.pt"
    state = torch.load(path, weights_only=False)
    del state["optimizer_class"]
    torch.save(state, path)
    assert isinstance(run(True), torch.optim.AdamW)


def test_a_resume_with_other_milestones_is_refused(tmp_path):
    """MultiStepLR keeps its milestones as a Counter, not a list: a resume with other --lr_scheduler#milestones
    continued the saved ones without a word."""
    def run(milestones, resume="auto"):
        net = torch.nn.Linear(2, 1)
        optimizer = torch.optim.AdamW(net.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.5)
        engine = Engine(lambda e, b: optimizer.step())
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: scheduler.step())
        ResumableCheckpoint(tmp_path, net, optimizer, lr_scheduler=scheduler, resume=resume).attach(engine)
        engine.run(DATA, max_epochs=2)
        return scheduler

    run([1, 5], resume="false")
    with pytest.raises(ValueError, match=r"other learning-rate scheduler settings \(milestones \[1, 5\] there, \[1, 3\] "
                                         r"here\).*\(--lr_scheduler#milestones \"\[1,5\]\"\)"):
        run([1, 3])
    assert run([5, 1]).milestones == {1: 1, 5: 1}  # the same milestones in another order resume


def _train_with_loss(folder, loss) -> int:
    """One epoch of a resumable run in ``folder`` whose trainer trains with ``loss``; returns its last iteration."""
    net = torch.nn.Linear(2, 1)
    engine = Engine(lambda e, b: loss(torch.zeros(1, 3, 2, 2, 2), torch.zeros(1, 3, 2, 2, 2)))
    ResumableCheckpoint(folder, net, torch.optim.SGD(net.parameters(), lr=0.1), resume="auto").attach(engine)
    engine.loss_function = loss  # as SupervisedTrainer sets it: after attaching its handlers
    engine.run(DATA, max_epochs=1)
    return engine.state.iteration


def test_a_resume_with_another_loss_is_refused(tmp_path, caplog):
    """The loss was not recorded: a resume with --loss#lambda_ce 0.5, MONAI's DiceCELoss instead of the bundle's, or
    a checkpoint trained with the loss before the per-region cross-entropy, continued the weights under another
    objective without a word."""
    from monai.losses import DiceCELoss as MonaiDiceCELoss

    from app.losses import DiceCELoss

    assert _train_with_loss(tmp_path, DiceCELoss(sigmoid=True, smooth_nr=0.0)) == 3
    recorded = load_training_checkpoint(tmp_path / "checkpoint_last.pt")["loss_config"]
    assert recorded["_target_"] == "app.losses.DiceCELoss" and recorded["lambda_ce"] == 1.0
    assert recorded["dice.smooth_nr"] == 0.0
    with pytest.raises(ValueError, match=r"another loss \(lambda_ce 1\.0 there, 0\.5 here\).*original loss settings "
                                         r"\(--loss#lambda_ce 1\.0\).*new run in another --output_dir"):
        _train_with_loss(tmp_path, DiceCELoss(sigmoid=True, smooth_nr=0.0, lambda_ce=0.5))
    with pytest.raises(ValueError, match=r"_target_ 'app\.losses\.DiceCELoss' there, 'monai\.losses\.dice\.DiceCELoss'"):
        _train_with_loss(tmp_path, MonaiDiceCELoss(sigmoid=True, smooth_nr=0.0))
    with pytest.raises(ValueError, match=r"dice\.smooth_nr 0\.0 there, 1e-05 here"):
        _train_with_loss(tmp_path, DiceCELoss(sigmoid=True))
    # the same loss resumes; so does a scalar weight, which MONAI's Dice expands to one per class on its first call
    assert _train_with_loss(tmp_path, DiceCELoss(sigmoid=True, smooth_nr=0.0)) == 3
    assert _train_with_loss(tmp_path / "weighted", DiceCELoss(sigmoid=True, weight=torch.tensor(2.0))) == 3
    assert _train_with_loss(tmp_path / "weighted", DiceCELoss(sigmoid=True, weight=torch.tensor(2.0))) == 3


def test_a_switch_an_earlier_version_took_as_text_is_compared_as_the_loss_read_it(tmp_path):
    """--loss#include_background false reached the loss as the string "false", which it read as true, and the
    checkpoint recorded the string: the same command, whose "false" now means false, trains another objective, and
    --loss#include_background true (the one it trained with) was refused too, so the run could not be resumed."""
    from app.losses import DiceCELoss

    _train_with_loss(tmp_path, DiceCELoss(sigmoid=True))
    path = tmp_path / "checkpoint_last.pt"
    state = load_training_checkpoint(path)
    state["loss_config"]["dice.include_background"] = "false"  # as an earlier version recorded it
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"another loss \(dice\.include_background 'false' \(read as True\) there, "
                                         r"False here\).*original loss settings \(--loss#include_background true\)"):
        _train_with_loss(tmp_path, DiceCELoss(sigmoid=True, include_background="false"))
    assert _train_with_loss(tmp_path, DiceCELoss(sigmoid=True, include_background="true")) == 3


def test_a_checkpoint_that_records_no_loss_resumes_with_a_warning_naming_the_old_loss(tmp_path, caplog):
    """A checkpoint written before the loss was recorded (brats_gmd before 0.6.0 trained with MONAI's softmax
    cross-entropy) cannot be checked: the resume says which loss it continues with and how to keep one objective."""
    from app.losses import DiceCELoss

    _train_with_loss(tmp_path, DiceCELoss(sigmoid=True))
    path = tmp_path / "checkpoint_last.pt"
    state = load_training_checkpoint(path)
    del state["loss_config"]
    torch.save(state, path)
    with caplog.at_level("WARNING", logger="app.engines.checkpoint"):
        assert _train_with_loss(tmp_path, DiceCELoss(sigmoid=True)) == 3
    assert "records no training loss" in caplog.text and "app.losses.DiceCELoss" in caplog.text
    assert "--loss#_target_ monai.losses.DiceCELoss" in caplog.text
    # resumed with that loss (--loss#_target_ monai.losses.DiceCELoss): the warning told the user to pass it anyway
    from monai.losses import DiceCELoss as MonaiDiceCELoss

    torch.save(state, path)
    caplog.clear()
    with caplog.at_level("WARNING", logger="app.engines.checkpoint"):
        assert _train_with_loss(tmp_path, MonaiDiceCELoss(sigmoid=True)) == 3
    assert (f"{path} records no training loss (it was written by an earlier version): the resumed run trains with "
            "monai.losses.dice.DiceCELoss, the loss of brats_gmd checkpoints from before bundle version 0.6.0 (a softmax "
            "cross-entropy over the region channels); if this one was trained with another, start a new run in another "
            "--output_dir to train with one loss throughout.") in caplog.text, caplog.text
    assert "--loss#_target_" not in caplog.text


def test_a_resume_with_a_sentiment_head_of_another_task_is_refused_even_when_its_shapes_fit(tmp_path):
    """A regression run with confidence fusion resumed as a 2-class run with mean fusion: the head has 2 rows either
    way, so the resume went on training the regression weights as class logits without a word."""
    from app.networks import DSTransformer

    def run(**head):
        net = DSTransformer(in_features=(6, 5, 4), encoder_layers=0, **head)
        engine = Engine(lambda e, b: None)
        ResumableCheckpoint(tmp_path, net, torch.optim.SGD(net.parameters(), lr=0.1), resume="auto").attach(engine)
        engine.run(DATA, max_epochs=2)
        return engine.state.iteration

    run(task="regression", out_channels=1, fusion="confidence")
    with pytest.raises(ValueError, match=r"checkpoint_last\.pt was trained for regression \(confidence fusion\), but "
                                         r"classification into 2 classes \(mean fusion\) is configured"):
        run(task="classification", out_channels=2, fusion="mean")


def test_a_checkpoint_that_records_no_strategy_settings_or_time_resumes_with_a_warning_naming_them(tmp_path, caplog):
    """Checkpoints of brats_gmd before 0.5.0 record neither the strategy, nor the sample settings, nor the time
    trained: a resume with --strategy plain on GMD weights, another --patch_size or a time budget continued under
    the new values without a word, while a newer checkpoint refuses the mismatch."""
    from app.engines import TimeLimitHandler
    from app.strategies import build_strategy

    def run(strategy, minutes=None, **settings):
        net = torch.nn.Linear(2, 1)
        engine = Engine(lambda e, b: None)
        ResumableCheckpoint(tmp_path, net, torch.optim.SGD(net.parameters(), lr=0.1), resume="auto",
                            strategy=build_strategy(strategy), settings=settings,
                            time_limit=TimeLimitHandler(minutes)).attach(engine)
        engine.run(DATA, max_epochs=1)

    run("gmd", patch_size=[32, 32, 32])
    path = tmp_path / "checkpoint_last.pt"
    state = load_training_checkpoint(path)
    torch.save({k: v for k, v in state.items() if k not in ("strategy_config", "settings", "time_limit")},
               path)  # as brats_gmd 0.3.0 wrote it
    with caplog.at_level("WARNING", logger="app.engines.checkpoint"):
        # a transform list is named, not written out (the bundle's are hundreds of entries); torchrun's flag as it is
        run("plain", minutes=5, patch_size=[96, 96, 96], augmentation={"train#augmentation#0#prob": 0.5},
            **{"torchrun --nproc_per_node": 1})
    assert (f"{path} records no strategy (PlainStrategy(seed=0)); no training settings (--patch_size \"[96,96,96]\" "
            "torchrun --nproc_per_node 1; the augmentation transforms); no time trained (the 5-minute budget counts "
            "from this resume) (it was written by an earlier version)") in caplog.text, caplog.text
    assert caplog.text.count("records no") == 1, caplog.text  # one warning, not one per kind of record
    caplog.clear()
    torch.save(state, path)
    run("gmd", minutes=5, patch_size=[32, 32, 32])  # a checkpoint that records them all: nothing to say
    assert "records no" not in caplog.text


def test_check_refuses_a_resume_before_the_run_starts(tmp_path):
    """The bundles call ``check`` before they write the split: a refused resume stops there (the run's files are
    left as they were), one that fits passes, and without ``resume`` nothing is read."""
    def handler(resume, amp):
        net = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=1)
        engine = Engine(lambda e, b: None)
        engine.state.max_epochs = 1  # as MONAI's trainers set it when they are built
        saver = ResumableCheckpoint(tmp_path, net, optimizer, lr_scheduler=scheduler, resume=resume,
                                    settings={"amp": amp})
        saver.attach(engine)
        return saver, engine

    saver, engine = handler(False, True)
    saver.check(engine)  # no checkpoint read
    engine.run(DATA, max_epochs=1)
    written = (tmp_path / "checkpoint_last.pt").read_bytes()
    saver, engine = handler(True, False)
    with pytest.raises(ValueError, match=r"other training settings \(--amp True there, False here\)"):
        saver.check(engine)
    assert engine.state.iteration == 0 and (tmp_path / "checkpoint_last.pt").read_bytes() == written
    saver, engine = handler(True, True)
    engine.state.max_epochs = 2
    with pytest.raises(ValueError, match="resume with --max_epochs 1"):
        saver.check(engine)
    saver, engine = handler(True, True)
    saver.check(engine)


def test_a_resume_reads_its_checkpoint_once_for_the_check_and_the_restore(tmp_path, monkeypatch):
    """checkpoint_last.pt was read (every byte checked, then unpickled) by the early check and again by the restore;
    a file changed in between is read again."""
    import os

    _train(tmp_path, False, max_epochs=1)
    reads = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(a[0]) or load(*a, **k))

    def resume(change=False):
        net = torch.nn.Linear(2, 1)
        engine = Engine(lambda e, b: None)
        saver = ResumableCheckpoint(tmp_path, net, torch.optim.SGD(net.parameters(), lr=0.1), resume=True)
        saver.attach(engine)
        saver.check(engine)
        if change:  # rewritten by another process between the check and the start, in the same second
            path = tmp_path / "checkpoint_last.pt"
            stat = path.stat()
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
        engine.run(DATA, max_epochs=1)
        return engine.state.iteration

    assert resume() == 3 and len(reads) == 1, reads
    reads.clear()
    assert resume(change=True) == 3 and len(reads) == 2, reads


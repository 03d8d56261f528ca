"""Workflow helpers of the bundle configs."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from monai.inferers import SimpleInferer

from app.engines import ProgressBarHandler, SubsetEvaluator, SubsetTrainer, report_input_errors, set_cudnn
from app.networks import DSUNet
from app.strategies import build_strategy
from tests.bundles.helpers import REPO


@pytest.fixture
def restore_cudnn():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@pytest.mark.parametrize("value, deterministic", [(True, True), ("false", False), ("1", True), (False, False)])
def test_set_cudnn_switches_between_deterministic_and_autotuned(restore_cudnn, value, deterministic):
    set_cudnn(value)
    assert torch.backends.cudnn.deterministic is deterministic
    assert torch.backends.cudnn.benchmark is (not deterministic)


def test_set_cudnn_names_the_fix_for_a_bad_value(restore_cudnn):
    with pytest.raises(ValueError, match="--deterministic false"):
        set_cudnn("fast")


def test_boolean_knobs_read_the_command_line_strings():
    """``monai.bundle run --amp false`` passes the string "false": it must switch bf16 off, not on."""
    net = DSUNet(features=[2, 4])
    common = {"device": torch.device("cpu"), "network": net}
    trainer = SubsetTrainer(max_epochs=1, train_data_loader=[], optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                            loss_function=torch.nn.L1Loss(), strategy=build_strategy("plain"), amp="false", **common)
    evaluator = SubsetEvaluator(val_data_loader=[], inferer=SimpleInferer(), amp="false", **common)
    assert trainer.use_amp is False and evaluator.use_amp is False
    assert SubsetEvaluator(val_data_loader=[], inferer=SimpleInferer(), amp="true", **common).use_amp is True
    assert ProgressBarHandler(enabled="false").enabled is False
    with pytest.raises(ValueError, match="--amp must be true or false"):
        SubsetEvaluator(val_data_loader=[], inferer=SimpleInferer(), amp="yes", **common)
    with pytest.raises(ValueError, match="--progress_bar must be true or false"):
        ProgressBarHandler(enabled="no")



def test_check_spacing_warns_on_another_resolution(tmp_path, caplog):
    from app.data.discovery import discover_cases
    from app.data.phantoms import write_phantoms
    from app.engines.utils import check_spacing
    from app.networks import DSUNet

    write_phantoms(tmp_path, cases=2, size=16, seed=0)  # 1 mm
    records = discover_cases(tmp_path, require_label=True)
    net = DSUNet(features=[4, 8])
    assert check_spacing(net, records) is None  # the network did not record its spacing
    net.set_training_spacing([1.05, 0.95, 1.0])
    assert check_spacing(net, records) is None  # within 10%
    net.set_training_spacing([2.0, 2.0, 2.0])
    with caplog.at_level("WARNING"):
        message = check_spacing(net, records)
    assert message and "[1.0, 1.0, 1.0] mm" in message and "trained at [2.0, 2.0, 2.0] mm" in message
    assert message in caplog.text


def test_check_spacing_names_the_cases_of_another_resolution_among_many_at_the_training_one(tmp_path, caplog):
    """A test folder gathered from several sites: most cases at the training resolution, one at another.
    The cases' median matches the training spacing, but that case is still scored at a scale the network
    never saw, and the warning names it."""
    import nibabel as nib

    from app.data.discovery import discover_cases
    from app.data.phantoms import write_phantoms
    from app.engines.utils import check_spacing
    from app.networks import DSUNet

    write_phantoms(tmp_path, cases=3, size=16, seed=0)  # 1 mm
    records = discover_cases(tmp_path, require_label=True)
    odd = records[1]
    for path in [*odd["images"].values(), odd["label"]]:  # the same volumes stored at 2 mm by another site
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([2.0, 2.0, 2.0, 1.0])), path)
    net = DSUNet(features=[4, 8])
    net.set_training_spacing([1.0, 1.0, 1.0])
    with caplog.at_level("WARNING"):
        message = check_spacing(net, records)
    assert message and message in caplog.text
    assert message.startswith("1 of the 3 cases scored here")
    assert f"{odd['case']} at [2.0, 2.0, 2.0] mm" in message and "trained at [1.0, 1.0, 1.0] mm" in message
    assert not any(f"{r['case']} at" in message for r in records if r is not odd)


def _raised(fn):
    try:
        fn()
    except BaseException as err:  # noqa: BLE001
        return err
    raise AssertionError("expected an exception")


def _wrapped(err: BaseException) -> BaseException:
    """``err`` as MONAI's config evaluation re-raises it (a RuntimeError raised in MONAI's code)."""
    import monai.bundle.config_item as config_item

    namespace: dict = {}
    exec(compile("def evaluate(err):\n    try:\n        raise err\n    except BaseException as inner:\n"
                 "        raise RuntimeError('Failed to evaluate ConfigExpression') from inner\n",
                 config_item.__file__, "exec"), namespace)
    return _raised(lambda: namespace["evaluate"](err))


def test_report_input_errors_keeps_tracebacks_out_of_the_log_for_input_errors_only(monkeypatch):
    import io
    import logging

    from app.engines.utils import check_patch_size

    monkeypatch.setattr("sys.excepthook", lambda *exc: None)
    monkeypatch.delenv("APP_TRACEBACK", raising=False)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger().addHandler(handler)
    log = logging.getLogger("test_report_input_errors")
    try:
        report_input_errors()
        report_input_errors()  # one filter per handler, however often it is called
        assert len(handler.filters) == 1
        for error in (_raised(lambda: check_patch_size([30, 32, 32], DSUNet(features=(8, 16, 32, 64)))),
                      _raised(lambda: int("x"))):
            try:
                raise error
            except ValueError as err:
                log.exception(f"Exception: {err}")  # as MONAI's StatsHandler logs what ends an engine run
        ours, bug = stream.getvalue().split("Exception: ")[1:]
        assert ours.startswith("patch_size") and ours.count("\n") == 1  # the message, no traceback
        assert "Traceback" in bug and "int(\"x\")" in bug  # a bug keeps its traceback
        monkeypatch.setenv("APP_TRACEBACK", "1")
        try:
            raise _raised(lambda: check_patch_size([30, 32, 32], DSUNet(features=(8, 16, 32, 64))))
        except ValueError as err:
            log.exception(f"Exception: {err}")
        assert stream.getvalue().split("Exception: ")[-1].count("Traceback") == 1
    finally:
        logging.getLogger().removeHandler(handler)


def test_an_error_that_ends_a_training_is_said_once_by_its_error_line(monkeypatch, capsys, caplog):
    """A diverged training logged its message four times (ignite's 'Current run is terminating due to exception'
    and 'Engine run is terminating due to exception', each followed by the StatsHandler's 'Exception: ...')
    before the one error: line; a bug still gets ignite's records and its traceback."""
    import io
    import logging
    import sys

    from monai.handlers import StatsHandler

    class _Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(1.0))

        def per_modality(self, x, mask):
            return self.w * x.unsqueeze(2)

        def fuse(self, per_modality, mask, check=True):
            return per_modality.mean(1)

    def run(loss_function):
        net = _Net()
        batch = {"image": torch.ones(1, 2, 1), "label": torch.zeros(1, 1, 1),
                 "modality_mask": torch.ones(1, 2, dtype=torch.bool)}
        trainer = SubsetTrainer(max_epochs=1, train_data_loader=[batch] * 2, network=net, device=torch.device("cpu"),
                                optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=loss_function,
                                strategy=build_strategy("plain"), train_handlers=[StatsHandler(name=None)])
        stream.seek(0), stream.truncate()
        with pytest.raises(BaseException) as err:
            trainer.run()
        sys.excepthook(err.type, err.value, err.tb)
        return stream.getvalue(), capsys.readouterr().err

    seen = []
    monkeypatch.setattr("sys.excepthook", lambda *exc: seen.append(exc[1]))
    monkeypatch.delenv("APP_TRACEBACK", raising=False)
    caplog.set_level(logging.INFO)  # what StatsHandler(name=None) sets the root logger to; put back after the test
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger().addHandler(handler)
    engine_log = logging.getLogger("ignite.engine.engine.SubsetTrainer")
    level = engine_log.level
    engine_log.setLevel(logging.INFO)
    try:
        report_input_errors()
        log, err = run(lambda p, t: (p - t).sum() * float("nan"))
        assert "not finite" not in log and "Exception" not in log and "Traceback" not in log, log
        assert err.startswith("error: The training loss is not finite") and err.count("\n") == 1
        assert not seen  # printed by the product's hook, not handed on
        # Ctrl-C in an evaluation (no StopOnSignal there): one line, not the engine's traceback and Python's

        def interrupted(p, t):
            raise KeyboardInterrupt

        log, err = run(interrupted)
        assert "KeyboardInterrupt" not in log and "Traceback" not in log and "Exception" not in log, log
        assert err.startswith("error: stopped by SIGINT (Ctrl-C)") and err.count("\n") == 1, err
        assert not seen
        # a bug is no input error: the engine's records and the traceback stay, and the previous hook shows it
        log, err = run(lambda p, t: int("x"))
        assert log.count("terminating due to exception: invalid literal") == 2 and "Traceback" in log and err == ""
        assert isinstance(seen[-1], ValueError) and "invalid literal" in str(seen[-1])
        # with APP_TRACEBACK=1 the input error is logged in full too
        monkeypatch.setenv("APP_TRACEBACK", "1")
        log, _ = run(lambda p, t: (p - t).sum() * float("nan"))
        assert log.count("terminating due to exception: The training loss is not finite") == 2 and "Traceback" in log
    finally:
        logging.getLogger().removeHandler(handler)
        engine_log.setLevel(level)


def test_report_input_errors_prints_only_the_products_own_message(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr("sys.excepthook", lambda *exc: seen.append(exc[1]))
    monkeypatch.delenv("APP_TRACEBACK", raising=False)
    report_input_errors()
    report_input_errors()  # idempotent: a second call does not stack hooks
    import sys

    from app.engines.utils import check_patch_size

    ours = _wrapped(_raised(lambda: check_patch_size([30, 32, 32], DSUNet(features=(8, 16, 32, 64)))))
    sys.excepthook(type(ours), ours, ours.__traceback__)
    err = capsys.readouterr().err
    assert err.startswith("error: patch_size") and err.count("\n") == 1 and not seen
    # a ValueError raised outside the product (here by int()) is a bug to see whole: the previous hook gets it
    other = _wrapped(_raised(lambda: int("x")))
    sys.excepthook(type(other), other, other.__traceback__)
    assert seen == [other] and capsys.readouterr().err == ""
    # so is one the interpreter raises on a line of the product that is not a raise statement
    import app.engines.utils as utils

    namespace: dict = {}
    exec(compile("def unpack(c):\n    a, b = c\n", utils.__file__, "exec"), namespace)
    bug = _wrapped(_raised(lambda: namespace["unpack"]([1, 2, 3])))
    assert isinstance(bug.__cause__, ValueError) and utils._input_error(bug) is None
    # and a bug raised while handling a product error: the product error is not what went wrong
    def handle():
        try:
            check_patch_size([30, 32, 32], DSUNet(features=(8, 16, 32, 64)))
        except ValueError:
            return None + 1
    masked = _wrapped(_raised(handle))
    assert isinstance(masked.__cause__, TypeError) and utils._input_error(masked) is None
    monkeypatch.setenv("APP_TRACEBACK", "1")
    sys.excepthook(type(ours), ours, ours.__traceback__)
    assert seen == [other, ours]
    assert getattr(sys.excepthook, "_reports_input_errors", False)


def test_evaluating_training_cases_is_warned_about(tmp_path):
    from app.data.datalist import write_datalist
    from app.engines import check_held_out

    run = tmp_path / "run"
    train, val = [{"case": f"T{i}"} for i in range(4)], [{"case": "V0"}, {"case": "V1"}]
    write_datalist(run / "datalist.json", train, val)
    ckpt = run / "models" / "model.pt"
    message = check_held_out(ckpt, train[:2] + val)
    assert message.startswith("2 of the 4 cases scored here are training cases of this checkpoint's run")
    assert f"--eval_datalist {run / 'datalist.json'}" in message and "e.g. T0, T1" in message
    assert check_held_out(ckpt, val) is None  # the held-out cases only
    assert check_held_out(tmp_path / "moved" / "model.pt", train) is None  # no split to compare with


def test_evaluating_training_or_selection_utterances_is_warned_about(tmp_path):
    from app.data import make_synthetic_mmsa, write_mmsa_splits
    from app.engines import check_held_out_split

    data = make_synthetic_mmsa({"train": 6, "valid": 4, "test": 4}, dims=(4, 3, 4))
    run = tmp_path / "run"
    run.mkdir()
    write_mmsa_splits(run, data, "train", "valid")
    ckpt = run / "models" / "model.pt"
    assert check_held_out_split(ckpt, data, "train").startswith("6 of the 6 utterances of split 'train' trained")
    assert check_held_out_split(ckpt, data, "valid").startswith("4 of the 4 utterances of split 'valid' selected")
    assert check_held_out_split(ckpt, data, "test") is None  # held out
    # the ids decide, not the split's name: a file whose 'test' split repeats two training utterances
    mixed = {**data, "test": {**data["test"], "id": np.concatenate([data["train"]["id"][:2], data["test"]["id"][2:]])}}
    assert check_held_out_split(ckpt, mixed, "test").startswith("2 of the 4 utterances of split 'test' trained")
    assert check_held_out_split(tmp_path / "moved" / "model.pt", data, "train") is None  # no record beside it
    # the last weights were never chosen on valid: their valid scores are held out, not optimistic
    for name in ("model_final.pt", "checkpoint_last.pt"):
        assert check_held_out_split(run / "models" / name, data, "valid") is None
        assert check_held_out_split(run / "models" / name, data, "train").startswith("6 of the 6 utterances")
    with pytest.raises(ValueError, match="Split 'dev' is not in"):
        write_mmsa_splits(run, data, "train", "dev")


def test_files_without_ids_are_told_apart_by_their_features(tmp_path):
    from app.data import load_mmsa, make_synthetic_mmsa, save_mmsa_npz, write_mmsa_splits
    from app.engines import check_held_out_split

    def id_less(seed):
        data = make_synthetic_mmsa({"train": 6, "valid": 4, "test": 4}, dims=(4, 3, 4), seed=seed)
        return {name: {k: v for k, v in split.items() if k != "id"} for name, split in data.items()}

    ours, other = id_less(0), id_less(1)
    save_mmsa_npz(ours, tmp_path / "ours.npz")
    save_mmsa_npz(other, tmp_path / "other.npz")
    ours, other = load_mmsa(tmp_path / "ours.npz"), load_mmsa(tmp_path / "other.npz")
    assert list(ours["train"]["id"]) == list(other["train"]["id"])  # both only positions: train_0, ...
    run = tmp_path / "run"
    run.mkdir()
    write_mmsa_splits(run, ours, "train", "valid")
    ckpt = run / "models" / "model.pt"
    # another file's utterances share the positional ids but were never seen
    assert check_held_out_split(ckpt, other, "train") is None
    assert check_held_out_split(ckpt, other, "valid") is None
    # the run's own file, converted again, is still recognised
    save_mmsa_npz(ours, tmp_path / "again.npz")
    again = load_mmsa(tmp_path / "again.npz")
    assert check_held_out_split(ckpt, again, "train").startswith("6 of the 6 utterances of split 'train' trained")
    assert check_held_out_split(ckpt, again, "valid").startswith("4 of the 4 utterances of split 'valid' selected")
    # a training utterance copied into the test split is caught by its features, whatever its position
    moved = {k: np.concatenate([v[3:4], again["test"][k][1:]]) if k != "id" else again["test"][k]
             for k, v in again["train"].items()}
    assert check_held_out_split(ckpt, {**again, "test": moved}, "test").startswith(
        "1 of the 4 utterances of split 'test' trained")


def test_check_counts_accepts_whole_numbers_from_one():
    from app.engines import check_counts

    check_counts(max_epochs=1, val_interval="3", batch_size=np.int64(2))
    # whole, but a float: torch's DataLoader (batch_size) and MONAI's crop (num_samples) refused it with a traceback
    with pytest.raises(ValueError, match=r"^--batch_size 2\.0 must be a whole number written without a decimal point "
                                         r"\(a count that is a float stops torch\), e\.g\. --batch_size 2\.$"):
        check_counts(batch_size=2.0)
    for bad in (0, -1, 1.5, "x", None, True):
        with pytest.raises(ValueError, match=r"--max_epochs .* must be a whole number >= 1, e.g. --max_epochs 1\."):
            check_counts(max_epochs=bad)
    check_counts(at_least=0, checkpoint_interval=0)  # 0: off
    for bad in (-1, 0.5, "x"):  # used to turn periodic checkpoints off without a word
        with pytest.raises(ValueError, match=r"--checkpoint_interval .* must be a whole number >= 0, e\.g\. "
                                             r"--checkpoint_interval 1\."):
            check_counts(at_least=0, checkpoint_interval=bad)


def test_a_strategy_that_cannot_train_the_network_is_refused_when_the_trainer_is_built():
    net = DSUNet(features=[2, 4])
    with pytest.raises(ValueError, match="Strategy 'predict' .* DSUNet has none .*For BraTS, choose"):
        SubsetTrainer(max_epochs=1, train_data_loader=[], optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                      loss_function=torch.nn.L1Loss(), strategy=build_strategy("predict"), network=net,
                      device=torch.device("cpu"))


def test_check_positive_refuses_a_rate_that_is_not_a_number_above_zero():
    from app.engines import check_positive

    check_positive(learning_rate=3e-4)
    check_positive(learning_rate="0.001")  # as the command line gives it
    for bad in (0, -1, "x", None, float("nan"), float("inf"), True):  # torch would fail with a traceback, or train
        with pytest.raises(ValueError, match=r"--learning_rate .* must be a number > 0, e\.g\. --learning_rate 0\.001\."):
            check_positive(learning_rate=bad)


def test_cases_that_only_share_a_training_case_name_are_not_called_training_cases(tmp_path):
    """``make demo`` scores phantoms of another seed, named Phantom_000... as the training phantoms are:
    evaluation warned that 5 of its 8 unseen cases were training cases. A copy of a training case (same
    bytes in another folder) still is one."""
    import shutil

    from app.data.datalist import write_datalist
    from app.data.discovery import discover_cases
    from app.data.phantoms import write_phantoms
    from app.engines import check_held_out

    write_phantoms(tmp_path / "train", cases=3, size=24, seed=0)
    write_phantoms(tmp_path / "test", cases=3, size=24, seed=1000)
    train = discover_cases(tmp_path / "train")
    run = tmp_path / "run"
    write_datalist(run / "datalist.json", train[:2], train[2:])
    ckpt = run / "models" / "model.pt"
    test = discover_cases(tmp_path / "test")
    assert [r["case"] for r in test] == [r["case"] for r in train]  # the same names, other scans
    assert check_held_out(ckpt, test) is None
    shutil.copytree(tmp_path / "train", tmp_path / "copy")
    message = check_held_out(ckpt, discover_cases(tmp_path / "copy"))
    assert message is not None and message.startswith("2 of the 3 cases scored here are training cases"), message
    assert check_held_out(ckpt, train).startswith("2 of the 3 cases")


def test_check_held_out_finds_a_training_case_that_another_folder_names_its_own_way(tmp_path, caplog):
    """A test folder of another site or BraTS release can hold a training case under its own id (BraTS 2020's
    BraTS20_Training_003 is in BraTS 2021 under another name): it was scored as held out without a word."""
    import shutil

    from app.data.datalist import write_datalist
    from app.data.discovery import discover_cases
    from app.data.phantoms import write_phantoms
    from app.engines import check_held_out

    write_phantoms(tmp_path / "train", cases=3, size=16, seed=0)
    train = discover_cases(tmp_path / "train")
    run = tmp_path / "run"
    write_datalist(run / "datalist.json", train[:2], train[2:])
    write_phantoms(tmp_path / "test", cases=2, size=16, seed=1000)  # other scans
    renamed = tmp_path / "test" / "BraTS2021_00001"
    renamed.mkdir()
    for seq in ("flair", "t1", "t1ce", "t2", "seg"):  # training case Phantom_001, named by another release
        shutil.copy(tmp_path / "train" / "Phantom_001" / f"Phantom_001_{seq}.nii.gz",
                    renamed / f"BraTS2021_00001_{seq}.nii.gz")
    held_out = renamed.with_name("BraTS2021_00002")
    shutil.copytree(tmp_path / "train" / "Phantom_002", held_out)  # the validation case: not trained on
    for path in held_out.iterdir():
        path.rename(held_out / path.name.replace("Phantom_002", "BraTS2021_00002"))
    with caplog.at_level("WARNING"):
        message = check_held_out(run / "models" / "model.pt", discover_cases(tmp_path / "test"))
    assert message is not None and message in caplog.text
    assert message.startswith("1 of the 4 cases scored here are training cases") and "Phantom_000" not in message
    assert "under another id: BraTS2021_00001 is Phantom_001" in message and "BraTS2021_00002" not in message


def test_check_held_out_counts_once_a_scored_case_whose_copy_also_trained(tmp_path, caplog):
    """The split keeps the copies of one scan together on the training side, so a run can train on a case under
    two ids; scoring those training cases named each twice (as itself and as the other's copy), and counted
    more training cases than cases scored."""
    import shutil

    from app.data.datalist import write_datalist
    from app.data.discovery import discover_cases
    from app.data.phantoms import write_phantoms
    from app.engines import check_held_out

    write_phantoms(tmp_path / "train", cases=2, size=16, seed=0)
    again = tmp_path / "train" / "BraTS2021_00001"
    again.mkdir()
    for seq in ("flair", "t1", "t1ce", "t2", "seg"):  # Phantom_001 under another release's id
        shutil.copy(tmp_path / "train" / "Phantom_001" / f"Phantom_001_{seq}.nii.gz",
                    again / f"BraTS2021_00001_{seq}.nii.gz")
    cases = {c["case"]: c for c in discover_cases(tmp_path / "train")}
    run = tmp_path / "run"
    write_datalist(run / "datalist.json", [cases["BraTS2021_00001"], cases["Phantom_001"]], [cases["Phantom_000"]])
    with caplog.at_level("WARNING"):
        message = check_held_out(run / "models" / "model.pt", [cases["BraTS2021_00001"], cases["Phantom_001"]])
    assert message is not None and message.startswith("2 of the 2 cases scored here are training cases"), message
    assert "under another id" not in message


def test_check_output_dir_refuses_a_file_in_its_place_and_creates_nothing(tmp_path):
    from app.engines import check_output_dir

    check_output_dir(tmp_path / "new" / "run")  # a folder the run would create is fine ...
    assert not (tmp_path / "new").exists()  # ... and is not created by the check
    assert os.listdir(tmp_path) == []  # nor is the write probe left behind
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for target in (notes, notes / "run"):
        with pytest.raises(ValueError, match=r"--output_dir .*notes.txt is a file, not a folder: pass another"):
            check_output_dir(target)
    assert notes.read_text() == "mine"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_output_dir_refuses_a_folder_it_cannot_write(tmp_path):
    from app.engines import check_output_dir

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(ValueError, match=r"cannot write in .*locked"):
            check_output_dir(locked / "E", option="--output_dir")
    finally:
        locked.chmod(0o755)


def test_check_output_dir_probes_the_folders_of_an_earlier_run_a_training_writes_into(tmp_path, monkeypatch):
    """A training (or its resume) in the folder of an earlier run whose models/ it may not write (another user's run,
    or one made read-only) stopped only at model.pt after its first epoch, with that run's validation report and
    split already replaced by this one's. The tests may run as root, whom chmod does not stop: the write probe is
    refused instead, as the kernel refuses it to another user."""
    import errno
    import tempfile

    from app.engines import check_output_dir

    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    (run / "validation").mkdir()
    real_mkstemp = tempfile.mkstemp

    def refuse_in_models(*args, dir=None, **kwargs):
        if dir is not None and os.path.basename(dir) == "models":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse_in_models)
    check_output_dir(run)  # an evaluation writes into the folder itself only
    with pytest.raises(ValueError, match=rf"^--output_dir {re.escape(str(run))}: cannot write in "
                                         rf"{re.escape(str(run / 'models'))} \(Permission denied\): make it writable, or "
                                         r"pass another --output_dir\.$"):
        check_output_dir(run, subfolders=["models", "validation", "tensorboard"])  # tensorboard/: made by the run
    monkeypatch.undo()
    (run / "validation").rmdir()
    (run / "validation").write_text("mine")
    with pytest.raises(ValueError, match=r"validation is a file, not a folder: pass another --output_dir"):
        check_output_dir(run, subfolders=["models", "validation"])
    assert sorted(p.name for p in run.iterdir()) == ["models", "validation"]  # no probe left behind


@pytest.mark.parametrize("config", ["brats_gmd/configs/train.yaml", "brats_gmd/configs/multi_gpu_train.yaml",
                                    "mosi_gmd/configs/train.yaml", "mosi_gmd/configs/multi_gpu_train.yaml"])
def test_every_folder_a_training_writes_into_is_probed_before_any_work(config):
    import yaml

    text = (REPO / "bundles" / config).read_text()
    written = set(re.findall(r"@output_dir \+ '/(\w+)'", (REPO / "bundles" / config.split("/")[0] / "configs" /
                                                           "train.yaml").read_text()))
    (check,) = [step for step in yaml.safe_load(text)["initialize"] if "check_output_dir" in step]
    probed = re.search(r"subfolders=\[([^\]]*)\]", check)
    assert written == {"models", "validation", "tensorboard"} and probed is not None
    assert written == {name.strip(" '\"") for name in probed.group(1).split(",")}


def test_ids_repeated_across_splits_do_not_call_test_utterances_seen(tmp_path):
    """A file that numbers each split's utterances from 0 gives train and test the same ids; those test
    utterances were never trained on, so their scores must not be called 'not held out'."""
    from app.data import load_mmsa, make_synthetic_mmsa, save_mmsa_npz, write_mmsa_splits
    from app.engines import check_held_out_split

    data = make_synthetic_mmsa({"train": 6, "valid": 4, "test": 4}, dims=(4, 3, 4))
    for split in data.values():
        split["id"] = [str(i) for i in range(len(split["id"]))]
    save_mmsa_npz(data, tmp_path / "numbered.npz")
    data = load_mmsa(tmp_path / "numbered.npz")
    run = tmp_path / "run"
    run.mkdir()
    write_mmsa_splits(run, data, "train", "valid")
    ckpt = run / "models" / "model.pt"
    assert check_held_out_split(ckpt, data, "test") is None
    assert check_held_out_split(ckpt, data, "train").startswith("6 of the 6 utterances of split 'train' trained")
    assert check_held_out_split(ckpt, data, "valid").startswith("4 of the 4 utterances of split 'valid' selected")
    # a training utterance really copied into the test split is still caught, by its features
    copied = {k: v if k == "id" else np.concatenate([data["train"][k][:1], v[1:]]) for k, v in data["test"].items()}
    assert check_held_out_split(ckpt, {**data, "test": copied}, "test").startswith(
        "1 of the 4 utterances of split 'test' trained")


class _KilledInWorker(torch.utils.data.Dataset):
    """A dataset whose worker process is killed while it loads, as the out-of-memory killer does."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        import signal

        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(1)


def test_a_data_loader_worker_killed_from_outside_is_one_line_naming_the_settings(monkeypatch, capsys):
    """The OOM killer ending a worker (--num_workers 2, the default) ended training with a traceback whose last
    line named neither the likely cause nor the settings that avoid it."""
    import sys

    monkeypatch.setattr("sys.excepthook", lambda *exc: None)
    monkeypatch.delenv("APP_TRACEBACK", raising=False)
    report_input_errors()
    killed = _raised(lambda: next(iter(torch.utils.data.DataLoader(_KilledInWorker(), num_workers=1))))
    assert isinstance(killed, RuntimeError) and "DataLoader worker (pid" in str(killed)
    err = _wrapped(killed)
    sys.excepthook(type(err), err, err.__traceback__)
    line = capsys.readouterr().err
    assert line.startswith("error: DataLoader worker (pid") and line.count("\n") == 1
    assert "out-of-memory killer" in line and "--num_workers" in line and "--cache_rate" in line
    # the same words from elsewhere are not the data loader's
    other = _wrapped(_raised(lambda: (_ for _ in ()).throw(RuntimeError("DataLoader worker (pid 1) is killed"))))
    import app.engines.utils as utils

    assert utils._input_error(other) is None


def test_check_output_dir_refuses_an_unexpanded_home_folder(tmp_path, monkeypatch):
    """--output_dir=~/runs (the shell expands '~' neither in quotes nor after '=') wrote datalist.json,
    checkpoint_last.pt and the reports under ./~/runs, and model.pt and model_final.pt under the home folder."""
    from app.engines import check_output_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"^--output_dir ~/runs: .*part of its files under {tmp_path}/~/runs and "
                                         rf"part under {tmp_path}/home/runs: give --output_dir {tmp_path}/home/runs\.$"):
        check_output_dir("~/runs")
    check_output_dir("~runs")  # a folder whose name starts with '~' (no user of that name): a folder like another
    check_output_dir(tmp_path / "home" / "~")
    assert os.listdir(tmp_path) == []


def test_amp_uses_bf16_only_on_gpus_that_compute_it_natively(monkeypatch, caplog):
    """V100 and T4 emulate bf16, more slowly than fp32: evaluation and inference take fp16 there, training fp32."""
    from contextlib import nullcontext

    from app.engines import autocast_context
    from app.engines import utils

    monkeypatch.setattr(utils, "_AMP_FALLBACK_SAID", set())
    cuda = torch.device("cuda:0")
    assert utils.amp_dtype("cpu", True) is None and utils.amp_dtype("cpu", True, training=True) is None
    assert utils.amp_dtype(cuda, False) is None
    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    with caplog.at_level("WARNING", logger="app.engines.utils"):
        assert utils.amp_dtype(cuda, True) is torch.bfloat16 and utils.amp_dtype(cuda, True, True) is torch.bfloat16
        assert not caplog.records
        capability["value"] = (8, 0)  # A100: the first with native bf16
        assert utils.amp_dtype(cuda, True) is torch.bfloat16 and utils.amp_dtype(cuda, True, True) is torch.bfloat16
        assert not caplog.records
        capability["value"] = (7, 5)
        for _ in range(3):  # said once per device and use, not at every step
            assert utils.amp_dtype(cuda, True) is torch.float16
            assert utils.amp_dtype(cuda, True, training=True) is None
    assert [r.getMessage() for r in caplog.records] == [
        "--amp: cuda:0 (Some GPU) has no native bf16; evaluation and inference use fp16 autocast.",
        "--amp: cuda:0 (Some GPU) has no native bf16; training runs in fp32 (fp16 gradients would need loss scaling).",
    ]
    assert isinstance(autocast_context(cuda, True, training=True), nullcontext)


def test_check_modalities_refuses_other_sequences_or_another_order():
    """Two sequences stopped at the first step; the four in another order trained each encoder on another sequence
    than its name, which inference then feeds it."""
    from types import SimpleNamespace

    from app.engines import check_modalities

    order = ["flair", "t1", "t1ce", "t2"]
    check_modalities(SimpleNamespace(modalities=list(order)), order)
    check_modalities(object(), order)  # a network without named sequences
    for modalities in (["flair", "t1ce"], ["t1", "flair", "t1ce", "t2"]):
        with pytest.raises(ValueError, match=re.escape(f"network_def#modalities {modalities} must be the sequences the "
                                                       f"cases are loaded with, in their order: {order}. Leave")):
            check_modalities(SimpleNamespace(modalities=modalities), order)


def test_check_output_dir_reads_a_bare_tilde_as_the_home_folder(tmp_path, monkeypatch):
    """--output_dir=~ wrote part of a run into a folder named '~' where the job ran and part into the home folder."""
    from app.engines import check_output_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"'~' is not expanded here .*: give --output_dir {tmp_path}/home\.$"):
        check_output_dir("~")
    assert not (tmp_path / "~").exists()


def test_taking_the_output_folder_removes_what_a_killed_run_left(tmp_path, caplog):
    """A run killed while writing datalist.json or a validation report left a hidden temporary there for good
    (only models/ was cleaned); the next run that takes the folder removes those of dead writers."""
    import subprocess
    import sys

    from app.engines import lock_output_dir

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    (tmp_path / "validation").mkdir()
    left = [tmp_path / f".datalist.json.{dead}.0123abcd.tmp",
            tmp_path / "validation" / f".subset_dice.csv.{dead}.89abcdef.tmp"]
    kept = tmp_path / "validation" / f".subset_dice.md.{os.getpid()}.00112233.tmp"  # a live writer's
    for path in (*left, kept):
        path.write_text("x")
    with caplog.at_level("INFO", logger="app.engines.utils"):
        lock_output_dir(tmp_path)
    assert not any(p.exists() for p in left) and kept.exists()
    assert sum("left by a run killed while writing it" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.skipif(os.name != "posix", reason="SIGTERM ends a Windows process without a handler")
def test_an_output_folder_the_run_made_and_left_empty_is_removed_when_a_scheduler_stops_the_run(tmp_path):
    """A job cancelled or ended at its time limit gets SIGTERM, which ends Python without running atexit: an
    evaluation stopped while it read or scored its cases left the output folder it made (taking its lock), empty.
    The run still ends by the signal; a folder holding an output, or one that was there before, stays."""
    import signal
    import subprocess
    import sys

    code = ("import sys, time; from app.engines import lock_output_dir; lock_output_dir(sys.argv[1]); "
            "open(sys.argv[1] + '/subset_dice.json', 'w').close() if len(sys.argv) > 2 else None; "
            "print('locked', flush=True); time.sleep(60)")

    existing = tmp_path / "existing"
    existing.mkdir()
    runs = [[tmp_path / "runs" / "site" / "eval"], [existing], [tmp_path / "eval", "write"]]
    # the three runs start together: each spends seconds importing torch before it takes its folder
    procs = [subprocess.Popen([sys.executable, "-c", code, *map(str, run)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True) for run in runs]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "locked"
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(timeout=30) == -signal.SIGTERM  # the job script still sees the signal
    finally:
        for proc in procs:
            proc.kill()
            proc.stdout.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "existing"]  # runs/site/eval went with its parents
    assert existing.is_dir() and list(existing.iterdir()) == []
    assert (tmp_path / "eval" / "subset_dice.json").is_file()


def test_an_output_folder_the_run_made_and_left_empty_is_removed_at_exit(tmp_path):
    """A training that stops on a bad case after taking its output folder left that folder (and its new
    parents) behind, empty; a folder that was there before, or that holds an output, stays."""
    import subprocess
    import sys

    code = ("import sys; from app.engines import lock_output_dir; lock_output_dir(sys.argv[1]); "
            "open(sys.argv[1] + '/datalist.json', 'w').close() if len(sys.argv) > 2 else None; sys.exit(1)")
    new, existing, kept = tmp_path / "runs" / "site" / "out", tmp_path / "existing", tmp_path / "kept" / "out"
    existing.mkdir()
    runs = [[new], [existing / "out"], [kept, "write"]]
    # the three runs go together: each spends seconds importing torch before it takes its folder
    procs = [subprocess.Popen([sys.executable, "-c", code, *map(str, run)], cwd=REPO) for run in runs]
    assert [proc.wait(timeout=120) for proc in procs] == [1, 1, 1]
    assert not (tmp_path / "runs").exists()
    assert existing.is_dir() and not (existing / "out").exists()
    assert (kept / "datalist.json").is_file()


def test_a_training_that_failed_before_any_model_leaves_no_folder_it_made(tmp_path, monkeypatch):
    """A diverged training left datalist.json, tensorboard/ and an empty models/ in the output folder it had
    made. Such a folder goes, with the parents made for it; one holding a checkpoint stays, and so does a folder
    that was there before the run, with everything in it."""
    import app.engines.utils as utils

    def failed_run(out, made_from=None, model=None):
        (out / "models").mkdir(parents=True)
        (out / "tensorboard").mkdir()
        (out / "tensorboard" / "events.out.tfevents.1").write_text("x")
        (out / "datalist.json").write_text("{}")
        if model:
            (out / "models" / model).write_text("x")
        made = [] if made_from is None else [(str(out), str(made_from))]
        monkeypatch.setattr(utils, "_MADE", made)
        utils._remove_made_folders()  # as at the end of the process

    failed_run(tmp_path / "runs" / "site" / "out", made_from=tmp_path / "runs")
    assert list(tmp_path.iterdir()) == []
    failed_run(tmp_path / "runs" / "site" / "out", made_from=tmp_path / "runs", model="checkpoint_last.pt")
    assert (tmp_path / "runs" / "site" / "out" / "datalist.json").is_file()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    failed_run(existing)  # not made by the run
    assert (existing / "notes.txt").read_text() == "mine" and (existing / "datalist.json").is_file()


def test_a_patch_size_fix_never_suggests_a_single_voxel_at_the_deepest_level():
    """[4, 4, 4] for a divisor of 8 suggested [8, 8, 8], which leaves one voxel at the deepest level and stopped
    training with a torch traceback; [8, 8, 8] itself was accepted. A whole axis (0, inference windows) may
    hold the rest of the volume, so [8, 0, 0] stays accepted there."""
    from app.engines.utils import check_patch_size

    with pytest.raises(ValueError, match=r'must have 3 entries that are multiples of 8 .*use e\.g\. --patch_size "\[16, 16, 16\]"'):
        check_patch_size([4, 4, 4], 8)
    with pytest.raises(ValueError, match=r"patch_size \[8, 8, 8\] leaves a single voxel at the network's deepest level"):
        check_patch_size([8, 8, 8], 8)
    check_patch_size([8, 16, 8], 8)
    check_patch_size([8, 0, 0], 8, whole_axis=True)


@pytest.mark.parametrize("oom", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB "
                           "of which 1.20 GiB is free. Including non-PyTorch memory, this process has 78 GiB in use."),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)"),
])
def test_a_run_out_of_memory_ends_with_one_line_naming_the_settings(oom, monkeypatch, capsys):
    """A GPU too small for the patch and batch ended training with MONAI's traceback, whose last line was
    'Failed to evaluate ConfigExpression' and the run expression: the out-of-memory error sat in its middle."""
    import sys

    monkeypatch.setattr("sys.excepthook", lambda *exc: None)
    monkeypatch.delenv("APP_TRACEBACK", raising=False)
    report_input_errors()
    err = _wrapped(_raised(lambda: (_ for _ in ()).throw(oom)))
    sys.excepthook(type(err), err, err.__traceback__)
    line = capsys.readouterr().err
    assert line.count("\n") == 1, line
    assert line.startswith(f"error: Out of memory ({type(oom).__name__}: allocating ")
    assert "--batch_size" in line and "--patch_size" in line and "--sw_batch_size" in line
    # a sentiment evaluation has no --batch_size: its batches are --val_batch_size utterances
    assert "sentiment: --val_batch_size for validation and evaluation" in line
    assert ("20.0 GiB failed" in line) if isinstance(oom, torch.OutOfMemoryError) else ("65536.0 MiB failed" in line)
    # another RuntimeError is a bug, shown whole
    import app.engines.utils as utils

    assert utils._input_error(_wrapped(_raised(lambda: (_ for _ in ()).throw(RuntimeError("shape mismatch"))))) is None

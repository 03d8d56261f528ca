"""Crash-safe training: SIGKILL during a checkpoint write, a crash after an epoch, and bit-identical resumes.

The scenario is 2 epochs of 3 iterations with a checkpoint every 2 iterations (writes at iterations
2, 3 (epoch end), 4 and 6), approximate GMD with 4 sampled subsets (strategy generator and subset deck),
random crops, flips and intensity changes, cosine LR and validation after each epoch.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Events

from app.data.phantoms import write_phantoms
from tests.reliability.helpers import (
    TINY, TRAIN, assert_same_tensors, cli_args, load, run_in_process, start_bundle,
)

DRIVER = str(Path(__file__).with_name("pause_driver.py"))
SETTINGS = {**TINY, "max_epochs": 2, "epoch_length": 3, "checkpoint_interval": 2, "strategy": "gmd_approx",
            "gmd_subsets": 4, "diagnostics_interval": 0}
COMPARED = ("network", "optimizer", "lr_scheduler", "strategy", "validator", "key_metric_saver", "rng", "iteration")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_phantoms(root, cases=4, size=24, seed=0)
    return root


@pytest.fixture(scope="module")
def reference(phantoms, tmp_path_factory):
    """``reference()``: the uninterrupted run (in-process, run once on first call)."""
    out = tmp_path_factory.mktemp("uninterrupted")

    def get() -> Path:
        if not (out / "models" / "model_final.pt").is_file():
            run_in_process([TRAIN], dataset_dir=str(phantoms), output_dir=str(out), **SETTINGS)
        return out

    return get


def _assert_same_as_reference(reference_out: Path, out: Path) -> None:
    assert_same_tensors(load(reference_out / "models" / "model_final.pt"), load(out / "models" / "model_final.pt"))
    ref, got = load(reference_out / "models" / "checkpoint_last.pt"), load(out / "models" / "checkpoint_last.pt")
    assert ref["iteration"] == 6
    for key in COMPARED:
        assert_same_tensors(ref[key], got[key], key)


def _wait_for(marker: Path, proc: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    start = time.monotonic()
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended ({proc.returncode}) before the paused checkpoint write:\n"
                        f"{log.read_text()[-4000:]}")
        if time.monotonic() - start > timeout:
            pytest.fail("the run did not reach the paused checkpoint write in time")
        time.sleep(0.2)


def test_sigkill_during_checkpoint_write_then_resume_matches_uninterrupted_run(phantoms, reference, tmp_path):
    out, marker, log = tmp_path / "run", tmp_path / "paused", tmp_path / "log.txt"
    # freeze inside the 2nd write (iteration 3, epoch end): the temporary file is complete, not yet renamed
    proc = start_bundle(["--config_file", TRAIN, "--dataset_dir", str(phantoms), "--output_dir", str(out),
                         *cli_args(SETTINGS)], driver=[DRIVER],
                        env={"PAUSE_AT_WRITE": "2", "PAUSE_MARKER": str(marker)}, log=log)
    try:
        reference()  # computed while the subprocess starts up
        _wait_for(marker, proc, log)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    models = out / "models"
    (temp,) = sorted(models.glob(".checkpoint_last.pt.*.tmp"))
    assert load(temp)["iteration"] == 3  # the write that was cut off
    last = load(models / "checkpoint_last.pt")  # still the previous, complete checkpoint
    assert (last["iteration"], last["epoch"], last["epoch_length"]) == (2, 1, 3)

    # resume mid-epoch 1 (iteration 2 of 3), through the epoch end, validation and LR step, to the end
    run_in_process([TRAIN], dataset_dir=str(phantoms), output_dir=str(out), resume=True, **SETTINGS)
    assert not temp.exists(), "the stale temporary file is cleaned up on resume"
    _assert_same_as_reference(reference(), out)


def test_crash_after_an_epoch_resumes_from_the_epoch_end_checkpoint(phantoms, reference, tmp_path):
    out = tmp_path / "run"

    def crash_in_iteration_4(parser):
        trainer = parser.get_parsed_content("train#trainer")

        @trainer.on(Events.ITERATION_STARTED(once=4))
        def _crash(engine):
            raise RuntimeError("simulated crash in iteration 4")

    with pytest.raises(RuntimeError) as err:
        run_in_process([TRAIN], before_run=crash_in_iteration_4, dataset_dir=str(phantoms), output_dir=str(out),
                       **SETTINGS)
    assert "simulated crash" in str(err.value) + str(err.value.__cause__)
    last = load(out / "models" / "checkpoint_last.pt")
    assert (last["iteration"], last["epoch"]) == (3, 1)  # written after epoch 1's validation and LR step
    # as written before the network recorded its training spacing: the resume takes it from the data
    assert last["network"].pop("training_spacing").tolist() == [1.0, 1.0, 1.0]
    torch.save(last, out / "models" / "checkpoint_last.pt")

    run_in_process([TRAIN], dataset_dir=str(phantoms), output_dir=str(out), resume=True, **SETTINGS)
    _assert_same_as_reference(reference(), out)


def test_resume_without_checkpoint_names_the_file(phantoms, tmp_path):
    with pytest.raises(RuntimeError) as err:
        run_in_process([TRAIN], dataset_dir=str(phantoms), output_dir=str(tmp_path), resume=True, **SETTINGS)
    message = str(err.value.__cause__)
    assert "No training checkpoint at" in message and str(tmp_path / "models" / "checkpoint_last.pt") in message
    assert "--resume" in message


def test_resume_of_a_finished_run_changes_nothing(phantoms, reference, tmp_path):
    """``--resume true`` on a completed run restores the last state and stops at once (e.g. a requeued job)."""
    out = tmp_path / "run"
    shutil.copytree(reference(), out)
    before = load(out / "models" / "model_final.pt")
    run_in_process([TRAIN], dataset_dir=str(phantoms), output_dir=str(out), resume=True, **SETTINGS)
    assert_same_tensors(before, load(out / "models" / "model_final.pt"))
    assert load(out / "models" / "checkpoint_last.pt")["iteration"] == 6


def test_resume_that_does_not_fit_the_checkpoint_ends_with_the_error_alone(phantoms, reference, tmp_path):
    """The refusal is found once the engine starts, where MONAI's StatsHandler logs every exception with
    its traceback: the user sees the message (logged, then as the ``error:`` line) and no traceback."""
    out = tmp_path / "run"
    shutil.copytree(reference(), out)
    log = tmp_path / "log.txt"
    settings = {**SETTINGS, "epoch_length": 2}
    proc = start_bundle(["--config_file", TRAIN, "--dataset_dir", str(phantoms), "--output_dir", str(out),
                         "--resume", "true", *cli_args(settings)], log=log)
    assert proc.wait(timeout=300) == 1
    text = log.read_text()
    assert "error: " in text and "written with 3 iterations per epoch, this run has 2: resume with --epoch_length 3 " \
        "(or the original --batch_size" in text
    assert "Traceback" not in text, text[-3000:]


@pytest.mark.parametrize("flag, value, message", [
    ("--amp", "false", "(--amp True there, False here): resume with --amp True, or start a new run"),
    ("--train#augmentation#2#prob", "0.1",
     "(--train#augmentation#2#prob 0.5 there, 0.1 here): resume with --train#augmentation#2#prob 0.5,"),
    ("--sw_overlap", "0.25", "(--sw_overlap 0.5 there, 0.25 here): resume with --sw_overlap 0.5,"),
])
def test_a_resume_with_other_numerics_augmentation_or_validation_is_refused_naming_the_flag(
        phantoms, reference, tmp_path, flag, value, message):
    """A colleague's resume command with --amp false, another augmentation probability or another sliding-window
    overlap resumed without a word: the run continued under other numerics, on other samples, or chose model.pt by
    scores of another validation."""
    out = tmp_path / "run"
    shutil.copytree(reference(), out)
    log = tmp_path / "log.txt"
    proc = start_bundle(["--config_file", TRAIN, "--dataset_dir", str(phantoms), "--output_dir", str(out),
                         "--resume", "true", *cli_args(SETTINGS), flag, value], log=log)
    assert proc.wait(timeout=300) == 1
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith("error: ") and "was written by a run with other training settings " + message in last, last


def test_sigterm_writes_the_checkpoint_and_the_resume_matches_the_uninterrupted_run(phantoms, reference, tmp_path):
    """A scheduler's SIGTERM (time limit, preemption) used to kill the run at once, losing the iterations since
    the last checkpoint; now the iteration finishes, checkpoint_last.pt is written and the process ends by the
    signal, with no model_final.pt claiming the run finished."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    # iteration 5: mid epoch 2, between the interval checkpoints of iterations 4 and 6
    proc = start_bundle(["--config_file", TRAIN, "--dataset_dir", str(phantoms), "--output_dir", str(out),
                         *cli_args(SETTINGS)], driver=[str(Path(__file__).with_name("signal_driver.py"))],
                        env={"SIGTERM_AT_ITERATION": "5"}, log=log)
    reference()  # computed while the subprocess runs
    assert proc.wait(timeout=300) == -signal.SIGTERM, log.read_text()[-4000:]
    text = log.read_text()
    assert "SIGTERM received: stopping after iteration 5 and writing the resumable checkpoint" in text, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    models = out / "models"
    last = load(models / "checkpoint_last.pt")
    assert (last["iteration"], last["epoch"]) == (5, 2)
    assert not (models / "model_final.pt").exists()
    assert not list(models.glob(".*.tmp"))

    run_in_process([TRAIN], dataset_dir=str(phantoms), output_dir=str(out), resume=True, **SETTINGS)
    _assert_same_as_reference(reference(), out)

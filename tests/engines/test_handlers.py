"""Training handlers: the strategy diagnostics file holds one run's records, also after a resume."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Events

from app.engines import DiagnosticsHandler


def _run(folder, iterations, tag):
    handler = DiagnosticsHandler(folder)
    for it in iterations:
        engine = SimpleNamespace(state=SimpleNamespace(
            iteration=it, epoch=1, output={"diagnostics": {"strategy": "gmd", "run": tag}}))
        handler(engine)
    return [(r["iteration"], r["run"]) for r in map(json.loads, (folder / "gmd_diagnostics.jsonl").read_text().splitlines())]


def test_a_new_run_starts_the_file_afresh_and_a_resume_drops_what_came_after_its_checkpoint(tmp_path):
    assert _run(tmp_path, [20, 40, 60], "killed") == [(20, "killed"), (40, "killed"), (60, "killed")]
    with open(tmp_path / "gmd_diagnostics.jsonl", "a") as f:
        f.write('{"iteration": 8')  # a line cut short by the kill
    # resumed from the checkpoint at iteration 40: its next record is 60
    assert _run(tmp_path, [60, 80], "resumed") == [(20, "killed"), (40, "killed"), (60, "resumed"), (80, "resumed")]
    # a new run (--resume false) in the same folder
    assert _run(tmp_path, [20], "new") == [(20, "new")]


def test_a_run_that_writes_no_diagnostics_removes_an_earlier_runs_file(tmp_path):
    """A plain run (or one without diagnostics) after a gmd run in the same folder left the gmd run's
    gmd_diagnostics.jsonl beside the new model, and plot-conflicts drew it as this run's."""
    _run(tmp_path, [20, 40], "gmd run")
    handler = DiagnosticsHandler(tmp_path)  # a new plain run: its steps carry no diagnostics
    for it in (1, 2, 3):
        handler(SimpleNamespace(state=SimpleNamespace(iteration=it, epoch=1, output={"loss": 1.0})))
    assert not (tmp_path / "gmd_diagnostics.jsonl").exists()
    # a resume from iteration 40 of a gmd run keeps the records before it, even before its next record
    _run(tmp_path, [20, 40, 60], "killed")
    handler = DiagnosticsHandler(tmp_path)
    handler(SimpleNamespace(state=SimpleNamespace(iteration=41, epoch=3, output={"loss": 1.0})))
    assert [json.loads(line)["iteration"] for line in (tmp_path / "gmd_diagnostics.jsonl").read_text().splitlines()] \
        == [20, 40]


@pytest.mark.parametrize("target", ["existing", "dangling"])
def test_records_are_never_appended_through_a_link_under_the_files_name(tmp_path, target):
    """A link planted under gmd_diagnostics.jsonl in a shared output folder: appending followed it, so the
    records went into the file it named, or created that file where the link pointed."""
    victim = tmp_path / "elsewhere" / "notes.txt"
    victim.parent.mkdir()
    if target == "existing":
        victim.write_text("someone else's file\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "gmd_diagnostics.jsonl").symlink_to(victim)
    assert _run(run, [20, 40], "new") == [(20, "new"), (40, "new")]
    assert not (run / "gmd_diagnostics.jsonl").is_symlink()
    assert (victim.read_text() == "someone else's file\n") if target == "existing" else not victim.exists()


def test_validation_report_of_a_training_run_names_its_epoch(tmp_path):
    """validation/subset_dice.* is rewritten at each validation: it must say which epoch it scored,
    since models/model.pt may be an earlier, better one."""
    from app.engines import SubsetReportHandler

    result = {"subsets": {"flair": {"WT": 0.5, "TC": 0.4, "ET": 0.3, "mean": 0.4, "n_cases": 1}},
              "mean_over_subsets": {"WT": 0.5, "TC": 0.4, "ET": 0.3, "mean": 0.4},
              "worst_subset": {"name": "flair", "mean": 0.4}}
    metric = SimpleNamespace(last_result=result)
    engine = SimpleNamespace(state=SimpleNamespace(epoch=7))
    SubsetReportHandler(metric, tmp_path / "train", during_training="true")(engine)
    assert json.loads((tmp_path / "train" / "subset_dice.json").read_text())["epoch"] == 7
    assert "Validation after epoch 7 (the latest weights; models/model.pt holds the best)" in \
        (tmp_path / "train" / "subset_dice.md").read_text()
    SubsetReportHandler(metric, tmp_path / "eval")(engine)  # an evaluation of one checkpoint: no epoch
    assert "epoch" not in json.loads((tmp_path / "eval" / "subset_dice.json").read_text())


@pytest.mark.parametrize("val_interval,validated", [(2, [2, 4, 5]), (1, [1, 2, 3, 4, 5]), (5, [5])])
def test_last_epoch_is_validated_when_the_interval_skips_it(val_interval, validated):
    """max_epochs 5: interval 2 validates epochs 2 and 4, and the handler adds epoch 5 (once)."""
    from ignite.engine import Engine, Events

    from app.engines import TimeLimitHandler

    scored = []

    def run_validator(epoch: int) -> None:  # MONAI's Evaluator.run(global_epoch) leaves state.epoch == epoch
        scored.append(epoch)
        validator.state.epoch = epoch

    validator = SimpleNamespace(state=SimpleNamespace(epoch=0), run=run_validator)
    trainer = Engine(lambda e, b: None)
    trainer.add_event_handler(Events.EPOCH_COMPLETED(every=val_interval), lambda e: validator.run(e.state.epoch))
    TimeLimitHandler(minutes=0, validator=validator).attach(trainer)
    trainer.run([0, 0], max_epochs=5)
    assert scored == validated


@pytest.mark.parametrize("expire_at_iteration,validated", [(6, [2, 3]), (8, [2, 4]), (5, [2, 3])])
def test_a_time_limit_validates_the_weights_it_stops_with_once(expire_at_iteration, validated):
    """2 iterations per epoch, validation every 2 epochs. The budget runs out at the end of epoch 3
    (iteration 6, an epoch the interval skips: validated by the handler), at the end of epoch 4
    (already validated: not again) or mid-epoch 3 (iteration 5: validated)."""
    from ignite.engine import Engine, Events

    from app.engines import TimeLimitHandler

    scored = []

    def run_validator(epoch: int) -> None:
        scored.append(epoch)
        validator.state.epoch = epoch

    validator = SimpleNamespace(state=SimpleNamespace(epoch=0), run=run_validator)
    trainer = Engine(lambda e, b: None)
    limit = TimeLimitHandler(minutes=60, validator=validator)

    def spend_the_budget(engine):
        if engine.state.iteration == expire_at_iteration:
            limit.spent_before = 2 * limit.seconds

    trainer.add_event_handler(Events.ITERATION_COMPLETED, spend_the_budget)
    trainer.add_event_handler(Events.EPOCH_COMPLETED(every=2), lambda e: validator.run(e.state.epoch))
    limit.attach(trainer)
    trainer.run([0, 0], max_epochs=5)
    assert scored == validated and limit.expired


@pytest.mark.parametrize("expire_at_iteration,line", [
    (5, "Validation at the time limit, iteration 5 (within epoch 3): mean Dice over 1 subsets 0.4000"),
    (6, "Validation after epoch 3: mean Dice over 1 subsets 0.4000"),
])
def test_a_time_limit_stop_within_an_epoch_says_which_weights_it_validated(tmp_path, caplog, expire_at_iteration,
                                                                           line):
    """2 iterations per epoch. The time limit stopping the run at iteration 5 (the first of epoch 3) validated
    those weights as 'Validation after epoch 3', an epoch that was never finished; at an epoch's end it is."""
    from ignite.engine import Engine, Events

    from app.engines import SubsetReportHandler, TimeLimitHandler

    result = {"subsets": {"flair": {"WT": 0.5, "TC": 0.4, "ET": 0.3, "mean": 0.4, "n_cases": 1}},
              "mean_over_subsets": {"WT": 0.5, "TC": 0.4, "ET": 0.3, "mean": 0.4},
              "worst_subset": {"name": "flair", "mean": 0.4}}
    report = SubsetReportHandler(SimpleNamespace(last_result=result), tmp_path, during_training=True)

    def run_validator(epoch: int) -> None:  # as MONAI's Evaluator.run: its epoch is the trainer's
        validator.state.epoch = epoch
        report(validator)

    validator = SimpleNamespace(state=SimpleNamespace(epoch=0), run=run_validator)
    trainer = Engine(lambda e, b: None)
    limit = TimeLimitHandler(minutes=60, validator=validator)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: setattr(
        limit, "spent_before", 2 * limit.seconds if e.state.iteration == expire_at_iteration else 0.0))
    limit.attach(trainer)
    caplog.set_level("INFO", logger="app.engines.handlers")
    trainer.run([0, 0], max_epochs=5)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Validation")]
    assert len(lines) == 1 and lines[0].startswith(line), lines
    assert (tmp_path / "subset_dice.md").read_text().startswith(f"# {line.split(':')[0]} (the latest weights")
    assert validator.state.trainer_iteration is None  # a later validation is after its epoch again


def test_the_validation_of_a_time_limit_stop_leaves_the_global_generator_as_it_was():
    """The validation run when the budget stops training mid-epoch draws its data loader's base seed from
    the global generator, and the checkpoint written at that stop recorded the state after that draw: a run
    resumed from it with a larger budget drew other dropout masks than the uninterrupted run, which does
    not validate there (sentiment training, multi_gpu_train.yaml)."""
    import torch
    from ignite.engine import Engine, Events
    from torch.utils.data import DataLoader

    from app.engines import TimeLimitHandler

    def run_validator(epoch: int) -> None:
        for _ in DataLoader(list(range(2))):
            pass
        validator.state.epoch = epoch

    validator = SimpleNamespace(state=SimpleNamespace(epoch=0), run=run_validator)
    trainer = Engine(lambda e, b: None)
    limit = TimeLimitHandler(minutes=60, validator=validator)
    states = {}

    def spend_the_budget(engine):
        if engine.state.iteration == 3:
            limit.spent_before = 2 * limit.seconds
            states["stop"] = torch.get_rng_state()

    trainer.add_event_handler(Events.ITERATION_COMPLETED, spend_the_budget)
    limit.attach(trainer)
    trainer.add_event_handler(Events.TERMINATE, lambda e: states.setdefault("saved", torch.get_rng_state()))
    torch.manual_seed(0)
    trainer.run([0, 0], max_epochs=5)
    assert validator.state.epoch == 2 and limit.expired  # stopped mid-epoch 2, and validated
    assert torch.equal(states["stop"], states["saved"])


class _Writer:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (value, step)

    def flush(self):
        pass


def test_tensorboard_gets_gmd_conflict_fractions_norms_and_weights(tmp_path):
    writer = _Writer()
    diag = {"strategy": "gmd", "pairs": 4, "conflicts_before": 3, "conflicts_after": 1,
            "subsets": ["flair", "t1+t2"], "norms": [2.0, 0.5], "weights": [0.25, 0.75]}
    DiagnosticsHandler(tmp_path, summary_writer=writer)(
        SimpleNamespace(state=SimpleNamespace(iteration=9, epoch=1, output={"diagnostics": diag})))
    assert writer.scalars == {
        "gmd/conflict_fraction_before": (0.75, 9), "gmd/conflict_fraction_after": (0.25, 9),
        "gmd_norm/flair": (2.0, 9), "gmd_norm/t1+t2": (0.5, 9),
        "gmd_weight/flair": (0.25, 9), "gmd_weight/t1+t2": (0.75, 9),
    }


def test_tensorboard_gets_numbers_of_other_strategies_but_no_flags(tmp_path):
    writer = _Writer()
    diag = {"strategy": "vicreg", "loss": 1.5, "steps": 3, "skipped": True, "modalities": ["text", "audio"],
            "var": [0.5, None], "present": [True, False]}
    DiagnosticsHandler(tmp_path, summary_writer=writer)(
        SimpleNamespace(state=SimpleNamespace(iteration=4, epoch=1, output={"diagnostics": diag})))
    assert writer.scalars == {"vicreg/loss": (1.5, 4), "vicreg/steps": (3, 4), "vicreg_var/text": (0.5, 4)}


def test_records_of_a_strategy_of_ones_own_are_tagged_with_its_name(tmp_path):
    """A record without a 'strategy' entry (or one named gmd_* with other numbers) was taken for GMD's
    conflict statistics and stopped the run with a KeyError at its first diagnostics step."""
    writer = _Writer()
    handler = DiagnosticsHandler(tmp_path, summary_writer=writer)
    engine = SimpleNamespace(strategy=SimpleNamespace(name="unimodal_aux"),
                             state=SimpleNamespace(iteration=5, epoch=1, output={"diagnostics": {"aux_loss": 0.25}}))
    handler(engine)
    record = json.loads((tmp_path / "unimodal_aux_diagnostics.jsonl").read_text())
    assert record == {"iteration": 5, "epoch": 1, "strategy": "unimodal_aux", "aux_loss": 0.25}
    assert writer.scalars == {"unimodal_aux/aux_loss": (0.25, 5)}
    engine.state.output = {"diagnostics": {"strategy": "gmd_scaled", "alpha": 0.5}}
    handler(engine)
    assert json.loads((tmp_path / "gmd_scaled_diagnostics.jsonl").read_text())["alpha"] == 0.5
    assert not (tmp_path / "gmd_diagnostics.jsonl").exists() and writer.scalars["gmd_scaled/alpha"] == (0.5, 5)


@pytest.mark.parametrize("ablation_stage, fix", [
    (False, "run the same command with --resume true to continue."),
    # a stage of `python -m app ablate`: the ablation resumes it; its bundle command rerun by hand would not
    (True, "run the same python -m app ablate command again (it resumes this stage from its checkpoint) to continue."),
])
def test_stop_on_signal_finishes_the_iteration_runs_terminate_handlers_then_ends_by_the_signal(
        monkeypatch, caplog, ablation_stage, fix):
    """SIGTERM mid-iteration: the iteration completes, COMPLETED (model_final.pt) is skipped, the TERMINATE
    handlers (the resumable checkpoint) run, and only then is the process ended by the signal. Its last line says
    how to continue, in the command the user started."""
    import signal

    from ignite.engine import Engine, Events

    from app.engines import StopOnSignal
    from app.engines import distributed
    from app.engines.checkpoint import ABLATION_STAGE_ENV

    if ablation_stage:
        monkeypatch.setenv(ABLATION_STAGE_ENV, "1")
    else:
        monkeypatch.delenv(ABLATION_STAGE_ENV, raising=False)

    events: list[str] = []
    ended: list[tuple[int, int]] = []
    monkeypatch.setattr(distributed.os, "kill", lambda pid, signum: ended.append((pid, signum)))
    previous = signal.getsignal(signal.SIGTERM)

    def step(engine, batch):
        events.append(f"iteration {engine.state.iteration}")
        if engine.state.iteration == 3:
            signal.raise_signal(signal.SIGTERM)  # as a scheduler's would arrive, inside the step
            events.append("step 3 finished")

    engine = Engine(step)
    engine.add_event_handler(Events.TERMINATE, lambda e: events.append("checkpoint written"))
    engine.add_event_handler(Events.COMPLETED, lambda e: events.append("model_final.pt written"))
    StopOnSignal().attach(engine)
    try:
        engine.run(range(10), max_epochs=1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert events == ["iteration 1", "iteration 2", "iteration 3", "step 3 finished", "checkpoint written"]
    assert ended == [(distributed.os.getpid(), signal.SIGTERM)]
    # the log ends on a line of its own, not on the checkpoint's line that every epoch's end writes too
    assert _product_lines(caplog)[-1] == (
        "Training stopped by SIGTERM at epoch 1, iteration 3, after writing the resumable checkpoint: exit status "
        f"143; {fix}")
    assert _product_lines(caplog)[0].endswith(f"writing the resumable checkpoint; {fix}")
    assert signal.getsignal(signal.SIGTERM) == previous


def test_stop_on_signal_changes_nothing_without_a_signal():
    import signal

    from ignite.engine import Engine, Events

    from app.engines import StopOnSignal

    previous = signal.getsignal(signal.SIGTERM)
    done = []
    engine = Engine(lambda e, b: None)
    engine.add_event_handler(Events.COMPLETED, lambda e: done.append(e.state.iteration))
    StopOnSignal().attach(engine)
    engine.run(range(4), max_epochs=2)
    assert done == [8] and signal.getsignal(signal.SIGTERM) == previous  # uninstalled at the end


def test_stop_on_signal_gives_the_handlers_back_when_the_run_fails(caplog):
    """MONAI's StatsHandler, attached before it as the bundles do, re-raises a failed step's error before
    StopOnSignal's own EXCEPTION_RAISED handler runs: the handlers stayed installed after a diverged training, and
    in a notebook (or any process that goes on) Ctrl-C then did nothing."""
    import logging
    import signal

    from ignite.engine import Engine
    from monai.handlers import StatsHandler

    from app.engines import StopOnSignal

    def step(engine, batch):
        raise ValueError("diverged")

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    engine = Engine(step)
    caplog.set_level(logging.INFO)  # what StatsHandler(name=None) sets the root logger to; put back after the test
    StatsHandler(name=None, iteration_log=False).attach(engine)
    StopOnSignal().attach(engine)
    with pytest.raises(ValueError, match="diverged"):
        engine.run(range(4), max_epochs=1)
    assert {s: signal.getsignal(s) for s in before} == before


class _Clock:
    """``time.monotonic`` of the handlers: one second per training iteration."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _product_lines(caplog) -> list[str]:
    """The messages the product logged: ignite's own engine lines are in the records too once an earlier test in
    the process has set its loggers to INFO (MONAI's handlers do)."""
    return [r.getMessage() for r in caplog.records if r.name.startswith("app.")]


def _progress_run(monkeypatch, minutes, max_epochs=4, epoch_length=3, writer=None, datalist=None):
    from ignite.engine import Engine

    import app.engines.handlers as handlers
    from app.engines import TimeLimitHandler, TrainingProgressHandler

    clock = _Clock()
    monkeypatch.setattr(handlers.time, "monotonic", clock)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1)

    def step(engine, batch):
        clock.now += 1.0
        optimizer.step()
        return {"loss": torch.tensor(float(engine.state.iteration))}

    trainer = Engine(step)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: scheduler.step())
    limit = TimeLimitHandler(minutes)
    limit.attach(trainer)
    TrainingProgressHandler(optimizer=optimizer, summary_writer=writer, time_limit=limit, datalist=datalist,
                            modalities=("flair", "t1", "t1ce", "t2"), settings={"strategy": "plain", "seed": 3}
                            ).attach(trainer)
    trainer.run(range(epoch_length), max_epochs=max_epochs)
    return trainer


def test_each_epoch_logs_its_loss_learning_rate_pace_and_the_time_left(monkeypatch, caplog):
    """The log gave a loss per iteration only: no learning rate, no time per iteration and no estimate of the
    time left, and a run that ended on its time limit ended with the same lines as one that trained every epoch."""
    caplog.set_level("INFO", logger="app.engines.handlers")
    writer = _Writer()
    _progress_run(monkeypatch, minutes=0, writer=writer)
    lines = [r.getMessage() for r in caplog.records if r.name == "app.engines.handlers"]
    # epoch 1: iterations 1-3 (losses 1, 2, 3), at the learning rate set before the scheduler's step
    assert ("Epoch 1/4 done (iteration 3 of 12): train_loss mean 2.0000, learning rate 0.5, 1.00 s per iteration; "
            "0:00:03 trained, about 0:00:09 left.") in lines
    assert ("Epoch 3/4 done (iteration 9 of 12): train_loss mean 8.0000, learning rate 0.005, 1.00 s per "
            "iteration; 0:00:09 trained, about 0:00:03 left.") in lines
    assert lines[-1] == "Training finished: all 4 epoch(s) trained (12 iterations), in 0:00:12."
    assert writer.scalars["learning_rate"] == (pytest.approx(0.0005), 4)
    assert writer.scalars["train_loss_epoch"] == (pytest.approx(11.0), 4)
    assert writer.scalars["seconds_per_iteration"] == (1.0, 4)


def test_the_estimate_and_the_last_line_name_the_time_limit_when_it_stops_the_run(monkeypatch, caplog):
    caplog.set_level("INFO", logger="app.engines.handlers")
    trainer = _progress_run(monkeypatch, minutes=5 / 60)  # 5 s: 1 epoch and 2 iterations of the 4 epochs
    lines = [r.getMessage() for r in caplog.records if r.name == "app.engines.handlers"]
    assert lines[0].startswith("Run: strategy plain, seed 3, 4 epoch(s) of 3 iteration(s) (12 in all); torch ")
    assert ("Epoch 1/4 done (iteration 3 of 12): train_loss mean 2.0000, learning rate 0.5, 1.00 s per iteration; "
            "0:00:03 trained, about 0:00:02 left, when the time limit of 0.0833333 min stops it (at about epoch 2 "
            "of 4).") in lines
    assert trainer.state.iteration == 5
    assert lines[-1] == ("Training finished: the time limit of 0.0833333 min was reached at epoch 2 of 4, "
                         "iteration 5, in 0:00:05.")


def test_a_time_limit_spent_at_the_last_iteration_is_no_early_stop(monkeypatch, caplog):
    """The budget ran out at the last iteration of the last epoch: every epoch had trained, and the last line
    must not say that the time limit stopped the run."""
    caplog.set_level("INFO", logger="app.engines.handlers")
    _progress_run(monkeypatch, minutes=3 / 60, max_epochs=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "app.engines.handlers"]
    assert "Time limit of 0.05 min reached at epoch 1, iteration 3: stopping." in lines
    assert lines[-1] == "Training finished: all 1 epoch(s) trained (3 iterations), in 0:00:03."


def test_the_start_of_a_run_says_how_many_cases_train_and_validate_and_which_sequences_they_lack(monkeypatch,
                                                                                                  caplog):
    caplog.set_level("INFO", logger="app.engines.handlers")
    every = ["flair", "t1", "t1ce", "t2"]
    datalist = {"training": [{"modalities": every}, {"modalities": ["flair", "t2"]}, {"modalities": every[1:]}],
                "validation": [{"modalities": ["flair", "t1", "t2"]}]}
    _progress_run(monkeypatch, minutes=0, max_epochs=1, datalist=datalist)
    lines = [r.getMessage() for r in caplog.records if r.name == "app.engines.handlers"]
    assert lines[0] == ("Data: 3 training and 1 validation case(s); sequences missing from the case files: flair in 1 "
                        "training and 0 validation case(s), t1 in 1 training and 0 validation case(s), t1ce in 1 "
                        "training and 1 validation case(s).")
    caplog.clear()
    _progress_run(monkeypatch, minutes=0, max_epochs=1, datalist={"training": [{"modalities": every}],
                                                                   "validation": [{"modalities": every}]})
    assert _product_lines(caplog)[0] == "Data: 1 training and 1 validation case(s); every case's files hold all 4 sequences."


def test_each_validation_report_logs_the_regions_and_the_worst_subset_and_puts_them_on_tensorboard(tmp_path,
                                                                                                   caplog):
    """The validation log gave the key metric alone: a run whose mean rose while one subset stayed at 0 looked
    healthy from its log and TensorBoard."""
    from app.engines import SubsetReportHandler

    caplog.set_level("INFO", logger="app.engines.handlers")
    result = {"subsets": {"flair": {"WT": 0.5, "TC": 0.25, "ET": 0.0, "mean": 0.25, "n_cases": 1},
                          "t1ce": {"WT": 0.75, "TC": 0.5, "ET": 0.25, "mean": 0.5, "n_cases": 1}},
              "mean_over_subsets": {"WT": 0.625, "TC": 0.375, "ET": 0.125, "mean": 0.375},
              "worst_subset": {"name": "flair", "mean": 0.25},
              "subsets_without_cases": ["t1"], "per_case": []}
    metric = SimpleNamespace(last_result=result)
    engine = SimpleNamespace(state=SimpleNamespace(epoch=7))
    writer = _Writer()
    SubsetReportHandler(metric, tmp_path / "train", during_training=True, summary_writer=writer)(engine)
    SubsetReportHandler(metric, tmp_path / "eval")(engine)
    lines = [r.getMessage() for r in caplog.records if r.name == "app.engines.handlers"]
    assert lines == [
        "Validation after epoch 7: mean Dice over 2 of 3 subsets 0.3750 (WT 0.6250, TC 0.3750, ET 0.1250); worst "
        "subset flair 0.2500.",
        "Evaluation: mean Dice over 2 of 3 subsets 0.3750 (WT 0.6250, TC 0.3750, ET 0.1250); worst subset flair "
        "0.2500.",
    ]
    assert writer.scalars == {"val_WT": (0.625, 7), "val_TC": (0.375, 7), "val_ET": (0.125, 7),
                              "val_worst_subset_dice": (0.25, 7)}


def test_a_resumed_run_estimates_from_its_own_pace_and_leaves_where_it_resumed_to_the_checkpoint(monkeypatch, caplog):
    from ignite.engine import Engine

    import app.engines.handlers as handlers
    from app.engines import TimeLimitHandler, TrainingProgressHandler

    caplog.set_level("INFO", logger="app.engines.handlers")
    clock = _Clock()
    monkeypatch.setattr(handlers.time, "monotonic", clock)

    def step(engine, batch):
        clock.now += 2.0
        return {"loss": 1.0}

    trainer = Engine(step)
    limit = TimeLimitHandler(0)
    limit.attach(trainer)

    def restore(engine):  # as ResumableCheckpoint does at STARTED: 2 epochs of 3 done, 60 s trained before
        engine.state.iteration, engine.state.epoch = 6, 2
        limit.load_state_dict({"elapsed_seconds": 60.0})

    trainer.add_event_handler(Events.STARTED, restore)
    TrainingProgressHandler(time_limit=limit).attach(trainer)
    trainer.run(range(3), max_epochs=4)
    lines = [r.getMessage() for r in caplog.records if r.name == "app.engines.handlers"]
    # where the run resumed is the checkpoint's line (ResumableCheckpoint): said once
    assert not any("esumed" in line for line in lines), lines
    assert lines[1] == ("Epoch 3/4 done (iteration 9 of 12): train_loss mean 1.0000, 2.00 s per iteration; 0:01:06 "
                        "trained, about 0:00:06 left.")


def test_the_run_line_names_the_strategy_that_trains_not_the_label(caplog):
    """A recipe replacing strategy_def leaves --strategy at its default label (gmd): the start of the log named
    gmd for a run that trained another strategy."""
    from ignite.engine import Engine

    from app.engines import TrainingProgressHandler
    from app.strategies import build_strategy

    caplog.set_level("INFO", logger="app.engines.handlers")

    class Mine(type(build_strategy("plain"))):
        name = "unimodal_aux"

    for strategy, named in ((build_strategy("gmd_approx"), "strategy gmd_approx (subsets all), seed 1"),
                            (build_strategy("gmd", subsets=3), "strategy gmd (subsets 3), seed 1"),
                            (build_strategy("cggm"), "strategy cggm, seed 1"),
                            (Mine(), f"strategy unimodal_aux ({__name__}.{Mine.__qualname__}), seed 1")):
        caplog.clear()
        trainer = Engine(lambda e, b: None)
        trainer.strategy = strategy
        TrainingProgressHandler(settings={"strategy": "gmd", "seed": 1}).attach(trainer)
        trainer.run([0], max_epochs=1)
        assert _product_lines(caplog)[0].startswith(f"Run: {named}, 1 epoch(s) of 1 iteration(s)")


@pytest.mark.parametrize("key, task, metrics, worst, line, scalars", [
    ("MAE", "regression", ("Acc2", "F1", "MAE"), {"name": "audio", "Acc2": 0.5},
     "Validation after epoch 3: mean MAE over 2 subsets 1.2500 (Acc2 0.7500, F1 0.7000); worst subset audio Acc2 0.5000.",
     {"val_Acc2": (0.75, 3), "val_F1": (0.7, 3), "val_MAE": (1.25, 3), "val_worst_subset_Acc2": (0.5, 3)}),
    ("Acc", "classification", ("Acc", "F1"), {"name": "audio", "Acc": 0.5},
     "Validation after epoch 3: mean Acc over 2 subsets 0.7500 (F1 0.7000); worst subset audio 0.5000.",
     {"val_Acc": (0.75, 3), "val_F1": (0.7, 3), "val_worst_subset_Acc": (0.5, 3)}),
])
def test_each_sentiment_validation_logs_every_metric_and_the_worst_subset_and_puts_them_on_tensorboard(
        tmp_path, caplog, key, task, metrics, worst, line, scalars):
    """A sentiment validation logged only val_score (minus the mean MAE): the other metrics, the worst subset and
    the MAE itself reached neither the log nor TensorBoard."""
    from app.engines import SentimentReportHandler

    caplog.set_level("INFO", logger="app.engines.handlers")
    mean = {"Acc2": 0.75, "F1": 0.7, "MAE": 1.25} if task == "regression" else {"Acc": 0.75, "F1": 0.7}
    row = {**mean, "n": 1}
    result = {"subsets": {"text": row, "audio": row}, "mean_over_subsets": mean, "worst_subset": worst,
              "subsets_without_cases": [], "per_case": []}
    metric = SimpleNamespace(last_result=result, key=key, metrics=metrics)
    writer = _Writer()
    SentimentReportHandler(metric, tmp_path, plot=False, during_training=True, summary_writer=writer)(
        SimpleNamespace(state=SimpleNamespace(epoch=3)))
    assert _product_lines(caplog) == [line]
    assert writer.scalars == scalars
    assert json.loads((tmp_path / "subset_metrics.json").read_text())["epoch"] == 3


def test_the_data_line_counts_utterances_and_the_modalities_they_lack(monkeypatch, caplog):
    from ignite.engine import Engine

    from app.engines import TrainingProgressHandler

    caplog.set_level("INFO", logger="app.engines.handlers")
    datalist = {"training": [{"modalities": ["text", "audio", "vision"]}, {"modalities": ["text", "vision"]}],
                "validation": [{"modalities": ["text"]}]}
    trainer = Engine(lambda engine, batch: {"loss": 0.0})
    TrainingProgressHandler(datalist=datalist, modalities=("text", "audio", "vision"), unit="utterance",
                            missing_text="modalities missing (length 0)",
                            complete_text="every utterance has all {count} modalities").attach(trainer)
    trainer.run(range(1), max_epochs=1)
    assert _product_lines(caplog)[0] == ("Data: 2 training and 1 validation utterance(s); modalities missing (length "
                                         "0): audio in 1 training and 1 validation utterance(s), vision in 0 training "
                                         "and 1 validation utterance(s).")


class _SignalsItself(torch.utils.data.Dataset):
    """Each item sends SIGTERM to the data-loader worker that reads it, as a stop sent to a whole job does."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        return index


def test_data_loader_workers_leave_a_job_wide_sigterm_to_the_main_process():
    """SLURM's scancel or systemd send SIGTERM to every process of the job: PyTorch's worker handler ended a worker by
    it, and the main process stopped with "DataLoader worker ... killed by signal" before writing the checkpoint."""
    from monai.data import DataLoader

    from app.engines import data_worker_init

    loader = DataLoader(_SignalsItself(), batch_size=1, num_workers=1, worker_init_fn=data_worker_init)
    assert [int(b) for b in loader] == [0, 1, 2, 3]
    for bundle in ("brats_gmd", "mosi_gmd"):
        text = (Path(__file__).resolve().parents[2] / "bundles" / bundle / "configs" / "train.yaml").read_text()
        assert text.count("_target_: DataLoader") == text.count("worker_init_fn: $engines.data_worker_init") == 2


def test_stop_on_signal_stops_on_ctrl_c_like_on_sigterm_and_a_worker_ignores_it(monkeypatch, caplog):
    """Ctrl-C (SIGINT) mid-iteration stops training as SIGTERM does (checkpoint, one line, exit 130), where it
    raised KeyboardInterrupt inside the step; a second Ctrl-C has its default action (ends the process at once), one
    within 2 s is the same stop delivered twice;
    a forked data-loader worker that gets the terminal's SIGINT ignores it instead of dying."""
    import signal

    from ignite.engine import Engine, Events

    from app.engines import StopOnSignal
    from app.engines import distributed

    events: list[str] = []
    ended: list[tuple[int, int]] = []
    monkeypatch.setattr(distributed.os, "kill", lambda pid, signum: ended.append((pid, signum)))
    previous = signal.getsignal(signal.SIGINT)
    stopper = StopOnSignal()

    def step(engine, batch):
        events.append(f"iteration {engine.state.iteration}")
        if engine.state.iteration == 2:
            signal.raise_signal(signal.SIGINT)  # as the terminal's would arrive, inside the step
            # the same stop delivered twice (scancel signals the ablation and its stage): still a clean stop
            signal.raise_signal(signal.SIGTERM)
            events.append("step 2 finished")
            assert ended == [] and signal.getsignal(signal.SIGINT) == stopper._handle  # not the default action yet
            # a second Ctrl-C a while later ends it at once
            stopper._received_at -= distributed.DUPLICATE_SIGNAL_SECONDS
            stopper._handle(signal.SIGINT, None)
            assert ended == [(distributed.os.getpid(), signal.SIGINT)] and signal.getsignal(signal.SIGINT) == signal.SIG_DFL
            ended.clear()
            signal.signal(signal.SIGINT, stopper._handle)

    engine = Engine(step)
    engine.add_event_handler(Events.TERMINATE, lambda e: events.append("checkpoint written"))
    stopper.attach(engine)
    try:
        engine.run(range(10), max_epochs=1)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert events == ["iteration 1", "iteration 2", "step 2 finished", "checkpoint written"]
    assert ended == [(distributed.os.getpid(), signal.SIGINT)]
    assert _product_lines(caplog)[-1] == (
        "Training stopped by SIGINT at epoch 1, iteration 2, after writing the resumable checkpoint: exit status "
        "130; run the same command with --resume true to continue.")
    # in a forked worker (another pid) the terminal's signals are ignored, SIGTERM still ends it
    ended.clear()
    stopper._pid = -1
    stopper._handle(signal.SIGINT, None)
    assert ended == []
    try:
        stopper._handle(signal.SIGTERM, None)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert ended == [(distributed.os.getpid(), signal.SIGTERM)]


def test_the_lazy_summary_writer_writes_nothing_until_a_value_is_logged(tmp_path):
    """A bundle builds its writer with the trainer: a run refused before training left an empty event file."""
    from app.engines import LazySummaryWriter

    writer = LazySummaryWriter(log_dir=str(tmp_path / "tb"))
    assert not (tmp_path / "tb").exists() and not writer.created
    writer.add_scalar("loss", 1.0, 1)
    writer.close()  # and its writing thread ends
    assert writer.created and any((tmp_path / "tb").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("bundle", ["brats_gmd", "mosi_gmd"])
def test_the_training_bundles_write_no_event_file_before_training(bundle):
    from tests.bundles.helpers import REPO

    text = (REPO / "bundles" / bundle / "configs" / "train.yaml").read_text()
    assert "_target_: app.engines.LazySummaryWriter" in text and "tensorboard.SummaryWriter" not in text
    assert "$@train#handlers#3.check(@train#trainer)" in text


def test_a_full_disk_under_the_event_file_or_the_diagnostics_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    """TensorBoard writes every iteration, so a disk that fills during training is met there first: its writing
    thread printed its traceback and the training ended in another, with the disk's bare '[Errno 28] No space left on
    device'; the diagnostics records ended the same way. Each is now the product's error naming the file and the
    fix, which a bundle run prints as its one error line."""
    import builtins
    import contextlib
    import errno

    from tensorboard.summary.writer import record_writer

    from app.engines import LazySummaryWriter

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    writer = LazySummaryWriter(log_dir=str(tmp_path / "tb"))
    writer.add_scalar("loss", 1.0, 1)
    writer.flush()
    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    try:
        with pytest.raises(OSError, match=rf"^Cannot write {tmp_path / 'tb'} \(No space left on device\): free space "
                                          r"on that disk"):
            for step in range(2, 5):  # the writing thread fails; the writer's next use raises its error
                writer.add_scalar("loss", 1.0, step)
                writer.flush()
    finally:
        monkeypatch.undo()
        with contextlib.suppress(OSError):
            writer.close()
    assert "Traceback" not in capsys.readouterr().err  # the writing thread's own traceback is not printed

    records = tmp_path / "gmd_diagnostics.jsonl"
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: full() if Path(file) == records and a[:1] == ("a",)
                        else real_open(file, *a, **k))
    engine = SimpleNamespace(state=SimpleNamespace(iteration=20, epoch=1, output={"diagnostics": {"strategy": "gmd"}}))
    with pytest.raises(OSError, match=rf"^Cannot write {records} \(No space left on device\): free space"):
        DiagnosticsHandler(tmp_path)(engine)

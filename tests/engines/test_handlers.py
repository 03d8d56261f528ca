"""Training handlers: the strategy diagnostics file holds one run's records, also after a resume."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

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

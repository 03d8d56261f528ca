"""The brats_gmd bundle keeps the best validation epoch as model.pt, not the last (in process, tiny phantoms)."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events

from app.data.phantoms import write_phantoms
from tests.reliability.helpers import TINY, TRAIN, run_in_process


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_phantoms(root, cases=4, size=24, seed=0)
    return root


def test_model_pt_is_the_epoch_with_the_best_validation_dice_not_the_last(phantoms, tmp_path):
    """The bundle's selection as configured (15-subset mean Dice, higher is better): three epochs
    whose validation sees all-empty, all-tumour and all-empty predictions; only the middle one
    scores above 0 on the phantoms' tumours."""
    biases, dice = [-10.0, 10.0, -10.0], []

    def constant_predictions(parser):
        network, evaluator = parser.get_parsed_content("network"), parser.get_parsed_content("validate#evaluator")
        metric = parser.get_parsed_content("validate#key_metric#val_mean_dice")

        @evaluator.on(Events.STARTED)
        def _set_head(engine):
            with torch.no_grad():  # the linear 1x1x1 head of the shared trunk: every subset predicts sigmoid(bias)
                for p in network.trunk.head.parameters():
                    p.fill_(biases[len(dice)] if p.ndim == 1 else 0.0)

        @evaluator.on(Events.COMPLETED)
        def _record(engine):
            dice.append(metric.last_result["mean_over_subsets"]["mean"])

    run_in_process([TRAIN], before_run=constant_predictions, dataset_dir=str(phantoms), output_dir=str(tmp_path),
                   max_epochs=len(biases), epoch_length=1, strategy="plain", diagnostics_interval=0, **TINY)
    assert len(dice) == 3 and dice[0] == dice[2] == 0.0 < dice[1]
    best = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    head = {k: v for k, v in best.items() if k.startswith("trunk.head.") and v.ndim == 1}
    assert head and all((v == 10.0).all() for v in head.values())

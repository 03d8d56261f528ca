"""A gradient strategy of one's own: the worked example of the README's "A strategy of your own".

``UnimodalAux`` trains the prediction fused over each sample's sequences (as ``plain`` does) and adds, for every
sequence, the loss of that sequence's own output, so that each encoder also learns to segment alone (the
single-sequence subsets are the weakest of the 15). Train with it through ``examples/my_recipe.yaml``:

    PYTHONPATH=examples python -m monai.bundle run \\
      --config_file "['bundles/brats_gmd/configs/train.yaml','examples/my_recipe.yaml']" \\
      --bundle_root bundles/brats_gmd --dataset_dir D --output_dir O

The same class trains the sentiment network (``bundles/mosi_gmd``): it uses only the subset-aware network
protocol of :mod:`app.strategies.base`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from app.strategies import GradientStrategy, StepResult, subset_loss
from app.subsets import check_fusable

__all__ = ["UnimodalAux"]


class UnimodalAux(GradientStrategy):
    """The fused loss plus ``aux_weight`` times the mean of the single-sequence losses.

    Per iteration: ``L = L(fuse(all available)) + aux_weight * mean_m L(output of sequence m)``, each
    single-sequence loss taken over the samples that have that sequence, the mean over the sequences that some
    sample of the batch has. ``aux_weight`` 0 trains as ``plain``.

    Args:
        seed: seed of the strategy's random generator (unused here; kept so that a resume restores it as for
            every strategy).
        aux_weight: weight of the single-sequence losses, a finite number >= 0.

    Raises:
        ValueError: ``aux_weight`` is negative, not finite or not a number.
    """

    #: the label of the training log's ``Run:`` line and of the diagnostics file, were it to write one
    name = "unimodal_aux"

    def __init__(self, seed: int = 0, aux_weight: float = 0.5) -> None:
        super().__init__(seed)
        try:
            weight = float(aux_weight)
        except (TypeError, ValueError):
            weight = math.nan
        if not math.isfinite(weight) or weight < 0:
            # a negative weight would push each sequence's own output away from the label
            raise ValueError(f"strategy_def#aux_weight {aux_weight!r} must be a finite number >= 0, e.g. 0.5.")
        # every constructor argument is kept under its own name: a resume compares repr(self) with the checkpoint's
        self.aux_weight = weight

    def step(
        self, model: Any, inputs: Any, modality_mask: torch.Tensor, targets: torch.Tensor,
        loss_function: Callable, iteration: int = 0,
    ) -> StepResult:
        """One backward pass of the fused loss plus the weighted single-sequence losses.

        Raises:
            ValueError: a sample has no sequence (as every strategy raises).
        """
        check_fusable(modality_mask)
        per_mod = model.per_modality(inputs, modality_mask)  # [B, M, ...]: every encoder and the trunk run once
        has = modality_mask.cpu()  # read once: subset_loss needs the rows on the CPU (a device sync on a GPU)
        loss, pred = subset_loss(model, per_mod, modality_mask, targets, loss_function, valid=has.any(dim=1))
        aux = []
        for m in range(modality_mask.shape[1]):
            alone = torch.zeros_like(modality_mask)
            alone[:, m] = modality_mask[:, m]
            # the fusion of one sequence is its own output; samples without it are left out
            aux_m, _ = subset_loss(model, per_mod, alone, targets, loss_function, valid=has[:, m])
            if aux_m is not None:
                aux.append(aux_m)
        total = loss
        if aux and self.aux_weight:
            total = total + self.aux_weight * torch.stack(aux).mean()
        total.backward()
        # the trainer logs and checks the fused loss, the one every strategy reports
        return StepResult(loss=loss.detach(), pred=pred.detach())

"""Strategy ``predict``: missing-modality prediction by joint embedding (Kim & Kim, ECCV 2024).

Trains a :class:`app.networks.PromptedDSTransformer` as the paper trains its late-fusion model:

- task loss: the sum over the present modalities of each modality's own loss (late fusion of
  unimodal predictors); it trains the trunk, the head and the encoders;
- BitFit: the modality encoders are meant to be pretrained (bundle knob ``pretrained``); only
  their bias terms train. ``warmup_iterations`` first trains every parameter (unimodal pretraining
  on the per-modality losses) so the strategy also works from scratch, in one run;
- prediction loss, on the samples with every modality: for each ordered pair ``m -> m'``, ``m'``
  is treated as missing and its embedding predicted from ``m``'s read-only prompts, ``Ĉ^{m'}``,
  is pulled towards the real ``C^{m'}`` (detached) by VICReg (:mod:`app.strategies.vicreg`);
  optionally the head's loss on ``Ĉ^{m'}`` too. As in the paper's ``L_prd(theta_prd, phi_prd)``,
  it trains only the prompts, prompt readers and predictors (the encoders, trunk and head are
  left to the task loss, so the unimodal representations are not bent towards predictability);
- with ``fusion="confidence"``, a fusion loss teaches the confidence logits how to weigh present
  and predicted modalities: the fused prediction over a random non-empty subset of each sample's
  modalities, completed with predictions, with the per-modality values (and the predicted
  embeddings) detached, so it acts only through the confidence logits, not on what each modality
  predicts.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from app.flags import check_counts, check_positive
from app.strategies.base import GradientStrategy, StepResult, random_submasks
from app.strategies.vicreg import vicreg_terms

__all__ = ["PredictStrategy"]

logger = logging.getLogger(__name__)


class PredictStrategy(GradientStrategy):
    """Late fusion of unimodal predictors, BitFit, and a VICReg-trained missing-modality predictor.

    Args:
        seed: seed of the strategy's random generator (subsets of the fusion loss).
        warmup_iterations: the first N iterations (the trainer counts from 1) train every parameter;
            BitFit after (0: BitFit from the first step, meant for encoders that
            :func:`app.networks.load_pretrained` initialised; a warning is logged when none did).
        vicreg_invariance, vicreg_variance, vicreg_covariance: VICReg's lambda, mu, nu (the VICReg
            paper's 25, 25, 1; the invariance is a mean over the embedding's dimensions, see
            :mod:`app.strategies.vicreg`).
        prediction_weight: weight of the VICReg loss. It reaches only the prediction parameters,
            which no other term trains but ``predicted_task_weight``'s, and Adam is invariant to a
            loss scale, so 1.0 keeps the VICReg paper's balance and only the ratio to
            ``predicted_task_weight`` matters.
        predicted_task_weight: weight of the task loss of the head's output on each predicted
            embedding (all pairs, samples that have the source modality; the head is not trained by
            it). 0.5: a predicted modality's prediction counts half a real one's; it makes the
            predictor keep what the head reads, which the invariance alone weighs equally with
            everything else.
        confidence_weight: weight of the confidence-fusion loss (confidence fusion only; see the module).

    Raises:
        TypeError: at the first step, when the network has no prompts and predictors.
    """

    name = "predict"
    branches = ("sentiment",)  # the prompted DS transformer; DSUNet has no prompts or predictors

    def __init__(
        self,
        seed: int = 0,
        warmup_iterations: int = 0,
        vicreg_invariance: float = 25.0,
        vicreg_variance: float = 25.0,
        vicreg_covariance: float = 1.0,
        prediction_weight: float = 1.0,
        predicted_task_weight: float = 0.5,
        confidence_weight: float = 1.0,
    ) -> None:
        super().__init__(seed)
        # checked here, not by int()/float(): --warmup_iterations x stopped the run with a bare traceback
        check_counts(at_least=0, warmup_iterations=warmup_iterations)
        check_positive(allow_zero=True, vicreg_invariance=vicreg_invariance, vicreg_variance=vicreg_variance,
                       vicreg_covariance=vicreg_covariance, prediction_weight=prediction_weight,
                       predicted_task_weight=predicted_task_weight, confidence_weight=confidence_weight)
        self.warmup_iterations = int(warmup_iterations)
        self.vicreg_weights = (float(vicreg_invariance), float(vicreg_variance), float(vicreg_covariance))
        self.prediction_weight = float(prediction_weight)
        self.predicted_task_weight = float(predicted_task_weight)
        self.confidence_weight = float(confidence_weight)
        self.bitfit_applied = False

    # -- BitFit ----------------------------------------------------------------------------------
    def check_model(self, model: Any) -> None:
        """Raise a ``ValueError`` naming the fix when ``model`` cannot predict missing modalities."""
        needed = ("features", "pairs", "pair_predictions", "predicted_embeddings", "embedding_outputs",
                  "predicted_outputs", "prediction_parameters", "completed_mask")
        lacking = [n for n in needed if not hasattr(model, n)]
        if lacking:
            raise ValueError(
                f"Strategy 'predict' needs a network with read-only prompts and missing-modality predictors, and "
                f"{type(model).__name__} has none (it lacks {lacking}). The strategy is for the sentiment branch "
                "only: in bundles/mosi_gmd, --strategy predict builds app.networks.PromptedDSTransformer. "
                "For BraTS, choose --strategy plain, dropout, gmd, gmd_approx or cggm."
            )

    def apply_bitfit(self, model: Any) -> None:
        """Freeze every non-bias parameter of the modality encoders (idempotent).

        Frozen parameters get ``requires_grad=False`` and their gradient is dropped (``None``), so
        the optimizer skips them entirely, weight decay and Adam momentum from the warm-up included.
        """
        for name, param in model.encoders.named_parameters():
            if not name.endswith("bias") and param.requires_grad:
                param.requires_grad_(False)
                param.grad = None
        self.bitfit_applied = True

    def check_run_length(self, iterations: int) -> None:
        """Warn when the warm-up lasts the whole run: BitFit, and so the method, never starts.

        The encoders freeze after iteration ``warmup_iterations``; a run of that many iterations or fewer
        (``configs/predict.yaml``'s 200 with ``--max_epochs 1`` on CMU-MOSI's 40 iterations per epoch) trains
        every parameter to its end and saves a model that no step of the method trained, without a word.
        """
        if self.warmup_iterations and not self.bitfit_applied and self.warmup_iterations >= iterations:
            logger.warning(
                "--warmup_iterations %d is not below the %d iteration(s) this run trains (--max_epochs times the "
                "iterations per epoch): the encoders' weights never freeze (BitFit never starts), so every parameter "
                "trains to the end and the model is not trained as the method trains it. Lower --warmup_iterations "
                "below %d, or raise --max_epochs.", self.warmup_iterations, iterations, iterations)

    # -- the step ----------------------------------------------------------------------------------
    def step(
        self, model: Any, inputs: Any, modality_mask: torch.Tensor, targets: torch.Tensor,
        loss_function: Callable, iteration: int = 0,
    ) -> StepResult:
        """Task, prediction and fusion losses of one iteration (see the module); BitFit once warm-up is over.

        Raises:
            ValueError: ``model`` is not a prompted network (see :meth:`check_model`).
        """
        self.check_model(model)
        if self.bitfit_applied or self.warmup_iterations == 0 or iteration > self.warmup_iterations:
            if not self.bitfit_applied and iteration <= 1 and not getattr(model, "pretrained_path", ""):
                # BitFit from the first step of a new run on encoders that no checkpoint initialised: their
                # random weights stay as they are and only the biases train, which is not the method
                # (BitFit tunes pretrained encoders), and nothing in the run's outputs would show it
                logger.warning(
                    "Strategy 'predict' freezes the encoders' weights from the first step (BitFit, "
                    "--warmup_iterations 0) and no --pretrained checkpoint initialised them: only the bias terms "
                    "of randomly initialised encoders will train. Pass --pretrained PATH (a plain or dropout "
                    "model.pt with the same network options) or --warmup_iterations N (configs/predict.yaml: 200)."
                )
            self.apply_bitfit(model)
        feats = model.features(inputs, modality_mask)
        mask = feats.mask
        channels = model.out_channels
        out = model.embedding_outputs(feats.embeddings)  # [B, M, C (+1)]

        # task loss: late fusion of unimodal predictors, each trained on its own loss
        task = out.new_zeros(())
        for m in range(mask.shape[1]):
            rows = mask[:, m]
            if bool(rows.any()):
                task = task + loss_function(out[rows, m, :channels], targets[rows]).mean()

        # prediction loss: trains the prompts and predictors only
        pairs = model.pair_predictions(feats.prompt_summaries)
        prediction = out.new_zeros(())
        complete = mask.all(dim=1)
        n_complete = int(complete.sum())
        if n_complete >= 2 and self.prediction_weight > 0:
            lam, mu, nu = self.vicreg_weights
            vicreg = out.new_zeros(())
            for pred, (_, j) in zip(pairs, model.pairs):
                t = vicreg_terms(pred[complete].float(), feats.embeddings[complete, j].detach().float())
                vicreg = vicreg + lam * t.invariance + mu * t.variance + nu * t.covariance
            # the mean over pairs keeps the scale of one VICReg loss whatever the number of modalities
            prediction = prediction + self.prediction_weight * vicreg / len(pairs)
        if self.predicted_task_weight > 0:
            # per target modality: mean over its sources of the head's loss on the prediction
            per_target = [out.new_zeros(()) for _ in range(mask.shape[1])]
            sources = [0] * mask.shape[1]
            for pred, (i, j) in zip(pairs, model.pairs):
                rows = mask[:, i]
                if bool(rows.any()):
                    pred_out = model.embedding_outputs(pred[rows])[:, :channels]
                    per_target[j] = per_target[j] + loss_function(pred_out, targets[rows]).mean()
                    sources[j] += 1
            predicted_task = sum(t / max(s, 1) for t, s in zip(per_target, sources))
            prediction = prediction + self.predicted_task_weight * predicted_task

        fusion = out.new_zeros(())
        if self.confidence_weight > 0 and getattr(model, "fusion", "mean") == "confidence":
            sub = random_submasks(mask, self.generator)
            completed = sub | sub.any(dim=1, keepdim=True)
            with torch.no_grad():
                predicted = model.predicted_embeddings(feats.prompt_summaries, sub)
            pred_out = model.predicted_outputs(predicted)
            per_mod = torch.where(sub.unsqueeze(-1), out, pred_out)
            # values detached, confidence logits live: only the weighting learns from this loss
            per_mod = torch.cat([per_mod[..., :channels].detach(), per_mod[..., channels:]], dim=-1)
            fusion = self.confidence_weight * loss_function(model.fuse(per_mod, completed), targets).mean()

        prediction_params = [p for p in model.prediction_parameters() if p.requires_grad]
        if prediction.requires_grad and prediction_params:
            grads = torch.autograd.grad(prediction, prediction_params, retain_graph=True, allow_unused=True)
        else:
            grads = [None] * len(prediction_params)
        main = task + fusion
        if main.requires_grad:
            main.backward()
        for param, grad in zip(prediction_params, grads):
            if grad is not None:
                param.grad = grad if param.grad is None else param.grad + grad

        with torch.no_grad():
            fused = model.fuse(out.detach(), mask)
            loss = loss_function(fused, targets).mean()
        return StepResult(loss=loss.detach(), pred=fused)

    # -- resume ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The base state plus whether the encoders are already frozen to their biases (BitFit)."""
        return {**super().state_dict(), "bitfit_applied": self.bitfit_applied}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.bitfit_applied = bool(state.get("bitfit_applied", False))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(seed={self.seed}, warmup_iterations={self.warmup_iterations}, "
                f"vicreg={self.vicreg_weights}, prediction_weight={self.prediction_weight}, "
                f"predicted_task_weight={self.predicted_task_weight}, confidence_weight={self.confidence_weight})")

"""Classifier-guided Gradient Modulation (CGGM, Guo et al., NeurIPS 2024) as a gradient strategy.

Light per-modality heads ``f_i`` (probes, see :mod:`app.networks.heads`) predict the task from each
encoder's output ``h_i``. They see ``h_i`` detached and are trained by the strategy's own optimizer,
so they measure each modality's progress without training the encoders themselves. Each iteration:

1. ``eps_i``: the batch metric of head ``i`` (accuracy, minus MAE, or hard Dice) on the samples that
   have modality ``i``; ``delta_i = eps_i(t) - eps_i(t-1)`` with ``eps(0) = 0``.
2. Balance terms ``B_i = rho * sum_{k != i} delta_k / sum_k delta_k``: while ``sum_k delta_k > 0``, a
   modality that improves less than the others gets a larger ``B_i`` (when the sum is negative, eq. 7
   as published reverses that order); 1 when the batch has a single modality (nothing to balance).
3. Direction: ``L_gm = (1/M) sum_i (|B_i| - B_i cos(g_F, g_i))`` over the ``M`` modalities present
   in the batch (0 when ``M = 1``, as eq. 7's ``B = 0`` makes it in the paper), with ``g_F`` the
   gradient of the task loss w.r.t. the fusion head's final weight (kept differentiable, so ``L_gm``
   trains the network through it) and ``g_i`` the gradient of head ``i``'s loss w.r.t. its own final
   weight (a fixed target direction). One backward of ``L_task + lambda L_gm``.
4. Magnitude: the gradients of encoder ``i`` are multiplied by ``B_i``.

This follows the paper, not the published code (which compares weight tensors instead of gradients
and skips the magnitude scaling for segmentation).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from app.flags import check_counts, check_positive
from app.metrics.dice import dice_from_logits
from app.strategies.base import GradientStrategy, StepResult, process_group, subset_loss
from app.subsets import check_fusable

__all__ = ["CGGMStrategy", "balance_terms", "modulation_loss", "head_metric"]

#: below this ``|sum_k delta_k|`` the balance terms are undefined: no modulation (``B_i = 1``)
DELTA_EPS = 1e-12


def balance_terms(
    delta: torch.Tensor, rho: float, b_clip: float | None = None, present: Sequence[int] | None = None
) -> torch.Tensor:
    """``B_i = rho * sum_{k != i} delta_k / sum_k delta_k`` (eq. 7 of the paper).

    When ``|sum_k delta_k| < 1e-12`` or it is not finite (e.g. no head changed its metric), the
    ratio is undefined and every ``B_i`` is 1: the step is not modulated. So it is when fewer than two
    modalities are ``present``: eq. 7 balances modalities against each other, and with one alone
    (a batch of cases that share a single sequence) it would give ``B = 0`` and freeze that encoder.

    Args:
        delta: ``[M]`` metric improvements of the heads (0 for a modality absent from the batch).
        rho: scaling hyper-parameter.
        b_clip: if given, ``B`` is clamped to ``[-b_clip, b_clip]`` (the paper does not clip).
        present: indices of the modalities in the batch; ``None``: all ``M``.

    Returns:
        ``[M]`` float64 balance terms.
    """
    delta = delta.double()
    total = delta.sum()
    alone = present is not None and len(present) < 2
    if alone or not bool(torch.isfinite(total)) or abs(float(total)) < DELTA_EPS:
        terms = torch.ones_like(delta)
    else:
        terms = rho * (total - delta) / total
    if b_clip is not None:
        terms = terms.clamp(-float(b_clip), float(b_clip))
    return terms


def modulation_loss(
    terms: torch.Tensor, fusion_grad: torch.Tensor, head_grads: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``L_gm = (1/M) sum_i (|B_i| - B_i cos(g_F, g_i))`` and the cosines, in float32.

    Minimising ``L_gm`` raises ``cos(g_F, g_i)`` where ``B_i > 0`` and lowers it where ``B_i < 0``.

    Args:
        terms: ``[M]`` balance terms ``B_i`` of the heads in ``head_grads`` (constants).
        fusion_grad: ``g_F``, the task loss gradient w.r.t. the fusion head's final weight; only its
            first ``head_grads[i].shape[0]`` rows are compared (the confidence-logit row of a
            confidence-fusion head has no counterpart in the heads).
        head_grads: ``g_i`` per head, each of one head's final-weight shape (detached).

    Returns:
        ``(L_gm, cos [M])``; ``L_gm`` carries the graph of ``fusion_grad``.

    Raises:
        ValueError: ``head_grads`` is empty.
    """
    if not head_grads:
        raise ValueError("modulation_loss needs at least one modality head gradient.")
    cos = torch.stack([
        nn.functional.cosine_similarity(
            fusion_grad[: g.shape[0]].reshape(-1).float(), g.detach().reshape(-1).float(), dim=0, eps=1e-12
        )
        for g in head_grads
    ])
    b = terms.to(device=cos.device, dtype=torch.float32).detach()
    return (b.abs() - b * cos).mean(), cos


def head_metric(task: str, pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample metric ``eps`` of a head's predictions, higher is better (float64 ``[n]``).

    ``classification``: 1 where the arg-max class is right; ``regression``: minus the absolute
    error (mean over outputs); ``segmentation``: hard Dice of ``sigmoid > 0.5``, mean over channels.

    Raises:
        ValueError: ``task`` is none of the three.
    """
    pred = pred.detach().float()
    n = pred.shape[0]
    if task == "classification":
        return (pred.argmax(dim=1) == targets.reshape(n)).double()
    if task == "regression":
        return -(pred.reshape(n, -1) - targets.reshape(n, -1).to(pred)).abs().mean(dim=1).double()
    if task == "segmentation":
        return dice_from_logits(pred, targets).mean(dim=1)
    raise ValueError(f"CGGM has no metric for task {task!r}: the network's task must be classification, "
                     "regression or segmentation.")


class CGGMStrategy(GradientStrategy):
    """Classifier-guided gradient modulation of the encoders' gradients (magnitude and direction).

    The network needs :meth:`encode`/:meth:`decode`, ``fusion_head_weight()``,
    ``make_modality_heads()``, ``encoders`` and ``task`` (``DSUNet`` and ``DSTransformer`` have them).
    The heads are built on the first step (seeded by ``seed``, on the network's device and in its
    dtype) and belong to the strategy: they are saved by :meth:`state_dict` with their optimizer,
    never with the network. In a multi-process run the heads' gradients are averaged over the ranks
    and the metric is taken over the global batch, so every rank keeps the same heads and balance
    terms.

    Args:
        rho: scale of the balance terms ``B_i`` (paper: 1.2 - 1.3); must be > 0.
        cggm_lambda: weight of the direction loss ``L_gm`` (paper: 0.1 - 0.2; 0 turns it off).
        head_lr: learning rate of the heads' Adam optimizer.
        b_clip: clamp ``B`` to ``[-b_clip, b_clip]``; ``None`` (default) does not clip, as the paper.
        seed: seed of the strategy's generator and of the heads' initialisation.
        diagnostics_interval: record ``B``, ``eps``, ``delta``, ``cos`` and ``L_gm`` every this many
            iterations (0: never).

    Raises:
        ValueError: ``rho`` is not a finite number above 0, or another setting is out of range (naming its flag).
    """

    name = "cggm"

    def __init__(
        self, rho: float = 1.2, cggm_lambda: float = 0.1, head_lr: float = 1e-3, b_clip: float | None = None,
        seed: int = 0, diagnostics_interval: int = 0,
    ) -> None:
        super().__init__(seed)
        # checked here, not by float(): --cggm_rho x stopped the run with a bare traceback. rho scales every
        # balance term B_i, so rho = 0 zeroed every encoder's gradient and a negative rho reversed it (gradient
        # ascent) without a word; eq. 7 needs a positive scale
        try:
            valid = not isinstance(rho, bool) and math.isfinite(float(rho)) and float(rho) > 0
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise ValueError(f"--cggm_rho {rho!r} must be a finite number > 0 (it scales every balance term B_i: 0 "
                             "would zero the encoders' gradients, a negative value reverse them), e.g. --cggm_rho 1.2.")
        check_positive(allow_zero=True, cggm_lambda=cggm_lambda)
        check_positive(cggm_head_lr=head_lr)
        if b_clip is not None:
            check_positive(cggm_b_clip=b_clip)
        check_counts(at_least=0, diagnostics_interval=diagnostics_interval)
        self.rho = float(rho)
        self.cggm_lambda = float(cggm_lambda)
        self.head_lr = float(head_lr)
        self.b_clip = None if b_clip is None else float(b_clip)
        self.diagnostics_interval = int(diagnostics_interval)
        self.heads: nn.ModuleList | None = None
        self.head_optimizer: torch.optim.Optimizer | None = None
        self.eps: list[float] | None = None
        self._pending: dict | None = None  # loaded before the heads exist (resume): applied when built

    # -- heads ------------------------------------------------------------------------------------
    def build_heads(self, model: Any) -> nn.ModuleList:
        """The heads of ``model`` (built on the first call) and their optimizer.

        Raises:
            TypeError: ``model`` has no ``make_modality_heads()``.
        """
        if self.heads is not None:
            return self.heads
        if not hasattr(model, "make_modality_heads"):
            raise TypeError(f"{type(model).__name__} has no make_modality_heads(): CGGM needs a network with "
                            "per-modality heads (DSUNet or DSTransformer).")
        weight = model.fusion_head_weight()
        # a private seed: the heads are the same on every rank, and building them never moves the global
        # generator, so a resumed run (heads rebuilt, then loaded) draws the same numbers as an uninterrupted one
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            heads = model.make_modality_heads()
        self.heads = heads.to(device=weight.device, dtype=weight.dtype).train()
        self.head_optimizer = torch.optim.Adam(self.heads.parameters(), lr=self.head_lr)
        self.eps = [0.0] * model.num_modalities
        if self._pending is not None:
            self._load_heads(self._pending)
            self._pending = None
        return self.heads

    def _load_heads(self, state: dict) -> None:
        self.heads.load_state_dict(state["heads"])
        self.head_optimizer.load_state_dict(state["head_optimizer"])
        if len(state["eps"]) != len(self.eps):
            raise ValueError(f"The CGGM state has {len(state['eps'])} modalities, the network {len(self.eps)}: "
                             "resume with the run's original modalities.")
        self.eps = [float(e) for e in state["eps"]]

    def train_heads(
        self, model: Any, encoded: list, targets: torch.Tensor, loss_function: Callable,
    ) -> tuple[list[int], torch.Tensor, list[torch.Tensor], list[float]]:
        """One optimizer step of the heads on the detached representations.

        Returns the present modalities, the metric ``[M]`` (float64; ``nan`` where absent), each
        present head's final-weight gradient before the step, and its loss.
        """
        heads = self.build_heads(model)
        world = process_group()[0]
        m_total = model.num_modalities
        sums = torch.zeros(2 * m_total, dtype=torch.float64, device=targets.device)
        head_losses: dict[int, torch.Tensor] = {}
        for m, rows, rep in encoded:
            pred = heads[m](_detach(rep))
            y = targets[rows]
            head_losses[m] = loss_function(pred, y).mean()
            values = head_metric(model.task, pred, y)
            sums[m] = values.sum()
            sums[m_total + m] = values.numel()
        self.head_optimizer.zero_grad(set_to_none=True)
        sum(head_losses.values()).backward()
        if world > 1:
            # every rank steps the heads with the mean of the ranks' gradients, so the heads stay equal
            for p in heads.parameters():
                if p.grad is None:  # a modality this rank's batch lacks
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad.div_(world)
            dist.all_reduce(sums)
        counts = sums[m_total:]
        present = [m for m in range(m_total) if float(counts[m]) > 0]
        metric = torch.full((m_total,), float("nan"), dtype=torch.float64)
        for m in present:
            metric[m] = float(sums[m] / counts[m])
        for m in range(m_total):
            if m not in present:  # no rank had the modality: Adam must leave its head alone
                for p in heads[m].parameters():
                    p.grad = None
        grads = [heads[m].final_weight().grad.detach().clone() for m in present]
        self.head_optimizer.step()
        self.head_optimizer.zero_grad(set_to_none=True)
        return present, metric, grads, [float(head_losses[m].detach()) if m in head_losses else float("nan")
                                        for m in present]

    # -- the step ---------------------------------------------------------------------------------
    def step(
        self, model: Any, inputs: Any, modality_mask: torch.Tensor, targets: torch.Tensor,
        loss_function: Callable, iteration: int = 0,
    ) -> StepResult:
        """One CGGM step (see the class).

        Raises:
            ValueError: a sample has no modality (the loss would leave it out and ``pred`` would have
                fewer rows than the batch).
        """
        check_fusable(modality_mask)
        encoded = model.encode(inputs, modality_mask)
        per_mod = model.decode(encoded, modality_mask.shape[0], inputs=inputs)
        loss, pred = subset_loss(model, per_mod, modality_mask, targets, loss_function)

        present, metric, head_grads, head_losses = self.train_heads(model, encoded, targets, loss_function)
        eps_prev = torch.tensor(self.eps, dtype=torch.float64)
        eps_now = eps_prev.clone()
        eps_now[present] = metric[present]
        delta = eps_now - eps_prev  # an absent modality keeps its eps: delta 0
        terms = balance_terms(delta, self.rho, self.b_clip, present)
        self.eps = eps_now.tolist()

        want_diag = self.diagnostics_interval > 0 and iteration % self.diagnostics_interval == 0
        total = loss
        l_gm, cos = None, None
        # with a single modality eq. 7 gives B = 0, so eq. 12's direction loss is 0: there is no other modality to
        # turn the fusion towards. Only the magnitude deviates from the paper there (B = 1, see balance_terms); a
        # direction loss with that B = 1 pulled the fused gradient towards the lone probe's, which the paper never does
        balanced = len(present) >= 2
        if (self.cggm_lambda > 0 and balanced) or want_diag:
            weight = model.fusion_head_weight()
            train_direction = self.cggm_lambda > 0 and balanced
            fusion_grad = torch.autograd.grad(loss, weight, create_graph=train_direction, retain_graph=True)[0]
            if not train_direction:
                fusion_grad = fusion_grad.detach()
            l_gm, cos = modulation_loss(terms[present], fusion_grad, head_grads)
            if not balanced:
                l_gm = torch.zeros_like(l_gm)
            if train_direction:
                total = loss + self.cggm_lambda * l_gm.to(loss.dtype)
        total.backward()
        for m in present:
            scale = float(terms[m])
            for p in model.encoders[m].parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)

        diagnostics = None
        if want_diag:
            names = list(model.modalities)

            def by_modality(values: list) -> list:  # entries of the present modalities; None elsewhere
                out = [None] * len(names)
                for j, m in enumerate(present):
                    out[m] = values[j]
                return out

            diagnostics = {
                "strategy": self.name, "modalities": names, "present": [m in present for m in range(len(names))],
                # an absent modality's B scaled no gradient (its encoder did not run): no curve point for it
                "B": by_modality(terms[present].tolist()), "eps": self.eps, "delta": delta.tolist(),
                "cos": by_modality(cos.detach().tolist()), "L_gm": float(l_gm.detach()),
                "head_losses": by_modality(head_losses),
            }
        return StepResult(loss=loss.detach(), pred=pred.detach(), diagnostics=diagnostics)

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The base state plus the probe heads, their optimizer and the balance terms ``eps``."""
        state = super().state_dict()
        if self.heads is not None:
            state.update(heads=self.heads.state_dict(), head_optimizer=self.head_optimizer.state_dict(),
                         eps=list(self.eps))
        elif self._pending is not None:
            state.update(self._pending)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; heads not built yet are loaded when the first step builds them."""
        super().load_state_dict(state)
        if "heads" not in state:
            return
        heads = {k: state[k] for k in ("heads", "head_optimizer", "eps")}
        if self.heads is None:
            self._pending = heads
        else:
            self._load_heads(heads)



def _detach(representation: Any) -> Any:
    """The representation with every tensor detached (a probe must not train the encoder)."""
    if isinstance(representation, torch.Tensor):
        return representation.detach()
    if isinstance(representation, (list, tuple)):
        return type(representation)(_detach(r) for r in representation)
    return representation

"""Naive GMD for the tests: eq. 8 applied pair by pair to flattened per-subset gradients.

Independent of the strategy's Gram-matrix weights, so a test that compares the two catches a wrong
Gram matrix, projection or reduction.
"""

from __future__ import annotations

from typing import Sequence

import torch


def flat_gradient(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """The gradients of ``params`` as one vector (zeros where a parameter got none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


def shared_flags(model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """Bool vector over :func:`flat_gradient`'s entries: True where the parameter is shared."""
    shared_ids = {id(p) for p in model.shared_parameters()}
    return torch.cat([torch.full((p.numel(),), id(p) in shared_ids, device=p.device) for p in params])


def decoupled_merge(grads: torch.Tensor, orders: Sequence[Sequence[int]], is_shared: torch.Tensor) -> torch.Tensor:
    """Each subset gradient (row of ``grads``) loses its projection on every other one it conflicts with on
    the shared entries, in ``orders[i]``; shared entries take the mean of the results, the others the sum."""
    decoupled = []
    for i in range(len(grads)):
        g = grads[i].clone()
        for j in orders[i]:
            dot = g[is_shared] @ grads[j][is_shared]
            if dot < 0:
                g = g - dot / (grads[j][is_shared] @ grads[j][is_shared]) * grads[j]
        decoupled.append(g)
    decoupled = torch.stack(decoupled)
    return torch.where(is_shared, decoupled.mean(0), decoupled.sum(0))

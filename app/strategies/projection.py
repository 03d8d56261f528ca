"""GMD decoupling in coefficient space.

Every decoupled gradient is a linear combination of the original subset gradients ``G_1..G_k``
(each projection step subtracts a multiple of an *original* ``G_j``), so the whole PCGrad-style
procedure of eq. 8 can run on the Gram matrix ``K = G G^T`` alone. The result is a coefficient
matrix ``A`` with ``g~_i = sum_l A[i, l] G_l`` and merge weights ``w = A.mean(0)`` so that the mean
of the decoupled gradients is ``sum_j w_j G_j``.
"""

from __future__ import annotations

import torch

__all__ = ["projection_orders", "decouple_coefficients", "gram_cosine", "count_conflicts", "gmd_statistics"]

#: a gradient whose squared norm is at most this fraction of the largest subset gradient's is numerically zero:
#: its direction is rounding noise. Relative, as eq. 8 is invariant to the gradients' common scale: an absolute
#: floor switched the decoupling (and the diagnostics' conflicts) off for every subset once the gradients were
#: small (norms under 1e-10: a trained model on background-only patches), where the maths is unchanged.
_EPS = 1e-20


#: the same for a decoupled gradient, relative to the largest original one: ``A K A^T`` cancels terms of the size
#: of ``|G|^2``, so a decoupled gradient that is exactly 0 (a subset projected onto its exact opposite) comes out
#: with a squared norm of float64 rounding, about 1e-16 of ``|G|^2``, whose cosines would count as conflicts
_EPS_DECOUPLED = 1e-12


def _floor(sq_norms: torch.Tensor) -> float:
    """``_EPS`` times the largest squared norm: at or below it a gradient is numerically zero."""
    return _EPS * float(sq_norms.max()) if sq_norms.numel() else 0.0


def projection_orders(k: int, generator: torch.Generator | None = None) -> list[list[int]]:
    """For each subset ``i``, the random order in which the other subsets are visited."""
    orders = []
    for i in range(k):
        perm = torch.randperm(k, generator=generator).tolist()
        orders.append([j for j in perm if j != i])
    return orders


def decouple_coefficients(gram: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """Coefficients ``A`` of the decoupled gradients in the basis of the original ones.

    For each ``i``, start from ``g_i = G_i`` and visit the other subsets ``j`` in ``orders[i]``;
    whenever ``g_i . G_j < 0`` remove the projection: ``g_i -= (g_i . G_j / |G_j|^2) G_j`` (eq. 8).
    A numerically zero ``G_j`` (squared norm at most ``1e-20`` times the largest ``|G_l|^2``) has no
    direction to project on and is skipped.

    Args:
        gram: ``[k, k]`` Gram matrix ``G_j . G_l`` (use float64).
        orders: output of :func:`projection_orders`.

    Returns:
        ``[k, k]`` matrix ``A`` in the dtype and on the device of ``gram`` (computed on the host).
    """
    # k^2 tiny steps with a branch each: on the host, not one device sync per branch
    g = gram.detach().cpu()
    k = g.shape[0]
    coeffs = torch.eye(k, dtype=g.dtype)
    floor = _floor(g.diagonal())
    live = [bool(v > floor) and bool(v > 0) for v in g.diagonal()]
    for i in range(k):
        for j in orders[i]:
            dot = coeffs[i] @ g[:, j]
            norm_sq = g[j, j]
            if dot < 0 and live[j]:
                coeffs[i, j] -= dot / norm_sq
    return coeffs.to(gram.device)


def gram_cosine(gram: torch.Tensor, floor: float | None = None) -> torch.Tensor:
    """Pairwise cosine similarities from a Gram matrix.

    0 where a gradient is (numerically) zero: a squared norm of at most ``floor``, by default ``1e-20``
    times the largest one, the threshold below which :func:`decouple_coefficients` does not project on
    it either. Such a gradient's cosines are rounding noise and would otherwise be counted as conflicts.

    Args:
        gram: ``[k, k]`` Gram matrix.
        floor: the squared norm at or below which a gradient counts as zero; None: ``1e-20`` times the
            largest diagonal entry of ``gram``.
    """
    sq = gram.diagonal()
    live = (sq > (_floor(sq) if floor is None else floor)) & (sq > 0)
    norms = sq.clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    keep = live[:, None] & live[None, :]
    # live pairs have a positive denominator; the others' is replaced by 1 so that no 0/0 is ever formed
    return torch.where(keep, gram / torch.where(keep, denom, torch.ones_like(denom)), torch.zeros_like(gram))


def count_conflicts(cosine: torch.Tensor, tol: float = 1e-9) -> int:
    """Number of unordered pairs ``j < l`` with negative cosine."""
    upper = torch.triu(torch.ones_like(cosine, dtype=torch.bool), diagonal=1)
    return int(((cosine < -tol) & upper).sum())


def gmd_statistics(gram: torch.Tensor, coeffs: torch.Tensor) -> dict:
    """Diagnostics of one GMD step: norms, cosines and conflict counts before and after decoupling."""
    gram_after = coeffs @ gram @ coeffs.T
    scale = float(gram.diagonal().max()) if gram.numel() else 0.0
    cos_before, cos_after = gram_cosine(gram), gram_cosine(gram_after, _EPS_DECOUPLED * scale)
    k = gram.shape[0]
    pairs = k * (k - 1) // 2
    return {
        "norms": gram.diagonal().clamp_min(0).sqrt().tolist(),
        "norms_after": gram_after.diagonal().clamp_min(0).sqrt().tolist(),
        "cosine_before": cos_before.tolist(),
        "cosine_after": cos_after.tolist(),
        "conflicts_before": count_conflicts(cos_before),
        "conflicts_after": count_conflicts(cos_after),
        "pairs": pairs,
        "weights": coeffs.mean(0).tolist(),
    }

"""VICReg (variance-invariance-covariance) loss between predicted and real embeddings.

Used by the ``predict`` strategy to train the missing-modality predictor (Kim & Kim, ECCV 2024),
with the three terms of Bardes et al. (ICLR 2022):

- invariance ``s(Z, Z')``: mean squared error between the two batches (averaged over samples and
  dimensions, as the reference implementation's ``F.mse_loss``; the papers' equation sums over the
  ``d`` dimensions, so relative to it the invariance weight is ``invariance_weight / d``);
- variance ``v(Z) = mean_j max(0, gamma - sqrt(Var(Z[:, j]) + eps))``, a hinge on the standard
  deviation of each dimension over the batch (unbiased variance);
- covariance ``c(Z) = sum_{i != j} Cov(Z)[i, j]^2 / d``, the squared off-diagonal entries of the
  (unbiased) covariance matrix, which decorrelates the dimensions.

``L = invariance_weight * s + variance_weight * [v(Z) + v(Z')] + covariance_weight * [c(Z) + c(Z')]``,
the form of both papers' equation, with the reference code's ``s`` (the reference code also halves the
variance term, which the papers and this module do not). So ``invariance_weight = 25 * d`` gives the
papers' equation with lambda = 25, and ``variance_weight = 12.5`` the reference code (docs/methods.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn import functional as F

__all__ = ["VICRegTerms", "vicreg_invariance", "vicreg_variance", "vicreg_covariance", "vicreg_terms", "vicreg_loss"]


class VICRegTerms(NamedTuple):
    """The unweighted terms: ``invariance = s(Z, Z')``, ``variance = v(Z) + v(Z')``, ``covariance = c(Z) + c(Z')``."""

    invariance: torch.Tensor
    variance: torch.Tensor
    covariance: torch.Tensor


def _check(z: torch.Tensor) -> None:
    if z.ndim != 2:
        raise ValueError(f"VICReg expects embeddings [n, d], got shape {tuple(z.shape)}.")
    if z.shape[0] < 2:
        raise ValueError(f"VICReg needs at least 2 samples for variance and covariance, got {z.shape[0]}: "
                         "skip the term for such batches.")


def vicreg_invariance(z: torch.Tensor, z_prime: torch.Tensor) -> torch.Tensor:
    """``s(Z, Z')``: mean over samples and dimensions of the squared differences.

    Raises:
        ValueError: the embeddings' shapes differ.
    """
    if z.shape != z_prime.shape:
        raise ValueError(f"Embeddings must have the same shape, got {tuple(z.shape)} and {tuple(z_prime.shape)}.")
    return F.mse_loss(z, z_prime)


def vicreg_variance(z: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """``v(Z)``: mean over dimensions of ``max(0, gamma - sqrt(Var + eps))`` (unbiased variance over the batch)."""
    _check(z)
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(gamma - std).mean()


def vicreg_covariance(z: torch.Tensor) -> torch.Tensor:
    """``c(Z)``: sum of the squared off-diagonal entries of the unbiased covariance matrix, divided by ``d``."""
    _check(z)
    n, d = z.shape
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (n - 1)
    off_diagonal = cov - torch.diag_embed(torch.diagonal(cov))
    return off_diagonal.pow(2).sum() / d


def vicreg_terms(z: torch.Tensor, z_prime: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> VICRegTerms:
    """The three unweighted terms of two embedding batches ``[n, d]`` (``n >= 2``)."""
    return VICRegTerms(
        invariance=vicreg_invariance(z, z_prime),
        variance=vicreg_variance(z, gamma, eps) + vicreg_variance(z_prime, gamma, eps),
        covariance=vicreg_covariance(z) + vicreg_covariance(z_prime),
    )


def vicreg_loss(
    z: torch.Tensor,
    z_prime: torch.Tensor,
    invariance_weight: float = 25.0,
    variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
    gamma: float = 1.0,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Weighted VICReg loss (defaults: the VICReg paper's lambda = mu = 25, nu = 1).

    Args:
        z: predicted embeddings ``[n, d]``.
        z_prime: target embeddings ``[n, d]`` (detach them to train only the predictor).
        invariance_weight, variance_weight, covariance_weight: lambda, mu, nu.
        gamma: target standard deviation of the variance hinge.
        eps: added to the variance before the square root (numerical stability).
    """
    terms = vicreg_terms(z, z_prime, gamma, eps)
    return (invariance_weight * terms.invariance + variance_weight * terms.variance
            + covariance_weight * terms.covariance)

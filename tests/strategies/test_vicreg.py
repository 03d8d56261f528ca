"""VICReg terms against a hand computation on a 4 x 3 example."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from app.strategies.vicreg import vicreg_covariance, vicreg_invariance, vicreg_loss, vicreg_terms, vicreg_variance

# columns: mean 1 each; centred [-1, 1, -1, 1], [-1, -1, 1, 1], [-1, -1, -1, 3]
Z = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [2.0, 2.0, 4.0]], dtype=torch.float64)
Z_SMALL = Z / 4


def test_invariance_is_the_mean_squared_difference():
    # Z - Z/4 = 3/4 Z; sum of Z^2 = 4 + 4 + 4 + 4 + 16 = 32 over 12 entries: 9/16 * 32/12 = 3/2
    assert float(vicreg_invariance(Z, Z_SMALL)) == pytest.approx(1.5, abs=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        vicreg_invariance(Z, Z[:, :2])


def test_variance_hinge():
    # unbiased variances of Z: 4/3, 4/3, 12/3 = 4; standard deviations >= 1: no penalty
    assert float(vicreg_variance(Z)) == 0.0
    # Z/4: variances 1/12, 1/12, 1/4, all below gamma = 1
    expected = (2 * (1 - math.sqrt(1 / 12 + 1e-4)) + (1 - math.sqrt(1 / 4 + 1e-4))) / 3
    assert float(vicreg_variance(Z_SMALL)) == pytest.approx(expected, abs=1e-12)
    # gamma = 3 makes every column of Z pay: (3 - sqrt(4/3 + eps)) twice and (3 - sqrt(4 + eps))
    expected = (2 * (3 - math.sqrt(4 / 3 + 1e-4)) + (3 - math.sqrt(4 + 1e-4))) / 3
    assert float(vicreg_variance(Z, gamma=3.0)) == pytest.approx(expected, abs=1e-12)


def test_covariance_off_diagonal():
    # cov01 = (1 - 1 - 1 + 1)/3 = 0; cov02 = (1 - 1 + 1 + 3)/3 = 4/3; cov12 = (1 + 1 - 1 + 3)/3 = 4/3
    # c = 2 * (0 + 16/9 + 16/9) / 3 = 64/27; scaling by 1/4 scales it by 1/256
    assert float(vicreg_covariance(Z)) == pytest.approx(64 / 27, abs=1e-12)
    assert float(vicreg_covariance(Z_SMALL)) == pytest.approx(64 / 27 / 256, abs=1e-12)
    # decorrelated columns cost nothing, whatever their variances
    assert float(vicreg_covariance(Z[:, :2])) == 0.0


def test_terms_and_weighted_total():
    terms = vicreg_terms(Z_SMALL, Z)
    v_small = (2 * (1 - math.sqrt(1 / 12 + 1e-4)) + (1 - math.sqrt(1 / 4 + 1e-4))) / 3
    c_total = 64 / 27 + 64 / 27 / 256
    assert float(terms.invariance) == pytest.approx(1.5, abs=1e-12)
    assert float(terms.variance) == pytest.approx(v_small, abs=1e-12)  # v(Z) = 0
    assert float(terms.covariance) == pytest.approx(c_total, abs=1e-12)
    total = 25 * 1.5 + 25 * v_small + 1 * c_total  # the VICReg paper's lambda, mu, nu
    assert float(vicreg_loss(Z_SMALL, Z)) == pytest.approx(total, abs=1e-10)
    assert float(vicreg_loss(Z_SMALL, Z, 2.0, 3.0, 0.5)) == pytest.approx(2 * 1.5 + 3 * v_small + 0.5 * c_total,
                                                                            abs=1e-10)


def test_gradient_only_through_the_prediction_when_the_target_is_detached():
    pred = Z_SMALL.clone().requires_grad_(True)
    vicreg_loss(pred, Z.detach()).backward()
    # d/dpred of 25 * mean((pred - Z)^2) + ... is finite and nonzero; the target has no grad
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_one_sample_is_refused():
    with pytest.raises(ValueError, match="at least 2 samples"):
        vicreg_variance(Z[:1])
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        vicreg_covariance(Z.flatten())


def test_normalisation_against_the_papers_equation_and_the_reference_code():
    """docs/methods.md: the invariance is a mean over dimensions (the papers' s sums them) and the variance is
    not halved (the reference code halves it): weights 25 * d and 12.5 give the one and the other, by numpy."""
    rng = np.random.default_rng(1)
    n, d = 9, 64
    z, z_prime = 0.5 * rng.normal(size=(n, d)), rng.normal(size=(n, d))

    def v(a):
        return np.mean(np.maximum(0.0, 1.0 - np.sqrt(a.var(axis=0, ddof=1) + 1e-4)))

    def c(a):
        cov = np.cov(a, rowvar=False)
        return (np.sum(cov ** 2) - np.sum(np.diag(cov) ** 2)) / a.shape[1]

    equation = 25 * np.mean(np.sum((z - z_prime) ** 2, axis=1)) + 25 * (v(z) + v(z_prime)) + c(z) + c(z_prime)
    reference = 25 * np.mean((z - z_prime) ** 2) + 25 * (v(z) + v(z_prime)) / 2 + c(z) + c(z_prime)
    ours = 25 * np.mean((z - z_prime) ** 2) + 25 * (v(z) + v(z_prime)) + c(z) + c(z_prime)
    z_t, z_prime_t = torch.tensor(z), torch.tensor(z_prime)
    assert float(vicreg_loss(z_t, z_prime_t)) == pytest.approx(ours, rel=1e-12)
    assert float(vicreg_loss(z_t, z_prime_t, invariance_weight=25 * d)) == pytest.approx(equation, rel=1e-12)
    assert float(vicreg_loss(z_t, z_prime_t, variance_weight=12.5)) == pytest.approx(reference, rel=1e-12)

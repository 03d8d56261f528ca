"""Property tests of GMD's decoupling (``app.strategies.projection.decouple_coefficients``).

Notation: ``G_1..G_k`` are the subset gradients, ``K = G G^T`` their Gram matrix, ``A`` the returned
coefficients (``g~_i = sum_l A[i, l] G_l``) and ``orders[i]`` the order in which ``g~_i`` visits the
other subsets. Each visit of ``j`` removes the component of the running ``g`` along ``G_j`` when
``g . G_j < 0`` (eq. 8). What provably holds, and is checked here on random Gram matrices and orders:

1. Projection only adds the conflicting gradients: ``A[i, i] = 1`` and ``A[i, j] >= 0`` for ``j != i``
   (removing the component along ``G_j`` when ``g . G_j < 0`` adds ``-g.G_j / |G_j|^2 > 0`` times ``G_j``).
2. At the moment ``j`` is visited, the running ``g`` ends with ``g . G_j >= 0``: a conflict found
   then is removed exactly (``g . G_j = 0`` afterwards, ``A[i, j] > 0``) and otherwise ``g`` is left
   alone (``A[i, j] = 0``). Because ``A`` holds one coefficient per visited subset, the running ``g``
   after each visit is a prefix of ``A[i]`` in ``orders[i]``, so this is checked on the result.
3. On the result, ``g~_i . G_j >= 0`` for the *last* subset ``j`` of ``orders[i]``. For earlier ones it
   does not hold in general: a later projection against ``G_l`` with ``G_l . G_j > 0`` can bring back a
   conflict with ``G_j``, even one it removed before (PCGrad's known limitation; counterexample in
   :func:`test_what_does_not_hold_earlier_conflicts_and_three_subsets`).
4. Projections never lengthen a gradient: ``|g~_i| <= |G_i|``.
5. Without any conflict (``K >= 0`` off the diagonal) nothing changes: ``A = I``.
6. The decoupling ignores the loss scale: ``A(4^p K) = A(K)`` bit for bit (without underflow).
7. With two subsets the merged update ``m = (g~_1 + g~_2) / 2`` conflicts with neither:
   ``m . G_j >= 0`` (``g~_2 . G_1 = 0`` and ``g~_1 . G_1 = |G_1|^2 - (G_1.G_2)^2/|G_2|^2 >= 0`` by
   Cauchy-Schwarz, when they conflicted). With three or more subsets this can fail (same test).

Rounding: sign conditions are checked up to ``TOL * (1 + max |G_i|^2)``.
"""

from __future__ import annotations

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from app.strategies.projection import decouple_coefficients

TOL = 1e-9
_EPS = 1e-20  # the threshold below which decouple_coefficients does not project on a gradient

_value = st.floats(min_value=-8.0, max_value=8.0, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def gradients_and_orders(draw, min_k: int = 1, max_k: int = 6, value: st.SearchStrategy = _value):
    k = draw(st.integers(min_k, max_k))
    dim = draw(st.integers(1, 6))
    rows = draw(st.lists(st.lists(value, min_size=dim, max_size=dim), min_size=k, max_size=k))
    grads = torch.tensor(rows, dtype=torch.float64)
    orders = [[j for j in draw(st.permutations(range(k))) if j != i] for i in range(k)]
    return grads, orders


def _scale(gram: torch.Tensor) -> float:
    return TOL * (1.0 + float(gram.diagonal().max()))


@settings(max_examples=200, deadline=None)
@given(gradients_and_orders())
def test_projection_only_adds_the_conflicting_gradients(case):
    grads, orders = case
    coeffs = decouple_coefficients(grads @ grads.T, orders)
    k = grads.shape[0]
    assert torch.equal(coeffs.diagonal(), torch.ones(k, dtype=torch.float64))
    off = ~torch.eye(k, dtype=torch.bool)
    assert bool((coeffs[off] >= 0).all())


# The exact dot product at one visit is ~1e-323 here: the decoupling rounds it to 0 and a
# recomputation to -1e-323. Only the sign up to rounding is defined, as for every check here.
_UNDERFLOW = (
    torch.tensor([[0.0], [1.5], [-3.0], [-2.2250738585072014e-308]], dtype=torch.float64),
    [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]],
)


@settings(max_examples=200, deadline=None)
@given(gradients_and_orders())
@example(_UNDERFLOW)
def test_each_visit_leaves_no_conflict_with_the_visited_gradient(case):
    grads, orders = case
    gram = grads @ grads.T
    coeffs = decouple_coefficients(gram, orders)
    tol = _scale(gram)
    for i, order in enumerate(orders):
        running = torch.zeros_like(coeffs[i])
        running[i] = 1.0
        for j in order:
            before = float(running @ gram[:, j])
            running[j] = coeffs[i, j]
            after = float(running @ gram[:, j])
            if coeffs[i, j] > 0:  # projected: there was a conflict, and it is gone exactly
                assert before < tol and abs(after) <= tol, (i, j, before, after)
            else:  # not projected: there was no conflict, or nothing to project on
                assert before >= -tol or float(gram[j, j]) <= _EPS, (i, j, before)
            assert after >= -tol
        assert torch.equal(running, coeffs[i])  # the prefixes rebuild the result


@settings(max_examples=200, deadline=None)
@given(gradients_and_orders(min_k=2))
def test_result_does_not_conflict_with_the_last_visited_gradient(case):
    grads, orders = case
    gram = grads @ grads.T
    decoupled = decouple_coefficients(gram, orders) @ grads
    for i, order in enumerate(orders):
        assert float(decoupled[i] @ grads[order[-1]]) >= -_scale(gram)


@settings(max_examples=200, deadline=None)
@given(gradients_and_orders())
def test_projections_never_lengthen_a_gradient(case):
    grads, orders = case
    gram = grads @ grads.T
    coeffs = decouple_coefficients(gram, orders)
    norms_sq = (coeffs @ gram @ coeffs.T).diagonal()
    assert bool((norms_sq <= gram.diagonal() + _scale(gram)).all())


@settings(max_examples=100, deadline=None)
@given(gradients_and_orders())
def test_no_conflict_means_no_change(case):
    grads, orders = case
    grads = grads.abs()  # non-negative vectors never conflict
    coeffs = decouple_coefficients(grads @ grads.T, orders)
    assert torch.equal(coeffs, torch.eye(grads.shape[0], dtype=torch.float64))


# magnitudes that stay normal floats after scaling: with subnormals the scaling itself rounds
_normal_value = st.one_of(st.just(0.0), st.floats(1e-3, 8.0), st.floats(-8.0, -1e-3))


@settings(max_examples=100, deadline=None)
@given(gradients_and_orders(value=_normal_value), st.integers(-6, 6))
def test_decoupling_ignores_the_loss_scale(case, power):
    grads, orders = case
    gram = grads @ grads.T
    # scaling the losses by 2^p scales K by 4^p; multiplying by a power of two is exact, so the
    # ratios, signs and coefficients are bit-identical
    assert torch.equal(decouple_coefficients(gram * 4.0**power, orders), decouple_coefficients(gram, orders))


@settings(max_examples=300, deadline=None)
@given(gradients_and_orders(min_k=2, max_k=2))
def test_two_subsets_merged_update_conflicts_with_neither(case):
    grads, orders = case
    gram = grads @ grads.T
    merged = (decouple_coefficients(gram, orders) @ grads).mean(0)
    for j in range(2):
        assert float(merged @ grads[j]) >= -_scale(gram)


def test_what_does_not_hold_earlier_conflicts_and_three_subsets():
    """Counterexamples (found by hypothesis) for the claims the module docstring does not make."""
    grads = torch.tensor([[0.0, 1.0], [1.0, -1.0], [-1.0, 0.0]], dtype=torch.float64)
    orders = [[1, 2], [0, 2], [0, 1]]
    coeffs = decouple_coefficients(grads @ grads.T, orders)
    # g~_0 removes its conflict with G_1 (A[0, 1] > 0), then the projection on G_2 brings it back
    assert float(coeffs[0, 1]) > 0 and float((coeffs @ grads)[0] @ grads[1]) < 0
    grads = torch.tensor([[0.0, -1.0], [1.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    merged = (decouple_coefficients(grads @ grads.T, orders) @ grads).mean(0)
    assert min(float(merged @ g) for g in grads) < 0  # three subsets: the merged update may conflict

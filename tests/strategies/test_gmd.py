"""GMD maths by hand, and the fast strategy against a naive one-backward-per-subset reference."""

from __future__ import annotations

import math

import pytest
import torch

from app.networks import DSUNet
from app.strategies import GMDApproxStrategy, GMDStrategy, build_strategy
from app.strategies.projection import (
    count_conflicts, decouple_coefficients, gmd_statistics, gram_cosine, projection_orders,
)
from app.subsets import all_subsets, subset_masks
from tests.strategies.gmd_reference import decoupled_merge, flat_gradient, shared_flags


def _merged(grads: torch.Tensor, orders) -> torch.Tensor:
    gram = grads.double() @ grads.double().T
    coeffs = decouple_coefficients(gram, orders)
    return coeffs.mean(0) @ grads.double()


def test_two_conflicting_gradients_match_eq8():
    g1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g2 = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    # eq. 8 by hand: g1 - (g1.g2/|g2|^2) g2 = [1,0] + 0.5[-1,1] = [0.5, 0.5];
    #                g2 - (g2.g1/|g1|^2) g1 = [-1,1] + [1,0] = [0, 1].
    merged = _merged(torch.stack([g1, g2]), [[1], [0]])
    assert torch.allclose(merged, torch.tensor([0.25, 0.75], dtype=torch.float64))
    # the decoupled gradients no longer conflict with the original other one
    coeffs = decouple_coefficients(torch.stack([g1, g2]) @ torch.stack([g1, g2]).T, [[1], [0]])
    d = coeffs @ torch.stack([g1, g2])
    assert float(d[0] @ g2) == pytest.approx(0.0, abs=1e-12)
    assert float(d[1] @ g1) == pytest.approx(0.0, abs=1e-12)


def test_no_conflict_no_change():
    grads = torch.tensor([[1.0, 0.2, 0.0], [0.5, 1.0, 0.1], [0.1, 0.3, 2.0]], dtype=torch.float64)
    gram = grads @ grads.T
    coeffs = decouple_coefficients(gram, projection_orders(3, torch.Generator().manual_seed(0)))
    assert torch.equal(coeffs, torch.eye(3, dtype=torch.float64))
    assert torch.allclose(_merged(grads, [[1, 2], [0, 2], [0, 1]]), grads.mean(0))


def test_a_numerically_zero_gradient_counts_as_no_conflict():
    # the third subset's loss is at its minimum: its gradient is rounding noise, not a direction
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-3e-17, -1e-17]], dtype=torch.float64)
    gram = g @ g.T
    cos = gram_cosine(gram)
    assert torch.equal(cos[2], torch.zeros(3, dtype=torch.float64)) and float(cos[0, 1]) == 0.0
    assert count_conflicts(cos) == 0
    stats = gmd_statistics(gram, decouple_coefficients(gram, [[1, 2], [0, 2], [0, 1]]))
    assert stats["conflicts_before"] == 0 and stats["weights"] == pytest.approx([1 / 3] * 3)
    # a real conflict still counts
    assert count_conflicts(gram_cosine(torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64))) == 1



@pytest.mark.parametrize("ratio, live", [(1e-18, True), (1e-22, False)])
def test_a_gradient_is_zero_at_1e_20_of_the_largest_squared_norm(ratio, live):
    # the documented floor: |G_j|^2 at most 1e-20 |G_max|^2 has no direction (not projected on, cosines 0); above it
    # the projection of eq. 8 is exact however small G_j is: G_0 = (1, 0) loses its component along G_1 ~ (-1, 1)
    t = math.sqrt(ratio / 2)
    g = torch.tensor([[1.0, 0.0], [-t, t]], dtype=torch.float64)
    gram = g @ g.T
    decoupled = decouple_coefficients(gram, [[1], [0]])[0] @ g
    assert decoupled.tolist() == pytest.approx([0.5, 0.5] if live else [1.0, 0.0], rel=1e-9)
    assert float(gram_cosine(gram)[0, 1]) == pytest.approx(-math.sqrt(0.5) if live else 0.0, rel=1e-9)


@pytest.mark.parametrize("ratio, conflicts", [(1e-9, 1), (1e-14, 0)])
def test_a_decoupled_gradient_is_zero_at_1e_12_of_the_largest_original_one(ratio, conflicts):
    # after decoupling the floor is 1e-12 |G_max|^2 (float64 rounding of A K A^T): a decoupled gradient above it
    # still has a direction, and its conflict is recorded
    a = math.sqrt(ratio / 2)
    stats = gmd_statistics(torch.eye(2, dtype=torch.float64), torch.tensor([[1.0, 0.0], [-a, a]], dtype=torch.float64))
    assert stats["conflicts_after"] == conflicts


@pytest.mark.parametrize("scale", [1e-6, 1e-11, 1e-14])
def test_small_gradients_are_decoupled_as_their_scaled_up_copies(scale):
    # eq. 8 is invariant to the gradients' common scale: a trained model on background-only patches has subset
    # gradients with norms under 1e-10, which an absolute floor on |G_j|^2 treated as zero (no projection, and
    # no conflict in the diagnostics)
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.5], [0.0, -1.0]], dtype=torch.float64)
    orders = [[1, 2], [2, 0], [0, 1]]
    gram, small = g @ g.T, (scale * g) @ (scale * g).T
    assert torch.allclose(decouple_coefficients(small, orders), decouple_coefficients(gram, orders))
    stats, small_stats = (gmd_statistics(k, decouple_coefficients(k, orders)) for k in (gram, small))
    assert small_stats["conflicts_before"] == stats["conflicts_before"] == 2
    assert small_stats["conflicts_after"] == stats["conflicts_after"] == 1
    assert small_stats["weights"] == pytest.approx(stats["weights"])
    assert torch.allclose(gram_cosine(small), gram_cosine(gram))
    # the decoupled g1 is 0 up to rounding: it has no direction at any scale
    assert small_stats["cosine_after"][1] == [0.0, 0.0, 0.0]


def test_three_gradients_sequential_projection_by_hand():
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.5], [0.0, -1.0]], dtype=torch.float64)
    orders = [[1, 2], [2, 0], [0, 1]]
    # g0: dot(g0,g1)=-1 -> g0 + (1/1.25) g1 = [0.2, 0.4]; dot with g2 = -0.4 -> + 0.4 g2 = [0.2, 0.0]
    # g1: dot(g1,g2)=-0.5 -> g1 + 0.5 g2 = [-1, 0]; dot with g0 = -1 -> + g0 = [0, 0]
    # g2: dot(g2,g0)=0 -> unchanged; dot(g2,g1)=-0.5 -> g2 + 0.4 g1 = [-0.4, -0.8]
    coeffs = decouple_coefficients(g @ g.T, orders)
    d = coeffs @ g
    expected = torch.tensor([[0.2, 0.0], [0.0, 0.0], [-0.4, -0.8]], dtype=torch.float64)
    assert torch.allclose(d, expected)
    # coefficients over the originals, read off the steps above: rows g0 + 0.8 g1 + 0.4 g2,
    # g1 + g0 + 0.5 g2, g2 + 0.4 g1; the merge weights are their column means
    expected_coeffs = torch.tensor([[1.0, 0.8, 0.4], [1.0, 1.0, 0.5], [0.0, 0.4, 1.0]], dtype=torch.float64)
    assert torch.allclose(coeffs, expected_coeffs)
    stats = gmd_statistics(g @ g.T, coeffs)
    assert stats["conflicts_before"] == 2 and stats["pairs"] == 3  # (g0, g1) and (g1, g2)
    assert stats["weights"] == pytest.approx([2 / 3, 2.2 / 3, 1.9 / 3])
    # after: d0 = [0.2, 0], d1 = 0 (no direction: cosine 0), d2 = [-0.4, -0.8]; d0 . d2 < 0 is one conflict
    assert stats["norms"] == pytest.approx([1.0, 1.25**0.5, 1.0])
    assert stats["norms_after"] == pytest.approx([0.2, 0.0, 0.8**0.5], abs=1e-9)
    assert stats["conflicts_after"] == 1
    assert stats["cosine_after"][0][2] == pytest.approx(-0.08 / (0.2 * 0.8**0.5))
    assert stats["cosine_before"][0][1] == pytest.approx(-1 / 1.25**0.5)


def _loss(pred, target):
    return torch.nn.functional.binary_cross_entropy_with_logits(pred, target) + (pred.sigmoid() * target).mean()


def _level(pred, target):
    """Squared gap between the mean predicted and target logit per channel. With the target at the
    all-sequence prediction, subsets predicting above and below it pull the shared head in opposite
    directions: their gradients conflict, and the decoupling weights are far from uniform."""
    return (pred.mean(dim=(0, 2, 3, 4)) - target.mean(dim=(0, 2, 3, 4))).pow(2).sum()


def _naive_gmd(model, x, y, subsets_idx, orders, mask=None, loss=_loss):
    """One full backward per subset, projections on the flattened shared gradient, as published.

    With a batch ``mask``, subset ``j``'s loss is on the samples that have one of its modalities,
    fused over those they have; every index in ``subsets_idx`` must have such a sample.
    """
    masks = subset_masks(model.num_modalities)
    params = list(model.parameters())
    is_shared = shared_flags(model, params)
    grads = []
    for j in subsets_idx:
        model.zero_grad()
        m = masks[j].to(x.device).expand(x.shape[0], -1)
        if mask is None:
            loss(model(x, m), y).backward()
        else:
            m = m & mask
            rows = m.any(dim=1)
            loss(model(x[rows], m[rows]), y[rows]).backward()
        grads.append(flat_gradient(params))
    merged = decoupled_merge(torch.stack(grads).double(), orders, is_shared)
    model.zero_grad()
    return merged


def _fast(strategy, model, x, y, loss=_loss):
    model.zero_grad()
    mask = torch.ones(x.shape[0], model.num_modalities, dtype=torch.bool, device=x.device)
    result = strategy.step(model, x, mask, y, loss, iteration=1)
    if strategy.diagnostics_interval and loss is _level:  # the projections must have had work to do
        assert result.diagnostics["conflicts_before"] > 0
    return flat_gradient(list(model.parameters()))


@pytest.mark.parametrize("subsets", ["all", 5])
@pytest.mark.parametrize("vjp_chunk", [1, 4])
@pytest.mark.parametrize("loss", [_loss, _level], ids=["bce", "conflicting"])
def test_gmd_matches_naive_reference(subsets, vjp_chunk, loss):
    torch.manual_seed(0)
    model = DSUNet(features=(4, 8), out_channels=2).double()
    x = torch.randn(2, 4, 8, 8, 8, dtype=torch.float64)
    y = (torch.rand(2, 2, 8, 8, 8) > 0.6).double()
    if loss is _level:
        with torch.no_grad():
            y = model(x)
    strategy = GMDStrategy(subsets=subsets, seed=3, vjp_chunk=vjp_chunk, diagnostics_interval=1)
    # replay the strategy's random draws to give the reference the same subsets and orders
    probe = GMDStrategy(subsets=subsets, seed=3)
    chosen = probe.choose_subsets(15)
    orders = projection_orders(len(chosen), probe.generator)
    fast = _fast(strategy, model, x, y, loss)
    naive = _naive_gmd(model, x, y, chosen, orders, loss=loss)
    rel = (fast - naive).norm() / naive.norm()
    assert rel < 1e-5, float(rel)


def test_missing_modalities_match_the_naive_reference():
    """Samples lacking sequences: subsets without any of their modalities in the batch drop out, and a
    subset's loss covers only the samples that have one of its modalities."""
    torch.manual_seed(2)
    model = DSUNet(features=(4, 8), out_channels=2).double()
    x = torch.randn(3, 4, 8, 8, 8, dtype=torch.float64)
    # nobody has t1; sample 1 has flair only, sample 2 t1ce and t2
    mask = torch.tensor([[1, 0, 0, 1], [1, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        y = model(x, mask)
    used = [j for j, sub in enumerate(subset_masks(4)) if bool((sub & mask).any())]
    assert 0 < len(used) < 15
    model.zero_grad()
    result = GMDStrategy(seed=5, diagnostics_interval=1).step(model, x, mask, y, _level, iteration=1)
    assert result.diagnostics["conflicts_before"] > 0
    fast = flat_gradient(list(model.parameters()))
    orders = projection_orders(len(used), GMDStrategy(seed=5).generator)
    naive = _naive_gmd(model, x, y, used, orders, mask, loss=_level)
    rel = float((fast - naive).norm() / naive.norm())
    assert rel < 1e-5, rel


def test_gmd_float32_close_to_reference():
    torch.manual_seed(1)
    model = DSUNet(features=(4, 8), out_channels=3)
    x = torch.randn(2, 4, 8, 8, 8)
    y = (torch.rand(2, 3, 8, 8, 8) > 0.5).float()
    probe = GMDStrategy(seed=7)
    orders = projection_orders(15, probe.generator)
    fast = _fast(GMDStrategy(seed=7), model, x, y).double()
    naive = _naive_gmd(model, x, y, list(range(15)), orders)
    assert (fast - naive).norm() / naive.norm() < 1e-5


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("subsets", ["all", 5])
def test_gmd_matches_naive_reference_on_cuda(subsets):
    torch.manual_seed(0)
    model = DSUNet(features=(4, 8), out_channels=2).double().cuda()
    x = torch.randn(2, 4, 8, 8, 8, dtype=torch.float64, device="cuda")
    with torch.no_grad():
        y = model(x)
    probe = GMDStrategy(subsets=subsets, seed=3)
    chosen = probe.choose_subsets(15)
    orders = projection_orders(len(chosen), probe.generator)
    fast = _fast(GMDStrategy(subsets=subsets, seed=3, vjp_chunk=4, diagnostics_interval=1), model, x, y, _level)
    naive = _naive_gmd(model, x, y, chosen, orders, loss=_level)
    assert fast.is_cuda and (fast - naive).norm() / naive.norm() < 1e-5


@needs_cuda
@pytest.mark.parametrize("name", ["gmd", "gmd_approx"])
def test_cuda_step_matches_cpu_and_bf16_keeps_the_direction(name):
    from app.engines.trainer import autocast_context

    torch.manual_seed(5)
    model = DSUNet(features=(4, 8, 16), out_channels=3)
    x = torch.randn(2, 4, 16, 16, 16)
    y = (torch.rand(2, 3, 16, 16, 16) > 0.5).float()
    cpu = _fast(build_strategy(name, seed=1), model, x, y)
    model.cuda()
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # full fp32 to compare
    try:
        cuda = _fast(build_strategy(name, seed=1), model, x.cuda(), y.cuda()).cpu()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert (cuda - cpu).norm() / cpu.norm() < 1e-4
    with autocast_context(torch.device("cuda"), True):
        bf16 = _fast(build_strategy(name, seed=1), model, x.cuda(), y.cuda()).cpu()
    assert torch.isfinite(bf16).all()
    assert float(bf16 @ cpu / (bf16.norm() * cpu.norm())) > 0.95


def _draws(k: int, n: int, count: int) -> list[list[int]]:
    strategy = GMDStrategy(subsets=k, seed=k)
    draws = [strategy.choose_subsets(n) for _ in range(count)]
    assert all(len(d) == k and d == sorted(set(d)) and set(d) <= set(range(n)) for d in draws)
    return draws


@pytest.mark.parametrize("k", [1, 3, 5])
def test_k_dividing_the_subset_count_deals_every_subset_once_per_shuffled_deck(k):
    n = len(all_subsets(4))
    per_deck = n // k
    draws = _draws(k, n, 40 * per_deck)
    decks = [sum(draws[i : i + per_deck], []) for i in range(0, len(draws), per_deck)]
    assert all(sorted(deck) == list(range(n)) for deck in decks)
    assert len({tuple(deck) for deck in decks}) > 30  # each deck shuffled anew


@pytest.mark.parametrize("k", [2, 4, 7])
def test_k_not_dividing_the_subset_count_uses_every_subset_in_any_window(k):
    # a deck straddling two iterations: the cards popped between the first iteration of one deck and
    # the last of the next are at most 2 n - 2, at least k per iteration
    n = len(all_subsets(4))
    window = 1 + (2 * n - 2) // k
    draws = _draws(k, n, 300)
    for start in range(len(draws) - window + 1):
        assert set().union(*draws[start : start + window]) == set(range(n)), (start, window)


@pytest.mark.parametrize("k", [15, 20])
def test_k_at_least_the_subset_count_is_all_and_leaves_the_generator_alone(k):
    # so gmd_subsets=15 decouples with the same projection orders as gmd_subsets=all under one seed
    every, sampled = GMDStrategy(subsets="all", seed=6), GMDStrategy(subsets=k, seed=6)
    assert sampled.choose_subsets(15) == every.choose_subsets(15) == list(range(15))
    assert torch.equal(sampled.generator.get_state(), every.generator.get_state())
    assert projection_orders(15, sampled.generator) == projection_orders(15, every.generator)


@pytest.mark.parametrize("strategy", [GMDStrategy, GMDApproxStrategy])
def test_a_subset_count_above_the_models_subsets_is_warned_about_once(strategy, caplog):
    """--gmd_subsets 10 is a sampled count on the 15 BraTS subsets but all 7 of the sentiment network's: the run
    trained every subset under the name of a sampled count, without a word."""
    from types import SimpleNamespace

    brats, sentiment = DSUNet(features=(4, 8), out_channels=3), SimpleNamespace(num_modalities=3)
    with caplog.at_level("WARNING", logger="app.strategies"):
        for k in ("all", 7, 15):
            strategy(subsets=k).check_model(brats)
        strategy(subsets=7).check_model(sentiment)
    assert not caplog.records  # k equal to the subsets is what it says: all of them
    sampled = strategy(subsets=10)
    with caplog.at_level("WARNING", logger="app.strategies"):
        sampled.check_model(brats)
        sampled.check_model(sentiment)
        sampled.check_model(sentiment)  # where the run starts, then in the trainer: said once
    assert [r.getMessage() for r in caplog.records] == [
        "--gmd_subsets 10 is more than the 7 subsets of 3 modalities: every iteration trains all 7, as --gmd_subsets "
        "all does. Pass --gmd_subsets all, or a count below 7 to sample."]


def test_strategy_state_round_trip_reproduces_draws():
    a = GMDStrategy(subsets=4, seed=2)
    a.choose_subsets(15)
    state = a.state_dict()
    b = GMDStrategy(subsets=4, seed=99)
    b.load_state_dict(state)
    assert [a.choose_subsets(15) for _ in range(5)] == [b.choose_subsets(15) for _ in range(5)]


def test_gmd_approx_is_close_to_exact_direction():
    torch.manual_seed(2)
    model = DSUNet(features=(4, 8), out_channels=3)
    x = torch.randn(2, 4, 8, 8, 8)
    y = (torch.rand(2, 3, 8, 8, 8) > 0.5).float()
    exact = _fast(GMDStrategy(seed=0), model, x, y)
    approx = _fast(GMDApproxStrategy(seed=0), model, x, y)
    cos = float(exact @ approx / (exact.norm() * approx.norm()))
    assert cos > 0.5, cos


def _pcgrad_weights(gram: torch.Tensor, orders) -> torch.Tensor:
    """Merge weights of eq. 8 applied PCGrad-style, written out on explicit vectors: each running
    gradient is kept as coefficients over the originals, whose inner products the Gram matrix gives."""
    k = gram.shape[0]
    rows = []
    for i in range(k):
        coeff = [1.0 if l == i else 0.0 for l in range(k)]
        for j in orders[i]:
            dot = sum(coeff[l] * float(gram[l, j]) for l in range(k))
            if dot < 0:
                coeff[j] -= dot / float(gram[j, j])
        rows.append(coeff)
    return torch.tensor(rows, dtype=torch.float64).mean(0)


@pytest.mark.parametrize("subsets", ["all", 5])
def test_gmd_approx_matches_a_reference_in_output_space(subsets):
    """gmd_approx: weights from the Gram matrix of dL_j / d(per-modality outputs); the shared parameters
    take sum_j w_j G_j (the mean of the decoupled gradients), the encoders sum_j k w_j g_j (their sum)."""
    torch.manual_seed(0)
    model = DSUNet(features=(4, 8), out_channels=2).double()
    x = torch.randn(2, 4, 8, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
    probe = GMDApproxStrategy(subsets=subsets, seed=3)
    chosen = probe.choose_subsets(15)
    orders = projection_orders(len(chosen), probe.generator)
    k = len(chosen)

    masks = subset_masks(4)
    params = list(model.parameters())
    shared_ids = {id(p) for p in model.shared_parameters()}
    cotangents, grads = [], []
    for j in chosen:
        model.zero_grad()
        per_mod = model.per_modality(x)
        per_mod.retain_grad()
        _level(model.fuse(per_mod, masks[j].expand(2, -1)), y).backward()
        cotangents.append(per_mod.grad.flatten())
        grads.append(flat_gradient(params))
    cotangents, grads = torch.stack(cotangents), torch.stack(grads)
    weights = _pcgrad_weights(cotangents @ cotangents.T, orders)
    assert float(weights.max() - weights.min()) > 1e-3  # the projections had work to do
    scale = torch.cat([torch.full((p.numel(),), 1.0 if id(p) in shared_ids else float(k), dtype=torch.float64)
                       for p in params])
    expected = scale * (weights @ grads)

    got = _fast(GMDApproxStrategy(subsets=subsets, seed=3, diagnostics_interval=1), model, x, y, _level)
    assert (got - expected).norm() / expected.norm() < 1e-8


def _allocated_bytes(run) -> int:
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        run()
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


@pytest.mark.parametrize("known_subsets", [False, True])
def test_gmd_approx_gram_matrix_on_cpu_is_the_float64_product_of_the_cotangents(known_subsets):
    """The Gram matrix is the product of the cotangents' float64 copies (up to float64 rounding), taken one
    modality's block at a time: a subset's cotangent is zero on the modalities it lacks, so with the subsets
    known only their blocks are copied. A float32 stack and a float64 copy of it for each side of the product
    took a fifth of a 32^3 step."""
    torch.manual_seed(0)
    per_mod = torch.randn(2, 4, 3, 16, 16, 16)
    subsets = all_subsets(4)
    masks = subset_masks(4).view(15, 1, 4, 1, 1, 1, 1)
    # the cotangent of a subset without samples is None (global sync); the others vanish off their subset
    cotangents = [torch.randn_like(per_mod) * masks[j] if j % 3 else None for j in range(15)]
    live = [j for j, c in enumerate(cotangents) if c is not None]
    strategy = GMDApproxStrategy()
    out = {}
    allocated = _allocated_bytes(lambda: out.update(gram=strategy.gram_matrix(
        None, per_mod, cotangents, subsets=subsets if known_subsets else None)[0]))
    flat = torch.stack([cotangents[j] for j in live]).flatten(1)
    expected = torch.zeros(15, 15, dtype=torch.float64)
    expected[torch.tensor(live)[:, None], torch.tensor(live)] = flat.double() @ flat.double().T
    torch.testing.assert_close(out["gram"], expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))
    float64_copy = 8 * flat.numel()
    assert allocated < (0.7 if known_subsets else 1.1) * float64_copy


def test_diagnostics_recorded_on_interval():
    torch.manual_seed(3)
    model = DSUNet(features=(4, 8), out_channels=3)
    x = torch.randn(1, 4, 8, 8, 8)
    y = (torch.rand(1, 3, 8, 8, 8) > 0.5).float()
    mask = torch.ones(1, 4, dtype=torch.bool)
    strategy = build_strategy("gmd", diagnostics_interval=2, seed=0)
    assert strategy.step(model, x, mask, y, _loss, iteration=1).diagnostics is None
    diag = strategy.step(model, x, mask, y, _loss, iteration=2).diagnostics
    assert diag["subsets"][0] == "flair" and diag["subsets"][-1] == "flair+t1+t1ce+t2"
    assert len(diag["cosine_before"]) == 15 and diag["conflicts_after"] <= diag["pairs"]
    # projections only ever add non-negative multiples of the others, so every weight is >= 1/k
    assert len(diag["weights"]) == 15 and min(diag["weights"]) >= 1 / 15 - 1e-12


def test_unknown_strategy_names_the_choices():
    with pytest.raises(ValueError, match="gmd_approx"):
        build_strategy("pcgrad")


def test_partial_masks_skip_absent_subsets():
    torch.manual_seed(4)
    model = DSUNet(features=(4, 8), out_channels=3)
    x = torch.randn(2, 4, 8, 8, 8)
    y = (torch.rand(2, 3, 8, 8, 8) > 0.5).float()
    mask = torch.tensor([[1, 0, 0, 1], [1, 0, 0, 0]], dtype=torch.bool)
    model.zero_grad()
    GMDStrategy(seed=0, diagnostics_interval=1).step(model, x, mask, y, _loss, iteration=1)
    # encoders of absent modalities receive no gradient at all
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in model.encoders[1].parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.encoders[0].parameters())


@pytest.mark.parametrize("name", ["gmd", "gmd_approx"])
def test_few_gmd_iterations_on_a_phantom_reduce_the_loss(name):
    from monai.losses import DiceCELoss

    from app.data.labels import labels_to_regions
    from app.data.phantoms import make_phantom

    torch.manual_seed(0)
    phantom = make_phantom(24, rng=0)
    image = torch.stack([torch.as_tensor(phantom[m], dtype=torch.float32) for m in ("flair", "t1", "t1ce", "t2")])
    image = (image - image.mean(dim=(1, 2, 3), keepdim=True)) / image.std(dim=(1, 2, 3), keepdim=True)
    label = torch.as_tensor(labels_to_regions(phantom["seg"], "brats2018"))
    x, y = image[None, :, :24, :24, :24], label[None, :, :24, :24, :24]
    mask = torch.ones(1, 4, dtype=torch.bool)
    model = DSUNet(features=(4, 8, 16))
    loss_fn = DiceCELoss(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    strategy = build_strategy(name, subsets=5, seed=0)
    losses = []
    for it in range(8):
        optimizer.zero_grad()
        losses.append(float(strategy.step(model, x, mask, y, loss_fn, iteration=it).loss))
        optimizer.step()
    assert losses[-1] < 0.9 * losses[0], losses


def test_random_submasks_are_independent_between_ranks_and_match_one_process():
    from app.strategies.base import random_submasks

    full = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 0, 1]] * 4, dtype=torch.bool)
    one = random_submasks(full, torch.Generator().manual_seed(3), rank=0, world_size=1)
    ranks = [random_submasks(full[r * 8 : (r + 1) * 8], torch.Generator().manual_seed(3), rank=r, world_size=2)
             for r in range(2)]
    # each rank keeps its own rows of the global draw: together they are the one-process draw
    assert torch.equal(torch.cat(ranks), one)
    assert not torch.equal(ranks[0], ranks[1])  # same masks on both ranks, different subsets
    assert (one <= full).all() and one.any(dim=1).all()
    # every non-empty subset of four modalities is drawn, about equally often
    many = random_submasks(torch.ones(3000, 4, dtype=torch.bool), torch.Generator().manual_seed(0), 0, 1)
    codes = (many.long() * torch.tensor([1, 2, 4, 8])).sum(1)
    counts = torch.bincount(codes, minlength=16)
    assert counts[0] == 0 and counts[1:].min() > 140 and counts[1:].max() < 260


def test_projection_orders_visit_the_others_in_a_seeded_random_order():
    # every order is a permutation of the other subsets: k = 3 gives orders over {1, 2}, {0, 2}, {0, 1}
    orders = projection_orders(3, torch.Generator().manual_seed(0))
    assert [sorted(o) for o in orders] == [[1, 2], [0, 2], [0, 1]]
    # the same seed gives the same orders (a resumed or multi-rank run decouples identically)
    assert projection_orders(5, torch.Generator().manual_seed(4)) == projection_orders(5, torch.Generator().manual_seed(4))
    # the order is random, as in the reference code: over 200 draws subset 0 visits 1 first about half
    # the time (a fixed ascending order would visit 1 first every time, giving 200)
    gen = torch.Generator().manual_seed(1)
    first = [projection_orders(3, gen)[0][0] for _ in range(200)]
    assert 60 < first.count(1) < 140 and set(first) == {1, 2}


class _OneEncoder(torch.nn.Module):
    """An encoder weight and no shared parameter: its gradient is the weighted cotangent itself."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(4))

    def modality_parameters(self):
        return [self.weight]

    def shared_parameters(self):
        return []


@pytest.mark.parametrize("name", ["gmd", "gmd_approx"])
def test_half_precision_cotangents_keep_the_decoupling_weights(name):
    # under bf16 autocast the cotangents are bf16: the weights k w_j (1 +- the decoupling's correction) were cast to
    # bf16 before weighing, 1.0122 -> 1.015625 and 0.9878 -> 0.98828125, and where two conflicting subsets cancel
    # the encoders' gradient came out 12% off (0.02734 for 0.0244)
    model = _OneEncoder()
    per_mod = (model.weight * 1.0).to(torch.bfloat16)
    ones = torch.ones(4, dtype=torch.bfloat16)
    weights = torch.tensor([0.5061, 0.4939], dtype=torch.float64)
    strategy = build_strategy(name)
    cache = ([], torch.zeros(2, 0, dtype=torch.float64))
    strategy.apply_gradients(model, per_mod, [ones, -ones], weights, cache)
    exact = 2 * (0.5061 - 0.4939)
    assert model.weight.grad.dtype == torch.float32
    # one bf16 rounding of the sum (8 bits: 0.4%) is all that is left
    torch.testing.assert_close(model.weight.grad, torch.full((4,), exact, dtype=torch.float32), rtol=4e-3, atol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_approximate_gram_matrix_is_float64_under_the_trainers_autocast(device):
    # the trainer runs each step inside bf16 autocast on CUDA: a float32 product of the stacked cotangents taken there
    # ran in bf16 and rounded every entry of the Gram matrix to 8 bits (the CPU path was float64 already)
    torch.manual_seed(0)
    per_mod = torch.randn(2, 4, 3, 8, 8, 8, device=device)
    masks = subset_masks(4).view(15, 1, 4, 1, 1, 1, 1).to(device)
    cotangents = [torch.randn_like(per_mod) * masks[j] for j in range(15)]
    flat = torch.stack(cotangents).flatten(1).double()
    expected = flat @ flat.T
    with torch.autocast(device, dtype=torch.bfloat16):
        gram, _ = GMDApproxStrategy().gram_matrix(None, per_mod, cotangents, subsets=all_subsets(4))
    assert gram.dtype == torch.float64
    torch.testing.assert_close(gram, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))

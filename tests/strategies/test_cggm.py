"""CGGM maths by hand (balance terms, direction loss and its sign, metrics) and the strategy's gradients
against a manual re-computation on tiny networks; heads stay out of the network; resume continues."""

from __future__ import annotations

import copy
import io
import json
from types import SimpleNamespace

import pytest
import torch

from app.engines.handlers import DiagnosticsHandler
from app.networks import DSTransformer, DSUNet
from app.strategies import CGGMStrategy, build_strategy
from app.strategies.cggm import balance_terms, head_metric, modulation_loss
from tests.reliability.helpers import PEER_TIMEOUT

# -- balance terms ------------------------------------------------------------------------------


def test_balance_terms_by_hand():
    # sum delta = 0.2; B_i = 1.2 * (0.2 - delta_i) / 0.2
    terms = balance_terms(torch.tensor([0.2, 0.1, -0.1]), rho=1.2)
    assert terms.tolist() == pytest.approx([0.0, 0.6, 1.8])
    # a negative sum flips nothing by itself: the ratio is the same for (-0.2, -0.1, 0.1)
    assert balance_terms(torch.tensor([-0.2, -0.1, 0.1]), rho=1.2).tolist() == pytest.approx([0.0, 0.6, 1.8])


def test_balance_terms_without_progress_are_one():
    for delta in ([0.1, -0.1, 0.0], [0.0, 0.0, 0.0], [1e-14, 0.0, 0.0], [float("nan"), 0.1, 0.2]):
        assert balance_terms(torch.tensor(delta, dtype=torch.float64), rho=1.3).tolist() == [1.0, 1.0, 1.0]


def test_balance_terms_of_a_single_present_modality_are_one():
    """Eq. 7 weighs modalities against each other; with one modality in the batch (absent ones have delta 0)
    it gave B = rho * 0 / delta_i = 0, which multiplied that encoder's gradient by 0."""
    delta = torch.tensor([0.38, 0.0, 0.0, 0.0])
    assert balance_terms(delta, rho=1.2).tolist() == pytest.approx([0.0, 1.2, 1.2, 1.2])  # eq. 7 as such
    assert balance_terms(delta, rho=1.2, present=[0]).tolist() == [1.0] * 4
    # two present modalities are balanced as before, a zero delta included
    assert balance_terms(torch.tensor([0.3, 0.0, 0.1, 0.0]), rho=1.2, present=[0, 2]).tolist() == \
        pytest.approx([0.3, 1.2, 0.9, 1.2])
    assert balance_terms(torch.tensor([0.3, 0.0, 0.0]), rho=1.2, present=[0, 1]).tolist() == pytest.approx([0, 1.2, 1.2])
    assert balance_terms(delta, rho=1.2, b_clip=0.5, present=[0]).tolist() == [0.5] * 4  # clipped as any B


@pytest.mark.parametrize("kind", ["sequence", "segmentation"])
def test_a_batch_with_one_modality_trains_its_encoder_unmodulated(kind):
    """A batch whose cases share a single sequence (legal: cases may lack sequences) has nothing to balance:
    its encoder takes the task gradient (B = 1) instead of none (B = 0 from eq. 7)."""
    if kind == "sequence":
        net, (inputs, _, y), loss_fn = _seq_net(), _seq_batch(), torch.nn.L1Loss()
        mask = torch.tensor([[0, 1, 0]] * 5, dtype=torch.bool)
        only = 1
    else:
        net, (inputs, _, y), loss_fn = _seg_net(), _seg_batch(), _seg_loss
        mask = torch.tensor([[1, 0, 0, 0]] * 2, dtype=torch.bool)
        only = 0
    plain = _plain_grads(net, inputs, mask, y, loss_fn)
    result = build_strategy("cggm", rho=1.2, cggm_lambda=0.0, diagnostics_interval=1).step(
        net, inputs, mask, y, loss_fn, iteration=0)
    assert result.diagnostics["present"] == [m == only for m in range(mask.shape[1])]
    assert result.diagnostics["delta"][only] != 0.0  # eps(0) = 0: eq. 7 would have given B = 0
    assert result.diagnostics["B"][only] == 1.0
    grads = _grads(net)
    assert set(grads) == set(plain) and any(n.startswith(f"encoders.{only}.") for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, plain[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["sequence", "segmentation"])
def test_a_batch_with_one_modality_has_no_direction_loss(kind):
    """Eq. 7 gives B = 0 to a lone modality, so eq. 12's L_gm = |B| - B cos is 0: the direction loss has nothing
    to balance. Only the magnitude leaves the paper there (B = 1 instead of a frozen encoder); the direction loss
    used that B = 1 too, and trained the network to turn the fused gradient towards the lone probe's."""
    if kind == "sequence":
        net, (inputs, _, y), loss_fn = _seq_net(), _seq_batch(), torch.nn.L1Loss()
        mask = torch.tensor([[0, 1, 0]] * 5, dtype=torch.bool)
    else:
        net, (inputs, _, y), loss_fn = _seg_net(), _seg_batch(), _seg_loss
        mask = torch.tensor([[1, 0, 0, 0]] * 2, dtype=torch.bool)
    plain = _plain_grads(net, inputs, mask, y, loss_fn)
    result = build_strategy("cggm", rho=1.2, cggm_lambda=0.5, diagnostics_interval=1).step(
        net, inputs, mask, y, loss_fn, iteration=0)
    only = result.diagnostics["present"].index(True)
    cos = result.diagnostics["cos"][only]
    assert cos is not None and abs(cos) < 0.999  # with B = 1, L_gm would have been 1 - cos > 0
    assert result.diagnostics["L_gm"] == 0.0
    grads = _grads(net)
    assert set(grads) == set(plain)
    for name, g in grads.items():  # the task gradient alone, unscaled
        torch.testing.assert_close(g, plain[name], rtol=1e-4, atol=1e-7)


def test_balance_terms_clip():
    # sum 0.1: B = 1.2 * (-0.2) / 0.1 = -2.4 and 1.2 * 0.3 / 0.1 = 3.6
    assert balance_terms(torch.tensor([0.3, -0.2]), rho=1.2).tolist() == pytest.approx([-2.4, 3.6])
    assert balance_terms(torch.tensor([0.3, -0.2]), rho=1.2, b_clip=2.0).tolist() == pytest.approx([-2.0, 2.0])
    assert balance_terms(torch.tensor([0.2, 0.1, -0.1]), rho=1.2, b_clip=1.0).tolist() == pytest.approx([0, 0.6, 1])
    with pytest.raises(ValueError, match="cggm_b_clip"):
        CGGMStrategy(b_clip=0)


# -- direction loss -----------------------------------------------------------------------------


def test_modulation_loss_by_hand():
    g_f = torch.tensor([[3.0, 4.0], [100.0, -7.0]])  # second row: a confidence logit's, not compared
    g1, g2 = torch.tensor([[4.0, 3.0]]), torch.tensor([[0.0, -1.0]])
    loss, cos = modulation_loss(torch.tensor([1.5, -0.5]), g_f, [g1, g2])
    # cos = 24/25 = 0.96 and -4/5 = -0.8; L = ((1.5 - 1.5*0.96) + (0.5 - (-0.5)(-0.8))) / 2 = (0.06 + 0.1) / 2
    assert cos.tolist() == pytest.approx([0.96, -0.8])
    assert float(loss) == pytest.approx(0.08)
    # |B| - B cos >= 0 always
    assert float(modulation_loss(torch.tensor([-2.0]), torch.tensor([[1.0, 0.0]]), [torch.tensor([[1.0, 0.0]])])[0]) \
        == pytest.approx(4.0)


@pytest.mark.parametrize("b", [0.8, -0.8])
def test_one_step_on_the_direction_loss_moves_cos_with_the_sign_of_b(b):
    g_f = torch.tensor([[1.0, 2.0, -1.0]], requires_grad=True)
    g_i = torch.tensor([[0.5, -1.0, 2.0]])
    loss, cos = modulation_loss(torch.tensor([b]), g_f, [g_i])
    loss.backward()
    with torch.no_grad():
        _, cos_after = modulation_loss(torch.tensor([b]), g_f - 0.1 * g_f.grad, [g_i])
    assert (float(cos_after) - float(cos.detach())) * b > 0
    # the loss only depends on g_F's direction: no gradient along g_F itself
    assert float((g_f.grad * g_f.detach()).sum()) == pytest.approx(0.0, abs=1e-6)


# -- metrics ------------------------------------------------------------------------------------


def test_head_metrics_by_hand():
    logits = torch.tensor([[2.0, 0.1, -1.0], [0.0, 0.5, 0.2]])
    assert head_metric("classification", logits, torch.tensor([0, 2])).tolist() == [1.0, 0.0]
    # arg-max per sample (over classes): 1, 2, 0; right, right, wrong. An arg-max over the batch axis
    # (per class: rows 2, 0, 1) would score 0, 0, 0
    three = torch.tensor([[0.1, 2.0, -1.0], [0.0, 0.5, 3.0], [1.0, 0.0, 0.0]])
    assert head_metric("classification", three, torch.tensor([1, 2, 1])).tolist() == [1.0, 1.0, 0.0]
    assert head_metric("regression", torch.tensor([[1.0], [-0.5]]), torch.tensor([[0.5], [1.0]])).tolist() \
        == pytest.approx([-0.5, -1.5])
    # channel 0: prediction {0, 1} vs reference {0} -> 2*1/3; channel 1: both empty -> 1
    pred = torch.tensor([[[[[3.0, 2.0, -1.0]]], [[[-1.0, -2.0, -3.0]]]]])
    target = torch.tensor([[[[[1.0, 0.0, 0.0]]], [[[0.0, 0.0, 0.0]]]]])
    assert head_metric("segmentation", pred, target).tolist() == pytest.approx([(2 / 3 + 1) / 2])
    with pytest.raises(ValueError, match="task"):
        head_metric("detection", logits, torch.tensor([0, 2]))


# -- the strategy on the networks -----------------------------------------------------------------

DIMS = (6, 5, 4)


def _seq_net(**kwargs) -> DSTransformer:
    torch.manual_seed(0)
    opts = {"in_features": DIMS, "hidden": 8, "num_heads": 2, "encoder_layers": 1, "trunk_layers": 1,
            "dropout": 0.0, "head_dropout": 0.0, "fusion": "confidence", **kwargs}
    return DSTransformer(**opts).train()


def _seq_batch(seed: int = 0, n: int = 5):
    g = torch.Generator().manual_seed(seed)
    inputs = {"text": torch.randn(n, 4, 6, generator=g), "audio": torch.randn(n, 3, 5, generator=g),
              "vision": torch.randn(n, 2, 4, generator=g), "audio_lengths": torch.tensor([3, 2, 1, 3, 2][:n])}
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]][:n], dtype=torch.bool)
    return inputs, mask, torch.randn(n, 1, generator=g)


def _seg_net() -> DSUNet:
    torch.manual_seed(0)
    return DSUNet(features=(4, 8)).train()


def _seg_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, 8, generator=g)
    y = (torch.rand(2, 3, 8, 8, 8, generator=g) > 0.6).float()
    return x, torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0]], dtype=torch.bool), y


def _seg_loss(pred, target):
    return torch.nn.functional.binary_cross_entropy_with_logits(pred, target)


def _grads(net) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def _plain_grads(net, inputs, mask, targets, loss_fn) -> dict[str, torch.Tensor]:
    net = copy.deepcopy(net)
    net.zero_grad()
    loss_fn(net(inputs, mask), targets).backward()
    return _grads(net)


@pytest.mark.parametrize("kind", ["sequence", "segmentation"])
def test_encoder_gradients_are_b_times_the_task_gradients(kind):
    """lambda = 0 leaves the task gradient, whose encoder parts are scaled by B_i; heads do not train encoders."""
    if kind == "sequence":
        net, (inputs, mask, y), loss_fn = _seq_net(), _seq_batch(), torch.nn.L1Loss()
    else:
        net, (inputs, mask, y), loss_fn = _seg_net(), _seg_batch(), _seg_loss
    plain = _plain_grads(net, inputs, mask, y, loss_fn)
    strategy = build_strategy("cggm", rho=1.2, cggm_lambda=0.0, diagnostics_interval=1)
    result = strategy.step(net, inputs, mask, y, loss_fn, iteration=0)
    terms = result.diagnostics["B"]
    # eps(0) = 0: the first delta is the metric itself
    assert result.diagnostics["delta"] == result.diagnostics["eps"]
    assert terms == pytest.approx(balance_terms(torch.tensor(result.diagnostics["delta"]), 1.2).tolist())
    assert len(set(round(b, 6) for b in terms)) > 1  # a non-trivial modulation
    grads = _grads(net)
    assert set(grads) == set(plain)
    for name, g in grads.items():
        scale = terms[int(name.split(".")[1])] if name.startswith("encoders.") else 1.0
        torch.testing.assert_close(g, scale * plain[name], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(result.loss, loss_fn(net(inputs, mask), y).detach())


def test_balance_terms_follow_the_metric_improvement_over_iterations():
    """delta_i = eps_i(t) - eps_i(t-1) with eps the heads' metric (minus MAE) before their update, recomputed
    by hand over three steps of a training run; B_i and the encoder scaling follow from it."""
    net, (inputs, mask, y), loss_fn = _seq_net(), _seq_batch(), torch.nn.L1Loss()
    strategy = CGGMStrategy(rho=1.25, cggm_lambda=0.0, diagnostics_interval=1)
    strategy.build_heads(net)
    previous = [0.0, 0.0, 0.0]
    for it in range(3):
        heads, reference = copy.deepcopy(strategy.heads), copy.deepcopy(net)
        eps = list(previous)
        for m, rows, (h, padding) in reference.encode(inputs, mask):
            eps[m] = -float((heads[m]((h.detach(), padding)).detach() - y[rows]).abs().mean())
        delta = [e - p for e, p in zip(eps, previous)]
        previous = eps
        terms = [1.25 * (sum(delta) - d) / sum(delta) for d in delta]
        reference.zero_grad()
        loss_fn(reference(inputs, mask), y).backward()

        net.zero_grad()
        diag = strategy.step(net, inputs, mask, y, loss_fn, iteration=it).diagnostics
        assert diag["eps"] == pytest.approx(eps, abs=1e-6)
        assert diag["delta"] == pytest.approx(delta, abs=1e-6)
        assert diag["B"] == pytest.approx(terms, rel=1e-4)
        for (name, p), (_, q) in zip(net.named_parameters(), reference.named_parameters()):
            scale = terms[int(name.split(".")[1])] if name.startswith("encoders.") else 1.0
            torch.testing.assert_close(p.grad, scale * q.grad, rtol=1e-4, atol=1e-7, msg=name)
        with torch.no_grad():  # the trainer's optimizer step, so the next metric differs
            for p in net.parameters():
                p -= 0.05 * p.grad
    assert any(abs(d) > 1e-4 for d in delta) and previous != delta  # the last step had a history


def test_gradients_with_the_direction_loss_match_a_manual_computation():
    net, (inputs, mask, y), loss_fn = _seq_net(), _seq_batch(), torch.nn.L1Loss()
    strategy = CGGMStrategy(rho=1.2, cggm_lambda=0.5, diagnostics_interval=1)
    reference = copy.deepcopy(net)
    strategy.build_heads(net)
    heads = copy.deepcopy(strategy.heads)
    result = strategy.step(net, inputs, mask, y, loss_fn)
    diag = result.diagnostics
    terms = torch.tensor(diag["B"])

    # head gradients g_i on the detached representations, by hand
    encoded = reference.encode(inputs, mask)
    head_grads = []
    for m, rows, (h, padding) in encoded:
        head_loss = loss_fn(heads[m]((h.detach(), padding)), y[rows])
        head_grads.append(torch.autograd.grad(head_loss, heads[m].head.weight)[0])
    # task loss, g_F with its graph, L_gm, one backward
    loss = loss_fn(reference(inputs, mask), y)
    g_f = torch.autograd.grad(loss, reference.trunk.head.weight, create_graph=True)[0]
    cos = torch.stack([torch.nn.functional.cosine_similarity(g_f[:1].flatten(), g.flatten(), dim=0)
                       for g in head_grads])
    l_gm = (terms.abs() - terms * cos).mean()
    assert diag["cos"] == pytest.approx(cos.tolist(), abs=1e-5)
    assert diag["L_gm"] == pytest.approx(float(l_gm.detach()), abs=1e-5)
    (loss + 0.5 * l_gm).backward()
    for (name, p), (_, q) in zip(net.named_parameters(), reference.named_parameters()):
        scale = float(terms[int(name.split(".")[1])]) if name.startswith("encoders.") else 1.0
        torch.testing.assert_close(p.grad, scale * q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_direction_loss_uses_gradients_not_weights():
    """Same weights (network and heads), different data: a weight comparison could not tell them apart."""
    net, loss_fn = _seq_net(), torch.nn.L1Loss()
    diags = []
    for seed in (0, 1):
        inputs, mask, y = _seq_batch(seed)
        diags.append(CGGMStrategy(diagnostics_interval=1).step(copy.deepcopy(net), inputs, mask, y, loss_fn).diagnostics)
    assert diags[0]["L_gm"] != pytest.approx(diags[1]["L_gm"], abs=1e-4)
    assert diags[0]["cos"] != pytest.approx(diags[1]["cos"], abs=1e-4)


def test_absent_modality_keeps_its_metric_and_gets_no_gradient():
    net, (inputs, mask, y), loss_fn = _seq_net(), _seq_batch(), torch.nn.L1Loss()
    strategy = CGGMStrategy(diagnostics_interval=1)
    first = strategy.step(net, inputs, mask, y, loss_fn).diagnostics
    net.zero_grad()
    no_audio = mask.clone()
    no_audio[:, 1] = False
    keep = no_audio.any(dim=1)
    sub_inputs = {k: v[keep] for k, v in inputs.items()}
    second = strategy.step(net, sub_inputs, no_audio[keep], y[keep], loss_fn, iteration=1).diagnostics
    assert second["present"] == [True, False, True]
    assert second["eps"][1] == first["eps"][1] and second["delta"][1] == 0.0 and second["cos"][1] is None
    # audio's encoder did not run: no balance term is reported for it (eq. 7 would give rho, which no
    # gradient was scaled by, yet became a TensorBoard point), as no cosine is
    assert second["B"][1] is None and None not in (second["B"][0], second["B"][2])
    assert all(p.grad is None for p in net.encoders[1].parameters())
    b = torch.tensor([second["B"][0], second["B"][2]])
    cos = torch.tensor([second["cos"][0], second["cos"][2]])
    assert second["L_gm"] == pytest.approx(float((b.abs() - b * cos).mean()), abs=1e-6)  # M = 2


def test_heads_are_not_part_of_the_network_and_train_with_their_own_optimizer():
    net, (inputs, mask, y), loss_fn = _seq_net(), _seq_batch(), torch.nn.L1Loss()
    keys = set(net.state_dict())
    params = {id(p) for p in net.parameters()}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    strategy = CGGMStrategy()
    strategy.build_heads(net)
    head_before = copy.deepcopy(strategy.heads.state_dict())
    strategy.step(net, inputs, mask, y, loss_fn)
    assert set(net.state_dict()) == keys
    assert not params & {id(p) for p in strategy.heads.parameters()}
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the trainer steps the network
    changed = [k for k, v in strategy.heads.state_dict().items() if not torch.equal(head_before[k], v)]
    assert changed and all(p.grad is None for p in strategy.heads.parameters())
    assert strategy.heads[0].final_weight().shape == net.fusion_head_weight()[: net.out_channels].shape


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # as a training checkpoint is read


@pytest.mark.parametrize("kind", ["sequence", "segmentation"])
def test_state_dict_round_trip_continues_identically(kind):
    if kind == "sequence":
        net, loss_fn, batch = _seq_net(), torch.nn.L1Loss(), _seq_batch
    else:
        net, loss_fn, batch = _seg_net(), _seg_loss, _seg_batch
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    strategy = CGGMStrategy(diagnostics_interval=1, seed=3)

    def run(strategy, net, optimizer, seed):
        optimizer.zero_grad()
        result = strategy.step(net, *batch(seed), loss_fn, iteration=seed)
        optimizer.step()
        return result.diagnostics, _grads(net)

    for seed in (0, 1):
        run(strategy, net, optimizer, seed)
    saved = _roundtrip(strategy.state_dict())
    net2 = copy.deepcopy(net)
    optimizer2 = torch.optim.SGD(net2.parameters(), lr=0.1)
    optimizer2.load_state_dict(optimizer.state_dict())
    resumed = CGGMStrategy(diagnostics_interval=1, seed=3)
    resumed.load_state_dict(saved)  # before the heads exist, as at a resume
    assert _roundtrip(resumed.state_dict())["eps"] == saved["eps"]
    rng = torch.get_rng_state()
    for seed in (2, 3):
        d1, g1 = run(strategy, net, optimizer, seed)
        d2, g2 = run(resumed, net2, optimizer2, seed)
        assert json.dumps(d1) == json.dumps(d2)
        assert all(torch.equal(g1[k], g2[k]) for k in g1)
    # building the heads never draws from the global generator (the networks have no dropout here)
    assert torch.equal(torch.get_rng_state(), rng)


def test_cpu_bf16_autocast_step():
    net, (inputs, mask, y), loss_fn = _seq_net(), _seq_batch(), torch.nn.L1Loss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = CGGMStrategy(diagnostics_interval=1).step(net, inputs, mask, y, loss_fn)
    assert torch.isfinite(result.loss) and all(torch.isfinite(p.grad).all() for p in net.parameters())
    assert all(-1.0 <= c <= 1.0 for c in result.diagnostics["cos"])


def test_build_strategy_passes_the_bundle_knobs():
    strategy = build_strategy("cggm", rho=1.3, cggm_lambda=0.2, head_lr=0.01, b_clip=None, subsets="all", seed=4,
                              diagnostics_interval=5, vjp_chunk=2)
    assert (strategy.rho, strategy.cggm_lambda, strategy.head_lr, strategy.b_clip, strategy.seed) == (
        1.3, 0.2, 0.01, None, 4)
    with pytest.raises(ValueError, match="cggm_lambda"):
        CGGMStrategy(cggm_lambda=-1)
    with pytest.raises(TypeError, match="make_modality_heads"):
        CGGMStrategy().build_heads(torch.nn.Linear(2, 2))


# -- diagnostics handler ------------------------------------------------------------------------


class _Writer:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = value

    def flush(self):
        pass


def test_diagnostics_handler_writes_cggm_records_apart_from_gmd(tmp_path):
    net, (inputs, mask, y), loss_fn = _seq_net(), _seq_batch(), torch.nn.L1Loss()
    diag = CGGMStrategy(diagnostics_interval=1).step(net, inputs, mask, y, loss_fn).diagnostics
    writer = _Writer()
    handler = DiagnosticsHandler(tmp_path, summary_writer=writer)
    engine = SimpleNamespace(state=SimpleNamespace(output={"diagnostics": diag}, iteration=7, epoch=1))
    handler(engine)
    rows = [json.loads(line) for line in (tmp_path / "cggm_diagnostics.jsonl").read_text().splitlines()]
    assert rows[0]["iteration"] == 7 and rows[0]["B"] == diag["B"] and not (tmp_path / "gmd_diagnostics.jsonl").exists()
    assert writer.scalars["cggm/L_gm"] == diag["L_gm"]
    assert writer.scalars["cggm_B/audio"] == diag["B"][1] and writer.scalars["cggm_cos/vision"] == diag["cos"][2]
    assert not any(tag.startswith("cggm_present") for tag in writer.scalars)


# -- multi-process (gloo) -------------------------------------------------------------------------

WORLD = 2


def _sync_worker(rank: int, store: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=PEER_TIMEOUT)
    try:
        net = _seg_net().double()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, 4, 8, 8, 8, generator=g, dtype=torch.float64)
        y = (torch.rand(4, 3, 8, 8, 8, generator=g) > 0.6).double()
        # flair only on rank 0, t2 only on rank 1
        mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
        whole = CGGMStrategy(diagnostics_interval=1, seed=1)
        local = whole.step(copy.deepcopy(net), x, mask, y, _seg_loss)  # no collective: the whole batch
        assert whole.heads[0].final_weight().dtype == torch.float64
        strategy = CGGMStrategy(diagnostics_interval=1, seed=1)
        shard = slice(2 * rank, 2 * rank + 2)
        diag = strategy.step(net, x[shard], mask[shard], y[shard], _seg_loss).diagnostics
        # the metric is that of the global batch, so eps, delta and B match one process on the whole batch
        assert diag["eps"] == pytest.approx(local.diagnostics["eps"], abs=1e-12)
        assert diag["B"] == pytest.approx(local.diagnostics["B"], abs=1e-9)
        flat = torch.cat([p.detach().flatten() for p in strategy.heads.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        assert torch.equal(gathered[0], gathered[1]), "the ranks' heads differ after a step"
    finally:
        dist.destroy_process_group()


def test_ranks_share_heads_metric_and_balance_terms(tmp_path):
    import torch.multiprocessing as mp

    # fork: the workers inherit the imported modules; one torch thread each keeps OpenMP safe after the fork.
    # Where CUDA is present, autograd's device threads may already run in this process, which fork cannot copy.
    start = "spawn" if torch.cuda.is_available() else "fork"
    mp.start_processes(_sync_worker, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True, start_method=start)

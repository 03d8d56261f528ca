"""DS transformer: subset protocol, length masking, fusion rules, and every strategy unchanged on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from app.data import MMSADataset, make_synthetic_mmsa
from app.networks import DSTransformer, PromptedDSTransformer, lengths_to_padding_mask
from app.networks import ds_transformer
from app.networks import prompted as prompted_module
from app.networks.ds_transformer import masked_pool, stack_sequences
from app.strategies import STRATEGIES, build_strategy
from app.subsets import subset_masks
from tests.strategies.gmd_reference import decoupled_merge, flat_gradient, shared_flags

DIMS = (6, 5, 4)


def _batch(layout: str = "unaligned", n: int = 6, label_key: str = "regression_labels"):
    data = make_synthetic_mmsa({"train": n}, layout=layout, dims=DIMS, seq_len=5, seed=2)
    ds = MMSADataset(data, "train", label_key=label_key)
    return ds, default_collate([ds[i] for i in range(n)])


def _net(**kwargs) -> DSTransformer:
    torch.manual_seed(0)
    opts = {"in_features": DIMS, "hidden": 16, "num_heads": 2, "encoder_layers": 1, "trunk_layers": 1, **kwargs}
    return DSTransformer(**opts).eval()


def test_padding_mask():
    mask = lengths_to_padding_mask(torch.tensor([1, 3]), 4)
    assert mask.tolist() == [[False, True, True, True], [False, False, False, True]]


def test_masked_pool_averages_the_real_steps_only():
    # sequence 0 has 2 real steps of 3: (1 + 3) / 2 = 2 and (2 + 4) / 2 = 3; the padded step (100) is
    # neither summed nor counted (a mean over the padded length would give 104 / 3 and 106 / 3)
    # sequence 1 has all 3: (1 + 2 + 6) / 3 = 3 and (0 + 0 + 3) / 3 = 1
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[1.0, 0.0], [2.0, 0.0], [6.0, 3.0]]])
    pooled = masked_pool(h, lengths_to_padding_mask(torch.tensor([2, 3]), 3))
    assert pooled.tolist() == [[2.0, 3.0], [3.0, 1.0]]


@pytest.mark.parametrize("fusion", ["mean", "confidence"])
def test_per_modality_and_subset_fusion(fusion):
    ds, batch = _batch()
    net = _net(fusion=fusion).set_input_statistics(ds.statistics())
    mask = batch["modality_mask"].clone()
    mask[0, 1] = False  # sample 0 has no audio
    with torch.no_grad():
        per_mod = net.per_modality(batch["image"], mask)
        assert per_mod.shape == (6, 3, 1 if fusion == "mean" else 2)
        assert torch.all(per_mod[0, 1] == 0)
        for sub in subset_masks(3):
            sub_mask = mask & sub
            keep = sub_mask.any(1)
            fused = net.fuse(per_mod[keep], sub_mask[keep])
            # the subset prediction from the shared pass equals a forward with only those modalities
            direct = net({k: v[keep] for k, v in batch["image"].items()}, sub_mask[keep])
            torch.testing.assert_close(fused, direct, rtol=1e-5, atol=1e-5)
            weights = net.modality_weights(per_mod[keep], sub_mask[keep])
            torch.testing.assert_close(weights.sum(1), torch.ones(int(keep.sum())))
            assert torch.all(weights[~sub_mask[keep]] == 0)
        if fusion == "mean":
            torch.testing.assert_close(net.fuse(per_mod, mask), (per_mod * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
    with pytest.raises(ValueError, match="no available modality"):
        net.fuse(per_mod, torch.zeros(6, 3, dtype=torch.bool))


def test_padding_and_absent_modalities_are_never_read():
    ds, batch = _batch()
    net = _net()
    image = batch["image"]
    mask = batch["modality_mask"].clone()
    mask[:, 2] = False
    with torch.no_grad():
        ref = net(image, mask)
        poisoned = dict(image)
        poisoned["vision"] = torch.full_like(image["vision"], float("nan"))  # absent: never read
        audio = image["audio"].clone()
        steps = torch.arange(audio.shape[1])[None, :] >= image["audio_lengths"][:, None]
        audio[steps] = 1e6  # padding steps: masked out of attention and pooling
        poisoned["audio"] = audio
        torch.testing.assert_close(net(poisoned, mask), ref)
        no_vision = {k: v for k, v in image.items() if not k.startswith("vision")}
        torch.testing.assert_close(net(no_vision, mask), ref)
        with pytest.raises(ValueError, match="no such key"):
            net(no_vision, batch["modality_mask"])
        # without a mask, a modality of length 0 is absent, as the dataset marks it
        lengths = dict(image, audio_lengths=image["audio_lengths"].clone())
        lengths["audio_lengths"][0] = 0
        row_mask = torch.ones_like(mask)
        row_mask[0, 1] = False
        torch.testing.assert_close(net(lengths), net(lengths, row_mask))
        # a modality the mask marks available with length 0 is read as one step (attention over no
        # step at all would be NaN): the same output as length 1
        one = dict(image, audio_lengths=lengths["audio_lengths"].clone())
        one["audio_lengths"][0] = 1
        full = torch.ones_like(mask)
        zero_out = net(lengths, full)
        assert torch.isfinite(zero_out).all()
        torch.testing.assert_close(zero_out, net(one, full))
        lengths["audio"] = image["audio"].clone()
        lengths["audio"][0] = 100.0
        torch.testing.assert_close(net(lengths), net(lengths, row_mask))
        none_left = {m: image[m][:1] for m in ("text", "audio")}
        none_left |= {"text_lengths": torch.zeros(1, dtype=torch.int64), "audio_lengths": torch.zeros(1, dtype=torch.int64)}
        with pytest.raises(ValueError, match="no modality"):
            net(none_left)


@pytest.mark.parametrize("prompted", [False, True])
def test_the_trunk_pads_each_modality_only_to_its_own_length(prompted, monkeypatch):
    """Short text beside long audio (MOSEI: 50 steps beside 500): one stack padded the text to the audio's length
    for the trunk's attention. Each length now runs as a stack of its own, with the outputs of the one stack."""
    torch.manual_seed(0)
    rows, lengths = 4, {"text": 3, "audio": 40, "vision": 40}
    image = {m: torch.randn(rows, steps, d) for (m, steps), d in zip(lengths.items(), DIMS)}
    image |= {f"{m}_lengths": torch.randint(1, steps + 1, (rows,)) for m, steps in lengths.items()}
    for m, steps in lengths.items():  # one sample as long as the padding: the batch's longest is the file's
        image[f"{m}_lengths"][-1] = steps
    mask = torch.ones(rows, 3, dtype=torch.bool)
    mask[0, 1] = False  # a sample without audio: its row is left out of the audio's
    net = (PromptedDSTransformer(DIMS, hidden=16, num_heads=2, encoder_layers=1, missing="skip").eval() if prompted
           else _net())
    seen = []
    net.trunk.layers.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape[:2])))

    def outputs() -> torch.Tensor:
        with torch.no_grad():
            return net.features(image, mask).embeddings if prompted else net.per_modality(image, mask)

    out = outputs()
    assert sorted(seen) == [(4, 3), (7, 40)]
    for module in (ds_transformer, prompted_module):  # every sequence in one stack, padded to the longest
        monkeypatch.setattr(module, "by_length", lambda run, sequences: run(*stack_sequences(sequences)))
    torch.testing.assert_close(out, outputs(), rtol=1e-5, atol=1e-5)
    assert seen[-1] == (11, 40)


@pytest.mark.parametrize("prompted", [False, True], ids=["plain", "prompted"])
def test_a_batch_runs_only_up_to_its_longest_sequence(prompted):
    """A file pads every utterance to its longest (MMSA's unaligned CMU-MOSEI: 500 audio steps), and each batch's
    sequences went through the encoders and the trunk at that length. They now run up to the batch's longest, with
    the outputs of the padded run; a batch of one-step sequences from a sequence file still gets its positions."""
    torch.manual_seed(0)
    rows, padded, longest = 5, {"text": 6, "audio": 12, "vision": 12}, {"text": 1, "audio": 5, "vision": 7}
    image = {m: torch.randn(rows, padded[m], d) for m, d in zip(padded, DIMS)}
    image |= {f"{m}_lengths": torch.randint(1, longest[m] + 1, (rows,)) for m in padded}
    for m in padded:
        image[f"{m}_lengths"][-1] = longest[m]
    mask = torch.ones(rows, 3, dtype=torch.bool)
    mask[0, 2] = False
    net = (PromptedDSTransformer(DIMS, hidden=16, num_heads=2, encoder_layers=1, missing="skip").eval() if prompted
           else _net())
    seen = {}
    for m, name in enumerate(padded):
        net.encoders[m].layers.layers[0].register_forward_pre_hook(
            lambda _, args, name=name: seen.setdefault(name, tuple(args[0].shape[:2])) and None)
    with torch.no_grad():
        out = net.features(image, mask).embeddings if prompted else net.per_modality(image, mask)
        assert seen == {"text": (5, 2), "audio": (5, 5), "vision": (4, 7)}
        # the padded run, modality by modality: each encoder, then the trunk, at the file's length
        expected = torch.zeros_like(out)
        for m, name in enumerate(padded):
            rows_m = mask[:, m].nonzero().flatten()
            padding = lengths_to_padding_mask(image[f"{name}_lengths"][rows_m], padded[name])
            x = image[name][rows_m]
            h = net.encode_with_prompts(m, x, padding)[0] if prompted else net.encoders[m](x, padding)
            expected[rows_m, m] = net.trunk.pooled(h, padding) if prompted else net.trunk(h, padding)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)



def test_fractional_lengths_keep_every_step_their_padding_mask_keeps():
    """Lengths given as floats mark ``t < length`` as steps (3.5: four steps), and a batch ran only up to the
    floor of its longest, leaving out a step its padding mask kept: the output changed from the padded run."""
    torch.manual_seed(0)
    image = {m: torch.randn(3, 6, d) for m, d in zip(("text", "audio", "vision"), DIMS)}
    whole = {f"{m}_lengths": torch.tensor([2, 4, 1]) for m in ("text", "audio", "vision")}
    fractional = {f"{m}_lengths": torch.tensor([2.0, 3.5, 1.0]) for m in ("text", "audio", "vision")}
    net = _net()
    with torch.no_grad():
        torch.testing.assert_close(net.per_modality({**image, **fractional}), net.per_modality({**image, **whole}),
                                   rtol=0, atol=0)

def test_input_statistics_are_buffers_saved_with_the_weights():
    ds, _ = _batch("utterance")
    net = _net().set_input_statistics(ds.statistics())
    state = net.state_dict()
    np.testing.assert_allclose(state["encoders.1.input_mean"].numpy(), ds.statistics()["audio"][0], rtol=1e-6)
    fresh = _net()
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.encoders[1].input_std, net.encoders[1].input_std)
    with pytest.raises(ValueError, match="features"):
        net.set_input_statistics({m: (np.zeros(2), np.ones(2)) for m in ("text", "audio", "vision")})


def test_constructor_checks():
    # each names the bundle's flag and a value that it takes
    with pytest.raises(ValueError, match=r"^--out_channels 3 needs --task classification"):
        DSTransformer(out_channels=3)
    with pytest.raises(ValueError, match=r"^--task classification needs --out_channels N, .* e\.g\. --out_channels 4"):
        DSTransformer(task="classification", out_channels=1)
    with pytest.raises(ValueError, match=r"^--fusion 'max' must be mean or confidence, e\.g\. --fusion confidence\.$"):
        DSTransformer(fusion="max")
    with pytest.raises(ValueError, match=r"^--hidden 10 must be a multiple of --num_heads 4 .*, e\.g\. --hidden 12\.$"):
        DSTransformer(hidden=10, num_heads=4)
    with pytest.raises(ValueError, match=r"^--input_dropout \[0\.1, 0\.2\] needs one value or one per modality .*"
                                         r"e\.g\. --input_dropout \"\[0\.1,0\.1,0\.1\]\"\.$"):
        DSTransformer(input_dropout=[0.1, 0.2])
    net = DSTransformer(input_dropout=[0.1, 0.5, 0.3])
    assert [enc.input_dropout.p for enc in net.encoders] == [0.1, 0.5, 0.3]


@pytest.mark.parametrize("fusion", ["mean", "confidence"])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_trains_every_parameter(strategy, fusion):
    """The BraTS strategy objects work unchanged: every parameter, shared head included, gets a gradient."""
    ds, batch = _batch()
    net = _net(fusion=fusion).train()
    if strategy == "predict":  # needs its prompted network; during the warm-up every parameter trains
        torch.manual_seed(0)
        net = PromptedDSTransformer(in_features=DIMS, hidden=16, num_heads=2, fusion=fusion).train()
    result = build_strategy(strategy, subsets="all", seed=0, diagnostics_interval=1, warmup_iterations=1).step(
        net, batch["image"], batch["modality_mask"], batch["label"], torch.nn.L1Loss(), iteration=0
    )
    assert result.pred.shape == (6, 1) and torch.isfinite(result.loss)
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert net.trunk.head.weight.grad.abs().sum() > 0
    if strategy.startswith("gmd"):
        assert len(result.diagnostics["subsets"]) == 7 and result.diagnostics["subsets"][-1] == "text+audio+vision"


def test_exact_gmd_merged_gradient_matches_manual_weighted_sum():
    """Exact GMD on the shared trunk: the update is sum_j w_j G_j of the per-subset gradients."""
    ds, batch = _batch("utterance")
    # no dropout anywhere, so the manual passes see the same function as the strategy
    net = _net(fusion="confidence", encoder_layers=0, dropout=0.0, head_dropout=0.0).train()
    strategy = build_strategy("gmd", subsets="all", seed=0, diagnostics_interval=1)
    loss_fn = torch.nn.L1Loss()
    result = strategy.step(net, batch["image"], batch["modality_mask"], batch["label"], loss_fn)
    merged = torch.cat([p.grad.flatten() for p in net.shared_parameters()])
    weights = torch.tensor(result.diagnostics["weights"], dtype=torch.float64)
    shared = list(net.shared_parameters())
    grads = []
    for sub in subset_masks(3):
        loss = loss_fn(net(batch["image"], batch["modality_mask"] & sub), batch["label"])
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared)]).double())
    expected = weights @ torch.stack(grads)
    torch.testing.assert_close(merged.double(), expected, rtol=1e-4, atol=1e-6)


def _level(pred, target):
    """Squared gap between the batch's mean prediction and the target's: with the target at the prediction of
    all modalities, subsets predicting above and below it pull the shared head apart (conflicting gradients)."""
    return (pred.mean(0) - target.mean(0)).pow(2).sum()


@pytest.mark.parametrize("subsets", ["all", 3])
def test_exact_gmd_matches_a_naive_pcgrad_reference_with_missing_modalities(subsets):
    """The DS transformer takes exact GMD's path without per-modality trunk parts (one VJP through the whole
    trunk per subset). Against one backward per subset and eq. 8 on the flattened shared gradients, in a random
    order replayed from the seed: conflicting subsets, samples lacking modalities, all 7 or 3 sampled subsets.
    The test above takes the weights from the strategy itself, so a wrong Gram matrix passed it."""
    from app.strategies import GMDStrategy
    from app.strategies.projection import projection_orders

    torch.manual_seed(0)
    net = DSTransformer(in_features=DIMS, hidden=8, num_heads=2, dropout=0.0, head_dropout=0.0).double().train()
    g = torch.Generator().manual_seed(1)
    n = 5
    inputs = {"text": torch.randn(n, 4, 6, generator=g).double(), "audio": torch.randn(n, 3, 5, generator=g).double(),
              "vision": torch.randn(n, 2, 4, generator=g).double(), "audio_lengths": torch.tensor([3, 2, 1, 3, 2])}
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    with torch.no_grad():
        y = net(inputs, mask)

    probe = GMDStrategy(subsets=subsets, seed=3)
    chosen = probe.choose_subsets(7)
    params = list(net.parameters())
    is_shared = shared_flags(net, params)
    grads = []
    for j in chosen:  # every subset has a sample here, fused over the modalities of it the sample has
        net.zero_grad()
        sub = subset_masks(3)[j].expand(n, -1) & mask
        rows = sub.any(dim=1)
        _level(net({k: v[rows] for k, v in inputs.items()}, sub[rows]), y[rows]).backward()
        grads.append(flat_gradient(params))
    expected = decoupled_merge(torch.stack(grads), projection_orders(len(chosen), probe.generator), is_shared)

    net.zero_grad()
    result = GMDStrategy(subsets=subsets, seed=3, diagnostics_interval=1).step(net, inputs, mask, y, _level, iteration=1)
    assert result.diagnostics["conflicts_before"] > 0  # the projections had work to do
    got = flat_gradient(params)
    assert float((got - expected).norm() / expected.norm()) < 1e-10


def test_classification_head_with_gmd():
    ds, batch = _batch(label_key="classification_labels")
    net = _net(task="classification", out_channels=3, fusion="confidence").train()
    result = build_strategy("gmd").step(net, batch["image"], batch["modality_mask"], batch["label"],
                                        torch.nn.CrossEntropyLoss())
    assert result.pred.shape == (6, 3)
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("fusion", ["mean", "confidence"])
def test_encode_decode_is_per_modality_and_heads_match_the_fusion_head(fusion):
    ds, batch = _batch()
    net = _net(fusion=fusion)
    mask = batch["modality_mask"].clone()
    mask[:, 2] = False
    mask[0, 1] = False
    with torch.no_grad():  # both sides on the same (eval, no-grad) attention kernels
        encoded = net.encode(batch["image"], mask)
        assert torch.equal(net.decode(encoded, 6, inputs=batch["image"]), net.per_modality(batch["image"], mask))
    assert [m for m, _, _ in encoded] == [0, 1]
    assert encoded[1][1].tolist() == [i for i in range(6) if mask[i, 1]]
    h, padding = encoded[1][2]
    assert h.shape[::2] == (len(encoded[1][1]), 16) and padding.shape == h.shape[:2]
    empty = net.decode([], 6, inputs=batch["image"])
    assert empty.shape == (6, 3, net.per_modality_channels) and not empty.any()
    with pytest.raises(ValueError, match="inputs=inputs"):
        net.decode([], 6)

    assert net.fusion_head_weight() is net.trunk.head.weight
    heads = net.make_modality_heads()
    assert len(heads) == 3 and not {id(p) for p in heads.parameters()} & {id(p) for p in net.parameters()}
    assert heads[0].final_weight().shape == net.fusion_head_weight()[: net.out_channels].shape == (1, 16)
    assert heads[1]((h, padding)).shape == (len(encoded[1][1]), 1)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"num_heads": 0}, r"--num_heads 0 must be a whole number >= 1"),
        ({"hidden": 0}, r"--hidden 0 must be a whole number >= 1"),
        ({"encoder_layers": -1}, r"--encoder_layers -1 must be a whole number >= 0"),
        ({"trunk_layers": -1}, r"--trunk_layers -1 must be a whole number >= 0"),
        ({"dropout": 1.5}, r"--dropout 1.5 is not a dropout probability"),
        ({"head_dropout": -0.1}, r"--head_dropout -0.1 is not a dropout probability"),
        ({"input_dropout": [0.1, 0.5, 1.5]}, r"--input_dropout \[0.1, 0.5, 1.5\] is not a dropout probability"),
    ],
)
def test_an_impossible_setting_is_a_value_error_naming_it(settings, message):
    # a ZeroDivisionError or torch's own ValueError would surface as a traceback of the bundle run
    with pytest.raises(ValueError, match=message):
        DSTransformer(in_features=[6, 5, 4], **settings)


def test_boundary_settings_still_build():
    """0 layers, no dropout and input dropout 1.0 are accepted and the network runs; while training, input
    dropout 1.0 makes a modality's output independent of its input, and 0.0 does not."""
    ds, batch = _batch()
    torch.manual_seed(0)
    net = DSTransformer(in_features=DIMS, hidden=16, num_heads=2, encoder_layers=0, trunk_layers=0, dropout=0.0,
                        head_dropout=0.0, input_dropout=[0.0, 0.0, 1.0]).set_input_statistics(ds.statistics())
    mask = batch["modality_mask"]
    with torch.no_grad():
        out = net.eval()(batch["image"], mask)
        assert out.shape == (6, 1) and torch.isfinite(out).all()
        net.train()
        names = list(net.modalities)
        for m, dropped in ((2, True), (0, False)):  # not symmetric: a reversed list would drop text
            other = dict(batch["image"])
            other[names[m]] = other[names[m]] * 3 + 1  # another input for modality m only
            a, b = net.per_modality(batch["image"], mask)[:, m], net.per_modality(other, mask)[:, m]
            assert torch.equal(a, b) is dropped, names[m]


@pytest.mark.parametrize("rows", [2, 8])
def test_modality_mask_of_other_rows_is_refused(rows):
    # 6 samples: a 2-row mask used to score the first 2 samples only, returning [2, 1] without a word
    ds, batch = _batch()
    net = _net().set_input_statistics(ds.statistics())
    mask = torch.ones(rows, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"modality_mask must be \[B, 3\] .* give one row per sample"):
        net(batch["image"], mask)
    assert net(batch["image"], batch["modality_mask"]).shape == (6, 1)


@pytest.mark.parametrize("trained, configured, fix", [
    # the same head rows: 2 (score and confidence logit) against 2 class logits; 4 against 4
    (dict(task="regression", out_channels=1, fusion="confidence"),
     dict(task="classification", out_channels=2, fusion="mean"),
     "--task regression --label_key regression_labels --out_channels 1 --fusion confidence"),
    (dict(task="classification", out_channels=3, fusion="confidence"),
     dict(task="classification", out_channels=4, fusion="mean"),
     "--task classification --label_key classification_labels --out_channels 3 --fusion confidence"),
])
def test_a_checkpoint_of_another_task_or_class_count_is_refused_even_when_its_head_fits(tmp_path, trained,
                                                                                     configured, fix):
    """A regression checkpoint loaded into a 2-class network with mean fusion (or 3 classes with confidence into 4
    with mean) fitted tensor for tensor, and was scored with its outputs read as another task's: wrong numbers, no
    error."""
    from app.networks.weights import load_weights

    path = tmp_path / "model.pt"
    torch.save(DSTransformer(in_features=(6, 5, 4), encoder_layers=0, **trained).state_dict(), path)
    with pytest.raises(ValueError, match="was trained for") as err:
        load_weights(DSTransformer(in_features=(6, 5, 4), encoder_layers=0, **configured), path)
    assert str(path) in str(err.value) and fix in str(err.value) and "\n" not in str(err.value)
    load_weights(DSTransformer(in_features=(6, 5, 4), encoder_layers=0, **trained), path)  # its own settings load


def test_a_checkpoint_written_before_the_head_was_recorded_still_loads(tmp_path):
    net = DSTransformer(in_features=(6, 5, 4), encoder_layers=0)
    state = {k: v for k, v in net.state_dict().items() if k != "head_config"}
    torch.save(state, tmp_path / "old.pt")
    from app.networks.weights import load_weights

    again = load_weights(DSTransformer(in_features=(6, 5, 4), encoder_layers=0), tmp_path / "old.pt")
    assert again.head_config.tolist() == [0, 1, 0]  # regression, 1 output, mean fusion: the configured head
    again.load_state_dict(state)  # torch's own loader too (e.g. a script of one's own)

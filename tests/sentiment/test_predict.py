"""Strategy ``predict`` and its network: read-only prompts, missing-modality prediction, BitFit, VICReg
routing, subset evaluation that never reads an absent modality, and the bundle commands."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

from app.data import MMSADataset, make_synthetic_mmsa
from app.engines.sentiment import predicted_subset_predictions
from app.networks import DSTransformer, PromptedDSTransformer, build_sentiment_network, load_pretrained
from app.networks.prompted import read_only_update
from app.strategies import PredictStrategy, build_strategy
from app.strategies.base import random_submasks
from app.strategies.vicreg import vicreg_loss
from app.subsets import subset_masks
from tests.sentiment.helpers import EVALUATE, MOSI_BUNDLE, TRAIN, run_mosi_bundle

DIMS = (6, 5, 4)
PREDICT = str(MOSI_BUNDLE / "configs" / "predict.yaml")
NAMES = ["text", "audio", "vision", "text+audio", "text+vision", "audio+vision", "text+audio+vision"]
L1 = nn.L1Loss()


def _batch(n: int = 6, layout: str = "unaligned"):
    data = make_synthetic_mmsa({"train": n}, layout=layout, dims=DIMS, seq_len=5, seed=2)
    ds = MMSADataset(data, "train")
    return ds, default_collate([ds[i] for i in range(n)])


def _net(seed: int = 0, **kwargs) -> PromptedDSTransformer:
    torch.manual_seed(seed)
    opts = {"in_features": DIMS, "hidden": 16, "num_heads": 2, "encoder_layers": 1, "trunk_layers": 1, **kwargs}
    return PromptedDSTransformer(**opts)


def _plain_copy(net: PromptedDSTransformer, **kwargs) -> DSTransformer:
    opts = {"in_features": DIMS, "hidden": 16, "num_heads": 2, "encoder_layers": 1, "trunk_layers": 1, **kwargs}
    plain = DSTransformer(**opts)
    plain.load_state_dict({k: v for k, v in net.state_dict().items()
                           if not k.startswith(("prompts", "prompt_readers", "predictors", "predicted_confidence"))})
    return plain


# -- read-only prompts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("encoder_layers", [0, 1, 2])
def test_input_tokens_ignore_the_prompts_while_prompt_outputs_read_them(encoder_layers):
    ds, batch = _batch()
    net = _net(encoder_layers=encoder_layers).set_input_statistics(ds.statistics()).eval()
    x = batch["image"]["audio"].float()
    padding = torch.arange(5)[None, :] >= batch["image"]["audio_lengths"][:, None]
    for grad in (True, False):  # autograd takes the plain path, no_grad PyTorch's fused fast path
        with torch.set_grad_enabled(grad):
            tokens, prompts = net.encode_with_prompts(1, x, padding)
            assert torch.equal(tokens, net.encoders[1](x, padding))  # bit-for-bit
            assert prompts.shape == (6, 4, 16)
    with torch.no_grad():
        mask = batch["modality_mask"]
        ref = net.per_modality(batch["image"], mask)
        net.prompts.add_(torch.randn_like(net.prompts))
        tokens2, prompts2 = net.encode_with_prompts(1, x, padding)
        assert torch.equal(tokens2, tokens)
        assert not torch.allclose(prompts2, prompts, atol=1e-3)
        assert torch.equal(net.per_modality(batch["image"], mask), ref)
    # another number of prompts, same encoders: same tokens, same per-modality outputs
    other = _net(encoder_layers=encoder_layers, num_prompts=7)
    other.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith(("prompts", "prompt_readers"))},
                          strict=False)
    other.eval()
    with torch.no_grad():
        tokens7, prompts7 = other.encode_with_prompts(1, x, padding)
        assert prompts7.shape == (6, 7, 16)
        assert torch.equal(tokens7, tokens)
        assert torch.equal(other.per_modality(batch["image"], mask), ref)


def _masked_joint_pass(layer: nn.TransformerEncoderLayer, tokens, prompts, padding):
    """The paper's formulation: one pass over [tokens; prompts] where tokens may not attend to prompts."""
    n, length, p = tokens.shape[0], tokens.shape[1], prompts.shape[1]
    attn = torch.zeros(length + p, length + p, dtype=torch.bool)
    attn[:length, length:] = True
    key_padding = torch.cat([padding, torch.zeros(n, p, dtype=torch.bool)], dim=1)
    return layer(torch.cat([tokens, prompts], dim=1), src_mask=attn, src_key_padding_mask=key_padding)


@pytest.mark.parametrize("norm_first", [True, False])
def test_read_only_update_equals_the_masked_joint_pass(norm_first):
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=norm_first).eval()
    tokens, prompts = torch.randn(3, 5, 8), torch.randn(3, 2, 8)
    padding = torch.arange(5)[None, :] >= torch.tensor([5, 2, 1])[:, None]
    with torch.no_grad():
        joint = _masked_joint_pass(layer, tokens, prompts, padding)
        mine = read_only_update(layer, tokens, prompts, torch.cat([padding, torch.zeros(3, 2, dtype=torch.bool)], 1))
        torch.testing.assert_close(mine, joint[:, 5:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(tokens, src_key_padding_mask=padding), joint[:, :5], rtol=1e-5, atol=1e-5)


# -- missing = predict | skip --------------------------------------------------------------------------
@pytest.mark.parametrize("fusion", ["mean", "confidence"])
def test_skip_is_exactly_ds_transformer_and_predict_fills_absent_modalities(fusion):
    ds, batch = _batch()
    net = _net(fusion=fusion).set_input_statistics(ds.statistics()).eval()
    plain = _plain_copy(net, fusion=fusion).eval()
    mask = batch["modality_mask"].clone()
    mask[0, 1] = mask[1, 2] = mask[2, 1] = mask[2, 2] = False
    with torch.no_grad():
        net.missing = "skip"
        assert not net.predicts_missing and torch.equal(net.completed_mask(mask), mask)
        skipped = net.per_modality(batch["image"], mask)
        assert torch.equal(skipped, plain.per_modality(batch["image"], mask))
        assert torch.equal(net(batch["image"], mask), plain(batch["image"], mask))

        net.missing = "predict"
        assert net.predicts_missing and bool(net.completed_mask(mask).all())
        if fusion == "confidence":  # a predicted modality's confidence logit gets its learnt offset
            net.predicted_confidence.copy_(torch.tensor([0.5, -0.7, 0.2]))
        filled = net.per_modality(batch["image"], mask)
        assert torch.equal(filled[mask], skipped[mask])  # present modalities untouched
        assert torch.all(skipped[~mask] == 0) and torch.all(filled[~mask] != 0)
        feats = net.features(batch["image"], mask)
        pairs = dict(zip(net.pairs, net.pair_predictions(feats.prompt_summaries)))
        # sample 0 lacks audio (1): the mean of the predictions from text (0) and vision (2)
        offsets = torch.tensor([0.0, -0.7, 0.2]) if fusion == "confidence" else torch.zeros(3)
        expected = net.embedding_outputs((pairs[(0, 1)][0] + pairs[(2, 1)][0]) / 2)
        expected[-1] += offsets[1]
        torch.testing.assert_close(filled[0, 1], expected)
        # sample 2 has text only: audio and vision both from text
        expected = net.embedding_outputs(pairs[(0, 2)][2])
        expected[-1] += offsets[2]
        torch.testing.assert_close(filled[2, 2], expected)
        # forward fuses present and predicted modalities
        torch.testing.assert_close(net(batch["image"], mask), net.fuse(filled, torch.ones_like(mask)))
    with pytest.raises(ValueError, match="predict|skip"):
        net.missing = "zero"


def test_subset_predictions_never_read_the_absent_modalities():
    ds, batch = _batch()
    net = _net(fusion="confidence").set_input_statistics(ds.statistics()).eval()
    image, mask = batch["image"], batch["modality_mask"]
    with torch.no_grad():
        preds, valid = predicted_subset_predictions(net, image, mask)
        assert preds.shape == (6, 7, 1) and bool(valid.all())
        poisoned = dict(image)
        poisoned["audio"] = torch.randn_like(image["audio"]) * 100
        poisoned["vision"] = torch.full_like(image["vision"], float("nan"))
        again, _ = predicted_subset_predictions(net, poisoned, mask)
        # subsets without audio and vision (text) are unchanged; the others read the new inputs
        assert torch.equal(again[:, 0], preds[:, 0])
        assert not torch.allclose(again[:, 3], preds[:, 3])
        # each subset is the prediction from only its modalities' inputs
        for j, sub in enumerate(subset_masks(3)):
            names = [m for m, keep in zip(net.modalities, sub.tolist()) if keep]
            only = {k: v for k, v in image.items() if k.split("_")[0] in names}
            torch.testing.assert_close(preds[:, j], net(only, mask & sub))


# -- the strategy --------------------------------------------------------------------------------------
def _step(net, strategy, batch, mask=None, iteration=1):
    net.zero_grad(set_to_none=True)
    return strategy.step(net, batch["image"], batch["modality_mask"] if mask is None else mask, batch["label"], L1,
                         iteration=iteration)


def test_bitfit_trains_encoder_biases_prompts_predictors_and_trunk():
    ds, batch = _batch()
    net = _net(dropout=0.0, head_dropout=0.0).set_input_statistics(ds.statistics()).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    strategy = build_strategy("predict", seed=0)
    result = _step(net, strategy, batch)
    assert result.pred.shape == (6, 1) and not result.pred.requires_grad and result.loss.ndim == 0
    for name, param in net.encoders.named_parameters():
        assert param.requires_grad == name.endswith("bias"), name
        assert (param.grad is not None) == name.endswith("bias"), name
    optimizer.step()
    after = net.state_dict()
    for name, _ in net.encoders.named_parameters():
        changed = not torch.equal(after[f"encoders.{name}"], before[f"encoders.{name}"])
        assert changed == name.endswith("bias"), name
    for key in ("prompts", "predictors.0.0.weight", "predictors.5.2.bias", "trunk.head.weight", "trunk.norm.weight"):
        assert not torch.equal(after[key], before[key]), key
    # the frozen ones keep no gradient in later steps either (AdamW skips them, weight decay included)
    _step(net, strategy, batch, iteration=2)
    assert all(p.grad is None for n, p in net.encoders.named_parameters() if not n.endswith("bias"))


def test_warmup_trains_everything_then_bitfit_and_resume_keeps_bitfit():
    ds, batch = _batch()
    net = _net().set_input_statistics(ds.statistics()).train()
    strategy = PredictStrategy(seed=0, warmup_iterations=2)
    for it in (1, 2):
        _step(net, strategy, batch, iteration=it)
        assert net.encoders[0].proj.weight.grad is not None and not strategy.bitfit_applied
    _step(net, strategy, batch, iteration=3)
    assert net.encoders[0].proj.weight.grad is None and strategy.bitfit_applied
    # a resumed run (fresh network) freezes at its first step whatever the iteration
    state = strategy.state_dict()
    resumed = PredictStrategy(seed=0, warmup_iterations=100)
    resumed.load_state_dict(state)
    fresh = _net().set_input_statistics(ds.statistics()).train()
    _step(fresh, resumed, batch, iteration=1)
    assert fresh.encoders[0].proj.weight.grad is None and not fresh.encoders[0].proj.weight.requires_grad
    assert torch.equal(resumed.generator.get_state(), strategy.generator.get_state())


def test_bitfit_on_encoders_no_checkpoint_initialised_is_warned(tmp_path, caplog):
    """--strategy predict with the defaults (no --pretrained, --warmup_iterations 0) froze randomly initialised
    encoder weights from the first step, so only their biases trained, without a word in the log."""
    ds, batch = _batch()
    message = "Strategy 'predict' freezes the encoders' weights from the first step"
    with caplog.at_level("WARNING", logger="app.strategies"):
        strategy = PredictStrategy(seed=0)
        net = _net().set_input_statistics(ds.statistics()).train()
        _step(net, strategy, batch, iteration=1)
        _step(net, strategy, batch, iteration=2)  # once per run
    assert [r.getMessage()[: len(message)] for r in caplog.records] == [message]
    assert "--pretrained PATH" in caplog.records[0].getMessage()
    assert "--warmup_iterations N" in caplog.records[0].getMessage()
    # a warm-up, or encoders a checkpoint initialised: nothing to say
    caplog.clear()
    with caplog.at_level("WARNING", logger="app.strategies"):
        warm, warmed = PredictStrategy(seed=0, warmup_iterations=1), _net().set_input_statistics(ds.statistics()).train()
        _step(warmed, warm, batch, iteration=1)
        _step(warmed, warm, batch, iteration=2)  # BitFit after the warm-up: the encoders trained, nothing to say
        assert warm.bitfit_applied
        pretrained = load_pretrained(_net(), _saved(_plain_copy(_net()), tmp_path / "plain.pt"))
        _step(pretrained.set_input_statistics(ds.statistics()).train(), PredictStrategy(seed=0), batch, iteration=1)
    assert not caplog.records and pretrained.pretrained_path == str(tmp_path / "plain.pt")


def test_a_warmup_as_long_as_the_run_is_warned(synthetic_pkl, tmp_path, caplog):
    """configs/predict.yaml's 200 warm-up iterations with --max_epochs 1 (40 iterations on CMU-MOSI) trained every
    parameter to the end, BitFit never started, and nothing in the log said so."""
    message = "--warmup_iterations 2 is not below the 2 iteration(s) this run trains"
    with caplog.at_level("WARNING", logger="app.strategies"):
        PredictStrategy(seed=0, warmup_iterations=2).check_run_length(3)  # BitFit from iteration 3: the method
        PredictStrategy(seed=0).check_run_length(1)
        PredictStrategy(seed=0, warmup_iterations=2).check_run_length(2)
    assert [r.getMessage()[: len(message)] for r in caplog.records] == [message]
    assert "Lower --warmup_iterations below 2, or raise --max_epochs" in caplog.records[0].getMessage()
    # the trainer passes the run's length: 48 training samples / 24 = 2 iterations
    proc = run_mosi_bundle([TRAIN], "--data_path", str(synthetic_pkl), "--trust_pickle", "true", "--output_dir",
                           str(tmp_path / "run"), "--max_epochs", "1", "--batch_size", "24", "--strategy", "predict",
                           "--warmup_iterations", "2")
    assert message in proc.stderr + proc.stdout


def test_gradients_by_hand_task_loss_to_the_model_prediction_loss_to_prompts_and_predictors():
    ds, batch = _batch()
    net = _net(dropout=0.0, head_dropout=0.0, fusion="mean").set_input_statistics(ds.statistics()).train()
    strategy = PredictStrategy(seed=0, predicted_task_weight=0.5, prediction_weight=2.0)
    _step(net, strategy, batch)
    got = {n: (p.grad.clone() if p.grad is not None else None) for n, p in net.named_parameters()}

    net.zero_grad(set_to_none=True)
    feats = net.features(batch["image"], batch["modality_mask"])
    out = net.embedding_outputs(feats.embeddings)
    y = batch["label"]
    task = sum(L1(out[:, m], y) for m in range(3))  # every sample has every modality
    preds = net.pair_predictions(feats.prompt_summaries)
    vicreg = sum(vicreg_loss(p, feats.embeddings[:, j].detach()) for p, (_, j) in zip(preds, net.pairs)) / 6
    # per target modality, the mean over its 2 sources of the head's loss on the prediction
    predicted_task = sum(L1(net.embedding_outputs(p), y) for p in preds) / 2
    prediction = 2.0 * vicreg + 0.5 * predicted_task
    pred_names = {n for n, _ in net.named_parameters() if n.startswith(("prompts", "predictors"))}
    pred_params = [p for n, p in net.named_parameters() if n in pred_names]
    expected_pred = dict(zip(sorted(pred_names, key=list(dict(net.named_parameters())).index),
                             torch.autograd.grad(prediction, pred_params, retain_graph=True)))
    task_params = {n: p for n, p in net.named_parameters() if n not in pred_names and p.requires_grad}
    expected_task = dict(zip(task_params, torch.autograd.grad(task, list(task_params.values()), allow_unused=True)))
    for name, grad in expected_pred.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6)
    for name, grad in expected_task.items():
        if grad is None:
            assert got[name] is None or not got[name].any(), name
        else:
            torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6)
    # the prediction loss does reach the encoder biases through the prompts, but is kept off them
    bias = net.encoders[0].layers.layers[0].linear1.bias
    assert torch.autograd.grad(prediction, bias, retain_graph=True)[0].abs().sum() > 0


def test_gradients_by_hand_with_missing_modalities():
    """Each modality's task loss covers the samples that have it; VICReg covers the complete samples only
    (missingness is simulated on them); the head's loss on a prediction covers the samples with its source."""
    ds, batch = _batch()
    net = _net(dropout=0.0, head_dropout=0.0, fusion="mean").set_input_statistics(ds.statistics()).train()
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[2, 1] = mask[3, 2] = mask[4, 0] = mask[4, 1] = mask[5, 0] = False  # complete: samples 0 and 1
    _step(net, PredictStrategy(seed=0, predicted_task_weight=0.5, prediction_weight=2.0), batch, mask=mask)
    got = {n: p.grad for n, p in net.named_parameters()}

    net.zero_grad(set_to_none=True)
    feats = net.features(batch["image"], mask)
    out = net.embedding_outputs(feats.embeddings)
    y = batch["label"]
    task = sum(L1(out[mask[:, m], m], y[mask[:, m]]) for m in range(3))
    preds = dict(zip(net.pairs, net.pair_predictions(feats.prompt_summaries)))
    vicreg = sum(vicreg_loss(preds[(i, j)][:2], feats.embeddings[:2, j].detach()) for i, j in net.pairs) / 6
    predicted_task = sum(L1(net.embedding_outputs(preds[(i, j)][mask[:, i]]), y[mask[:, i]]) for i, j in net.pairs) / 2
    prediction = 2.0 * vicreg + 0.5 * predicted_task
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    params = [p for n, p in net.named_parameters() if p.requires_grad]
    is_pred = [n.startswith(("prompts", "predictors")) for n in names]
    by_pred = torch.autograd.grad(prediction, params, retain_graph=True, allow_unused=True)
    by_task = torch.autograd.grad(task, params, allow_unused=True)
    for name, pred_param, g_pred, g_task in zip(names, is_pred, by_pred, by_task):
        expected = g_pred if pred_param else g_task
        if expected is None:
            assert got[name] is None or not got[name].any(), name
        else:
            torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=1e-6, msg=name)


def test_vicreg_needs_two_complete_samples():
    ds, batch = _batch()
    net = _net().set_input_statistics(ds.statistics()).train()
    mask = batch["modality_mask"].clone()
    mask[1:, 2] = False  # only sample 0 is complete
    strategy = PredictStrategy(seed=0, predicted_task_weight=0.0)
    _step(net, strategy, batch, mask=mask)
    assert net.prompts.grad is None or not net.prompts.grad.any()
    mask[1, 2] = True  # two complete samples: the VICReg loss trains the prompts
    _step(net, strategy, batch, mask=mask)
    assert net.prompts.grad is not None and net.prompts.grad.abs().sum() > 0


def test_confidence_loss_trains_the_confidence_weights_only_through_the_weighting():
    ds, batch = _batch()
    net = _net(fusion="confidence", dropout=0.0, head_dropout=0.0).set_input_statistics(ds.statistics()).train()
    strategy = PredictStrategy(seed=0, predicted_task_weight=0.0, prediction_weight=0.0)
    _step(net, strategy, batch)
    with_conf = net.trunk.head.weight.grad.clone()
    assert net.predicted_confidence.grad.abs().sum() > 0  # how far to trust a predicted modality
    _step(net, PredictStrategy(seed=0, predicted_task_weight=0.0, prediction_weight=0.0, confidence_weight=0.0), batch)
    without = net.trunk.head.weight.grad.clone()
    # the value row's gradient is the task loss's alone; the confidence row learns only from the fusion loss
    torch.testing.assert_close(with_conf[0], without[0])
    assert not without[1].any() and with_conf[1].abs().sum() > 0
    assert net.predicted_confidence.grad is None or not net.predicted_confidence.grad.any()


def test_confidence_loss_by_hand_fuses_drawn_modalities_with_predictions_of_the_others():
    """The fusion loss: per sample a random non-empty subset is kept, its modalities give their own
    outputs, every other modality the head's output on its embedding predicted from the kept ones."""
    ds, batch = _batch()
    net = _net(fusion="confidence", dropout=0.0, head_dropout=0.0).set_input_statistics(ds.statistics()).train()
    _step(net, PredictStrategy(seed=3, predicted_task_weight=0.0, prediction_weight=0.0), batch)
    got = [net.predicted_confidence.grad.clone(), net.trunk.head.weight.grad[1].clone()]  # the confidence row

    net.zero_grad(set_to_none=True)
    mask = batch["modality_mask"]
    feats = net.features(batch["image"], mask)
    out = net.embedding_outputs(feats.embeddings)
    sub = random_submasks(mask, torch.Generator().manual_seed(3))  # the strategy's draw under seed 3
    assert sub.any() and not sub.all()  # kept and predicted modalities both occur
    with torch.no_grad():
        predicted = net.predicted_embeddings(feats.prompt_summaries, sub)
    pred_out = net.predicted_outputs(predicted)
    per_mod = torch.stack([out[b, m] if sub[b, m] else pred_out[b, m] for b in range(sub.shape[0])
                           for m in range(3)]).reshape(out.shape)
    per_mod = torch.cat([per_mod[..., :1].detach(), per_mod[..., 1:]], dim=-1)  # values fixed, weights live
    fusion = L1(net.fuse(per_mod, torch.ones_like(sub)), batch["label"])  # every sample has a kept modality
    expected = torch.autograd.grad(fusion, [net.predicted_confidence, net.trunk.head.weight])
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[1], expected[1][1], rtol=1e-4, atol=1e-6)


def test_predict_refuses_a_network_without_prompts():
    ds, batch = _batch()
    plain = DSTransformer(in_features=DIMS, hidden=16, num_heads=2)
    with pytest.raises(ValueError, match="PromptedDSTransformer"):
        PredictStrategy().step(plain, batch["image"], batch["modality_mask"], batch["label"], L1)
    with pytest.raises(ValueError, match=">= 0"):
        PredictStrategy(prediction_weight=-1)


# -- network factory and pretrained weights ----------------------------------------------------------
def test_a_negative_predictor_width_is_refused_naming_the_setting(synthetic_pkl, tmp_path):
    """--predictor_hidden -3 stopped the run with torch's 'negative dimension' traceback (0 means 2 * hidden)."""
    for width in (-3, -1):
        with pytest.raises(ValueError, match=rf"predictor_hidden must be >= 0 \(0: 2 \* hidden\), got {width}"):
            _net(predictor_hidden=width)
    assert _net(predictor_hidden=0).predictor_hidden == 32
    out = tmp_path / "run"
    proc = run_mosi_bundle([TRAIN], "--data_path", str(synthetic_pkl), "--trust_pickle", "true", "--output_dir",
                           str(out), "--max_epochs", "1", "--strategy", "predict", "--predictor_hidden", "-3",
                           check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: predictor_hidden must be >= 0")
    assert not out.exists()


def test_factory_and_pretrained_loading(tmp_path):
    opts = {"in_features": DIMS, "hidden": 16, "num_heads": 2, "encoder_layers": 1}
    assert type(build_sentiment_network("gmd", **opts)) is DSTransformer
    torch.manual_seed(0)
    net = build_sentiment_network("predict", num_prompts=3, predictor_hidden=5, missing="skip", **opts)
    assert isinstance(net, PromptedDSTransformer) and net.missing == "skip"
    torch.save({"model": net.state_dict()}, tmp_path / "prompted.pt")
    # the checkpoint decides the class and the prompt sizes, whatever the strategy says
    again = build_sentiment_network("gmd", checkpoint=str(tmp_path / "prompted.pt"), **opts)
    assert isinstance(again, PromptedDSTransformer) and again.num_prompts == 3 and again.predictor_hidden == 5
    again.load_state_dict(net.state_dict())
    plain = DSTransformer(**opts)
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    assert type(build_sentiment_network("predict", checkpoint=str(tmp_path / "plain.pt"), **opts)) is DSTransformer

    # a plain checkpoint initialises everything but the prompts and predictors
    prompts = net.prompts.detach().clone()
    load_pretrained(net, tmp_path / "plain.pt")
    for key, value in plain.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key
    assert torch.equal(net.prompts, prompts)
    assert load_pretrained(net, "") is net
    with pytest.raises(ValueError, match="different network configuration.*--hidden"):
        load_pretrained(net, _saved(DSTransformer(**{**opts, "hidden": 8}), tmp_path / "small.pt"))
    with pytest.raises(FileNotFoundError):
        load_pretrained(net, tmp_path / "none.pt")
    # a prompted checkpoint lacking part of a group (one predictor tensor) is refused, not half loaded
    partial = {k: v for k, v in net.state_dict().items() if k != "predictors.0.0.weight"}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="predictors.0.0.weight is missing"):
        load_pretrained(net, tmp_path / "partial.pt")


def _saved(module: nn.Module, path):
    torch.save(module.state_dict(), path)
    return path


# -- the bundle -----------------------------------------------------------------------------------------
@pytest.mark.usefixtures("process_state_restored")  # the bundle's setup of its process, run in this one
def test_bundle_config_pretrained_and_override(synthetic_pkl, tmp_path):
    from monai.bundle import ConfigParser

    def parser(*files, **overrides):
        p = ConfigParser()
        p.read_config(list(files))
        p.update({"bundle_root": str(MOSI_BUNDLE), "data_path": str(synthetic_pkl), "trust_pickle": True,
                  "output_dir": str(tmp_path), **overrides})
        return p

    plain = parser(TRAIN, strategy="plain").get_parsed_content("network")
    assert type(plain) is DSTransformer
    torch.save({"model": plain.state_dict()}, tmp_path / "plain.pt")
    recipe = parser(TRAIN, PREDICT, pretrained=str(tmp_path / "plain.pt"))
    strategy = recipe.get_parsed_content("strategy_def")
    assert isinstance(strategy, PredictStrategy) and strategy.warmup_iterations == 200
    recipe.get_parsed_content("initialize")  # input statistics, then the pretrained weights
    network = recipe.get_parsed_content("network")
    assert isinstance(network, PromptedDSTransformer)
    for key, value in plain.state_dict().items():
        assert torch.equal(network.state_dict()[key], value), key


def test_bundle_train_predict_and_evaluate_predict_and_skip(synthetic_pkl, tmp_path):
    out = tmp_path / "train"
    # the acceptance command: plain train.yaml with --strategy predict (48 samples / 24 = 2 iterations)
    run_mosi_bundle([TRAIN], "--data_path", str(synthetic_pkl), "--trust_pickle", "true", "--output_dir", str(out),
                    "--max_epochs", "1", "--batch_size", "24", "--strategy", "predict")
    ckpt = out / "models" / "model.pt"
    assert "prompts" in torch.load(ckpt, weights_only=True)
    reports = {}
    for missing in ("predict", "skip"):
        # evaluation as for any checkpoint: the checkpoint decides the network class
        run_mosi_bundle([TRAIN, EVALUATE], "--data_path", str(synthetic_pkl), "--trust_pickle", "true",
                        "--ckpt_path", str(ckpt), "--eval_split", "test", "--output_dir", str(tmp_path / missing),
                        "--missing", missing)
        reports[missing] = json.loads((tmp_path / missing / "subset_metrics.json").read_text())
        assert list(reports[missing]["subsets"]) == NAMES
        assert all(row["n"] == 24 for row in reports[missing]["subsets"].values())
    predict, skip = (reports[m]["subsets"] for m in ("predict", "skip"))
    # complete samples: the full subset needs no prediction; a single modality is completed only in predict mode
    assert predict["text+audio+vision"] == skip["text+audio+vision"]
    assert any(predict[n]["MAE"] != skip[n]["MAE"] for n in NAMES[:3])


@pytest.mark.parametrize("option, value", [("num_prompts", 8), ("predictor_hidden", 16), ("missing", "skip")])
def test_a_prompt_option_given_to_another_strategys_network_is_warned(caplog, option, value):
    """The bundles pass the prompt options to every network: ``--num_prompts 8 --strategy gmd`` built the plain
    DSTransformer and left no trace of the option."""

    with caplog.at_level(logging.WARNING, logger="app.networks.prompted"):
        net = build_sentiment_network(strategy="gmd", in_features=DIMS, hidden=8, **{option: value})
    assert type(net) is DSTransformer
    assert [r.getMessage() for r in caplog.records] == [
        f"{option}={value} is an option of the predict strategy's network: the gmd strategy's network has no prompts "
        "or predictors, so it has no effect here."]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="app.networks.prompted"):  # the bundle's defaults say nothing
        build_sentiment_network(strategy="plain", in_features=DIMS, hidden=8, num_prompts=4, predictor_hidden=0,
                                missing="predict")
        build_sentiment_network(strategy="predict", in_features=DIMS, hidden=8, **{option: value})
    assert not caplog.records


def test_a_pretrained_path_that_is_no_model_file_names_the_setting_to_fix(tmp_path):
    """A missing file, a folder or a named pipe given as ``--pretrained`` was refused with "pass --ckpt_path ...",
    a setting sentiment training does not have; the pipe is refused without being opened."""
    import os

    pipe = tmp_path / "model.pt"
    os.mkfifo(pipe)
    fix = r": pass --pretrained a model\.pt written by an earlier sentiment training run"
    with pytest.raises(FileNotFoundError, match=rf"^Checkpoint {pipe} is a named pipe, not a model file .*{fix}"):
        load_pretrained(_net(), pipe)
    with pytest.raises(FileNotFoundError, match=rf"^Checkpoint {tmp_path} is a folder, not a model file{fix}"):
        load_pretrained(_net(), tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"^Checkpoint {tmp_path / 'none.pt'} not found.*{fix}"):
        load_pretrained(_net(), tmp_path / "none.pt")

"""DS U-Net: shapes, skipped encoders, and invariance to absent modalities' inputs."""

from __future__ import annotations

import weakref

import pytest
import torch

from app.networks import DSUNet, masked_mean


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return DSUNet(features=(4, 8, 16)).eval()


def test_shapes_and_per_modality_fusion(net):
    x = torch.randn(2, 4, 16, 16, 16)
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 1, 0]], dtype=torch.bool)
    per_mod = net.per_modality(x, mask)
    assert per_mod.shape == (2, 4, 3, 16, 16, 16)
    fused = net(x, mask)
    assert torch.allclose(fused[0], per_mod[0, [0, 1, 3]].mean(0), atol=1e-6)
    assert torch.allclose(fused[1], per_mod[1, 2], atol=1e-6)


def test_absent_modality_input_cannot_change_output(net):
    x = torch.randn(2, 4, 16, 16, 16)
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    ref = net(x, mask)
    y = x.clone()
    y[0, 1] = 1e4
    y[0, 3] = float("nan")
    y[1, 0] = -7.0
    assert torch.equal(net(y, mask), ref)


def test_absent_encoder_does_not_run(net):
    calls = []
    hooks = [enc.register_forward_hook(lambda m, i, o, k=k: calls.append(k)) for k, enc in enumerate(net.encoders)]
    try:
        net(torch.randn(1, 4, 16, 16, 16), torch.tensor([[0, 0, 1, 1]], dtype=torch.bool))
    finally:
        for h in hooks:
            h.remove()
    assert calls == [2, 3]


def test_shared_trunk_matches_single_modality_run(net):
    """Batching all modalities through the trunk equals running each one alone."""
    x = torch.randn(1, 4, 16, 16, 16)
    full = net.per_modality(x, torch.ones(1, 4, dtype=torch.bool))
    for m in range(4):
        only = torch.zeros(1, 4, dtype=torch.bool)
        only[0, m] = True
        assert torch.allclose(net.per_modality(x, only)[0, m], full[0, m], atol=1e-5)


def test_without_gradients_each_feature_map_is_freed_once_the_trunk_has_used_it(net):
    """Validation and evaluation run per_modality() without gradients on whole windows: the encoders' features
    stayed alive beside their stacked copy through the whole trunk, and the full-resolution skip through the last
    up block's convolutions, about a third of a full-resolution window's peak memory, and the level below too. The
    logits are unchanged."""
    features, alive = [], []
    hooks = [enc.register_forward_hook(lambda m, i, out: features.extend(weakref.ref(t) for t in out))
             for enc in net.encoders]
    hooks.append(net.trunk.register_forward_pre_hook(lambda m, args: features.extend(weakref.ref(t) for t in args[0])))
    hooks += [up.conv_block.register_forward_hook(lambda m, i, out: features.append(weakref.ref(out)))
              for up in net.trunk.ups[:-1]]
    hooks.append(net.trunk.ups[-1].conv_block.register_forward_pre_hook(
        lambda m, args: alive.append(sum(ref() is not None for ref in features))))
    x = torch.randn(1, 4, 16, 16, 16)
    mask = torch.ones(1, 4, dtype=torch.bool)
    try:
        with torch.no_grad():
            out = net.per_modality(x, mask)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(features) == 4 * 3 + 3 + 1  # each encoder's 3 levels, the trunk's 3 stacked ones and the level below
    assert alive == [0]  # none of them is held when the last up block's convolutions run
    # a caller's own list of features is left as it is, and decodes to the same logits
    with torch.no_grad():
        skips = [torch.cat(level) for level in zip(*(s for _, _, s in net.encode(x, mask)))]
        decoded = net.trunk(skips)
    assert len(skips) == 3
    assert torch.equal(decoded, out[0])


def test_clinical_inference_frees_each_feature_map_once_the_trunk_has_used_it(net):
    """Clinical inference (FusedDSUNet, run as it is from a model.pt) decodes one sequence at a time on whole scans:
    the encoder's features stayed alive through the whole trunk, and the full-resolution skip and the level below
    through the last up block's convolutions (tensors of a 128x176x144 window of the default network: 1,378 MiB at the
    peak instead of 1,064). The logits are unchanged, and the exported model's equal them."""
    from app.inference.model import FusedDSUNet

    fused = FusedDSUNet(net).eval()
    maps, alive = [], []
    hooks = [enc.register_forward_hook(lambda m, i, out: maps.extend(weakref.ref(t) for t in out))
             for enc in fused.encoders]
    hooks += [up.conv_block.register_forward_hook(lambda m, i, out: maps.append(weakref.ref(out)))
              for up in fused.trunk.ups[:-1]]
    hooks.append(fused.trunk.ups[-1].conv_block.register_forward_pre_hook(
        lambda m, args: alive.append(sum(ref() is not None for ref in maps))))
    x = torch.randn(1, 4, 16, 16, 16)
    mask = torch.tensor([[1, 0, 1, 1]], dtype=torch.bool)
    try:
        with torch.inference_mode():
            out = fused(x, mask)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(maps) == 3 * (3 + 1)  # per sequence: its encoder's 3 levels, then the trunk's level below the last
    assert alive == [0, 0, 0]  # none of them is held when the last up block's convolutions run
    with torch.inference_mode():
        assert torch.equal(torch.jit.script(FusedDSUNet(net).eval())(x, mask), out)
        torch.testing.assert_close(out, net(x, mask))


def test_features_from_config_and_parameter_groups():
    net = DSUNet(features=[2, 4, 8, 16])
    assert net.encoders[0].levels[-1].conv1.conv.out_channels == 16
    shared = {id(p) for p in net.shared_parameters()}
    specific = {id(p) for p in net.modality_parameters()}
    assert shared.isdisjoint(specific)
    assert shared | specific == {id(p) for p in net.parameters()}
    assert net.divisor == 8


def test_empty_mask_is_an_error(net):
    with pytest.raises(ValueError, match="at least one"):
        masked_mean(torch.zeros(1, 4, 3, 2, 2, 2), torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="Expected image"):
        net(torch.zeros(1, 3, 16, 16, 16))


def test_unchecked_fusion_is_the_same_mean():
    x = torch.randn(3, 4, 3, 2, 2, 2)
    mask = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    fused = masked_mean(x, mask, check=False)
    assert torch.equal(fused, masked_mean(x, mask))
    torch.testing.assert_close(fused[0], (x[0, 0] + x[0, 3]) / 2)
    # without the check a sample without modality is not an error, and its fusion is not finite
    assert not torch.isfinite(masked_mean(x[:1], torch.zeros(1, 4, dtype=torch.bool), check=False)).any()


def test_encode_decode_is_per_modality_and_heads_match_the_fusion_head(net):
    x = torch.randn(2, 4, 16, 16, 16)
    mask = torch.tensor([[1, 0, 0, 1], [0, 0, 1, 1]], dtype=torch.bool)
    encoded = net.encode(x, mask)
    assert [(m, rows.tolist()) for m, rows, _ in encoded] == [(0, [0]), (2, [1]), (3, [0, 1])]
    assert [s.shape[1:] for s in encoded[2][2]] == [(4, 16, 16, 16), (8, 8, 8, 8), (16, 4, 4, 4)]
    assert torch.equal(net.decode(encoded, 2, inputs=x), net.per_modality(x, mask))
    torch.testing.assert_close(net.decode(encoded, 2), net.per_modality(x, mask))
    empty = net.decode([], 2, inputs=x)
    assert empty.shape == (2, 4, 3, 16, 16, 16) and not empty.any()
    with pytest.raises(ValueError, match="inputs=image"):
        net.decode([], 2)

    assert net.fusion_head_weight() is net.trunk.head.conv.conv.weight
    heads = net.make_modality_heads()
    assert len(heads) == 4 and not {id(p) for p in heads.parameters()} & {id(p) for p in net.parameters()}
    assert heads[0].final_weight().shape == net.fusion_head_weight().shape == (3, 4, 1, 1, 1)
    assert heads[3](encoded[2][2]).shape == (2, 3, 16, 16, 16)


def test_recorded_spacing_reads_the_buffer_without_float32_noise():
    from app.networks.ds_unet import recorded_spacing

    net = DSUNet(features=[4, 8, 16, 32])
    assert recorded_spacing(net) is None  # nothing recorded yet
    net.set_training_spacing([0.8594, 0.8594, 3.3])
    assert recorded_spacing(net) == [0.8594, 0.8594, 3.3]
    assert recorded_spacing(torch.nn.Module()) is None


@pytest.mark.parametrize("fused", [False, True])
def test_a_size_of_one_voxel_at_the_deepest_level_is_refused_with_the_fix(net, fused):
    # features (4, 8, 16): 4^3 is a multiple of the divisor but the deepest level holds one voxel, which
    # instance normalisation refused with torch's "Expected more than 1 spatial element" deep inside
    from app.inference.model import FusedDSUNet

    model = torch.jit.script(FusedDSUNet(net).eval()) if fused else net
    mask = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(Exception, match=r"single voxel") as info:
        model(torch.randn(1, 4, 4, 4, 4), mask)
    assert "8 along one axis" in str(info.value)
    assert model(torch.randn(1, 4, 4, 8, 4), mask).shape == (1, 3, 4, 8, 4)


@pytest.mark.parametrize("fused", [False, True])
def test_spatial_size_off_the_divisor_is_refused_with_the_fix(net, fused):
    # features (4, 8, 16): sizes must be multiples of 4; 18 fails inside the decoder without the check
    from app.inference.model import FusedDSUNet

    model = torch.jit.script(FusedDSUNet(net).eval()) if fused else net
    x = torch.randn(1, 4, 16, 18, 16)
    mask = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(Exception, match=r"multiples of 4") as info:
        model(x, mask)
    assert "pad or crop" in str(info.value)
    assert model(torch.randn(1, 4, 16, 20, 16), mask).shape == (1, 3, 16, 20, 16)

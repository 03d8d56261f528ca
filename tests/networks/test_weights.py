"""Checkpoint reading (``app.networks.weights``): what each refusal says."""

from __future__ import annotations

import pytest
import torch

from app.networks import DSTransformer, DSUNet
from app.networks.weights import describe_state_dict, load_weights


def test_a_checkpoint_of_the_other_model_kind_names_its_bundle(tmp_path):
    torch.save(DSTransformer(in_features=[6, 5, 4]).state_dict(), tmp_path / "mosi.pt")
    torch.save(DSUNet(features=(8, 16, 32, 64)).state_dict(), tmp_path / "brats.pt")
    with pytest.raises(ValueError, match=r"mosi.pt holds a sentiment \(DS transformer\) model, but a brain-tumour "
                                         r"segmentation \(DS U-Net\) model is configured: .* brats_gmd bundle"):
        load_weights(DSUNet(features=(8, 16, 32, 64)), tmp_path / "mosi.pt")
    with pytest.raises(ValueError, match="brats.pt holds a brain-tumour segmentation .* the mosi_gmd bundle"):
        load_weights(DSTransformer(in_features=[6, 5, 4]), tmp_path / "brats.pt")


def test_same_kind_other_settings_are_described_for_both_models(tmp_path):
    torch.save(DSTransformer(in_features=[6, 5, 4], hidden=32).state_dict(), tmp_path / "h32.pt")
    with pytest.raises(ValueError, match=r"\(3 modality encoders, feature sizes \[6, 5, 4\], hidden 32, 1 encoder and "
                                         r"1 trunk layer\(s\), head of 1 output\(s\): regression with --fusion mean\) than the one configured \(.*hidden 64.*"
                                         r"sentiment: --hidden"):
        load_weights(DSTransformer(in_features=[6, 5, 4], hidden=64), tmp_path / "h32.pt")
    assert describe_state_dict(DSUNet(features=(8, 16, 32, 64)).state_dict()) == \
        "4 modality encoders, features [8, 16, 32, 64]"


def test_a_fusion_mismatch_names_fusion_not_only_out_channels(tmp_path):
    """Confidence fusion adds a confidence logit to the head: a regression checkpoint trained with
    --fusion mean, loaded into the default (confidence) network, must point at --fusion; '1 output
    vs 2 outputs' with only --out_channels in the hint sends the user to a setting regression refuses."""
    state = DSTransformer(in_features=[6, 5, 4], fusion="mean").state_dict()
    torch.save(state, tmp_path / "mean.pt")
    with pytest.raises(ValueError) as err:
        load_weights(DSTransformer(in_features=[6, 5, 4], fusion="confidence"), tmp_path / "mean.pt")
    # the checkpoint records its head: the fusion it was trained with is named outright
    assert ("was trained for regression (mean fusion), but regression (confidence fusion) is configured: pass the "
            "settings it was trained with (--task regression --label_key regression_labels --out_channels 1 --fusion "
            "mean)") in str(err.value)
    # a checkpoint written before the head was recorded: its shapes say which settings may fit
    torch.save({k: v for k, v in state.items() if k != "head_config"}, tmp_path / "mean.pt")
    with pytest.raises(ValueError) as err:
        load_weights(DSTransformer(in_features=[6, 5, 4], fusion="confidence"), tmp_path / "mean.pt")
    message = str(err.value)
    assert "head of 1 output(s): regression with --fusion mean)" in message
    assert ("head of 2 output(s): regression with --fusion confidence, or --out_channels 2 with --fusion mean;"
            in message)
    assert "--fusion, and data" in message
    classes = DSTransformer(in_features=[6, 5, 4], task="classification", out_channels=3, fusion="confidence")
    assert describe_state_dict(classes.state_dict()).endswith(
        "head of 4 output(s): --out_channels 3 with --fusion confidence, or --out_channels 4 with --fusion mean")


def test_a_checkpoint_saved_without_checksums_loads(tmp_path):
    """torch can skip the zip CRCs for speed (compute_crc32 = False): nothing to verify, not damage."""
    import zipfile

    import torch.utils.serialization as serialization

    from app.networks.weights import read_state_dict

    net = DSUNet(features=(8, 16, 32, 64))
    # plain assignment and restore: torch's config module does not survive monkeypatch's undo
    previous = serialization.config.save.compute_crc32
    serialization.config.save.compute_crc32 = False
    try:
        torch.save(net.state_dict(), tmp_path / "nocrc.pt")
    finally:
        serialization.config.save.compute_crc32 = previous
    assert {i.CRC for i in zipfile.ZipFile(tmp_path / "nocrc.pt").infolist()} == {0}
    assert read_state_dict(tmp_path / "nocrc.pt").keys() == net.state_dict().keys()


def test_an_optional_group_may_be_absent_as_a_whole_but_not_in_part(tmp_path):
    from app.networks.weights import apply_state_dict

    state = DSUNet(features=(4, 8)).state_dict()
    prefix = "trunk."
    group = [k for k in state if k.startswith(prefix)]
    assert 1 < len(group) < len(state)
    whole = {k: v for k, v in state.items() if k not in group}
    apply_state_dict(DSUNet(features=(4, 8)), whole, tmp_path / "m.pt", optional_prefixes=[prefix])  # loads
    part = {k: v for k, v in state.items() if k != group[0]}
    with pytest.raises(ValueError, match=rf"e\.g\. {group[0]} is missing from it\)"):
        apply_state_dict(DSUNet(features=(4, 8)), part, tmp_path / "m.pt", optional_prefixes=[prefix])
    with pytest.raises(ValueError, match=r"e\.g\. extra\.weight is unexpected in it\)"):
        apply_state_dict(DSUNet(features=(4, 8)), {**state, "extra.weight": torch.zeros(1)}, tmp_path / "m.pt")


def test_a_missing_checkpoint_names_the_file_and_the_setting(tmp_path):
    """What an evaluation answers for a --ckpt_path that does not exist (bad-input catalogue)."""
    missing = tmp_path / "models" / "model.pt"
    with pytest.raises(FileNotFoundError, match=rf"^Checkpoint {missing} not found: pass --ckpt_path to a model\.pt "
                                                r"written by training\.$"):
        load_weights(DSUNet(features=(8, 16, 32, 64)), missing)


def test_a_checkpoint_path_naming_a_folder_or_a_named_pipe_says_what_is_there(tmp_path):
    """--ckpt_path O/models (the folder) or a named pipe under the checkpoint's name was reported as 'not found'
    although the path exists; a pipe must not be opened either (the read would wait for a writer forever)."""
    import os

    net = DSUNet(features=(8, 16, 32, 64))
    with pytest.raises(FileNotFoundError, match=rf"^Checkpoint {tmp_path} is a folder, not a model file: pass "
                                                r"--ckpt_path to a model\.pt written by training\.$"):
        load_weights(net, tmp_path)
    pipe = tmp_path / "model.pt"
    os.mkfifo(pipe)
    with pytest.raises(FileNotFoundError, match=rf"^Checkpoint {pipe} is a named pipe, not a model file \(it is not "
                                                r"read.*\): pass --ckpt_path"):
        load_weights(net, pipe)


def test_a_torchscript_model_given_as_the_checkpoint_is_named_as_one(tmp_path):
    """Evaluating the exported model.ts (or a TorchScript archive under a .pt name) said the file was 'corrupt or
    not a PyTorch checkpoint; re-export it from training': it is intact, and the fix is the training checkpoint."""
    exported = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(exported))
    with pytest.raises(ValueError, match=rf"^{exported} is a TorchScript model \(an export for python -m app infer\), "
                                         r"not a training checkpoint: pass the model\.pt written by training"):
        load_weights(DSUNet(features=(8, 16, 32, 64)), exported)

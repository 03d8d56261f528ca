"""TorchScript export (``app.inference.export``): a model replaces ``--out`` only once verified."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import app.inference.export as export
from app.inference.model import FusedDSUNet, export_torchscript, is_torchscript
from app.networks import DSUNet
from tests.inference.conftest import FEATURE_ARGS, FEATURES


def _change_one_weight(scripted: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Shift one output bias of a scripted DS U-Net by 0.01: every logit of that channel moves by 0.01."""
    with torch.no_grad():
        dict(scripted.named_parameters())["trunk.head.conv.conv.bias"][0] += 0.01
    return scripted


def test_verify_export_refuses_a_model_with_one_weight_changed():
    torch.manual_seed(0)
    eager = DSUNet(features=FEATURES).eval()
    scripted = torch.jit.script(FusedDSUNet(eager).eval())  # FusedDSUNet copies the weights
    assert export.verify_export(eager, scripted, eager.divisor) <= 1e-4
    with pytest.raises(ValueError, match=r"differs from the checkpoint by 0\.01 \(> 0\.0001\): do not deploy"):
        export.verify_export(eager, _change_one_weight(scripted), eager.divisor)


def test_export_that_scripts_a_different_model_exits_2_and_keeps_the_deployed_one(random_ckpt, tmp_path,
                                                                                    monkeypatch, capsys):
    out = tmp_path / "model.ts"
    out.write_bytes(b"the deployed model")
    script = torch.jit.script

    def script_wrongly(obj, *args, **kwargs):
        if not isinstance(obj, FusedDSUNet):
            return script(obj, *args, **kwargs)
        # a scripted module shares its parameters with the module scripted, which the CLI then compares against
        return _change_one_weight(script(copy.deepcopy(obj), *args, **kwargs))

    monkeypatch.setattr(torch.jit, "script", script_wrongly)
    assert export.main(["--ckpt", random_ckpt, "--out", str(out), *FEATURE_ARGS]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: The exported model differs from the checkpoint by 0.01 ") and err.count("\n") == 1
    assert out.read_bytes() == b"the deployed model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.ts"]  # no temporary left


def test_failed_verification_keeps_the_deployed_model(random_ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "models" / "model.ts"
    out.parent.mkdir()
    out.write_bytes(b"the deployed model")

    def differs(eager, scripted, divisor, atol=1e-4):
        raise ValueError("The exported model differs from the checkpoint by 0.5 (> 0.0001): do not deploy it.")

    monkeypatch.setattr(export, "verify_export", differs)
    rc = export.main(["--ckpt", random_ckpt, "--out", str(out), "--features", "8", "16", "32", "64"])
    assert rc == 2 and "differs from the checkpoint" in capsys.readouterr().err
    assert out.read_bytes() == b"the deployed model"
    assert [p.name for p in out.parent.iterdir()] == ["model.ts"]  # no temporary left


def test_verified_model_replaces_the_old_one(random_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "model.ts"
    out.write_bytes(b"the deployed model")
    real_verify = export.verify_export
    seen: list[bytes] = []

    def verify(eager, scripted, divisor, atol=1e-4):
        seen.append(out.read_bytes())  # what a reader of --out gets while the new model is checked
        return real_verify(eager, scripted, divisor, atol)

    monkeypatch.setattr(export, "verify_export", verify)
    assert export.main(["--ckpt", random_ckpt, "--out", str(out)]) == 0
    assert seen == [b"the deployed model"]
    assert is_torchscript(out) and [p.name for p in tmp_path.iterdir()] == ["model.ts"]



def test_bad_output_paths_are_refused_before_scripting(random_ckpt, tmp_path, monkeypatch, capsys):
    """The checkpoint itself, a folder, another format, or a folder that cannot be written: one line,
    exit 2, before any scripting, and the checkpoint is untouched."""
    import shutil

    ckpt = tmp_path / "model.pt"
    shutil.copy(random_ckpt, ckpt)
    before = ckpt.read_bytes()
    scripted = []
    monkeypatch.setattr(torch.jit, "script", lambda *a, **k: scripted.append(1))
    (tmp_path / "folder.ts").mkdir()
    (tmp_path / "blocked").write_text("a file where a folder should be")
    os.link(ckpt, tmp_path / "same.ts")  # the checkpoint under an export's name
    for out, expected in ((tmp_path / "same.ts", "is also an input"), (ckpt, "must end with .ts: rename it"),
                          (tmp_path / "folder.ts", "is a folder"),
                          (tmp_path / "model.nii.gz", "must end with .ts: rename it"),
                          (tmp_path / "blocked" / "m.ts", "is a file, not a folder")):
        assert export.main(["--ckpt", str(ckpt), "--out", str(out)]) == 2, out
        err = capsys.readouterr().err
        assert err.startswith("error: --out") and expected in err and err.count("\n") == 1, err
    assert ckpt.read_bytes() == before and not scripted


def test_export_never_replaces_a_training_checkpoint(random_ckpt, tmp_path, capsys):
    """``--out O/models/model.pt`` from another checkpoint would replace trained weights with the
    export; an earlier export under that name may be replaced."""
    import shutil

    weights = tmp_path / "model.pt"
    shutil.copy(random_ckpt, weights)
    before = weights.read_bytes()
    final = tmp_path / "model_final.pt"
    shutil.copy(random_ckpt, final)
    assert export.main(["--ckpt", str(final), "--out", str(weights), *FEATURE_ARGS]) == 2
    err = capsys.readouterr().err
    assert "must end with .ts" in err and err.count("\n") == 1  # inference runs TorchScript only from .ts files
    assert weights.read_bytes() == before
    named_ts = tmp_path / "weights.ts"
    shutil.copy(random_ckpt, named_ts)
    assert export.main(["--ckpt", str(final), "--out", str(named_ts), *FEATURE_ARGS]) == 2
    err = capsys.readouterr().err
    assert "is a checkpoint written by training, not an exported model" in err and err.count("\n") == 1
    exported = tmp_path / "exported.ts"
    assert export.main(["--ckpt", str(final), "--out", str(exported), *FEATURE_ARGS]) == 0
    assert is_torchscript(exported)
    assert export.main(["--ckpt", str(final), "--out", str(exported), *FEATURE_ARGS]) == 0  # a re-export


def test_missing_or_empty_checkpoint_names_this_commands_option(tmp_path, capsys):
    """The export's option is --ckpt: a missing checkpoint used to be answered with 'pass --ckpt_path', an
    option the command refuses, and an empty one ('--ckpt $CKPT' unset) named no file at all."""
    for ckpt, expected in ((str(tmp_path / "nope.pt"), f"Checkpoint {tmp_path / 'nope.pt'} not found: pass --ckpt "),
                           ("", "--ckpt is empty")):
        assert export.main(["--ckpt", ckpt, "--out", str(tmp_path / "model.ts")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and "--ckpt_path" not in lines[0], lines
    assert not list(tmp_path.iterdir())


def test_a_checkpoint_under_an_unexpanded_home_folder_names_the_path_to_give(tmp_path, capsys, monkeypatch):
    """export --ckpt=~/runs/model.pt (a '~' the shell leaves alone after '=') was 'not found' without the path."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert export.main(["--ckpt=~/runs/model.pt", "--out", str(tmp_path / "model.ts")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"Checkpoint ~/runs/model.pt not found ('~' is not expanded here" in lines[0], lines
    assert f"give {tmp_path}/runs/model.pt)" in lines[0], lines


@pytest.mark.parametrize("rows", [1, 3])
def test_fused_network_refuses_a_mask_of_other_rows(rows):
    # 2 images and a 1-row mask used to encode image 0 only and return all-zero logits for image 1
    torch.manual_seed(0)
    scripted = torch.jit.script(FusedDSUNet(DSUNet(features=FEATURES)).eval())
    image = torch.randn(2, 4, 16, 16, 16)
    with pytest.raises(Exception, match=r"modality_mask \[B, M\] with one row per image"):
        scripted(image, torch.ones(rows, 4, dtype=torch.bool))
    assert scripted(image, torch.ones(2, 4, dtype=torch.bool)).shape == (2, 3, 16, 16, 16)


def test_an_exported_network_without_a_mask_fuses_every_sequence():
    # the bundle metadata declares the mask a second input that DSUNet.forward may go without; the exported model
    # required it, so monai.bundle verify_net_in_out (which passes the image alone) stopped with a TypeError
    torch.manual_seed(0)
    eager = DSUNet(features=FEATURES).eval()
    scripted = torch.jit.script(FusedDSUNet(eager).eval())
    image = torch.randn(2, 4, 16, 16, 16)
    with torch.no_grad():
        unmasked = scripted(image)
        torch.testing.assert_close(unmasked, scripted(image, torch.ones(2, 4, dtype=torch.bool)), rtol=0, atol=0)
        torch.testing.assert_close(unmasked, eager(image), rtol=1e-4, atol=1e-4)


def test_export_leaves_the_given_network_as_it_was(tmp_path):
    # export moved a FusedDSUNet to the CPU and into eval mode in place: a model served on a GPU (load_network
    # with device="cuda") then failed on the next GPU batch
    torch.manual_seed(0)
    fused = FusedDSUNet(DSUNet(features=FEATURES)).train()
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    export_torchscript(fused, tmp_path / "model.ts")
    assert fused.training and all(m.training for m in fused.modules())
    assert all(torch.equal(before[k], v) for k, v in fused.state_dict().items())
    assert is_torchscript(tmp_path / "model.ts")

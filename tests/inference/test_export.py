"""TorchScript export (``app.inference.export``): a model replaces ``--out`` only once verified."""

from __future__ import annotations

import app.inference.export as export
from app.inference.model import is_torchscript


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


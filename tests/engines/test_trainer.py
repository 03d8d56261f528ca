"""Engine helpers: which subsets a case counts for, from its modality mask."""

from __future__ import annotations

import torch

from app.engines.trainer import subset_sample_masks
from app.subsets import BRATS_MODALITIES, all_subsets, subset_name
from tests.fakes import FullDiskFile

NAMES = [subset_name(s, BRATS_MODALITIES) for s in all_subsets(4)]


def test_a_case_counts_for_a_subset_only_if_it_has_all_of_its_sequences():
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)  # no t1; all; t2 only
    valid, masks = subset_sample_masks(mask)
    masks = list(masks)
    assert valid.shape == (3, 15) and valid.dtype == torch.bool and len(masks) == 15
    # written out by hand: every subset without t1, every subset, t2 alone
    expected = [
        ["flair", "t1ce", "t2", "flair+t1ce", "flair+t2", "t1ce+t2", "flair+t1ce+t2"],
        NAMES,
        ["t2"],
    ]
    for row, names in zip(valid.tolist(), expected):
        assert [n for n, ok in zip(NAMES, row) if ok] == names
    # a subset the case has: its sequences only; one it lacks: the case's own mask (left out of the metrics)
    by_name = dict(zip(NAMES, masks))
    assert by_name["flair+t2"].int().tolist() == [[1, 0, 0, 1], [1, 0, 0, 1], [0, 0, 0, 1]]
    assert by_name["t1"].int().tolist() == [[1, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 1]]
    assert by_name["flair+t1+t1ce+t2"].int().tolist() == [[1, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]]


class _Scaled(torch.nn.Module):
    """per-modality outputs ``w * x``, fused by the mean over the available modalities; records train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))
        self.modes: list[bool] = []

    def per_modality(self, x, mask):
        self.modes.append(self.training)
        return self.w * x.unsqueeze(2)  # [B, M, C=1, 1]

    def fuse(self, per_modality, mask, check=True):
        m = mask[:, :, None, None].to(per_modality.dtype)
        return (per_modality * m).sum(1) / m.sum(1)


def test_each_iteration_steps_with_that_iteration_gradient_only_after_sync_and_backward_completed():
    from ignite.engine import Events
    from monai.engines.utils import IterationEvents

    from app.engines import SubsetTrainer
    from app.strategies import build_strategy

    net = _Scaled().eval()  # the trainer must switch it to training mode itself
    batch = {"image": torch.tensor([[[1.0], [3.0]]]), "label": torch.zeros(1, 1, 1),
             "modality_mask": torch.tensor([[True, True]])}
    seen: list[tuple[str, float, float]] = []
    trainer = SubsetTrainer(
        max_epochs=1, train_data_loader=[batch, batch], network=net, device=torch.device("cpu"),
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=lambda p, t: (p - t) ** 2,
        strategy=build_strategy("plain"),
        grad_sync=lambda network, strategy: seen.append(("sync", float(network.w.detach()), float(network.w.grad))),
    )
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED,
                              lambda e: seen.append(("backward", float(net.w.detach()), float(net.w.grad))))
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    trainer.run()
    # fused prediction 2w, target 0: loss 4w^2, gradient 8w; SGD lr 0.1: w 1 -> 0.2 -> 0.04
    # (an accumulated gradient would give 0.2 - 0.1 * (8 + 1.6) = -0.76)
    expected = [("sync", 1.0, 8.0), ("backward", 1.0, 8.0), ("sync", 0.2, 1.6), ("backward", 0.2, 1.6)]
    assert [(k, round(w, 6), round(g, 6)) for k, w, g in seen] == expected
    assert round(float(net.w.detach()), 6) == 0.04 and [round(v, 6) for v in losses] == [4.0, 0.16]
    assert net.modes == [True, True]


def _trainer(net: torch.nn.Module, loss_function, batches: int = 3):
    from app.engines import SubsetTrainer
    from app.strategies import build_strategy

    batch = {"image": torch.tensor([[[1.0], [3.0]]]), "label": torch.zeros(1, 1, 1),
             "modality_mask": torch.tensor([[True, True]])}
    return SubsetTrainer(
        max_epochs=1, train_data_loader=[batch] * batches, network=net, device=torch.device("cpu"),
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=loss_function,
        strategy=build_strategy("plain"),
    )


def test_a_nan_loss_stops_training_before_the_step_with_a_one_line_error():
    import pytest

    from app.engines import NonFiniteLossError
    from app.engines.utils import _input_error

    net = _Scaled()
    calls = []

    def loss_function(p, t):
        calls.append(1)
        return (p - t) ** 2 * (float("nan") if len(calls) == 2 else 1.0)

    trainer = _trainer(net, loss_function)
    with pytest.raises(NonFiniteLossError, match=r"not finite \(loss nan\) at epoch 1, iteration 2: .*--learning_rate") as err:
        trainer.run()
    # the first step (w 1 -> 0.2) happened, the NaN step did not, and the third iteration never ran
    assert round(float(net.w.detach()), 6) == 0.2 and len(calls) == 2
    assert _input_error(err.value) is err.value  # printed as one error: line by the bundle's hook
    # on CPU nothing is autocast, so --amp false would change nothing: it is not offered as a fix
    assert "--amp" not in str(err.value)


def test_a_nan_sentiment_loss_does_not_send_the_user_to_images_and_voxels():
    """A diverged sentiment run was told to check its training images for NaN voxels: it has features, and the
    loader has already read their NaN and infinite values as 0."""
    import pytest

    from app.engines import NonFiniteLossError

    net = _Scaled()
    net.task = "regression"
    trainer = _trainer(net, lambda p, t: (p - t) ** 2 * float("nan"))
    with pytest.raises(NonFiniteLossError) as err:
        trainer.run()
    assert str(err.value).endswith("Start again with a lower --learning_rate.")
    assert "voxels" not in str(err.value) and "images" not in str(err.value)


def test_a_nan_loss_under_gpu_autocast_names_amp_as_a_fix(monkeypatch):
    import pytest

    import app.engines.trainer as trainer_module
    from app.engines import NonFiniteLossError

    monkeypatch.setattr(trainer_module, "amp_dtype", lambda device, enabled, training=False: torch.bfloat16)
    trainer = _trainer(_Scaled(), lambda p, t: (p - t) ** 2 * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"--learning_rate \(or --amp false\)"):
        trainer.run()


def test_an_infinite_gradient_under_a_finite_loss_stops_training_too():
    import pytest

    from app.engines import NonFiniteLossError

    net = _Scaled()
    # sqrt at 0: loss 0, gradient infinite
    trainer = _trainer(net, lambda p, t: torch.sqrt((p - 2 * net.w) ** 2 + 0 * t))
    with pytest.raises(NonFiniteLossError, match=r"gradient of the training loss is not finite \(loss 0.0\) at epoch 1, iteration 1"):
        trainer.run()
    assert float(net.w.detach()) == 1.0


def test_the_training_step_asks_for_the_training_autocast(monkeypatch):
    """--amp on a GPU without native bf16 must train in fp32: fp16 gradients would need loss scaling, which the
    per-subset gradients of GMD and CGGM do not take. The step asks amp_dtype for the training dtype."""
    import app.engines.trainer as trainer_module

    asked = []
    monkeypatch.setattr(trainer_module, "amp_dtype",
                        lambda device, enabled, training=False: asked.append((enabled, training)))
    trainer = _trainer(_Scaled(), lambda p, t: (p - t) ** 2, batches=2)
    trainer.use_amp = True
    trainer.run()
    assert asked == [(True, True), (True, True)]


def test_a_fresh_training_does_not_log_that_it_resumes(caplog):
    """ignite logged 'Engine run resuming from iteration 0, epoch 0 until 1 epochs' at the start of every
    training (MONAI sets max_epochs when the trainer is built), as if a checkpoint were continued."""
    import logging

    trainer = _trainer(_Scaled(), lambda p, t: (p - t) ** 2)
    caplog.set_level(logging.INFO, logger=trainer.logger.name)
    trainer.run()
    lines = [r.getMessage() for r in caplog.records if r.name == trainer.logger.name]
    assert not any("resuming" in line for line in lines), lines
    assert any(line.startswith("Engine run finished") for line in lines), lines


def test_only_rank_0_logs_the_engine_lines_of_a_multi_process_run(caplog, monkeypatch):
    """ignite's 'Epoch[1] Complete' and 'Engine run finished' (and MONAI's 'Got new best metric') came from every
    rank of a torchrun training, unlabelled: with 8 GPUs each line 8 times. A warning of any rank stays."""
    import logging

    import app.engines.trainer as trainer_module

    trainer = _trainer(_Scaled(), lambda p, t: (p - t) ** 2)
    caplog.set_level(logging.INFO, logger=trainer.logger.name)
    monkeypatch.setattr(trainer_module, "process_group", lambda: (2, 1))
    trainer.run()
    trainer.logger.warning("a warning of rank 1")
    assert [r.getMessage() for r in caplog.records if r.name == trainer.logger.name] == ["a warning of rank 1"]
    caplog.clear()
    monkeypatch.setattr(trainer_module, "process_group", lambda: (2, 0))
    _trainer(_Scaled(), lambda p, t: (p - t) ** 2).run()
    assert any(r.getMessage().startswith("Engine run finished") for r in caplog.records)



def test_a_full_disk_after_a_checkpoint_names_the_checkpoint_to_resume_from(tmp_path, monkeypatch):
    """A disk that filled during a long training ended it with 'free space ..., or write to another folder': a
    training started again elsewhere, or without --resume, began from scratch although checkpoint_last.pt of the
    last epoch end was still there. The error now names that checkpoint and how to continue from it."""
    import os

    import pytest

    import app.atomic as atomic
    from app.engines import ResumableCheckpoint, load_training_checkpoint
    from app.engines.utils import _input_error

    def trainer_with_checkpoint(folder, full):
        net = _Scaled()
        trainer = _trainer(net, lambda p, t: ((p - t) ** 2).mean())
        trainer.state.max_epochs = 2
        ResumableCheckpoint(folder, net, trainer.optimizer).attach(trainer)
        real_fdopen = os.fdopen
        monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: FullDiskFile(real_fdopen(fd, mode))
                            if full(trainer) else real_fdopen(fd, mode))
        return trainer

    path = tmp_path / "models" / "checkpoint_last.pt"
    trainer = trainer_with_checkpoint(path.parent, full=lambda trainer: trainer.state.epoch == 2)
    with pytest.raises(OSError, match=rf"^Cannot write {path} \(No space left on device\): free space .* The resumable "
                                      rf"checkpoint {path} \(epoch 1, iteration 3\) is kept: once the disk can take the "
                                      r"run's files, run the same command with --resume true to continue from it\.$") as err:
        trainer.run()
    assert _input_error(err.value) is err.value  # still the bundle's one error line
    monkeypatch.undo()
    assert load_training_checkpoint(path)["iteration"] == 3
    # nothing written yet: no checkpoint to name
    with pytest.raises(OSError, match=r"free space on that disk \(or raise the quota\), or write to another folder\.$"):
        trainer_with_checkpoint(tmp_path / "other", full=lambda trainer: True).run()


def test_a_cpu_training_keeps_the_memory_a_step_frees_for_the_next(monkeypatch):
    """Without it glibc gave the heap back after every step and the kernel zeroed it again for the next one:
    about a tenth of a 48^3 CPU step's time (tests/test_host_memory.py checks the setting itself)."""
    from ignite.engine import Events

    import app.engines.trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "keep_freed_host_memory", lambda: calls.append(1) or True)
    trainer = _trainer(_Scaled(), lambda p, t: (p - t) ** 2)
    trainer.add_event_handler(Events.STARTED, lambda e: calls.append("started"))
    trainer.run()
    assert calls == [1, "started"]  # before the first step


def test_a_validation_gives_the_kept_memory_back_before_it_starts(monkeypatch):
    """The heap kept at a CPU training's high-water mark stayed resident through its validations, whose blocks of
    32 MiB and more are mapped beside it: with --sw_batch_size 8 against batches of two 48^3 patches the peak rose
    from 1.65-1.68 to 1.88-1.92 GiB (tests/test_host_memory.py checks that the memory is given back)."""
    from ignite.engine import Events
    from monai.inferers import SimpleInferer

    import app.engines.trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "release_kept_host_memory", lambda: calls.append(1) or True)
    from app.networks import DSUNet

    data = [{"image": torch.randn(1, 4, 8, 8, 8), "label": torch.zeros(1, 3, 8, 8, 8),
             "modality_mask": torch.ones(1, 4, dtype=torch.bool), "case": ["a"]}]
    evaluator = trainer_module.SubsetEvaluator(device=torch.device("cpu"), val_data_loader=data,
                                               network=DSUNet(features=(4, 8)), inferer=SimpleInferer())
    evaluator.add_event_handler(Events.STARTED, lambda e: calls.append("started"))
    evaluator.run()
    assert calls == [1, "started"]

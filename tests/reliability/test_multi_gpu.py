"""Multi-process training on CPU (gloo): the bundle override under torchrun, and GMD's two sync modes.

``global`` sync must give every rank the GMD gradient of the global batch, i.e. exactly what one
process computes on the concatenated batch; ``local`` sync must leave every rank with the average of
the ranks' own GMD gradients. Both are checked in float64 on a batch whose ranks lack different
sequences, so that some subsets exist on one rank only.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ignite.engine import Engine
from monai.bundle import ConfigParser

from app.data.datalist import shard_cases
from app.data.mmsa import write_synthetic_mmsa
from app.data.phantoms import write_phantoms
from app.atomic import lock_folder
from app.engines import (
    DistributedTimeLimitHandler, GradientSync, SubsetTrainer,
    ResumableSampler, check_shards, close_distributed, lock_output_dir, mean_over_ranks,
)
from app.networks import DSUNet
from app.strategies import GMDApproxStrategy, GMDStrategy, build_strategy
from tests.reliability.helpers import (
    BRATS, MULTI_GPU, PEER_TIMEOUT, REPO, TINY, TRAIN, assert_same_tensors, cli_args, load, subprocess_env,
)

RANK_WEIGHTS = str(Path(__file__).with_name("configs") / "save_rank_weights.yaml")
WORLD = 2
# rank 0 holds samples 0-1, rank 1 samples 2-3; flair is absent on rank 1, so e.g. subset "flair" has
# samples on rank 0 only and the flair encoder gets no gradient on rank 1
MASK = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)


def _loss(pred, target):
    return torch.nn.functional.binary_cross_entropy_with_logits(pred, target, reduction="none")


def _grads(model):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


class _Scaled(torch.nn.Module):
    """per-modality outputs ``w * x``, fused by the mean over the available modalities."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))
        self.unused = torch.nn.Parameter(torch.tensor(1.0))  # no gradient on any rank

    def per_modality(self, x, mask):
        return self.w * x.unsqueeze(2)

    def fuse(self, per_modality, mask, check=True):
        m = mask[:, :, None, None].to(per_modality.dtype)
        return (per_modality * m).sum(1) / m.sum(1)


def _sync_worker(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=PEER_TIMEOUT)
    try:
        torch.manual_seed(0)
        model = DSUNet(features=(4, 8), out_channels=2).double()
        x = torch.randn(4, 4, 8, 8, 8, dtype=torch.float64)
        y = (torch.rand(4, 2, 8, 8, 8) > 0.6).double()
        shard = slice(2 * rank, 2 * rank + 2)
        sync = GradientSync()
        for cls in (GMDStrategy, GMDApproxStrategy):
            model.zero_grad()
            cls(seed=3).step(model, x, MASK, y, _loss)  # one process, whole batch (local: no collective)
            reference = _grads(model)
            model.zero_grad()
            strategy = cls(seed=3, sync="global")
            strategy.step(model, x[shard], MASK[shard], y[shard], _loss)
            sync(model, strategy)
            got = _grads(model)
            err = float((got - reference).abs().max() / reference.abs().max())
            assert err < 1e-10, f"{cls.name} global sync differs from the whole batch by {err:.3g}"

        model.zero_grad()
        strategy = GMDStrategy(seed=3, sync="local")
        strategy.step(model, x[shard], MASK[shard], y[shard], _loss)
        own = _grads(model)
        sync(model, strategy)
        got = _grads(model)
        owns, gots = [torch.zeros_like(own) for _ in range(WORLD)], [torch.zeros_like(got) for _ in range(WORLD)]
        dist.all_gather(owns, own)
        dist.all_gather(gots, got)
        assert all(torch.equal(g, gots[0]) for g in gots), "ranks differ after local sync"
        assert torch.allclose(got, torch.stack(owns).mean(0), rtol=0, atol=1e-15)
        assert not torch.allclose(owns[0], owns[1]), "the ranks' batches should give different gradients"

        # the logged loss is the global batch's: the same on every rank
        assert float(mean_over_ranks(torch.tensor(1.0 + rank))) == 1.5

        # a trainer with GradientSync steps with the global batch's gradient and logs its loss: per rank
        # x = (rank + 1) * [1, 3], fused 2w(rank + 1), loss 4w^2(rank + 1)^2 = 4 | 16 -> 10, gradient 8 | 32 -> 20
        net = _Scaled()
        batch = {"image": torch.tensor([[[1.0], [3.0]]]) * (rank + 1), "label": torch.zeros(1, 1, 1),
                 "modality_mask": torch.tensor([[True, True]])}
        trainer = SubsetTrainer(max_epochs=1, train_data_loader=[batch], network=net, device=torch.device("cpu"),
                                optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                                loss_function=lambda p, t: (p - t) ** 2, strategy=build_strategy("plain"),
                                grad_sync=GradientSync())
        trainer.run()
        assert float(trainer.state.output["loss"]) == 10.0 and float(net.w.detach()) == -1.0  # 1 - 0.1 * 20
        assert net.unused.grad is None  # as in one process: the optimizer skips it

        # the time limit stops every rank when one has spent it (rank 1 here), at the same iteration
        limit = DistributedTimeLimitHandler(1.0)
        limit.spent_before, limit.start = (120.0 if rank == 1 else 0.0), time.monotonic()
        engine = Engine(lambda e, b: None)
        limit._check(engine)
        assert limit.expired and engine.should_terminate, f"rank {rank} did not stop"

        # too few validation cases for the ranks: an error instead of a hang in the metric's gather
        check_shards(["case_a", "case_b"], "validation cases")
        with pytest.raises(ValueError, match=r"1 validation cases for 2 processes.*raise --val_fraction"):
            check_shards(["case_a"], "validation cases", "raise --val_fraction")
    finally:
        close_distributed()
    # after the bundles' finalize, this process reads one rank again (ignite had kept the group)
    assert not dist.is_initialized() and len(ResumableSampler(range(4), shuffle=False)) == 4


def test_gmd_global_sync_is_exact_and_local_sync_averages(tmp_path):
    # fork: the workers inherit the imported modules (spawn would spend most of the test re-importing);
    # they set one torch thread before any parallel region, which keeps OpenMP safe after the fork. Where CUDA
    # is present, autograd's device threads may already run in this process, which fork cannot copy.
    start = "spawn" if torch.cuda.is_available() else "fork"
    mp.start_processes(_sync_worker, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True, start_method=start)


def test_two_gloo_processes_train_the_bundle_to_identical_weights(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    write_phantoms(data, cases=4, size=24, seed=0)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
        "-m", "monai.bundle", "run", "--config_file", str([TRAIN, MULTI_GPU, RANK_WEIGHTS]),
        "--bundle_root", str(BRATS), "--dataset_dir", str(data), "--output_dir", str(out), "--dist_backend", "gloo",
        "--strategy", "gmd", "--gmd_subsets", "4", "--gmd_sync", "global", "--max_epochs", "1", "--epoch_length", "2",
        "--val_fraction", "0.5", *cli_args(TINY),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    rank0, rank1 = load(out / "rank0.pt"), load(out / "rank1.pt")
    assert_same_tensors(rank0, rank1, "rank 1 vs rank 0")
    assert_same_tensors(rank0, load(out / "models" / "model_final.pt"), "model_final.pt")
    ckpt = load(out / "models" / "checkpoint_last.pt")
    assert (ckpt["iteration"], ckpt["world_size"], len(ckpt["rng"])) == (2, WORLD, WORLD)
    assert all(int(s["step"]) == 2 for s in ckpt["optimizer"]["state"].values())
    # files are written once, by rank 0
    assert len(list((out / "tensorboard").iterdir())) == 1
    assert (out / "validation" / "subset_dice.json").is_file() and (out / "models" / "model.pt").is_file()


def _torchrun(config_files: list[str], *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "-m", "monai.bundle", "run", "--config_file", str(config_files), *args]
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)


def _rank_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("[rank")]


def test_a_bad_case_on_one_rank_stops_every_rank_and_writes_nothing(tmp_path):
    """Each rank reads only its share of the cases: the one holding a corrupt file stops, and the other
    must not go on to write the run's datalist.json (nor hang, nor print a traceback)."""
    data, out = tmp_path / "data", tmp_path / "out"
    write_phantoms(data, cases=6, size=24, seed=0)
    (data / "Phantom_003" / "Phantom_003_t2.nii.gz").write_bytes(b"not a NIfTI file")
    proc = _torchrun([TRAIN, MULTI_GPU], "--bundle_root", str(BRATS), "--dataset_dir", str(data), "--output_dir",
                     str(out), "--dist_backend", "gloo", "--max_epochs", "1", "--val_fraction", "0.5", *cli_args(TINY))
    assert proc.returncode != 0
    lines = _rank_lines(proc)
    assert any("error: Cannot read" in line and "Phantom_003_t2.nii.gz" in line for line in lines), lines
    assert any("error: Rank" in line and "stops too: another process stopped before training" in line
               for line in lines), lines
    assert not any("Traceback" in line for line in lines), lines
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


def test_sentiment_run_refused_on_every_rank_writes_no_splits(tmp_path):
    pkl = write_synthetic_mmsa(tmp_path / "mosi.pkl", splits={"train": 8, "valid": 1}, seed=0)
    out = tmp_path / "out"
    proc = _torchrun([str(MOSI / "train.yaml"), str(MOSI / "multi_gpu_train.yaml")], "--bundle_root",
                     str(REPO / "bundles" / "mosi_gmd"), "--data_path", str(pkl), "--trust_pickle", "true",
                     "--output_dir", str(out), "--dist_backend", "gloo", "--max_epochs", "1")
    assert proc.returncode != 0
    assert any("1 validation samples for 2 processes" in line for line in _rank_lines(proc)), _rank_lines(proc)
    assert not (out / "splits.json").exists()


def _hold_lock(folder: Path) -> int:
    """What a training running on ``folder`` holds (the kernel's lock on the folder itself)."""
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


@pytest.mark.parametrize("bundle", ["brats", "mosi"])
def test_a_second_multi_process_training_on_a_busy_output_dir_stops_every_rank(bundle, tmp_path):
    """A job started twice: while another training holds --output_dir, every rank of a torchrun training
    stops with the one error line and nothing in the folder changes (the ranks used to take no lock and
    trained into the first run's folder)."""
    out = tmp_path / "out"
    (out / "models").mkdir(parents=True)
    (out / "models" / "checkpoint_last.pt").write_bytes(b"first run")  # the running training's files
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    if bundle == "brats":
        data = tmp_path / "data"
        write_phantoms(data, cases=4, size=24, seed=0)
        configs = [TRAIN, MULTI_GPU]
        args = ["--bundle_root", str(BRATS), "--dataset_dir", str(data), "--val_fraction", "0.5", *cli_args(TINY)]
    else:
        pkl = write_synthetic_mmsa(tmp_path / "mosi.pkl", splits={"train": 8, "valid": 4}, seed=0)
        configs = [str(MOSI / "train.yaml"), str(MOSI / "multi_gpu_train.yaml")]
        args = ["--bundle_root", str(REPO / "bundles" / "mosi_gmd"), "--data_path", str(pkl), "--trust_pickle", "true"]
    fd = _hold_lock(out)
    try:
        proc = _torchrun(configs, *args, "--output_dir", str(out), "--dist_backend", "gloo", "--max_epochs", "1")
    finally:
        os.close(fd)
    assert proc.returncode != 0
    lines = _rank_lines(proc)
    expected = (f"error: --output_dir {out} is in use by another run that is still writing into it (a job started "
                "twice?): wait for it to end, or pass another --output_dir.")
    for rank in range(WORLD):
        errors = [line for line in lines if line.startswith(f"[rank{rank}]") and "error:" in line]
        assert len(errors) == 1 and errors[0].endswith(expected), lines
    assert not any("Traceback" in line for line in lines), lines
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def _lock_worker(rank: int, store: str, folder: str, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=PEER_TIMEOUT)
    try:
        lock_output_dir(folder)
        dist.barrier()
        if rank == 1:  # a single-process training started meanwhile: what train.yaml runs, in a process of its own
            proc = subprocess.run([sys.executable, "-c", f"from app.engines import lock_output_dir; "
                                   f"lock_output_dir({folder!r})"], cwd=REPO, env=subprocess_env(),
                                  capture_output=True, text=True, timeout=120)
            Path(results).write_text(proc.stderr)
        dist.barrier()
    finally:
        close_distributed()


def test_a_multi_process_training_holds_its_output_dir_against_single_process_runs(tmp_path):
    """Rank 0 takes the lock for the whole run: a single-process training on the folder is refused meanwhile,
    and the lock is released when the run ends."""
    folder, results = tmp_path / "out", tmp_path / "single.txt"
    # fork as in the sync test above (spawn re-imported torch and MONAI in each rank); the single-process run
    # stays a process of its own
    start = "spawn" if torch.cuda.is_available() else "fork"
    mp.start_processes(_lock_worker, args=(str(tmp_path / "store"), str(folder), str(results)), nprocs=WORLD,
                       join=True, start_method=start)
    assert "is in use by another run that is still writing into it" in results.read_text(), results.read_text()
    fd = lock_folder(folder)
    assert fd is not None
    os.close(fd)


MOSI = REPO / "bundles" / "mosi_gmd" / "configs"
FILE_WRITERS = {
    "StatsHandler", "TensorBoardStatsHandler", "DiagnosticsHandler", "AtomicCheckpointSaver", "ProgressBarHandler",
}
#: writers of the segmentation bundle only (the sentiment bundle has no such handler)
BRATS_FILE_WRITERS = {"TrainingProgressHandler"}
# StopOnSignal on every rank: the ranks agree on a SIGTERM stop with one all-reduce per iteration
ALL_RANKS = ["LrScheduleHandler", "ValidationHandler", "DistributedTimeLimitHandler", "ResumableCheckpoint",
             "StopOnSignal"]


@pytest.fixture(scope="module")
def bundle_inputs(tmp_path_factory):
    """Settings of both bundles for resolving their multi-GPU configs without running them."""
    root = tmp_path_factory.mktemp("inputs")
    write_phantoms(root / "brats", cases=4, size=24, seed=0)
    pkl = write_synthetic_mmsa(root / "mosi.pkl", splits={"train": 8, "valid": 4}, seed=0)
    return {
        "brats": ([TRAIN, MULTI_GPU], {"dataset_dir": str(root / "brats"), "val_fraction": 0.5, **TINY}),
        "mosi": ([str(MOSI / "train.yaml"), str(MOSI / "multi_gpu_train.yaml")],
                 {"data_path": str(pkl), "trust_pickle": True}),
    }


@pytest.mark.usefixtures("process_state_restored")  # the bundle's setup of its process, run in this one
@pytest.mark.parametrize("bundle", ["brats", "mosi"])
@pytest.mark.parametrize("rank", [0, 1])
def test_override_runs_file_writing_handlers_on_rank_0_only(bundle, rank, bundle_inputs, monkeypatch, tmp_path):
    """The override disables handlers by their index in train.yaml: this catches an index gone stale."""
    monkeypatch.setenv("RANK", str(rank))  # the config's rank and world size before the process group exists
    monkeypatch.setenv("WORLD_SIZE", "2")
    files, settings = bundle_inputs[bundle]
    parser = ConfigParser()
    parser.read_config(files)
    samplers = {} if bundle == "brats" else {  # the sentiment override keeps DistributedSamplers
        "train#sampler#num_replicas": 2, "train#sampler#rank": rank,
        "validate#sampler#num_replicas": 2, "validate#sampler#rank": rank}
    parser.update({**settings, "output_dir": str(tmp_path), "dist_backend": "gloo", **samplers})
    trainer = parser.get_parsed_content("train#trainer")
    names = [type(h).__name__ for h in parser.get_parsed_content("train#trainer#train_handlers")]
    val_names = [type(h).__name__ for h in parser.get_parsed_content("validate#evaluator#val_handlers") or []]
    checkpoint = next(h for h in parser.get_parsed_content("train#trainer#train_handlers")
                      if type(h).__name__ == "ResumableCheckpoint")
    assert isinstance(trainer.grad_sync, GradientSync) and trainer.strategy.sync == "local"
    assert all(name in names for name in ALL_RANKS)
    assert names.index("ResumableCheckpoint") > names.index("ValidationHandler") > names.index("LrScheduleHandler")
    if rank == 0:
        assert FILE_WRITERS | (BRATS_FILE_WRITERS if bundle == "brats" else set()) <= set(names)
        assert "AtomicCheckpointSaver" in val_names
        assert type(checkpoint.key_metric_saver).__name__ == "AtomicCheckpointSaver"
        assert parser.get_parsed_content("summary_writer") is not None
    else:
        assert sorted(names) == sorted(ALL_RANKS) and val_names == []
        assert checkpoint.key_metric_saver is None and parser.get_parsed_content("summary_writer") is None
    if bundle == "brats":  # each rank caches its own share of the cases, not all of them
        datalist = parser.get_parsed_content("datalist")
        shards = [shard_cases(datalist["training"], r, 2, seed=0) for r in (0, 1)]
        assert parser.get_parsed_content("train#dataset").data == shards[rank]
        assert parser.get_parsed_content("validate#dataset").data == datalist["validation"][rank::2]
        assert parser.get_parsed_content("train#sampler#seed") == 1000003 * rank and len(shards[0]) == len(shards[1])
    writer = parser.get_parsed_content("summary_writer")
    if writer is not None:
        writer.close()

"""Multi-process training (torchrun) without ``DistributedDataParallel``.

DDP synchronises gradients from hooks on ``backward()``; the GMD strategies also take gradients with
``torch.autograd.grad``, which those hooks do not see, and exact GMD writes the shared gradients
itself. So the network is not wrapped: all ranks start from the same weights
(:func:`broadcast_module`), each rank runs the strategy on its own batch, and :class:`GradientSync`
then averages the gradients before the optimizer step. ``GMDStrategy(sync="global")`` instead
all-reduces the per-subset gradients before the decoupling so that every rank uses the decoupling
weights of the global batch (see ``docs/scale_out.md``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from typing import Any, Iterable, Sized

import torch
import ignite.distributed as idist
import torch.distributed as dist
from ignite.engine import Engine, Events

from app.engines.checkpoint import resume_hint
from app.engines.handlers import TimeLimitHandler
from app.strategies.base import process_group

__all__ = [
    "init_distributed",
    "close_distributed",
    "distributed_device",
    "is_distributed",
    "broadcast_module",
    "check_shards",
    "mean_over_ranks",
    "wait_for_ranks",
    "any_rank",
    "GradientSync",
    "DistributedTimeLimitHandler",
    "DUPLICATE_SIGNAL_SECONDS",
    "StopOnSignal",
    "data_worker_init",
]

logger = logging.getLogger(__name__)

_BACKENDS = ("nccl", "gloo")


def close_distributed() -> None:
    """Leave the process group (the multi-GPU bundles' ``finalize``).

    ignite keeps the group it has seen; without the re-sync, world size and rank (read through
    ``ignite.distributed`` by the sampler, the strategies and the metrics) would raise in this
    process afterwards instead of reading 1 and 0.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    idist.sync()


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return process_group()[0] > 1


def _check_backend(backend: str) -> str:
    name = str(backend).strip().lower()
    if name not in _BACKENDS:
        raise ValueError(f"dist_backend must be one of {list(_BACKENDS)}, got {backend!r}: nccl for GPUs, "
                         "--dist_backend gloo for CPU.")
    if name == "nccl" and not torch.cuda.is_available():
        raise ValueError("dist_backend nccl needs CUDA GPUs and none is visible: pass --dist_backend gloo to train "
                         "on CPU processes.")
    return name


def distributed_device(backend: str = "nccl") -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for NCCL (made the current device), CPU for gloo."""
    if _check_backend(backend) == "gloo":
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def init_distributed(backend: str = "nccl", timeout_minutes: float = 30.0) -> int:
    """Join the process group that ``torchrun`` describes in the environment; returns this rank.

    Does nothing if the group already exists.

    Raises:
        ValueError: not started by ``torchrun`` (no ``WORLD_SIZE``/``RANK`` in the environment; a bad
            launch, so the bundle run ends with one error line), unknown backend, or NCCL without a GPU.
    """
    name = _check_backend(backend)
    if dist.is_initialized():
        return dist.get_rank()
    missing = [k for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(
            f"The multi-GPU config needs the environment set by torchrun ({', '.join(missing)} missing): run "
            "torchrun --standalone --nproc_per_node N -m monai.bundle run --config_file \"['.../train.yaml',"
            "'.../multi_gpu_train.yaml']\" ..., or drop multi_gpu_train.yaml for one process."
        )
    if name == "nccl":
        distributed_device(name)  # NCCL binds each rank to its GPU before the group forms
    dist.init_process_group(backend=name, timeout=timedelta(minutes=float(timeout_minutes)))
    # ignite discovers the group lazily with a collective the first time it asks for the rank (e.g. in a
    # CheckpointSaver); a handler built on rank 0 only would then wait forever, so discover it now
    idist.sync()
    logger.info("Rank %d of %d joined the %s process group.", dist.get_rank(), dist.get_world_size(), name)
    return dist.get_rank()


def broadcast_module(module: torch.nn.Module, src: int = 0) -> torch.nn.Module:
    """Copy the parameters and buffers of rank ``src`` to every rank (no-op without a process group)."""
    if is_distributed():
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=src)
    return module


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """``value`` averaged over the ranks (a detached copy), or ``value`` itself in a single process.

    The trainer logs the loss through it, so that the loss rank 0 reports is the global batch's,
    like the gradients it steps with, not rank 0's share alone.
    """
    if not is_distributed():
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total.div_(dist.get_world_size())


def check_shards(items: Sized, what: str = "validation cases", hint: str = "") -> None:
    """Raise a clear error when ``items`` cannot give every rank at least one element.

    A rank without validation data skips the evaluation, and the others then wait forever in the
    metric's all-gather; this turns that hang into a message.

    Raises:
        ValueError: ``items`` has fewer elements than there are processes.
    """
    if is_distributed() and len(items) < dist.get_world_size():
        raise ValueError(f"{len(items)} {what} for {dist.get_world_size()} processes: every rank needs at least one; "
                         f"{hint + ', ' if hint else ''}add data, or start fewer processes (--nproc_per_node).")


def _buckets(params: Iterable[torch.nn.Parameter], max_bytes: int) -> list[list[torch.nn.Parameter]]:
    """Consecutive groups of one dtype and at most ``max_bytes`` of gradient (a larger tensor is alone)."""
    out: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if not out or out[-1][0].dtype != p.dtype or size + nbytes > max_bytes:
            out.append([])
            size = 0
        out[-1].append(p)
        size += nbytes
    return out


class GradientSync:
    """Averages the gradients over the ranks after the strategy's backward (``SubsetTrainer(grad_sync=...)``).

    A parameter without gradient on some ranks (e.g. the encoder of a sequence absent from a rank's
    batch) counts as a zero gradient there; one without gradient on every rank keeps ``None``, so
    the optimizer skips it exactly as a single process would. Parameters the strategy already
    synchronised (``strategy.synchronized_parameters(network)``, e.g. the shared trunk of exact GMD
    with ``sync="global"``) are left alone. Without a process group it does nothing.

    Args:
        bucket_mb: gradients are flattened into buckets of about this size per all-reduce.
    """

    def __init__(self, bucket_mb: float = 25.0) -> None:
        self.bucket_bytes = int(float(bucket_mb) * 2**20)

    def __call__(self, network: torch.nn.Module, strategy: Any = None) -> None:
        if not is_distributed():
            return
        world = dist.get_world_size()
        done = getattr(strategy, "synchronized_parameters", None)
        skip = {id(p) for p in done(network)} if callable(done) else set()
        params = [p for p in network.parameters() if p.requires_grad and id(p) not in skip]
        if not params:
            return
        has_grad = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
        dist.all_reduce(has_grad)
        live = []
        for p, count in zip(params, has_grad.tolist()):
            if count > 0:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                live.append(p)
        for bucket in _buckets(live, self.bucket_bytes):
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            dist.all_reduce(flat)
            flat.div_(world)
            offset = 0
            for p in bucket:
                n = p.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (``flag`` itself in a single process); every rank must call it.

    Raises:
        ValueError: another rank stopped (its own error is printed), so this one stops too, with one line.
    """
    if not is_distributed():
        return bool(flag)
    try:
        return _set_on_any_rank(flag)
    except RuntimeError:  # the connection to a rank that stopped closes (DistBackendError is one)
        raise ValueError(f"Rank {dist.get_rank()} stops too: another process stopped before training (its error is "
                         "printed above, with the file and the fix); nothing was written.") from None


def _set_on_any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank of the process group (one all-reduce; every rank must call it)."""
    value = torch.tensor([float(flag)], device=_rank_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def wait_for_ranks() -> None:
    """Return once every rank has got here (at once in a single process).

    Each rank reads only its own share of the cases, so a bad file stops one rank while the others
    go on. Waiting here before the run's files are written means a rank that stops never arrives,
    torchrun then ends the others, and a run that never trained leaves no ``datalist.json``.
    """
    any_rank(False)


def _rank_device() -> torch.device | str:
    """Where this rank's collectives run: its current GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"


class DistributedTimeLimitHandler(TimeLimitHandler):
    """:class:`~app.engines.TimeLimitHandler` whose stop decision is taken jointly by all ranks.

    Each rank measures its own clock; the ranks all-reduce (max) whether the budget is spent after
    every iteration, so they stop at the same iteration instead of one rank waiting forever in the
    next collective. Without a process group it behaves like the base class.
    """

    def _check(self, engine: Engine) -> None:
        if self.expired:
            return
        spent = self.elapsed() >= self.seconds
        if is_distributed():
            spent = _set_on_any_rank(spent)
        if spent:
            self._stop(engine)


def data_worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of the bundles' data loaders: MONAI's (each worker's random transforms seeded), and
    SIGTERM left to the main process.

    A stop sent to the whole job (SLURM's ``scancel``, systemd, ``kill -- -PGID``) reaches the data-loader workers
    too. PyTorch's own worker handler ends a worker by that signal, and the main process then stopped with "DataLoader
    worker ... is killed by signal: Terminated" before :class:`StopOnSignal` could write the checkpoint. Ignored here,
    the signal is the main process's to act on: it finishes the iteration and shuts its workers down, and a worker
    whose parent is gone exits by itself (PyTorch's watchdog).

    Args:
        worker_id: the worker's index, as the ``DataLoader`` passes it.
    """
    from monai.data.utils import worker_init_fn

    worker_init_fn(worker_id)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


#: the signals a terminal sends to every process of its foreground group (Ctrl-C, the terminal closed)
_TERMINAL_SIGNALS = frozenset(getattr(signal, name) for name in ("SIGINT", "SIGHUP") if hasattr(signal, name))


#: A second stop signal within this many seconds of the first is the same stop, delivered twice.
DUPLICATE_SIGNAL_SECONDS = 2.0


class StopOnSignal:
    """Ends training cleanly on SIGTERM, Ctrl-C (SIGINT) or a closed terminal (SIGHUP): the resumable checkpoint
    is written, then the process ends by the signal.

    A job scheduler (SLURM at a time limit or a preemption, Kubernetes, ``docker stop``) sends SIGTERM
    and, some seconds later, SIGKILL. Without a handler the process died at once and lost the
    iterations since the last ``checkpoint_last.pt``. With it, the iteration in progress is finished
    (a validation in progress too), training is terminated without the ``COMPLETED`` handlers, so no
    ``model_final.pt`` claims the run finished, :class:`~app.engines.ResumableCheckpoint` writes the
    checkpoint at ``TERMINATE``, and the signal is then delivered again with its default action: the
    exit status says the run was stopped (143), and ``--resume true`` (or ``auto``) continues it
    exactly. A second signal ends the process at once, unless it comes within :data:`DUPLICATE_SIGNAL_SECONDS` of
    the first: that is the same stop reaching the process twice (a scheduler that signals every process of a job,
    such as SLURM's ``scancel``, reaches a stage of ``python -m app ablate`` directly and through the ablation, which
    passes stops on), and it would otherwise end the run without its checkpoint. A SIGTERM sent to the whole job
    reaches the data-loader workers too: :func:`data_worker_init` leaves it to the main process. The ranks of a multi-process run
    all-reduce the decision after every iteration, so they stop at the same one.

    Ctrl-C and a closed terminal are handled the same way (exit status 130 and 129): Python's default for
    Ctrl-C raised ``KeyboardInterrupt`` wherever the step was, with a traceback and no checkpoint of the
    iterations since the last epoch's end. The terminal sends these two to the whole process group, data-loader
    workers included: a worker ignores them (the main process stops the run and the loader ends its workers),
    where dying by them would make the loader raise a "worker killed" error instead of the clean stop.

    Signal handlers can only be installed from the main thread; elsewhere (a notebook's worker thread)
    the handler does nothing.

    Args:
        signals: the signals to handle (default SIGTERM, SIGINT and, where the platform has it, SIGHUP).
    """

    def __init__(self, signals: Iterable[int] | None = None) -> None:
        if signals is None:
            signals = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
        self.signals = tuple(signals)
        self.received: int | None = None
        self._received_at = 0.0
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def attach(self, engine: Engine) -> None:
        """Install the signal handlers when ``engine`` starts, check for a signal after each iteration, and
        restore the previous handlers when it completes or raises.

        Args:
            engine: the trainer.
        """
        engine.add_event_handler(Events.STARTED, self._install)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._check)
        engine.add_event_handler(Events.COMPLETED, self._uninstall)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._uninstall_and_raise)
        # an EXCEPTION_RAISED handler attached before this one (MONAI's StatsHandler) re-raises before ours runs, and
        # the handlers stayed installed after the failed run: in a notebook, Ctrl-C then did nothing. However the run
        # ends, the previous handlers come back.
        run = engine.run

        def run_and_uninstall(*args: Any, **kwargs: Any) -> Any:
            try:
                return run(*args, **kwargs)
            finally:
                self._uninstall()

        engine.run = run_and_uninstall  # type: ignore[method-assign]

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a data-loader worker forked with this handler
            if signum in _TERMINAL_SIGNALS:  # sent to the whole group: the main process stops the run
                return
            signal.signal(signum, signal.SIG_DFL)  # die as asked
            os.kill(os.getpid(), signum)
            return
        now = time.monotonic()
        if self.received is None:
            self.received, self._received_at = signum, now
        elif now - self._received_at >= DUPLICATE_SIGNAL_SECONDS:  # asked again: end at once, as without a handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _install(self, engine: Engine) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._pid = os.getpid()
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _uninstall(self, engine: Engine | None = None) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, previous)
        self._previous.clear()

    def _uninstall_and_raise(self, engine: Engine, err: BaseException) -> None:
        self._uninstall(engine)
        raise err

    def _check(self, engine: Engine) -> None:
        stop = self.received is not None
        if is_distributed():
            stop = _set_on_any_rank(stop)
        if not stop:
            return
        signum = self.received if self.received is not None else signal.SIGTERM
        logger.warning("%s received: stopping after iteration %d and writing the resumable checkpoint; %s to "
                       "continue.", signal.Signals(signum).name, engine.state.iteration, resume_hint())
        # registered now, so it runs after every TERMINATE handler attached before (the checkpoint's)
        engine.add_event_handler(Events.TERMINATE, self._end_process, signum)
        engine.terminate(skip_completed=True)

    def _end_process(self, engine: Engine, signum: int) -> None:
        self._uninstall(engine)
        # the log's last line: the checkpoint line before it is written at every epoch's end too
        logger.warning("Training stopped by %s at epoch %d, iteration %d, after writing the resumable checkpoint: "
                       "exit status %d; %s to continue.", signal.Signals(signum).name, engine.state.epoch,
                       engine.state.iteration, 128 + signum, resume_hint())
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for handler in logging.getLogger().handlers:
            handler.flush()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

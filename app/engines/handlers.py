"""Ignite handlers of the training workflow: wall-clock budget, strategy diagnostics, subset reports."""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from ignite.engine import Engine, Events

from app.atomic import atomic_write_text, write_error
from app.flags import parse_bool
from app.metrics.subset_metrics import BRATS_REGIONS

__all__ = ["LazySummaryWriter", "TimeLimitHandler", "DiagnosticsHandler", "SubsetReportHandler", "TrainingProgressHandler", "format_duration"]

logger = logging.getLogger(__name__)


class LazySummaryWriter:
    """A TensorBoard ``SummaryWriter`` created at its first use, with the same arguments.

    ``SummaryWriter`` writes an event file into ``log_dir`` when it is built, which a bundle does with the trainer's
    handlers: a run refused after that (a resume whose settings differ from the checkpoint's) left an empty event
    file in the run it refused to continue. Built lazily, nothing is written until a value is logged.

    The event file is written every iteration, so a disk that fills during training is usually met here first:
    the writer's ``OSError`` (raised at its next use in the training thread) becomes :func:`app.atomic.write_error`,
    one line naming the folder and the fix, and its writing thread's own traceback is not printed. The training
    stops there; ``checkpoint_last.pt`` of the last epoch end is kept.

    Args:
        args, kwargs: those of ``torch.utils.tensorboard.SummaryWriter``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args, self._kwargs = args, kwargs
        self._writer: Any = None

    @property
    def created(self) -> bool:
        """Whether the writer exists (and its event file was written)."""
        return self._writer is not None

    def _log_dir(self) -> str:
        return os.fspath(self._kwargs.get("log_dir") or (self._args[0] if self._args else None) or "runs")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # copy/pickle probes, and the attributes above before __init__
            raise AttributeError(name)
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_event_writer_threads()
            try:
                self._writer = SummaryWriter(*self._args, **self._kwargs)  # writes the event file's first record
            except OSError as err:
                raise write_error(err, self._log_dir()) from err
        attr = getattr(self._writer, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except OSError as err:  # a full disk: the writing thread's error, raised again here
                raise write_error(err, self._log_dir()) from err

        return call


def _quiet_event_writer_threads() -> None:
    """Keep TensorBoard's writing thread from printing a traceback for an ``OSError`` (a full disk, a folder made
    read-only): the thread keeps the error, and the training thread's next use of the writer raises it, as
    :class:`LazySummaryWriter` reports it, in one line. Installed once; ``APP_TRACEBACK=1`` keeps the traceback."""
    previous = threading.excepthook
    if getattr(previous, "_quiets_event_writers", False):
        return

    def hook(args: Any) -> None:
        thread = type(args.thread).__module__ if args.thread is not None else ""
        if (isinstance(args.exc_value, OSError) and thread.startswith("tensorboard.")
                and os.environ.get("APP_TRACEBACK") != "1"):
            return
        previous(args)

    hook._quiets_event_writers = True  # type: ignore[attr-defined]
    threading.excepthook = hook



class TimeLimitHandler:
    """Stops training cleanly once a wall-clock budget is spent.

    The budget counts from the start of the run. When it runs out, the handler optionally runs the
    validator once more (so the best-model checkpoint sees the last weights) and terminates the
    trainer; ``COMPLETED`` handlers (e.g. the final-model ``CheckpointSaver``) still run. A budget
    spent at an epoch's last iteration stops the run at ``EPOCH_COMPLETED`` instead, after the
    epoch-end handlers attached before this one (LR schedule, validation, whose score it reuses), so
    a checkpoint written then holds a complete epoch.

    A resumed run continues the budget of the run it resumes: :class:`~app.engines.ResumableCheckpoint`
    stores :meth:`state_dict` and gives it back through :meth:`load_state_dict`, so the time spent
    before the interruption counts, and a run that had already stopped on its limit stops again
    without training (otherwise every resume, e.g. of a requeued ``--resume auto`` job, would grant a
    whole new budget and break equal-budget comparisons).

    With or without a budget, the validator also scores the last epoch when the validation interval
    skipped it (``max_epochs`` not a multiple of ``val_interval``): otherwise the best-model
    checkpoint would miss the final weights, or not be written at all.

    Args:
        minutes: budget in minutes; ``None`` or ``<= 0`` disables the limit.
        validator: optional evaluator to run before stopping.
    """

    def __init__(self, minutes: float | None, validator: Engine | None = None) -> None:
        self.seconds = None if minutes is None or float(minutes) <= 0 else float(minutes) * 60.0
        self.validator = validator
        self.start: float | None = None
        self.expired = False
        self.spent_before = 0.0  # seconds used by the runs this one resumes

    def attach(self, engine: Engine) -> None:
        """Start the clock with ``engine``, check the budget after each iteration and epoch, and validate a
        last epoch that the validation interval skipped.

        Args:
            engine: the trainer.
        """
        if self.validator is not None:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._validate_last_epoch)
        # the clock runs without a budget too: a run resumed with one counts the time already trained
        engine.add_event_handler(Events.STARTED, self._started)
        if self.seconds is None:
            return
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._check_mid_epoch)
        # a stop at an epoch's last iteration waits for EPOCH_COMPLETED: terminating before it would skip
        # the epoch-end handlers attached before this one (LR schedule, validation), while the checkpoint
        # would still count the epoch as done, so a resumed run would train on one scheduler step behind
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._check)

    def elapsed(self) -> float:
        """Seconds of training so far, those of the resumed runs included."""
        return self.spent_before + (0.0 if self.start is None else time.monotonic() - self.start)

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs: ``{"elapsed_seconds": float, "expired": bool}``."""
        return {"elapsed_seconds": self.elapsed(), "expired": bool(self.expired)}

    def load_state_dict(self, state: dict[str, Any], engine: Engine | None = None) -> None:
        """Continue the budget of a resumed run (at ``STARTED``, after the checkpoint is restored).

        Args:
            state: a :meth:`state_dict`.
            engine: the trainer; terminated at once when the resumed run had spent the budget
                (it validated and wrote its final model then).
        """
        self.spent_before = max(0.0, float(state.get("elapsed_seconds", 0.0)))
        self.start = time.monotonic()
        if self.seconds is None or self.spent_before < self.seconds:
            return
        self.expired = True
        logger.info("The resumed run had already used its time limit of %g min (%.1f min trained): stopping "
                    "without training. Pass a larger --time_limit_minutes to train on.",
                    self.seconds / 60, self.spent_before / 60)
        if engine is not None:
            engine.terminate()

    def _validate_last_epoch(self, engine: Engine) -> None:
        if engine.state.epoch == engine.state.max_epochs and self.validator.state.epoch != engine.state.epoch:
            logger.info("Validating the last epoch (%d), which the validation interval skipped.", engine.state.epoch)
            self.validator.run(engine.state.epoch)

    def _started(self, engine: Engine) -> None:
        self.start = time.monotonic()

    def _check_mid_epoch(self, engine: Engine) -> None:
        if not self._at_epoch_end(engine):  # an epoch's end is decided at EPOCH_COMPLETED
            self._check(engine)

    def _check(self, engine: Engine) -> None:
        if self.expired or self.elapsed() < self.seconds:
            return
        self._stop(engine)

    def _stop(self, engine: Engine) -> None:
        self.expired = True
        logger.info(
            "Time limit of %g min reached at epoch %d, iteration %d: stopping.",
            self.seconds / 60, engine.state.epoch, engine.state.iteration,
        )
        # at an epoch end the validation handler may already have scored these weights
        if self.validator is not None and not (self._at_epoch_end(engine) and self._validated(engine)):
            # a validation an uninterrupted run does not do here: its data loader draws its base seed from the
            # global generator, which the checkpoint written at this stop records, so a run resumed from it with a
            # larger budget drew other dropout masks (sentiment) than the uninterrupted run from here on
            # within an epoch, the weights scored are those of this iteration: the report says so, not "after epoch E"
            within = not self._at_epoch_end(engine)
            self.validator.state.trainer_iteration = int(engine.state.iteration) if within else None
            try:
                with torch.random.fork_rng(devices=[]):
                    self.validator.run(engine.state.epoch)
            finally:
                self.validator.state.trainer_iteration = None
        engine.terminate()

    @staticmethod
    def _at_epoch_end(engine: Engine) -> bool:
        length = engine.state.epoch_length
        return bool(length) and engine.state.iteration % length == 0

    def _validated(self, engine: Engine) -> bool:
        return self.validator.state.epoch == engine.state.epoch


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` of a number of seconds (rounded down; days add to the hours)."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class TrainingProgressHandler:
    """Logs what a run is, how far it is and why it ended, and puts its learning rate and speed on TensorBoard.

    A run of many hours is watched through its log: MONAI's per-iteration line gives the loss, but not the
    learning rate, the time an iteration takes or how long the run has left, and a run that ended on its time
    limit ended with the same lines as one that trained every epoch. This handler logs:

    - at the start, the data (training and validation cases, the sequences their files lack), the settings
      that decide the run (``settings``), the device and the versions (where a resumed run continues, and the time
      trained before it, is :class:`~app.engines.ResumableCheckpoint`'s line);
    - after each epoch, ``Epoch E/N done (iteration I of T): train_loss mean L, learning rate R, S s per
      iteration; H:MM:SS trained, about H:MM:SS left``, the estimate from this run's pace so far (validation
      included), ended by ``max_epochs`` or by the time limit, whichever comes first;
    - at the end, one line saying why the run ended (every epoch trained, or the time limit) and where the
      best validation score is.

    TensorBoard gets ``learning_rate``, ``train_loss_epoch`` (the epoch's mean) and ``seconds_per_iteration``
    per epoch (the epoch as step, as the validation scores).

    Args:
        optimizer: the trainer's optimizer (its first parameter group's learning rate, as it was during the
            epoch: the scheduler steps at the epoch's end).
        summary_writer: optional TensorBoard ``SummaryWriter``.
        time_limit: optional :class:`TimeLimitHandler` of the run: its budget bounds the estimate, and its
            clock (which counts the time of the runs a resumed run continues) gives the time trained.
        validator: optional evaluator whose best key metric the last line names.
        datalist: optional ``{"training": [...], "validation": [...]}`` case records (``modalities``: the
            sequences each case's files name) summarised at the start.
        settings: optional settings logged at the start, in order (``{"seed": 0, ...}``), after the strategy of the
            trainer (``engine.strategy``: its ``name``, and its class when it is not one of this package's).
        modalities: every sequence a case may have, for the count of those missing.
        loss_key: key of the loss in the engine output.
        unit: what a record of ``datalist`` is, in the data line (``utterance`` for the sentiment branch).
        missing_text: the data line's words before the modalities missing from some records.
        complete_text: the data line's words when no record misses one (``{count}``: how many ``modalities``).
    """

    def __init__(self, optimizer: Any = None, summary_writer: Any = None, time_limit: TimeLimitHandler | None = None,
                 validator: Engine | None = None, datalist: dict[str, list[dict[str, Any]]] | None = None,
                 settings: dict[str, Any] | None = None, modalities: Sequence[str] = (),
                 loss_key: str = "loss", unit: str = "case",
                 missing_text: str = "sequences missing from the case files",
                 complete_text: str = "every case's files hold all {count} sequences") -> None:
        self.unit = unit
        self.missing_text = missing_text
        self.complete_text = complete_text
        self.optimizer = optimizer
        self.writer = summary_writer
        self.time_limit = time_limit
        self.validator = validator
        self.datalist = datalist
        self.settings = dict(settings or {})
        self.modalities = tuple(modalities)
        self.loss_key = loss_key
        self._start = time.monotonic()
        self._start_iteration = 0
        self._loss_sum: Any = 0.0
        self._loss_count = 0
        self._lr: float | None = None
        self._epoch_start = self._start
        self._last_iteration = self._start
        self._epoch_iterations = 0

    def attach(self, engine: Engine) -> None:
        """Log at the start, after each iteration's loss, at each epoch's end and at the end of ``engine``.

        Attach it after the handlers whose epoch-end work the estimate should include (validation, checkpoint).

        Args:
            engine: the trainer.
        """
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def data_summary(self) -> str | None:
        """One sentence on the cases of ``datalist``: how many train and validate, and the sequences they lack."""
        if not self.datalist:
            return None
        parts = {k: list(self.datalist.get(k) or []) for k in ("training", "validation")}
        text = f"{len(parts['training'])} training and {len(parts['validation'])} validation {self.unit}(s)"
        if not self.modalities:
            return text
        missing = []
        for seq in self.modalities:
            counts = [sum(seq not in (rec.get("modalities") or ()) for rec in recs) for recs in parts.values()]
            if any(counts):
                missing.append(f"{seq} in {counts[0]} training and {counts[1]} validation {self.unit}(s)")
        # by the files, as datalist.json lists them: an all-zero channel of an MSD 4D image drops out only when
        # the case is loaded
        return text + (f"; {self.missing_text}: " + ", ".join(missing) if missing
                       else "; " + self.complete_text.format(count=len(self.modalities)))

    def _lr_now(self) -> float | None:
        groups = getattr(self.optimizer, "param_groups", None)
        return float(groups[0]["lr"]) if groups else None

    def _started(self, engine: Engine) -> None:
        import monai

        self._start = time.monotonic()
        self._start_iteration = int(engine.state.iteration)
        data = self.data_summary()
        if data:
            logger.info("Data: %s.", data)
        settings = dict(self.settings)
        strategy = getattr(engine, "strategy", None)
        if strategy is not None:
            # the object that trains, not the --strategy label: a recipe's strategy_def decides (and keeps the label)
            kind = type(strategy)
            notes = [] if kind.__module__.startswith("app.") else [f"{kind.__module__}.{kind.__qualname__}"]
            if getattr(strategy, "subsets", None) is not None:  # GMD: all subsets, or k sampled per iteration
                notes.append(f"subsets {strategy.subsets}")
            where = f" ({', '.join(notes)})" if notes else ""
            settings = {"strategy": f"{getattr(strategy, 'name', kind.__name__)}{where}",
                        **{k: v for k, v in settings.items() if k != "strategy"}}
        settings = ", ".join(f"{k} {v}" for k, v in settings.items())
        total = engine.state.max_epochs * engine.state.epoch_length if engine.state.epoch_length else None
        device = getattr(engine.state, "device", None) or getattr(engine, "device", None)
        logger.info("Run: %s%s%d epoch(s) of %s iteration(s)%s; %storch %s, monai %s.",
                    settings, ", " if settings else "", engine.state.max_epochs, engine.state.epoch_length,
                    f" ({total} in all)" if total else "", f"device {device}; " if device is not None else "",
                    torch.__version__, monai.__version__)

    def _epoch_started(self, engine: Engine) -> None:
        self._loss_sum, self._loss_count, self._epoch_iterations = 0.0, 0, 0
        self._epoch_start = self._last_iteration = time.monotonic()
        self._lr = self._lr_now()  # the scheduler steps at the epoch's end: this is the epoch's rate

    def _iteration_completed(self, engine: Engine) -> None:
        self._last_iteration = time.monotonic()
        self._epoch_iterations += 1
        output = engine.state.output
        loss = output.get(self.loss_key) if isinstance(output, dict) else None
        if loss is None:
            return
        # summed on the device: no host sync per iteration for the mean
        self._loss_sum = self._loss_sum + (loss.detach().float().mean() if isinstance(loss, torch.Tensor) else loss)
        self._loss_count += 1

    def _elapsed(self) -> float:
        return self.time_limit.elapsed() if self.time_limit is not None else time.monotonic() - self._start

    def _epoch_completed(self, engine: Engine) -> None:
        state = engine.state
        epoch_length = int(state.epoch_length or 0)
        # the iterations alone (their data loading included), not the epoch-end validation
        per_iteration = ((self._last_iteration - self._epoch_start) / self._epoch_iterations
                         if self._epoch_iterations else None)
        done = int(state.iteration) - self._start_iteration
        pace = (time.monotonic() - self._start) / done if done > 0 else None  # validation and checkpoints too
        total = int(state.max_epochs) * epoch_length
        left = None if pace is None else max(0, total - int(state.iteration)) * pace
        limit = ""
        budget = getattr(self.time_limit, "seconds", None)
        if budget is not None and pace:  # pace 0: a clock too coarse to measure this run's iterations
            budget_left = max(0.0, budget - self.time_limit.elapsed())
            if budget_left < left:
                at = min(total, int(state.iteration) + int(budget_left / pace))
                limit = (f", when the time limit of {budget / 60:g} min stops it (at about epoch "
                         f"{max(1, -(-at // epoch_length))} of {state.max_epochs})")
                left = budget_left
        loss = float(self._loss_sum) / self._loss_count if self._loss_count else None
        parts = [f"train_loss mean {loss:.4f}" if loss is not None else None,
                 f"learning rate {self._lr:.3g}" if self._lr is not None else None,
                 f"{per_iteration:.2f} s per iteration" if per_iteration is not None else None]
        logger.info("Epoch %d/%d done (iteration %d of %d): %s; %s trained%s.", state.epoch, state.max_epochs,
                    state.iteration, total, ", ".join(p for p in parts if p),
                    format_duration(self._elapsed()),
                    "" if left is None else f", about {format_duration(left)} left{limit}")
        if self.writer is not None:
            for tag, value in (("learning_rate", self._lr), ("train_loss_epoch", loss),
                               ("seconds_per_iteration", per_iteration)):
                if value is not None:
                    self.writer.add_scalar(tag, value, state.epoch)
            self.writer.flush()

    def _completed(self, engine: Engine) -> None:
        state = engine.state
        total = int(state.max_epochs) * int(state.epoch_length or 0)
        if total and state.iteration >= total:  # a limit spent at the last iteration stopped nothing
            why = f"all {state.max_epochs} epoch(s) trained ({state.iteration} iterations)"
        elif getattr(self.time_limit, "expired", False):
            why = (f"the time limit of {self.time_limit.seconds / 60:g} min was reached at epoch {state.epoch} of "
                   f"{state.max_epochs}, iteration {state.iteration}")
        else:
            why = f"stopped at epoch {state.epoch} of {state.max_epochs}, iteration {state.iteration} of {total}"
        best = ""
        vstate = getattr(self.validator, "state", None)
        if vstate is not None and int(getattr(vstate, "best_metric_epoch", -1)) > 0:
            name = getattr(vstate, "key_metric_name", None) or "validation score"
            best = f"; best {name} {float(vstate.best_metric):.4f} at epoch {int(vstate.best_metric_epoch)}"
        logger.info("Training finished: %s, in %s%s.", why, format_duration(self._elapsed()), best)


#: the entries of GMD's diagnostics that the TensorBoard curves and ``plot-conflicts`` read
_GMD_KEYS = ("pairs", "conflicts_before", "conflicts_after", "subsets", "norms", "weights")


class DiagnosticsHandler:
    """Writes the strategy's per-step diagnostics to a JSONL file and to TensorBoard.

    GMD records (strategies ``gmd*``) go to ``gmd_diagnostics.jsonl``, which ``python -m app
    plot-conflicts`` reads; any other strategy's to ``<strategy>_diagnostics.jsonl``, ``<strategy>`` being the
    record's ``strategy`` entry or, without one, the trainer's strategy's ``name``. TensorBoard
    gets GMD's conflict fractions and per-subset norms and weights; for other strategies, every
    number of the record (``<strategy>/<key>``) and every per-modality list, given a
    ``modalities`` entry (``<strategy>_<key>/<modality>``).

    Args:
        output_dir: folder of the JSONL files.
        summary_writer: optional TensorBoard ``SummaryWriter``.
        key: key of the diagnostics in the engine output.
    """

    def __init__(self, output_dir: str | os.PathLike, summary_writer: Any = None, key: str = "diagnostics") -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / "gmd_diagnostics.jsonl"
        self.writer = summary_writer
        self.key = key
        self._started: set[Path] = set()
        self._cleaned = False

    def attach(self, engine: Engine) -> None:
        """Write the diagnostics of every iteration that has some.

        Args:
            engine: the trainer.
        """
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _drop_stale_files(self, iteration: int) -> None:
        """Drop every diagnostics file's records from ``iteration``, the first this run trained (all of them for
        a new run), and a file left with none.

        A file is otherwise started afresh only when this run writes to it, so a plain run (or one without
        diagnostics) after a gmd run in the same folder left that run's ``gmd_diagnostics.jsonl`` beside its own
        model, and ``plot-conflicts`` drew it as this run's. Done at the first iteration, when a resume has
        restored the iteration it continues from whatever the order of the handlers.
        """
        if not self.output_dir.is_dir():
            return
        for path in sorted(self.output_dir.glob("*_diagnostics.jsonl")):
            self._drop_records_from(path, iteration)
            if path.is_file() and not path.read_text(encoding="utf-8").strip():
                path.unlink()

    @staticmethod
    def _is_gmd(diag: dict) -> bool:
        # GMD's conflict statistics, which plot-conflicts reads; a strategy of one's own named gmd_* may record
        # other numbers
        return str(diag.get("strategy")).startswith("gmd") and all(k in diag for k in _GMD_KEYS)

    def path_for(self, diag: dict) -> Path:
        """JSONL file of a diagnostics record."""
        return self.path if self._is_gmd(diag) else self.output_dir / f"{diag['strategy']}_diagnostics.jsonl"

    def __call__(self, engine: Engine) -> None:
        if not self._cleaned:
            self._cleaned = True
            self._drop_stale_files(engine.state.iteration)
            self._started.update(self.output_dir.glob("*_diagnostics.jsonl"))  # kept records are before this run's
        output = engine.state.output
        diag = output.get(self.key) if isinstance(output, dict) else None
        if not diag:
            return
        if "strategy" not in diag:  # a strategy of one's own may leave it out: its name tags the records
            diag = {"strategy": str(getattr(getattr(engine, "strategy", None), "name", None) or "strategy"), **diag}
        record = {"iteration": engine.state.iteration, "epoch": engine.state.epoch, **diag}
        path = self.path_for(diag)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path not in self._started:
            self._drop_records_from(path, engine.state.iteration)
            self._started.add(path)
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk: the file and the fix (readers and a resume drop a record cut short)
            raise write_error(err, path) from err
        if self.writer is not None:
            if self._is_gmd(diag):
                self._write_gmd(diag, engine.state.iteration)
            else:
                self._write_generic(diag, engine.state.iteration)
            self.writer.flush()

    @staticmethod
    def _drop_records_from(path: Path, iteration: int) -> None:
        """Keep only the records of ``path`` before ``iteration``, the first this run writes.

        A new run starts at iteration 1, so an earlier run's records in the same folder go; a resumed
        run keeps the records up to its checkpoint and drops those a killed run wrote after it.
        """
        if path.is_symlink():
            # records are appended to a file of the run's own: through a link (planted in a shared folder, or
            # dangling) each record went into the file it names, or created that file
            path.unlink()
            return
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line)["iteration"]) < iteration:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
        atomic_write_text(path, "".join(kept))

    def _write_gmd(self, diag: dict, it: int) -> None:
        pairs = max(diag["pairs"], 1)
        self.writer.add_scalar("gmd/conflict_fraction_before", diag["conflicts_before"] / pairs, it)
        self.writer.add_scalar("gmd/conflict_fraction_after", diag["conflicts_after"] / pairs, it)
        for name, norm, w in zip(diag["subsets"], diag["norms"], diag["weights"]):
            self.writer.add_scalar(f"gmd_norm/{name}", norm, it)
            self.writer.add_scalar(f"gmd_weight/{name}", w, it)

    def _write_generic(self, diag: dict, it: int) -> None:
        tag = diag["strategy"]
        names = diag.get("modalities") or []
        for key, value in diag.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{tag}/{key}", value, it)
            elif isinstance(value, list) and names and len(value) == len(names) and key != "modalities":
                for name, v in zip(names, value):
                    # absent modalities have None; flags are not curves
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        self.writer.add_scalar(f"{tag}_{key}/{name}", v, it)


class _NoNewBestLine(logging.Filter):
    """Drops MONAI's "Got new best metric of ..." record (the full float) from a training's validation, whose
    :class:`SubsetReportHandler` line says when the weights are the best so far.

    The engine's logger is shared by name with every evaluator of its class in the process: the filter drops the
    line only while its own engine runs, so a later evaluation in the same process (a notebook) keeps it."""

    def __init__(self) -> None:
        super().__init__()
        self.running = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.running and isinstance(record.msg, str) and record.msg.startswith("Got new best metric of"))


class SubsetReportHandler:
    """After each evaluation, writes the metric's per-subset report (JSON, CSV, MD, PNG).

    Args:
        metric: a metric exposing ``last_result`` (e.g. :class:`app.metrics.SubsetMeanDice`).
        output_dir: where the report files go.
        stem: file stem, e.g. ``subset_dice``.
        print_table: also log the Markdown table.
        during_training: the evaluator validates a training run: the report records the epoch it
            scored (``"epoch"``) and says that it describes the latest weights, not necessarily the
            best (``models/model.pt``).
        checkpoint: the checkpoint an evaluation scores: the report records its path and SHA-256
            (``"checkpoint"``), so two reports can be told apart once the file is moved or replaced.
        summary_writer: optional TensorBoard ``SummaryWriter``: ``val_WT``, ``val_TC``, ``val_ET`` (means over the
            subsets) and ``val_worst_subset_dice`` per epoch, beside the key metric's curve.

    Each report is also summed up in one log line: the mean over the subsets scored (and how many), the
    regions' means and the worst subset, which the key metric's line alone does not show.
    """

    def __init__(self, metric: Any, output_dir: str | os.PathLike, stem: str = "subset_dice",
                 print_table: bool = False, during_training: bool = False,
                 checkpoint: str | os.PathLike | None = None, summary_writer: Any = None) -> None:
        self.metric = metric
        self.output_dir = Path(output_dir)
        self.stem = stem
        self.print_table = parse_bool(print_table, "print_table")
        self.during_training = parse_bool(during_training, "during_training")
        self.checkpoint = os.path.abspath(os.fspath(checkpoint)) if checkpoint else None
        self.writer = summary_writer

    def attach(self, engine: Engine) -> None:
        """Write the report each time ``engine`` completes.

        Args:
            engine: the evaluator.
        """
        engine.add_event_handler(Events.COMPLETED, self)
        if self.during_training:  # the summary line says when a validation is the best so far
            quiet = _NoNewBestLine()
            engine.logger.addFilter(quiet)
            engine.add_event_handler(Events.STARTED, lambda _: setattr(quiet, "running", True))
            engine.add_event_handler(Events.COMPLETED, lambda _: setattr(quiet, "running", False))

    @staticmethod
    def _when(engine: Engine) -> str:
        """Which weights a training's validation scored: those after an epoch, or (the time limit stopping the run
        within an epoch, :class:`TimeLimitHandler`) those of the iteration it stopped at."""
        epoch, iteration = int(engine.state.epoch), getattr(engine.state, "trainer_iteration", None)
        if iteration is None:
            return f"Validation after epoch {epoch}"
        return f"Validation at the time limit, iteration {iteration} (within epoch {epoch})"

    def annotated(self, engine: Engine, result: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """``result`` with what it describes (the epoch, the checkpoint), and the report title (None: default)."""
        title = None
        if self.during_training:
            epoch = int(engine.state.epoch)
            result = {**result, "epoch": epoch}
            title = f"{self._when(engine)} (the latest weights; models/model.pt holds the best)"
        if self.checkpoint is not None:
            from app.networks.weights import checkpoint_sha256, loaded_sha256

            # the model loaded before scoring, not what the file holds now (a running training replaces model.pt)
            sha = loaded_sha256(self.checkpoint) or checkpoint_sha256(self.checkpoint)
            result = {**result, "checkpoint": {"path": self.checkpoint, "sha256": sha}}
            title = f"Per-subset results: {self.stem} of {os.path.basename(self.checkpoint)} (sha256 {sha[:12]})"
        return result, title

    def __call__(self, engine: Engine) -> None:
        from app.reports import format_table, write_subset_report

        result = getattr(self.metric, "last_result", None)
        if not result:
            return
        result, title = self.annotated(engine, result)
        # the Dice columns as ever; the HD95 ones after them when the metric recorded HD95 (--hd95 true)
        metrics = (*BRATS_REGIONS, "mean", *(k for k in result["mean_over_subsets"] if k.startswith("HD95_")))
        write_subset_report(result, self.output_dir, stem=self.stem, title=title, metrics=metrics)
        if self.print_table:
            print(format_table(result, metrics), flush=True)
        self._summarise(engine, result)

    def _best_so_far(self, engine: Engine, headline: str) -> str:
        """The end of a training validation's line: whether these weights are the best so far (and so kept as
        ``models/model.pt``), else the best score and its epoch; empty outside training.

        The key metric may be a report column negated so that higher is better (the sentiment MAE): the best is
        then given as that column, unnegated.
        """
        state = engine.state
        name, best, epoch = (getattr(state, "key_metric_name", None), getattr(state, "best_metric", None),
                             getattr(state, "best_metric_epoch", -1))
        if not self.during_training or not name or best is None or epoch is None or epoch < 1:
            return ""
        from app.reports.subset_report import LOWER_IS_BETTER

        shown, value = (headline, -best) if headline in LOWER_IS_BETTER else (name, best)
        if int(epoch) == int(state.epoch):
            return f"; the best {shown} so far: kept as models/model.pt"
        return f"; the best {shown} is still {value:.4f}, after epoch {int(epoch)} (models/model.pt)"

    def _summarise(self, engine: Engine, result: dict[str, Any], headline: str = "mean", label: str = "mean Dice",
                   columns: Sequence[str] = BRATS_REGIONS, worst_tag: str = "val_worst_subset_dice") -> None:
        """One log line (and the TensorBoard curves) of a report: the headline mean, the other columns' means and
        the worst subset.

        Args:
            engine: the evaluator (its epoch names a validation of a training run).
            result: the metric's aggregate (``mean_over_subsets``, ``worst_subset``, ...).
            headline: the entry of ``mean_over_subsets`` the line leads with.
            label: its name in the line.
            columns: the other means, in the line's parentheses (the headline left out there) and on TensorBoard
                as ``val_<column>`` (the headline too when it is one of them: a key metric logged negated, as
                the sentiment MAE, gets its own curve).
            worst_tag: TensorBoard tag of the worst subset's score.
        """
        mean, worst = result.get("mean_over_subsets") or {}, result.get("worst_subset") or {}
        if headline not in mean:
            return
        scored = len(result.get("subsets") or {})
        total = scored + len(result.get("subsets_without_cases") or [])
        others = ", ".join(f"{k} {mean[k]:.4f}" for k in columns if k in mean and k != headline)
        where = self._when(engine) if self.during_training else "Evaluation"
        # the worst subset is ranked by the metric's primary score, which the line names when it is not the headline
        worst_key = next((k for k in worst if k != "name"), None)
        worst_text = ("" if worst_key is None else f"; worst subset {worst['name']}"
                      f"{'' if worst_key == headline else ' ' + worst_key} {worst[worst_key]:.4f}")
        logger.info("%s: %s over %s subsets %.4f%s%s%s.", where, label,
                    scored if scored == total else f"{scored} of {total}", mean[headline],
                    f" ({others})" if others else "", worst_text, self._best_so_far(engine, headline))
        if self.writer is not None and self.during_training:
            step = int(engine.state.epoch)
            for k in columns:
                if k in mean:
                    self.writer.add_scalar(f"val_{k}", mean[k], step)
            if worst_key is not None:
                self.writer.add_scalar(worst_tag, worst[worst_key], step)
            self.writer.flush()

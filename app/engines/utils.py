"""Workflow helpers used by the bundle configs: checks, weight loading (from
:mod:`app.networks.weights`) and the progress bar."""

from __future__ import annotations

import atexit
import contextlib
import linecache
import logging
import os
import re
import signal
import sys
import threading
from types import TracebackType
from typing import Any, Mapping, Sequence

import torch
from ignite.engine import Engine

from app.atomic import check_writable_folder, lock_folder, unexpanded_home
from app.bundle_args import _MONAI_DIR, check_overrides
from app.data.errors import WorkerCaseError
from app.flags import check_bools, check_counts, check_paths, check_positive, check_share, parse_bool
from app.networks.ds_unet import recorded_spacing
from app.networks.weights import describe_state_dict, load_weights

__all__ = [
    "check_held_out", "check_held_out_split", "check_output_dir", "check_modalities", "check_patch_size", "check_spacing", "set_cudnn", "reseed_global_generator", "fit_roi", "load_weights", "describe_state_dict",
    "ProgressBarHandler", "report_input_errors", "is_out_of_memory", "allocation_failure", "check_overrides", "check_bools", "check_counts", "check_share", "resolve_device", "amp_dtype", "check_positive", "lock_output_dir", "UNSELECTED_CHECKPOINTS",
]

logger = logging.getLogger(__name__)

_APP_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _raised_at(exc: BaseException) -> tuple[str, int]:
    """File and line of the frame that raised ``exc`` (the innermost of its traceback)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return ("", 0) if tb is None else (os.path.abspath(tb.tb_frame.f_code.co_filename), tb.tb_lineno)


#: where PyTorch's data loader raises the error of a worker process that died (killed by a signal, or exited)
_TORCH_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(torch.utils.data.__file__)), "")


def _worker_died(exc: BaseException) -> RuntimeError | None:
    """PyTorch's error for a data-loader worker process that died, as a one-line error naming the fix, or None.

    On a shared server the out-of-memory killer often picks a worker (``DataLoader worker (pid N) is killed by
    signal: Killed.``), and a container without enough shared memory kills one with a bus error; the run ended
    with a traceback whose last line named neither the cause nor the settings that avoid it.
    """
    text = " ".join(str(exc).split())
    if not (isinstance(exc, RuntimeError) and text.startswith("DataLoader worker (pid")
            and _raised_at(exc)[0].startswith(_TORCH_DATA_DIR)):
        return None
    return RuntimeError(
        f"{text.rstrip('.')}. A data-loader worker process (--num_workers) was ended from outside, on a shared "
        "machine most often by the out-of-memory killer (see dmesg) or for want of shared memory (Docker: "
        "--shm-size): pass a lower --num_workers (0 loads the cases in the main process) or a lower --cache_rate, "
        "or run where more memory is free.")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says that an allocation failed: CUDA's ``OutOfMemoryError``, PyTorch's CPU allocator (a
    ``RuntimeError``), or numpy's ``MemoryError``."""
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def allocation_failure(err: BaseException) -> str:
    """A short account of a failed allocation (PyTorch's messages run over several lines and sentences): the size
    asked for when the message says it."""
    text = " ".join(str(err).split())
    asked = re.search(r"tried to allocate ([0-9.]+) ?([kmgt]?i?b(?:ytes)?)", text, re.IGNORECASE)
    if asked is None:
        return f"{type(err).__name__}: {text[:120]}" if text else type(err).__name__
    amount, unit = float(asked.group(1)), asked.group(2)
    if unit.lower() == "bytes":
        amount, unit = amount / 2**20, "MiB"
    return f"{type(err).__name__}: allocating {amount:.1f} {unit} failed"


def _out_of_memory(exc: BaseException) -> RuntimeError | None:
    """A run that ran out of memory, as a one-line error naming the settings that need less, or None.

    A GPU too small for the patch and batch (or shared with another job) ended training or evaluation with
    MONAI's ``Failed to evaluate ConfigExpression`` traceback, whose last line named neither the cause nor a fix:
    the out-of-memory error sat in the middle of it.
    """
    if not is_out_of_memory(exc):
        return None
    return RuntimeError(
        f"Out of memory ({allocation_failure(exc)}): pass a smaller --batch_size (segmentation: also --num_samples "
        "or --patch_size, and --sw_batch_size for the validation windows; sentiment: --val_batch_size for validation "
        "and evaluation, whose memory grows with the squared sequence length), or run where more memory is free (on a "
        "GPU another job may hold part of it: see nvidia-smi).")


def _input_error(exc: BaseException | None) -> BaseException | None:
    """The product's own bad-input error behind ``exc``, or None.

    Only MONAI's wrappers (``Failed to evaluate ...``, raised in MONAI ``from`` the real error) are
    looked through. The error must be a ``ValueError`` or ``OSError`` raised by a ``raise``
    statement of this package, whose messages name the file and the fix; one raised inside a
    library or the interpreter (``int('x')``, a bad unpacking) is a bug, shown whole. A
    :class:`~app.data.errors.WorkerCaseError` is such an error found in a data-loader worker, which
    PyTorch raises again in the main process. A data-loader worker that died (:func:`_worker_died`) and an
    allocation that failed (:func:`_out_of_memory`) are reported as errors naming the settings that avoid them.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, WorkerCaseError):  # raised by PyTorch's data loader, for bad input a worker found
            return exc
        if (died := _worker_died(exc)) is not None:
            return died
        if (oom := _out_of_memory(exc)) is not None:
            return oom
        filename, line = _raised_at(exc)
        if filename.startswith(_APP_DIR):
            ours = linecache.getline(filename, line).lstrip().startswith("raise")
            return exc if ours and isinstance(exc, (ValueError, OSError)) else None
        if not filename.startswith(_MONAI_DIR) or exc.__cause__ is None:
            return None
        exc = exc.__cause__
    return None


class _InputErrorTracebacks(logging.Filter):
    """Keep the product's own bad-input error to its one ``error:`` line.

    MONAI's ``StatsHandler`` logs every exception the engine raises with its traceback before the
    exception ends the run, so an input error found during a run (a ``--resume`` that does not fit
    the checkpoint) printed a traceback above its ``error:`` line: such a record keeps its message only.
    An engine's own records of the error (ignite's "Current run is terminating due to exception: ...",
    "Engine run is terminating due to exception: ...", and the ``StatsHandler``'s "Exception: ..." after
    each, under the engine's logger) are dropped: they said the message of a diverged training four times
    before the ``error:`` line that :func:`report_input_errors` prints for it. ignite logs the exception it
    handles by its message alone, so the exception of such a record is the one being handled.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if os.environ.get("APP_TRACEBACK") == "1":
            return True
        exc = record.exc_info[1] if record.exc_info else None
        engine = record.name.startswith("ignite.") and record.levelno >= logging.ERROR
        if exc is None and engine:
            exc = sys.exc_info()[1]
        if isinstance(exc, KeyboardInterrupt):
            return False  # a stop, no error: the hook's one line says it (ignite logs it with an empty message)
        if exc is None or _input_error(exc) is None:
            return True
        if engine and str(exc) and record.getMessage().endswith(str(exc)):
            return False  # the error: line says it
        record.exc_info, record.exc_text = None, None
        return True


def report_input_errors() -> None:
    """Make a bundle run end on bad input with one ``error:`` line, as the command-line tools do.

    ``python -m monai.bundle run`` wraps every failure of a config expression in its own
    ``RuntimeError`` and prints the whole chain, so the message that names the file and the fix sits
    in the middle of a long traceback. This hook prints only that message when the chain holds one
    (exit status stays 1); any other failure keeps the full traceback (see :func:`_input_error`),
    and so does every failure when the environment sets ``APP_TRACEBACK=1``. The log handlers set
    up so far (the bundle's ``logging.conf``) leave out the traceback of such an error too.

    Ctrl-C outside a training's own handling (:class:`~app.engines.StopOnSignal`), in an evaluation or while a
    training reads its cases, ends with one line too: it printed two ``KeyboardInterrupt`` tracebacks (the
    engine's log record and Python's), though the user asked for the stop. The process still ends by SIGINT
    (exit status 130), as Python ends it after this hook for an uncaught ``KeyboardInterrupt``.
    """
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _InputErrorTracebacks) for f in handler.filters):
            handler.addFilter(_InputErrorTracebacks())
    previous = sys.excepthook
    if getattr(previous, "_reports_input_errors", False):
        return

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if isinstance(exc, KeyboardInterrupt) and os.environ.get("APP_TRACEBACK") != "1":
            print("error: stopped by SIGINT (Ctrl-C) before the run finished; run the same command again to start it "
                  "over.", file=sys.stderr)
            return
        err = None if os.environ.get("APP_TRACEBACK") == "1" else _input_error(exc)
        if err is None:
            previous(exc_type, exc, tb)
            return
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)

    hook._reports_input_errors = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def _run_folder(ckpt_path: str | os.PathLike) -> str:
    """The training run a checkpoint at ``<run>/models/<name>.pt`` belongs to, where its split records lie."""
    return os.path.dirname(os.path.dirname(os.path.abspath(os.fspath(ckpt_path))))


def _scan_files(record: Mapping[str, Any]) -> dict[str, str]:
    """The image files of a case record, by sequence (``image4d`` for an MSD 4D image)."""
    files = {str(k): os.fspath(v) for k, v in (record.get("images") or {}).items() if v}
    if record.get("image4d"):
        files["image4d"] = os.fspath(record["image4d"])
    return files


def _other_scans(record: Mapping[str, Any], trained: Mapping[str, Any]) -> bool:
    """Whether a case shares its id with a training case but not its scans: a sequence file of both
    exists and the two differ in content. Files that cannot be compared (moved, unreadable) count as
    the same case, so that the warning errs on the side of being given."""
    import filecmp

    mine, theirs = _scan_files(record), _scan_files(trained)
    for key in mine.keys() & theirs.keys():
        if os.path.realpath(mine[key]) == os.path.realpath(theirs[key]):
            continue  # the training file itself (evaluating the training folder): no need to read it
        try:
            if not filecmp.cmp(mine[key], theirs[key], shallow=False):
                return True
        except OSError:
            continue
    return False


def check_held_out(ckpt_path: str | os.PathLike, records: Sequence[dict[str, Any]]) -> str | None:
    """Warn when an evaluation scores cases the checkpoint was trained on.

    A checkpoint at ``<run>/models/<name>.pt`` has its run's split beside it in ``<run>/datalist.json``
    (a moved checkpoint has none, and nothing is said). A case counts as a training case when its id
    is one and its scans are those files or copies of them: another folder's case of the same name with
    other scans (the phantoms of another seed) is not one. So does a case of another id holding a
    training case's scan (:func:`app.data.datalist.shared_scans`: a link or byte copy, as when another
    site's folder or BraTS release names the case its own way). Returns the warning, or None.
    """
    from app.data.datalist import read_datalist, shared_scans

    datalist = os.path.join(_run_folder(ckpt_path), "datalist.json")
    if not os.path.isfile(datalist):
        return None
    try:
        trained = {str(r["case"]): r for r in read_datalist(datalist)[0]}
    except (ValueError, KeyError, TypeError):
        return None
    # a case id alone does not make a training case: another folder may reuse the names (phantoms of
    # another seed, as in the demo's test set) for other scans; a copy of the training folder has the same bytes
    seen = sorted(str(r["case"]) for r in records
                  if str(r["case"]) in trained and not _other_scans(r, trained[str(r["case"])]))
    # nor does another id make a held-out case: a test folder of another site or BraTS release may hold a
    # training case's scans under its own name
    scored = {str(r["case"]) for r in records}
    renamed = sorted((other, first) for first, other, _, _ in shared_scans([*trained.values(), *records])
                     if first in trained and other in scored and other not in seen)
    if not seen and not renamed:
        return None
    parts = []
    if seen:
        parts.append(f"e.g. {', '.join(seen[:3])}")
    if renamed:
        parts.append(f"under another id: {', '.join(f'{o} is {t}' for o, t in renamed[:3])}")
    message = (f"{len(seen) + len(renamed)} of the {len(records)} cases scored here are training cases of this "
               f"checkpoint's run ({datalist}; {'; '.join(parts)}): their Dice is optimistic. Pass --eval_datalist "
               f"{datalist} to score only its held-out cases, or --dataset_dir a folder of cases it never saw.")
    logger.warning(message)
    return message


#: checkpoints a training run writes without choosing them on its validation split (the last weights)
UNSELECTED_CHECKPOINTS = ("model_final.pt", "checkpoint_last.pt")


def check_held_out_split(ckpt_path: str | os.PathLike, data: Mapping[str, Mapping[str, Any]],
                         eval_split: str) -> str | None:
    """Warn when a sentiment evaluation scores utterances the checkpoint was trained or selected on.

    A checkpoint at ``<run>/models/<name>.pt`` has its run's utterance ids beside it in
    ``<run>/splits.json`` (:func:`app.data.write_mmsa_splits`; a moved checkpoint has none, and
    nothing is said). The selection split concerns only the checkpoint chosen on it (``model.pt``):
    the last epoch's weights (``model_final.pt``, ``checkpoint_last.pt``) were never chosen on it, so
    their scores there are held out. Returns the warning, or None.
    """
    from app.data.mmsa import SPLITS_NAME, read_mmsa_splits, seen_utterances

    path = os.path.join(_run_folder(ckpt_path), SPLITS_NAME)
    record = read_mmsa_splits(path)
    if record is None or eval_split not in data:
        return None
    scored = data[eval_split]["id"]
    seen = seen_utterances(record, data[eval_split], eval_split)
    trained, selected = seen["train"], seen["val"]
    if trained:
        message = (f"{trained} of the {len(scored)} utterances of split {eval_split!r} trained this checkpoint "
                   f"(its run's --train_split {record['train_split']!r}, {path}): these scores are not held out. "
                   "Pass --eval_split a split it never saw.")
    elif selected and os.path.basename(os.fspath(ckpt_path)) not in UNSELECTED_CHECKPOINTS:
        message = (f"{selected} of the {len(scored)} utterances of split {eval_split!r} selected this checkpoint "
                   f"(its run's --val_split {record['val_split']!r}, {path}): these scores are optimistic. Pass "
                   "--eval_split a split it never saw (test) for unbiased ones.")
    else:
        return None
    logger.warning(message)
    return message


def check_spacing(network: torch.nn.Module, records: Sequence[dict[str, Any]]) -> str | None:
    """Warn when some of ``records`` are at another resolution than ``network`` was trained at.

    Evaluation scores cases on their own grid, so a model trained on 2 mm data scores 1 mm cases
    at a scale it never saw. Each case is compared, not the cases' median: a test folder gathered from
    several sites, most at the training resolution, would otherwise score the others without a word.
    Only headers are read. Returns the warning (None when every spacing matches or one is unknown).
    """
    from app.data.datalist import SPACING_TOLERANCE, name_outliers, spacing_outliers

    trained = recorded_spacing(network)
    if trained is None:
        return None
    off = spacing_outliers(records, trained)
    if not off:
        return None
    message = (f"{len(off)} of the {len(records)} cases scored here ({name_outliers(off)}) have a voxel size more than "
               f"{SPACING_TOLERANCE:.0%} off the one the network was trained at {trained} mm: its Dice on them "
               f"measures it at a scale it never saw. Resample those cases to {trained} mm for a like-for-like score "
               "(clinical inference does this itself, --spacing auto).")
    logger.warning(message)
    return message


def check_output_dir(output_dir: str | os.PathLike, option: str = "--output_dir",
                     subfolders: Sequence[str] = ()) -> None:
    """Raise a ``ValueError`` that names the fix unless the run can create its files in ``output_dir``.

    Called first in a bundle's ``initialize``: an evaluation otherwise read and scored every case and
    only then stopped with a traceback when it wrote the report, and training stopped with one when
    it wrote ``datalist.json``. A folder that does not exist yet is not created here (a refused run
    leaves nothing behind); the folder it would be created in is probed instead.

    Args:
        output_dir: the run's output folder.
        option: the setting that gave it, named in the message.
        subfolders: folders of ``output_dir`` the run writes into (training: ``models``, ``validation``,
            ``tensorboard``), probed too where they exist: in the folder of an earlier run, one another user made
            (or a read-only ``models/``) stopped a training or its resume only when it wrote ``model.pt`` after its
            first epoch, with that run's report and split already replaced by this one's.
    """
    check_paths(**{option.lstrip("-"): output_dir})
    text = os.fspath(output_dir)
    home = unexpanded_home(text)
    if home is not None:
        # the shell expands ~ only unquoted and not after '=' (--output_dir=~/runs): unexpanded, the run wrote
        # datalist.json, checkpoint_last.pt and the reports under ./~/runs but model.pt and model_final.pt
        # (ignite's saver expands ~) under the home folder
        raise ValueError(f"{option} {text}: '~' is not expanded here (the shell expands it only unquoted and not "
                         f"after '='), and the run would write part of its files under {os.path.abspath(text)} and "
                         f"part under {home}: give {option} {home}.")
    what = f"{option} {os.path.abspath(os.fspath(output_dir))}"
    check_writable_folder(output_dir, what, file_fix=f"pass another {option}, or move the file away",
                          write_fix=f"pass an {option} you can write to")
    for name in subfolders:
        folder = os.path.join(text, name)
        if os.path.lexists(folder):  # one the run will create is made in output_dir, probed above
            check_writable_folder(folder, what, file_fix=f"pass another {option}, or move the file away",
                                  write_fix=f"make it writable, or pass another {option}")


#: Output folders this process holds (:func:`lock_output_dir`): path -> open descriptor holding the lock.
_LOCKED: dict[str, int] = {}


def lock_output_dir(output_dir: str | os.PathLike, option: str = "--output_dir") -> None:
    """Hold an exclusive lock on ``output_dir`` (created if need be) until this process ends.

    Two trainings started on one output folder (a job started twice, or run again while the first one
    still trains) both wrote ``datalist.json``, ``checkpoint_last.pt`` and ``model.pt`` there, so the
    folder held a mix of two runs and a resume continued from either; two evaluations both wrote the
    report files, so the folder could hold the JSON of one beside the CSV and PNG of the other. The
    second run (training or evaluation: they exclude each other) stops instead, before it writes anything.
    A folder made here that the run leaves empty (it stopped on a bad case) is removed when it ends. The
    lock is the kernel's (``flock`` on the folder itself): no lock file is left, and a killed run releases
    it. Where the file system cannot lock a folder (some network mounts) the run goes on unlocked.

    Under ``torchrun`` (an initialised process group of more than one rank) every rank must call it:
    rank 0 alone takes the lock, so one lock stands for the whole run and a single-process training
    on the same folder is refused too, and rank 0 tells the others whether it got it. A second
    multi-process run then stops on every rank, each with the same one line, before any rank writes;
    the ranks used to skip the lock altogether and both runs trained into the folder.

    Raises:
        ValueError: another process holds the lock (on every rank of a multi-process run).
    """
    path = os.path.abspath(os.fspath(output_dir))
    message = (f"{option} {path} is in use by another run that is still writing into it (a job started twice?): "
               f"wait for it to end, or pass another {option}.")
    from app.engines.distributed import any_rank
    from app.strategies.base import process_group

    if any_rank(process_group()[1] == 0 and not _lock_here(path)):
        raise ValueError(message)
    if process_group()[1] == 0 and path in _LOCKED:
        # the run owns the folder now (a folder that cannot be locked may be shared with another machine,
        # whose process ids mean nothing here): what a killed run's writes left goes (checkpoints: ResumableCheckpoint)
        from app.atomic import remove_abandoned_temporaries

        for folder in (path, os.path.join(path, "validation")):
            for tmp in remove_abandoned_temporaries(folder):
                logger.info("Removed %s, left by a run killed while writing it.", tmp)


def _lock_here(path: str) -> bool:
    """Take the lock on ``path`` in this process; False when another process holds it."""
    if path in _LOCKED:
        return True
    created = _first_missing(path)
    try:
        fd = lock_folder(path)
    except BlockingIOError:
        return False
    if created is not None:
        # the run stops on a bad case after the lock (reading every case comes next): what it made for itself
        # and left empty is no output of it
        _remove_if_left_empty(path, created)
    if fd is not None:  # None: a folder that cannot be locked, which runs unlocked
        _LOCKED[path] = fd  # kept open: the lock lasts as long as the process
    return True


def _first_missing(path: str) -> str | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet, or None."""
    missing = None
    while not os.path.lexists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _remove_if_empty(path: str, created: str) -> None:
    """Remove ``path`` and its parents up to ``created`` while they are empty (at the end of a run that wrote
    nothing there)."""
    while True:
        try:
            os.rmdir(path)
        except OSError:  # not empty (the run wrote its outputs), or gone
            return
        if path == created:
            return
        path = os.path.dirname(path)


#: Output folders this process made when it took them, and the outermost folder it made for each:
#: removed when they are still empty at the run's end or at a SIGTERM (:func:`_remove_if_left_empty`).
_MADE: list[tuple[str, str]] = []


def _without_model(path: str) -> bool:
    """Whether ``path`` is a training's output folder whose ``models/`` holds no file: no model, no resumable
    checkpoint. A training that ends in any way but a failure leaves one there (``model_final.pt`` at its end,
    ``checkpoint_last.pt`` at a stop by signal or time limit); an evaluation makes no ``models/``."""
    models = os.path.join(path, "models")
    if os.path.islink(models) or not os.path.isdir(models):
        return False
    return not any(files for _, _, files in os.walk(models))


def _remove_made_folders() -> None:
    """Remove the output folders this process made (latest first), and the parents it made for them, while
    they are empty.

    A training that failed before it wrote a model or a checkpoint (a loss that diverged in the first steps, a
    bad case found by a data-loader worker) left ``datalist.json``, ``tensorboard/`` and an empty ``models/`` in
    the folder it had made: a half-made run folder that a later ``--resume`` refuses and the user must delete.
    Such a folder goes with what is in it, all of which this run wrote (it made the folder and held its lock).
    A folder that existed before the run is never emptied.
    """
    import shutil

    for made, outermost in reversed(_MADE):
        if _without_model(made):
            with os.scandir(made) as entries:
                for entry in list(entries):
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            os.unlink(entry.path)
        _remove_if_empty(made, outermost)


def _remove_if_left_empty(path: str, created: str) -> None:
    """Have the end of the run, or a SIGTERM, remove ``path`` and its parents up to ``created`` while they are
    empty.

    A scheduler cancels a job, or ends it at its time limit, with SIGTERM, whose default action ends Python
    without running ``atexit``: an evaluation cancelled while it read or scored its cases left the output folder it
    had made (taking its lock) behind, empty. The process still ends by the signal, at once, as before (the
    status a job script sees is unchanged). The SIGTERM handler is installed only where SIGTERM has its default
    action (not over a handler of the caller's), in the main thread; a forked data-loader worker that gets the
    signal leaves the folder alone.
    """
    if not _MADE:
        atexit.register(_remove_made_folders)
    _MADE.append((path, created))
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGTERM)
    if getattr(current, "_removes_made_folders", False) or current is not signal.SIG_DFL:
        return
    owner = os.getpid()

    def stop(signum: int, frame: Any) -> None:
        if os.getpid() == owner:
            _remove_made_folders()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    stop._removes_made_folders = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, stop)


def check_modalities(network: Any, modalities: Sequence[str]) -> None:
    """Raise a ``ValueError`` naming the fix when the network's sequences are not the data's, in the data's order.

    The BraTS loader gives every case the four sequences as image channels in one order (an absent one as a
    zero channel with its mask off), and each encoder reads the channel at its position. An override such as
    ``--network_def#modalities "['flair','t1ce']"`` stopped the run at the first step, after ``datalist.json``
    and ``models/`` were written, and the four names in another order trained silently with each encoder on
    another sequence than its name, which inference then feeds it.

    Args:
        network: anything with a ``modalities`` attribute (a :class:`app.networks.DSUNet`).
        modalities: the sequences the data loader gives, in channel order.
    """
    have = [str(m) for m in getattr(network, "modalities", modalities)]
    if have != [str(m) for m in modalities]:
        raise ValueError(
            f"network_def#modalities {have} must be the sequences the cases are loaded with, in their order: "
            f"{list(modalities)}. Leave --network_def#modalities out; to train without a sequence, leave its files "
            "out of the cases (a case may lack sequences)."
        )


def check_patch_size(patch_size: Sequence[int], network: Any, whole_axis: bool = False, cli: bool = False) -> None:
    """Raise a ``ValueError`` that names the fix when the patch does not fit the network depth: each size a
    multiple of the network's divisor, and one of them larger than it (a window of the divisor along every axis
    is a single voxel at the deepest level).

    Args:
        patch_size: the three window sizes.
        network: anything with a ``divisor`` attribute (a :class:`app.networks.DSUNet`), or the divisor.
        whole_axis: a size of 0 or less means "the whole axis" and is accepted (inference windows).
        cli: also show the fix in the ``--patch-size`` syntax of ``python -m app infer``.
    """
    divisor = int(network) if isinstance(network, int) else int(getattr(network, "divisor", 1))
    try:  # a single number (--patch_size 96, as infer's --patch-size 96 96 96 reads) is no list: name the fix
        sizes = [int(s) for s in ([patch_size] if isinstance(patch_size, (int, float)) else patch_size)]
    except (TypeError, ValueError):
        raise ValueError(f"patch_size {patch_size!r} must be 3 whole numbers, multiples of {divisor}: use e.g. "
                         f"--patch_size \"{[max(divisor, 96 // divisor * divisor)] * 3}\".") from None
    bad = [s for s in sizes if (s <= 0 and not whole_axis) or (s > 0 and s % divisor)]
    # a window of the divisor along every axis reaches the deepest level as a single voxel, which instance
    # normalisation refuses: a torch traceback at the first step, after training had written into output_dir
    single_voxel = len(sizes) == 3 and not bad and all(s > 0 for s in sizes) and max(sizes) <= divisor
    if len(sizes) != 3 or bad or single_voxel:
        fixed = [s if s <= 0 and whole_axis else max(divisor, int(round(s / divisor)) * divisor) for s in sizes]
        fixed = fixed * 3 if len(fixed) == 1 else (fixed + [divisor] * 3)[:3]
        if all(s > 0 for s in fixed) and max(fixed) <= divisor:
            fixed = [2 * divisor] * 3
        usage = f"--patch_size \"{fixed}\""
        if cli:
            usage = f"--patch-size {' '.join(map(str, fixed))} (python -m app infer) or {usage} (bundles)"
        if single_voxel:
            raise ValueError(
                f"patch_size {sizes} leaves a single voxel at the network's deepest level ({divisor} = 2 ** "
                f"(len(features) - 1) along every axis), which instance normalisation cannot normalise: make at "
                f"least one entry {2 * divisor} or more: use e.g. {usage}."
            )
        raise ValueError(
            f"patch_size {sizes} must have 3 entries that are multiples of {divisor} "
            f"(2 ** (len(features) - 1)){' or 0 for the whole axis' if whole_axis else ''}: use e.g. {usage}."
        )


def resolve_device(device: Any, auto: bool = True) -> torch.device:
    """``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``, a ``torch.device``) as a device this machine has.

    The bundles call it first in ``initialize`` for ``--device``, which they otherwise met only when the
    network was moved there: a machine without CUDA, or a typo (``--device gpu``), ended in a torch traceback
    after ``datalist.json`` was written. Inference resolves its ``--device`` with it too.

    Args:
        device: the setting; ``None`` or ``"auto"`` picks CUDA when available, where ``auto`` is allowed.
        auto: whether ``auto`` is a value of the setting (inference); the training configs choose CUDA when
            available by leaving ``--device`` out.

    Raises:
        ValueError: naming the setting and the fix, for a value that is no device, or a GPU this machine lacks.
    """
    choices = "cpu, cuda, cuda:N or auto" if auto else "cpu, cuda or cuda:N"
    if device is None or str(device).strip().lower() == "auto":
        if not auto:
            raise ValueError("--device auto is not a setting of this config: leave --device out to train on CUDA "
                             "when it is available, or pass --device cpu, cuda or cuda:N.")
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device {str(device)!r} is not a device ({err}): use {choices}.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available here: use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device} does not exist: this machine has {torch.cuda.device_count()} GPU(s), "
                         "cuda:0 to cuda:N-1.")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device} is not supported: use {choices}.")
    return device


#: GPUs whose bf16 autocast was already said to fall back (one log line per device and use, not per step)
_AMP_FALLBACK_SAID: set[tuple[str, bool]] = set()


def amp_dtype(device: Any, enabled: bool, training: bool = False) -> torch.dtype | None:
    """The autocast dtype of ``--amp`` on ``device``, or None for full precision.

    bf16 where the GPU computes it natively (compute capability 8.0 and later: A100, H100, L4, RTX 30xx
    and later). Older GPUs (V100, T4) only emulate bf16, slower than fp32, so there evaluation and
    inference autocast to fp16 instead (no gradients: nothing to underflow), and training runs in fp32:
    fp16 gradients would need loss scaling, which the per-subset gradients of GMD and CGGM do not take.
    CPUs run in full precision.

    Args:
        device: where the network runs.
        enabled: the ``--amp`` setting.
        training: whether gradients are taken under the autocast.
    """
    device = torch.device(device)
    if not enabled or device.type != "cuda":
        return None
    if torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    key = (str(device), training)
    if key not in _AMP_FALLBACK_SAID:
        _AMP_FALLBACK_SAID.add(key)
        logger.warning("--amp: %s (%s) has no native bf16; %s.", device, torch.cuda.get_device_name(device),
                       "training runs in fp32 (fp16 gradients would need loss scaling)" if training
                       else "evaluation and inference use fp16 autocast")
    return None if training else torch.float16


def set_cudnn(deterministic: bool | str) -> None:
    """Deterministic cuDNN kernels (``true``), or autotuned ones (``false``: faster on GPU, not
    bit-reproducible). Call after ``monai.utils.set_determinism``, which forces the deterministic ones."""
    torch.backends.cudnn.deterministic = parse_bool(deterministic, "deterministic")
    torch.backends.cudnn.benchmark = not torch.backends.cudnn.deterministic


def reseed_global_generator() -> None:
    """Put torch's global generator back at the seed ``monai.utils.set_determinism`` gave it: the bundles'
    last step before ``trainer.run()``.

    MONAI's ``DataLoader`` built with ``num_workers=0`` and no generator of its own does this rewind itself,
    and one built with workers does not, so the global generator a training started from (the sentiment
    network's dropout masks, and the shuffle of a loader that draws from it) depended on ``--num_workers``:
    the same seed trained other weights with ``--num_workers 1`` than with 0. Rewound here, every number of
    workers starts from the state ``num_workers=0`` always started from (its results are unchanged).
    """
    generator = torch.random.default_generator
    generator.manual_seed(generator.initial_seed())


def fit_roi(roi_size: Sequence[int], spatial_shape: Sequence[int], divisor: int) -> tuple[int, ...]:
    """Sliding-window size for a volume: the training patch, shrunk to the volume (rounded up to
    ``divisor``) where the volume is smaller, so small volumes are not padded up to a whole patch."""
    return tuple(min(int(r), -(-int(s) // divisor) * divisor) for r, s in zip(roi_size, spatial_shape))


class ProgressBarHandler:
    """A tqdm progress bar over the iterations of each epoch, or nothing when disabled."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = parse_bool(enabled, "progress_bar")

    def attach(self, engine: Engine) -> None:
        """Attach an ignite ``ProgressBar`` showing the loss (nothing when disabled).

        Args:
            engine: the trainer.
        """
        if not self.enabled:
            return
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False).attach(engine, output_transform=lambda out: {"loss": float(out["loss"])})

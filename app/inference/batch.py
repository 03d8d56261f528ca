"""Batch inference: every case under a folder, each with whatever sequences it has.

Used by the bundle (``bundles/brats_gmd/configs/inference.yaml``) and as the Docker entrypoint::

    python -m app.inference.batch --input-dir /input --output-dir /output --ckpt /models/model.ts

Cases are found by name in the BraTS 2018, BraTS 2023 and MSD/nnU-Net layouts
(:func:`app.data.discover_cases`). Each case gets ``<case>.nii.gz`` (labels on its own grid) and
``<case>.json`` (summary) in the output folder, and ``<case>_prob.nii.gz`` with ``--probabilities``.
A case with bad input, including a problem found while discovering it (two files of one sequence, a
label without image, ...), is reported and skipped; the others still run. ``inference_summary.json``
lists every case with its status. A rerun into the same folder removes the outputs an earlier run
wrote for a case that this run does not write again (the case now fails, or ``--probabilities`` was
dropped), so the folder holds exactly this run's results; a case that fails only because its outputs
could not be written (a full disk) keeps the earlier run's.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping, Sequence

from app.atomic import atomic_write_text, check_writable_folder, locked_folder
from app.flags import check_paths, parse_bool
from app.inference.cli import _OneLineParser

__all__ = ["BatchError", "build_parser", "check_overrides_or_exit", "load_segmenter_or_exit", "main", "run_batch", "run_batch_or_exit"]


#: The batch's report of every case, in the output folder.
SUMMARY_NAME = "inference_summary.json"

#: The error entry of a case the batch did not reach (stopped, killed, or still running).
_NOT_REACHED = "not segmented: the batch was stopped before it (or, while it runs, has not reached it yet)"


class BatchError(RuntimeError):
    """Some cases of a batch could not be segmented; the message lists them with their errors.

    Args:
        message: every failed case with its error (for a caller of :func:`run_batch`).
        summary: the last line of the command, which names the cases only: each case's error has its own
            ``error: case`` line before it (empty: the message is the line).
    """

    def __init__(self, message: str, summary: str = "") -> None:
        super().__init__(message)
        self.summary = summary or message


def _output_names(case: str, probabilities: bool = True) -> list[str]:
    """File names the batch writes for ``case`` in the output folder (with ``probabilities``, also the map)."""
    return [f"{case}.nii.gz", f"{case}.json"] + ([f"{case}_prob.nii.gz"] if probabilities else [])


def _output_collisions(cases: Collection[str], probabilities: bool, ignore_case: bool = False) -> dict[str, str]:
    """``{case: message}`` for the cases one of whose output files is also an output of another case.

    With ``--probabilities``, case ``P1`` writes ``P1_prob.nii.gz``, which is also the label map of
    a case named ``P1_prob``: whichever ran second would replace the other's file, and ``P1.json``
    would then point at another patient's labels. Both cases fail instead, before any case runs.
    So does a case named ``inference_summary``, whose summary would be replaced by the batch's
    report of every case (:data:`SUMMARY_NAME`) after the case ran. With ``ignore_case`` (an output
    folder whose file system ignores case, see :func:`_ignores_case`), ``Case1`` and ``case1`` collide too.
    """
    key = str.casefold if ignore_case else str
    owners: dict[str, dict[str, str]] = {}  # {output file's key: {case: the case's spelling of it}}
    for case in sorted(cases):
        for name in _output_names(case, probabilities):
            owners.setdefault(key(name), {})[case] = name
    errors: dict[str, str] = {
        case: f"Its summary {SUMMARY_NAME} would be replaced by the batch's report of every case, which has that "
              "name: rename the files of this case."
        for case in owners.get(key(SUMMARY_NAME), ())
    }
    for both in owners.values():
        if len(both) < 2:
            continue
        for case, name in both.items():
            others = ", ".join(repr(c) for c in both if c != case)
            same = {n for c, n in both.items() if c != case} == {name}
            where = "" if same else " (the disk of the output folder does not tell upper from lower case)"
            errors.setdefault(case, f"Its output {name} would also be written for case {others}{where}, so one would "
                                    "replace the other: rename the files of one of these cases, or run them into "
                                    "separate output folders.")
    return errors


def _ignores_case(folder: Path) -> bool:
    """Whether files in ``folder`` (or, before it is made, in the nearest folder above it that exists) are
    found under another case of their name: macOS and Windows disks, and folders of theirs mounted into Docker.

    There, the outputs of ``Case1`` and ``case1`` are one file. An empty probe file is made and removed to
    tell; a folder that cannot be probed counts as case-sensitive (its write check reports it).
    """
    import tempfile

    probe_dir = folder.absolute()
    while not probe_dir.is_dir() and probe_dir.parent != probe_dir:
        probe_dir = probe_dir.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".case-probe-", suffix="-x", dir=probe_dir)
    except OSError:
        return False
    os.close(fd)
    try:
        head, name = os.path.split(probe)
        return os.path.exists(os.path.join(head, name.swapcase()))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)


def _case_inputs(rec: Mapping[str, Any]) -> list[str]:
    """Every file of a discovered case that clean-up must keep: what it is read from, and its label."""
    from app.data.discovery import case_sources

    return [*case_sources(dict(rec)), *([rec["label"]] if rec["label"] else [])]


def _output_entries(out_dir: Path) -> dict[str, list[os.DirEntry]]:
    """The files of ``out_dir`` by the output name they are for: a file under its own name, and a
    temporary file of :class:`~app.inference.io.AtomicOutputs` under the name it was made for.

    A batch lists its output folder once, before the first case, and each case's clean-up looks its
    names up here: listing the folder for every case (which grows by two or three files per case
    segmented) made a batch's clean-up grow with the square of its cases. No other batch writes into
    the folder meanwhile (this one holds its lock), and this batch writes each case's names only
    after that case's clean-up.
    """
    from app.inference.io import AtomicOutputs

    entries: dict[str, list[os.DirEntry]] = {}
    if not out_dir.is_dir():
        return entries
    with os.scandir(out_dir) as listing:
        for entry in listing:
            entries.setdefault(entry.name, []).append(entry)
            if (destination := AtomicOutputs.temporary_destination(entry.name)) is not None:
                entries.setdefault(destination, []).append(entry)
    return entries


def _remove_stale_outputs(
    out_dir: Path, case: str, keep: Collection[str], claimed: Mapping[str, str], inputs: Collection[str],
    entries: Mapping[str, Sequence[os.DirEntry]] | None = None,
) -> None:
    """Remove what an earlier run wrote for ``case`` in ``out_dir`` and this run will not write again.

    Only the batch's own names for the case are candidates (:func:`_output_names`, and the
    temporaries of a write that was killed, ``.<name>.<8 hex>[-<pid>].tmp.nii.gz|json``); of those, a name in
    ``keep`` (rewritten atomically by this run), a name another case of this run writes (``claimed``:
    name -> case), a link, a folder, and any input scan (``inputs``: real paths; an output folder may
    hold scans, e.g. an MSD ``imagesTs``) are left alone.

    A file under one of the output names is removed only when it is recognisably this product's
    output for ``case`` (:func:`app.inference.pipeline.written_by_product`): a scan or note the user
    keeps under such a name stays.

    ``entries`` is the listing of ``out_dir`` the batch took before its first case
    (:func:`_output_entries`); without it the folder is listed here.

    Raises:
        OSError: a stale output could not be removed.
    """
    from app.inference.io import option
    from app.inference.pipeline import written_by_product

    if entries is None:
        entries = _output_entries(out_dir)
    names = set(_output_names(case))
    candidates = {entry.path: entry for name in names for entry in entries.get(name, ())}
    for entry in candidates.values():
        if entry.name in keep or claimed.get(entry.name, case) != case:
            continue
        if (entry.is_file(follow_symlinks=False) and os.path.realpath(entry.path) not in inputs
                and (entry.name not in names or written_by_product(entry.path, case))):
            try:
                os.remove(entry.path)
            except FileNotFoundError:
                pass
            except OSError as err:
                raise OSError(f"Cannot remove {entry.path}, left by an earlier run ({err.strerror}): remove it or "
                              f"use an empty {option('output_dir')}.") from err


def run_batch(
    segmenter: Any,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    labels: str = "auto",
    probabilities: bool = False,
    resample_to: str | None = None,
    raise_on_error: bool = True,
) -> list[dict[str, Any]]:
    """Segment every case under ``input_dir`` into ``output_dir``.

    Args:
        segmenter: a :class:`app.inference.Segmenter` (see :func:`app.inference.load_segmenter`).
        input_dir: folder searched recursively for cases.
        output_dir: where ``<case>.nii.gz``, ``<case>.json`` and ``inference_summary.json`` go. Outputs of
            an earlier run for a case of this run that this run does not write again are removed.
        labels: ``auto`` (each case's own: its ``dataset.json``'s values for MSD / nnU-Net cases, 1/2/3
            for BraTS 2023 names, else 1/2/4), ``2018`` (1/2/4) or ``2023`` (1/2/3).
        probabilities: also write ``<case>_prob.nii.gz``.
        resample_to: sequence whose grid the others are resampled onto, in cases whose grids differ.
            A case without that sequence uses its own first sequence as the reference.
        raise_on_error: raise :class:`BatchError` after the last case when any case failed.

    Returns:
        One entry per case, sorted by case: ``{"case", "status": "ok" | "error", ...summary or "error"}``.
        A batch stopped by Ctrl-C or SIGTERM, or by an unexpected error (which is then raised), still
        writes ``inference_summary.json`` (``"stopped": true``, the case the error stopped it in with
        status ``error``, the cases it did not reach with status ``stopped``) before the stop goes on.
        A case that does not fit in the device's memory is an error of that case (the batch goes on); a case
        whose outputs the disk refuses (full, over quota, read-only) stops the batch there, its error raised
        (``OSError``), as every later case would fail the same way.
        A problem found while discovering a case (see ``case_errors`` of
        :func:`app.data.discover_cases`) makes that case an error; only a missing or empty
        ``input_dir``, a folder of it that cannot be listed, or an unusable ``dataset.json`` raise before any
        case runs.

    Raises:
        ValueError: a bad setting (``labels``, ``probabilities``, ``resample_to``), an empty
            ``input_dir`` or ``output_dir`` path, an output folder that cannot be written, or a problem of the whole input, before any case is read and
            before any file in ``output_dir`` is touched; also an output folder another batch is
            writing into (see :func:`_output_dir_lock`).
        BatchError: some cases failed (with ``raise_on_error``).
    """
    from app.data.discovery import discover_cases
    from app.inference.io import option, sequence_name
    from app.inference.pipeline import check_output_path, label_convention

    # an empty path (an unset shell variable, BRATS_INPUT= or BRATS_OUTPUT= in Docker) would mean the
    # current folder: every case under it segmented, or results written among the user's files
    check_paths(input_dir=input_dir, output_dir=output_dir)  # the bundle's --input_dir 2021: a number
    for folder, name, variable, what in ((input_dir, "input_dir", "BRATS_INPUT", "holding the cases"),
                                         (output_dir, "output_dir", "BRATS_OUTPUT", "to write the results to")):
        if folder is None or not os.fspath(folder).strip():  # None: input_dir: null in a bundle override file
            # the environment variables are the batch command's defaults (the Docker image), not the bundle's
            unset = "an unset variable" + ("" if option(name).endswith(name) else f", or {variable} set to ''")
            raise ValueError(f"{option(name)} is empty ({unset}), which would mean the current folder: give the "
                             f"folder {what}.")
    # settings first: a bad one would fail every case, and each failed case's clean-up would then
    # remove that case's outputs of an earlier run
    probabilities = parse_bool(probabilities, "probabilities")
    labels = label_convention(labels)
    reference = sequence_name(resample_to, option("resample_to")) if resample_to else None

    out_dir = Path(output_dir)
    check_writable_folder(out_dir, f"{option('output_dir')} {output_dir}")  # before any case runs
    # written after the last case: a file of the user's under its name must stop the batch before the first
    check_output_path(out_dir / SUMMARY_NAME, "Output", (".json",), rename="choose another output folder")
    discovery_errors: dict[str, str] = {}
    records = {rec["case"]: rec for rec in discover_cases(input_dir, require_label=False,
                                                          case_errors=discovery_errors)}
    for name, message in _output_collisions(records.keys() | discovery_errors.keys(), probabilities,
                                             _ignores_case(out_dir)).items():
        records.pop(name, None)
        discovery_errors.setdefault(name, message)
    inputs = {os.path.realpath(p) for rec in records.values() for p in _case_inputs(rec)}
    claimed = {f: c for c in (*records, *discovery_errors) for f in _output_names(c, probabilities)}
    with _output_dir_lock(out_dir, output_dir):
        return _run_cases(records, discovery_errors, segmenter, input_dir, out_dir, claimed, inputs, labels=labels,
                          probabilities=probabilities, reference=reference, raise_on_error=raise_on_error)


@contextlib.contextmanager
def _output_dir_lock(out_dir: Path, option_value: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``out_dir`` (created if need be) while a batch writes into it.

    Two batches started on one output folder (a scheduler that starts a job again while the first
    still runs) would each remove the other's temporary files and the outputs of cases that failed
    for it, and leave label maps, summaries and a report from different runs side by side. The
    second batch stops instead, before it touches anything. The lock is the kernel's (``flock`` on
    the folder itself), so no lock file is left behind and a killed batch holds it no longer; where
    the file system cannot lock a folder (some network mounts), the batch runs unlocked.

    Raises:
        ValueError: another batch holds the lock.
    """
    from app.inference.io import option

    flag = option("output_dir")
    with locked_folder(out_dir, f"{flag} {option_value} is in use by another batch that is still running (a job "
                                f"started twice?): wait for it to finish, or choose another {flag}."):
        yield


def _run_cases(records: Mapping[str, Any], discovery_errors: Mapping[str, str], segmenter: Any,
               input_dir: str | os.PathLike, out_dir: Path, claimed: Mapping[str, str], inputs: Collection[str],
               labels: str, probabilities: bool, reference: str | None, raise_on_error: bool) -> list[dict[str, Any]]:
    """The cases of :func:`run_batch`, once its checks passed and it holds the output folder."""
    results: list[dict[str, Any]] = []
    names = sorted(records.keys() | discovery_errors.keys())
    report = _Summary(out_dir, input_dir, names)

    # the report as it stands, before the first case and after each one: a process the OOM killer or a
    # scheduler ends with SIGKILL cannot write it at the end, and the previous run's report (all ok, not
    # stopped) would then stand beside this run's outputs. A report that cannot be written at all (a
    # full disk) stops the batch here, before any earlier output is touched.
    report.write(results, stopped=True)
    entries = _output_entries(out_dir)  # once: what earlier runs left, looked up by each case's clean-up

    def progress() -> None:
        with contextlib.suppress(OSError):  # the last report written still says the batch did not finish
            report.write(results, stopped=True)

    # the total, so that the per-case lines of a long batch say how far it is
    print(f"Segmenting {len(names)} case(s) under {report.input_dir} into {report.output_dir}.", flush=True)
    try:
        _segment_cases(names, records, discovery_errors, results, segmenter, out_dir, claimed, inputs,
                       labels=labels, probabilities=probabilities, reference=reference, progress=progress,
                       entries=entries)
    except (KeyboardInterrupt, Exception) as err:
        # Ctrl-C or SIGTERM (run_interruptible), or an error no check of a case foresaw: the report
        # says which case it stopped in and which it did not reach, instead of the previous run's
        # inference_summary.json staying beside this run's outputs
        left = report.not_reached(results)
        if left and not isinstance(err, KeyboardInterrupt):
            results.append({"case": left[0], "status": "error",
                            "error": f"{type(err).__name__}: {' '.join(str(err).split())}"})
        with contextlib.suppress(OSError):  # the stop (its signal, its error) is what the caller must see
            report.write(results, stopped=True)
        raise
    failed = [r for r in results if r["status"] != "ok"]
    report.write(results)
    # one line a service can grep for, whatever the outcome: the cases' own lines may be thousands
    print(f"Batch finished: {len(results) - len(failed)} of {len(results)} case(s) segmented, {len(failed)} failed, "
          f"in {time.perf_counter() - report.start:.1f} s; report: {report.path}.", flush=True)
    if failed and raise_on_error:
        names = [str(r["case"]) for r in failed]
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        counts = f"{len(failed)} of {len(results)} case(s) failed"
        raise BatchError(f"{counts}: " + "; ".join(f"{r['case']}: {r['error']}" for r in failed),
                         summary=f"{counts} ({shown}): each case's error is on its 'error: case' line above and in "
                                 f"{report.path}.")
    return results


class _Summary:
    """``inference_summary.json``: every case of the batch with its status (ok, error, or stopped when
    the batch was stopped before reaching it), rewritten after every case.

    Each case's entry is turned into JSON text once and kept, so a rewrite joins text instead of
    encoding every entry again: encoding them all after each case made the report's cost grow with
    the square of the cases (2,000 cases: 47 s, against 5 s on the same machine and day;
    ``bench/batch_bookkeeping.py``).
    The file is the same text as ``json.dumps(report, indent=2)`` would give.

    Args:
        out_dir: the output folder.
        input_dir: the folder the cases were found in, recorded in the report.
        names: every case of the batch, in the order they are segmented.
    """

    def __init__(self, out_dir: Path, input_dir: str | os.PathLike, names: Sequence[str]) -> None:
        self.path = out_dir / SUMMARY_NAME
        self.input_dir = os.path.abspath(os.fspath(input_dir))
        self.output_dir = os.path.abspath(os.fspath(out_dir))
        self.names = list(names)
        self.start = time.perf_counter()
        self._done: list[str] = []  # JSON text of the entries of the results written so far, in order
        self._done_cases: set[str] = set()
        self._failed = 0
        self._stopped_text: dict[str, str] = {}

    @staticmethod
    def _entry_text(result: Mapping[str, Any]) -> str:
        # the label values are per case: --labels auto follows each case's file names
        # the missing sequences and the notes (warnings) qualify the volumes: a reader of this report alone must
        # not take a result from one sequence for one from all four
        entry = {"case": result["case"], "status": result["status"], "sequences_used": result.get("sequences_used"),
                 "sequences_missing": result.get("sequences_missing"), "output": result.get("output"),
                 "label_convention": result.get("label_convention"), "labels": result.get("labels"),
                 "volumes_ml": result.get("volumes_ml"), "notes": result.get("notes"), "error": result.get("error")}
        # as an item of the report's "results" list, two levels deeper than on its own
        return json.dumps(entry, indent=2).replace("\n", "\n    ")

    def not_reached(self, results: Sequence[Mapping[str, Any]]) -> list[str]:
        """The cases without a result in ``results`` (the batch's, which only grows), in batch order."""
        for result in results[len(self._done):]:
            self._done.append(self._entry_text(result))
            self._done_cases.add(result["case"])
            self._failed += result["status"] == "error"
        return [n for n in self.names if n not in self._done_cases]

    def write(self, results: Sequence[Mapping[str, Any]], stopped: bool = False) -> None:
        """Write the report of ``results``; with ``stopped``, the cases without a result are listed as
        not reached (status ``stopped``)."""
        left = self.not_reached(results)  # also encodes the results new since the last write
        if not stopped:
            left = []
        for name in left:
            if name not in self._stopped_text:
                self._stopped_text[name] = self._entry_text({"case": name, "status": "stopped", "error": _NOT_REACHED})
        entries = [*self._done, *(self._stopped_text[n] for n in left)]
        head = json.dumps({"input_dir": self.input_dir, "output_dir": self.output_dir, "cases": len(entries),
                           "failed": self._failed, "stopped": stopped,
                           "seconds": round(time.perf_counter() - self.start, 3)}, indent=2)
        listed = "[\n    " + ",\n    ".join(entries) + "\n  ]" if entries else "[]"
        text = f'{head[:-2]},\n  "results": {listed}\n}}\n'
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, text)  # a full disk: names the file


def _segment_cases(names: Sequence[str], records: Mapping[str, Any], discovery_errors: Mapping[str, str],
                   results: list[dict[str, Any]], segmenter: Any, out_dir: Path, claimed: Mapping[str, str],
                   inputs: Collection[str], labels: str, probabilities: bool, reference: str | None,
                   progress: Callable[[], None] = lambda: None,
                   entries: Mapping[str, Sequence[os.DirEntry]] | None = None) -> None:
    """Segment each case in turn, appending its result (ok or error) to ``results`` and calling
    ``progress`` after each. ``entries``: the listing of ``out_dir`` taken before the first case
    (:func:`_output_entries`), which the clean-up of stale outputs looks each case up in."""
    from app.data.discovery import CaseError, case_sources
    from app.inference.pipeline import OutputWriteError, segment_case, summary_notes

    for position, name in enumerate(names):
        rec = records.get(name)
        written = _output_names(name, probabilities) if rec is not None else []
        try:
            # outputs this run writes are replaced atomically; the others would be mistaken for its results
            _remove_stale_outputs(out_dir, name, written, claimed, inputs, entries)
            if rec is None:
                raise CaseError(discovery_errors[name])
            paths = {s: rec["image4d"] for s in rec["channels"]} if rec["image4d"] else {}
            paths |= dict(rec["images"])
            summary = segment_case(
                segmenter,
                paths,
                out_dir / f"{name}.nii.gz",
                labels=labels,
                probabilities=out_dir / f"{name}_prob.nii.gz" if probabilities else None,
                summary=out_dir / f"{name}.json",
                resample_to=(reference if reference in paths else next(iter(paths))) if reference else None,
                channels=rec["channels"] or None,
                case=name,
                other_inputs=case_sources(rec),
                named_by_folder=True,
                label_map=rec["label_map"] if rec["layout"] == "msd" else None,  # the dataset.json's values
                remove_abandoned=False,  # the clean-up above removed every temporary of these outputs
            )
        except (ValueError, OSError) as err:  # CaseError is a ValueError; the case is skipped, the rest run
            message = " ".join(str(err).split())
            if isinstance(err, OutputWriteError):
                # the disk, not the case, failed (full, over quota): an earlier run's complete result for
                # the case is still the best there is, and removing it would lose it for a rerun to redo
                message += " The outputs an earlier run wrote for this case, if any, are kept."
                if err.errno in _DISK_ERRORS and position + 1 < len(names):
                    # every later case would be segmented only to fail the same way (hours of a long batch, one
                    # error line each): the batch stops here, as a whole, and its report lists the rest as stopped
                    err.args = (f"case {name}: {message} The batch stopped at this case, as the {len(names) - position - 1} "
                                f"case(s) after it would fail the same way (inference_summary.json lists them as "
                                "stopped): run it again once the disk can take the outputs.",)
                    raise
            else:
                try:  # no result of an earlier run may stand in for a case that failed now
                    _remove_stale_outputs(out_dir, name, (), claimed, inputs, entries)
                except OSError as rm_err:
                    message += f" {' '.join(str(rm_err).split())}"
            print(f"error: case {name}: {message}", file=sys.stderr)
            results.append({"case": name, "status": "error", "error": message})
            progress()
            continue
        vols = summary["volumes_ml"]
        notes = "".join(f", {n}" for n in summary_notes(summary))
        print(f"{name}: {'+'.join(summary['sequences_used'])} -> {summary['output']} (WT {vols['WT']:.1f} mL, "
              f"TC {vols['TC']:.1f} mL, ET {vols['ET']:.1f} mL, {summary['timing_s']['total_s']:.1f} s{notes})",
              flush=True)
        results.append({"case": name, "status": "ok", **summary})
        progress()


# auto and pipeline.LABEL_CHOICES, spelt out so that --help does not import torch
_LABELS = ("auto", "2018", "2021", "2023", "2024")

#: errors of a write that every later case would meet too: the disk is full, the quota spent, the file system read-only
_DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def build_parser() -> argparse.ArgumentParser:
    """Arguments of the batch / Docker entrypoint; defaults come from environment variables."""
    env = os.environ.get
    p = _OneLineParser(
        prog="python -m app.inference.batch",
        description="Segment every case under --input-dir (BraTS 2018/2023 or MSD layout, any subset of FLAIR, T1, "
                    "T1ce, T2 per case) into --output-dir: <case>.nii.gz on the case's own grid, <case>.json and "
                    "inference_summary.json. Defaults can be set with the BRATS_* environment variables.",
        epilog="Exit status: 0 all cases segmented, 2 bad arguments or at least one case with bad input.",
    )
    p.add_argument("--input-dir", default=env("BRATS_INPUT", "/input"), help="cases to segment (default: /input)")
    p.add_argument("--output-dir", default=env("BRATS_OUTPUT", "/output"), help="where to write (default: /output)")
    p.add_argument("--ckpt", default=env("BRATS_CKPT", "/models/model.ts"),
                   help="model.pt or exported model.ts (default: $BRATS_CKPT or /models/model.ts)")
    p.add_argument("--bundle", default=env("BRATS_BUNDLE"),
                   help="bundle folder for the defaults (default: $BRATS_BUNDLE or this repository's "
                        "bundles/brats_gmd)")
    p.add_argument("--labels", default=env("BRATS_LABELS", "auto"), choices=_LABELS,
                   help="label values: auto (default) = those of the dataset.json for MSD/nnU-Net cases, 1/2/3 "
                        "for cases named as BraTS 2023 names them (<case>-t2f.nii.gz), else 1/2/4; 2018 = 1/2/4; 2023 = 1/2/3 (also 2024; no resection "
                        "cavity is predicted)")
    p.add_argument("--probabilities", action="store_true", help="also write <case>_prob.nii.gz")
    p.add_argument("--resample-to", metavar="SEQ", help="resample each case's sequences onto SEQ's grid if they differ")
    p.add_argument("--spacing", nargs="+", metavar="MM", default=["auto"],
                   help="working spacing in mm, or native, or auto (default: the model's training spacing for "
                        "scans more than 10%% off it)")
    p.add_argument("--features", nargs="+", metavar="N", help="network widths (default: from the checkpoint)")
    p.add_argument("--patch-size", nargs="+", metavar="N",
                   help="sliding-window size (default: the whole foreground crop up to 256^3 voxels, else the "
                        "bundle's patch_size)")
    p.add_argument("--overlap", type=float, help="sliding-window overlap (default: the bundle's)")
    p.add_argument("--sw-batch-size", type=int, help="windows per network call (default: the bundle's)")
    p.add_argument("--device", default=env("BRATS_DEVICE", "auto"), help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-amp", action="store_true", help="disable autocast on CUDA (bf16, or fp16 on GPUs without native bf16)")
    p.add_argument("--no-head-mask", action="store_true",
                   help="keep labels where every given sequence is 0 (default: background there, outside the "
                        "skull-stripped head)")
    return p


def _error_line(err: Exception) -> str:
    """The one stderr line of a failed batch: for a :class:`BatchError`, the failed cases by name (each case's
    error has had its own line: said again, a batch with many bad cases ended on one line holding all of them)."""
    return f"error: {err.summary}" if isinstance(err, BatchError) else f"error: {' '.join(str(err).split())}"


def check_overrides_or_exit() -> None:
    """:func:`~app.bundle_args.check_overrides` for the batch bundle's ``initialize`` step: a
    misspelt ``--key`` (``--label 2023``, which would keep the default 2018 label values) ends with
    one error line and exit status 2 before the checkpoint or any case is read."""
    from app.bundle_args import check_overrides

    try:
        check_overrides()
    except ValueError as err:
        print(_error_line(err), file=sys.stderr)
        raise SystemExit(2) from None


def load_segmenter_or_exit(ckpt: str | os.PathLike, **kwargs: Any) -> Any:
    """:func:`~app.inference.pipeline.load_segmenter` for the batch bundle's ``segmenter``: a
    missing or unreadable checkpoint, or a bad setting, ends with one error line and exit status 2
    before any case is read, instead of MONAI's traceback and status 1."""
    from app.inference.io import bundle_options
    from app.inference.pipeline import load_segmenter

    try:
        with bundle_options():  # its messages name --sw_overlap, not infer's --overlap
            return load_segmenter(ckpt, **kwargs)
    except (ValueError, OSError) as err:
        print(_error_line(err), file=sys.stderr)
    raise SystemExit(2)


def run_batch_or_exit(segmenter: Any, input_dir: str | os.PathLike, output_dir: str | os.PathLike,
                      **kwargs: Any) -> list[dict[str, Any]]:
    """:func:`run_batch` for the batch bundle's ``run`` step: bad cases or a bad input folder end
    with the error lines and exit status 2, as ``python -m app.inference.batch`` does, instead of
    MONAI's traceback and status 1; SIGTERM and Ctrl-C stop it as they stop that command."""
    from app.atomic import exit_with, run_interruptible
    from app.inference.io import bundle_options

    results: list[dict[str, Any]] = []

    def work() -> int:
        try:
            with bundle_options():  # its messages, the cases' included, name --resample_to, not the batch command's
                results.extend(run_batch(segmenter, input_dir, output_dir, **kwargs))
        except (BatchError, ValueError, OSError) as err:
            print(_error_line(err), file=sys.stderr)
            return 2
        return 0

    status = run_interruptible(work)  # docker stop / SIGTERM: no partial file, one line
    if status:
        exit_with(status)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the batch; returns 0 when every case was segmented, 2 otherwise."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, one line already printed)
        return int(exit_.code or 0)
    if args.labels not in _LABELS:  # from BRATS_LABELS: argparse does not check a default
        from app.inference.pipeline import label_convention

        try:
            label_convention(args.labels, option="BRATS_LABELS")
        except ValueError as err:
            print(_error_line(err), file=sys.stderr)
            return 2
    from app.inference.cli import segmenter_from_args

    try:
        segmenter = segmenter_from_args(args)
        run_batch(segmenter, args.input_dir, args.output_dir, labels=args.labels, probabilities=args.probabilities,
                  resample_to=args.resample_to)
    except (BatchError, ValueError, OSError) as err:
        print(_error_line(err), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from app.atomic import exit_with, run_interruptible

    exit_with(run_interruptible(main))

"""Deterministic train/validation splits of case records and their JSON datalist files."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from app.atomic import atomic_write_text, missing_hint
from app.data.errors import check_regular_file
from app.flags import check_paths, parse_bool

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # numpy is imported where it is used: discovery and splitting do not need it
    import numpy as np

__all__ = [
    "SPACING_TOLERANCE", "evaluation_cases", "first_image_header", "median_spacing", "name_outliers", "prepare_datalist", "ras_spacing", "read_datalist",
    "shard_cases", "shared_scans", "spacing_differs", "spacing_outliers",
    "split_cases", "warn_header_conflicts", "write_datalist",
]

#: Voxel sizes that differ by more than this fraction along an axis count as another resolution
#: (0.9375 mm scans match a 1 mm model; 2 mm or 5 mm slices do not).
SPACING_TOLERANCE = 0.1


def _rank(case: str, seed: int) -> str:
    # a hash per (seed, case id) instead of a PRNG stream: identical on every platform and library
    # version, and adding a case never reorders the others
    return hashlib.sha256(f"{seed}\0{case}".encode()).hexdigest()


def split_cases(
    cases: Sequence[dict[str, Any]], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split case records into training and validation sets.

    The split depends only on the case ids, ``val_fraction`` and ``seed`` (not on the input order):
    cases are sorted by id, then put into a seeded order. With two or more cases at least one goes to
    validation and at least one to training.

    Args:
        cases: records with a ``"case"`` id (e.g. from :func:`app.data.discovery.discover_cases`).
        val_fraction: share of cases for validation, ``0 < val_fraction < 1``; rounded to whole cases.
        seed: selects the split.

    Returns:
        ``(train, val)``, each sorted by case id.

    Raises:
        ValueError: ``val_fraction`` is not in ``(0, 1)``, or two records share a case id.
    """
    try:  # a word (--val_fraction abc) stopped the run with a TypeError traceback
        good = not isinstance(val_fraction, bool) and 0.0 < float(val_fraction) < 1.0
    except (TypeError, ValueError):
        good = False
    if not good:
        raise ValueError(f"--val_fraction {val_fraction!r} must be a number > 0 and < 1 (the share of the cases held out "
                         "for validation), e.g. --val_fraction 0.2.")
    val_fraction = float(val_fraction)
    ids = [str(c["case"]) for c in cases]
    dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dupes:
        raise ValueError(f"Duplicate case ids {dupes[:5]}: a split by id needs unique ids.")
    ordered = sorted(cases, key=lambda c: str(c["case"]))
    n = len(ordered)
    n_val = 0 if n < 2 else min(n - 1, max(1, math.floor(n * val_fraction + 0.5)))
    shuffled = sorted(ordered, key=lambda c: _rank(str(c["case"]), seed))
    val_ids = {str(c["case"]) for c in shuffled[:n_val]}
    train = [c for c in ordered if str(c["case"]) not in val_ids]
    val = [c for c in ordered if str(c["case"]) in val_ids]
    return train, val


def shard_cases(cases: Sequence[dict[str, Any]], rank: int, world_size: int, seed: int = 0) -> list[dict[str, Any]]:
    """One process's share of ``cases`` in multi-process training.

    The cases are put in a seeded order that depends only on their ids (as in :func:`split_cases`)
    and dealt out to the ranks in turn. The order is padded by repeating its start, so every rank
    gets ``ceil(len(cases) / world_size)`` cases and all ranks run the same number of iterations.

    Args:
        cases: records with a ``"case"`` id.
        rank: this process, ``0 <= rank < world_size``.
        world_size: the number of processes.
        seed: selects the order.

    Raises:
        ValueError: ``rank`` is not in ``[0, world_size)``.
    """
    if not 0 <= int(rank) < int(world_size):
        raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}.")
    if not cases:
        return []
    order = sorted(sorted(cases, key=lambda c: str(c["case"])), key=lambda c: _rank(str(c["case"]), seed))
    total = math.ceil(len(order) / world_size) * world_size
    padded = (order * math.ceil(total / len(order)))[:total]
    return padded[int(rank) : total : int(world_size)]


def write_datalist(path: str | os.PathLike, train: Sequence[dict[str, Any]], val: Sequence[dict[str, Any]]) -> str:
    """Write ``{"training": [...], "validation": [...]}`` to ``path`` atomically.

    The JSON goes to a temporary file in the same folder which then replaces ``path``, so readers
    never see a half-written datalist.

    Returns:
        The path written, as a string.
    """
    payload = {"training": list(train), "validation": list(val)}
    text = json.dumps(payload, indent=2)  # serialise first: a TypeError leaves no file behind
    return str(atomic_write_text(path, text + "\n"))


def read_datalist(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read a datalist written by :func:`write_datalist`; returns ``(train, val)``.

    Training writes absolute paths. A relative path in a datalist written or edited by hand (``images``,
    ``image4d``, ``label``) is taken relative to the datalist's own folder, as MONAI's
    ``load_decathlon_datalist`` takes it, and returned absolute: it used to be read relative to the
    folder the command ran from, so the same evaluation found its cases or not depending on where a
    scheduler started it.

    Raises:
        ValueError: the file cannot be read, is not JSON, or has no ``training`` list.
    """
    # a named pipe given as --eval_datalist: open() would wait for a writer forever
    check_regular_file(path, "Pass the datalist.json that training wrote into its --output_dir.")
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"Cannot read datalist {path}{missing_hint(path)}: {err}. Pass the datalist.json that "
                         "training wrote into its --output_dir, or evaluate every case under --dataset_dir "
                         "instead.") from err
    if not isinstance(payload, dict) or "training" not in payload:
        raise ValueError(
            f"Datalist {path} has no 'training' list; expected {{'training': [...], 'validation': [...]}}."
        )
    base = Path(path).absolute().parent
    return ([_absolute_record(r, base) for r in payload["training"]],
            [_absolute_record(r, base) for r in payload.get("validation", [])])


def _absolute_record(record: Any, base: Path) -> Any:
    """``record`` with its relative file paths joined to ``base`` (the datalist's folder)."""
    if not isinstance(record, dict):
        return record  # not a case record: the reader that uses it names the problem

    def absolute(value: Any) -> Any:
        if isinstance(value, str) and value and not os.path.isabs(value):
            return os.path.normpath(base / value)  # '../data/x' as discovery writes it: /abs/data/x
        return value

    out = dict(record)
    if isinstance(out.get("images"), dict):
        out["images"] = {seq: absolute(f) for seq, f in out["images"].items()}
    for key in ("image4d", "label"):
        if key in out:
            out[key] = absolute(out[key])
    return out


#: A scan file is sketched by this many bytes read at each of this many evenly spaced offsets (and its size):
#: files with different sketches differ, and only files with one sketch are compared in full.
_SKETCH_CHUNK = 4096
_SKETCH_POINTS = 16


def _scan_sketch(path: str) -> tuple[int, str] | None:
    """``(size, digest of sampled bytes)`` of the file at ``path``; None when it cannot be read (the loader
    reports such a file, naming it)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            parts = []
            for k in range(_SKETCH_POINTS):
                f.seek(size * k // _SKETCH_POINTS)
                parts.append(f.read(_SKETCH_CHUNK))
    except OSError:
        return None
    return size, hashlib.sha256(b"".join(parts)).hexdigest()


def shared_scans(records: Sequence[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """Cases of different ids that hold the same scan: one file reached under two names (symbolic or hard
    links) or byte-identical copies, as when two sites' folders, or two BraTS releases, both hold a case.

    A case id is unique per folder tree, but the same scan under two ids is one case counted twice, and a
    split by id can put one copy in training and the other in validation. Files are told apart by their size
    and a few sampled bytes; only files that agree on those are compared in full, so the check reads little
    beyond the files' headers. Copies stored differently (recompressed, relabelled) are not found.

    Args:
        records: case records (``images``, ``image4d``) as :func:`app.data.discovery.discover_cases` gives them.

    Returns:
        ``(case_a, case_b, file_a, file_b)`` for each case that shares a scan with an earlier one, in input order.
    """
    import filecmp

    from app.data.discovery import record_files

    by_sketch: dict[tuple[int, str], tuple[str, str]] = {}  # sketch -> the first (case, file) with it
    shared: list[tuple[str, str, str, str]] = []
    reported: set[str] = set()
    for record in records:
        case = str(record.get("case"))
        for path in record_files(record):
            sketch = _scan_sketch(path)
            if sketch is None or sketch[0] == 0:  # no scan (the loader names such a file): nothing to share
                continue
            first = by_sketch.setdefault(sketch, (case, path))
            if first[0] == case or case in reported:
                continue
            try:
                same = os.path.samefile(first[1], path) or filecmp.cmp(first[1], path, shallow=False)
            except OSError:
                continue
            if same:
                shared.append((first[0], case, first[1], path))
                reported.add(case)
    return shared


def prepare_datalist(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
    label_convention: str | None = None,
    resume: bool | str = False,
    write: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Discover labelled cases under ``dataset_dir``, split them and write ``<output_dir>/datalist.json``.

    ``label_convention`` is passed to :func:`app.data.discovery.discover_cases` (``auto``: by the file
    names). Each record keeps its label map, so evaluating the datalist later reads labels the same way.

    ``resume`` is the bundle's ``--resume`` (true, false or auto: when ``models/checkpoint_last.pt``
    exists). A resumed run must split exactly as the run it continues, or validation would score
    cases the model trained on: a different split (other cases, ``--seed`` or ``--val_fraction``) is
    an error, and the recorded ``datalist.json`` is left as it was.

    ``write=False`` leaves writing to the caller (:func:`write_datalist`): the bundles write the split
    once every case has been read, so a bad file leaves no ``datalist.json`` behind.

    Cases of different ids holding the same scan (:func:`shared_scans`) are kept on one side of the split,
    with a warning: split by id as two cases, validation could score a copy of a case the model trained on.

    Returns:
        ``{"training": [...], "validation": [...]}``.

    Raises:
        ValueError: fewer than two labelled cases, or a resumed run whose split differs from the recorded
            one (and any problem of discovery).
    """
    from app.data.discovery import discover_cases

    check_paths(dataset_dir=dataset_dir, output_dir=output_dir)
    cases = discover_cases(dataset_dir, require_label=True, label_convention=label_convention)
    if len(cases) < 2:
        raise ValueError(
            f"{dataset_dir} holds {len(cases)} labelled case(s): training needs at least 2 (one for validation)."
        )
    train, val = split_cases(cases, val_fraction=val_fraction, seed=seed)
    train, val = _copies_on_one_side(train, val, shared_scans(cases), dataset_dir)
    _warn_mixed_spacing(train)
    warn_header_conflicts(cases)
    path = Path(output_dir) / "datalist.json"
    checkpoint = Path(output_dir) / "models" / "checkpoint_last.pt"
    if _resuming(resume, checkpoint) and path.is_file():
        _check_same_split(path, train, val, checkpoint,
                          {"dataset_dir": os.path.abspath(dataset_dir), "val_fraction": val_fraction, "seed": seed})
    if write:
        write_datalist(path, train, val)
    return {"training": train, "validation": val}


def _copies_on_one_side(train: list[dict[str, Any]], val: list[dict[str, Any]],
                        shared: Sequence[tuple[str, str, str, str]], dataset_dir: str | os.PathLike,
                        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Move to training the validation cases that hold the scan of a training case (:func:`shared_scans`).

    One case under two ids (two sites' folders or two BraTS releases both hold it) was split by id like two
    cases, so validation could score a copy of a case the model trained on, without a word. The copies stay
    together on one side: with a training case's, on the training side; copies that the split put in
    validation only stay there. The split is otherwise the one asked for, and a warning names them (the case
    still counts twice, in training or in validation, until one copy is removed).

    Raises:
        ValueError: every validation case is such a copy, so none would be left to validate on.
    """
    if not shared:
        return train, val
    group: dict[str, str] = {}  # case -> a representative of the cases holding one scan

    def root(case: str) -> str:
        while group.get(case, case) != case:
            case = group[case]
        return case

    for first, other, _, _ in shared:
        group[root(other)] = root(first)
    trained = {root(str(r["case"])) for r in train}
    moved = [r for r in val if root(str(r["case"])) in trained]
    first, other, first_file, other_file = shared[0]
    more = f" ({len(shared) - 1} more case(s) share a scan with another the same way)" if len(shared) > 1 else ""
    # the first three, and an ellipsis when there are more: the count before them says how many moved
    names = ", ".join(str(r["case"]) for r in moved[:3]) + (", ..." if len(moved) > 3 else "")
    done = (f"{len(moved)} validation case(s) holding a training case's scan ({names}) train instead, so that "
            "validation scores no case the model trained on." if moved else "The copies are on one side of the split.")
    logger.warning("Cases %r and %r hold the same scan (%s and %s are one file or copies)%s: one case under two ids, "
                   "as when two sites' folders or two BraTS releases both hold it. %s Keep one copy (remove the other "
                   "case from %s) to count the case once.", first, other, first_file, other_file, more, done,
                   dataset_dir)
    if len(moved) == len(val):
        raise ValueError(f"Every validation case holds the scan of a training case under another id (e.g. {first!r} "
                         f"and {other!r}: {first_file} and {other_file}), so none would be left to validate on: "
                         f"remove the copies from {dataset_dir}, or train with a larger --val_fraction.")
    ids = {str(r["case"]) for r in moved}
    return (sorted([*train, *moved], key=lambda r: str(r["case"])),
            [r for r in val if str(r["case"]) not in ids])


def _resuming(resume: bool | str, checkpoint: Path) -> bool:
    if str(resume).strip().lower() == "auto":
        return checkpoint.is_file()
    try:
        return parse_bool(resume, "resume")
    except ValueError:  # the checkpoint handler names the fix for a bad value
        return False


def _recorded_settings(checkpoint: Path) -> dict[str, Any]:
    """The ``settings`` the training checkpoint recorded (``seed``, ``val_fraction``, ``dataset_dir``), or {} where it
    records none or cannot be read (the resume then reports the file itself)."""
    import torch

    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - only names the fix of another error
        return {}
    settings = state.get("settings") if isinstance(state, dict) else None
    return dict(settings) if isinstance(settings, dict) else {}


def _some(names: Sequence[str], sign: str, shown: int = 5) -> str:
    """The first ``shown`` names, each after ``sign``, and how many more: a full release's split is 1,000 cases."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(sign + n for n in names[:shown]) + more


def _check_same_split(path: Path, train: Sequence[dict[str, Any]], val: Sequence[dict[str, Any]],
                      checkpoint: Path | None = None, settings: dict[str, Any] | None = None) -> None:
    """Refuse a resumed run whose split differs from the one ``path`` recorded.

    Args:
        path: the run's ``datalist.json``.
        train, val: this run's split.
        checkpoint: the training checkpoint, whose recorded ``settings`` name the flags that restore the split.
        settings: this run's values of those flags (``dataset_dir``, ``val_fraction``, ``seed``).

    Raises:
        ValueError: naming the cases that moved and, where the checkpoint records them, the flags that differ and
            their original values.
    """
    old_train, old_val = read_datalist(path)
    ids = [sorted(str(r["case"]) for r in records) for records in (old_train, old_val, train, val)]
    if ids[:2] == ids[2:]:
        return
    changes = []
    for what, before, now in (("training", ids[0], ids[2]), ("validation", ids[1], ids[3])):
        added, dropped = sorted(set(now) - set(before)), sorted(set(before) - set(now))
        if added or dropped:
            changes.append(f"{what} {_some(added, '+')}{' ' if added and dropped else ''}{_some(dropped, '-')}")
    recorded = _recorded_settings(checkpoint) if checkpoint is not None and settings else {}
    differ = [k for k in (settings or {}) if k in recorded and recorded[k] != settings[k]]
    if differ:
        listed = "; ".join(f"--{k} {recorded[k]!r} there, {settings[k]!r} here" for k in differ)  # type: ignore[index]
        fix = f"{' '.join(f'--{k} {recorded[k]}' for k in differ)} ({listed})"
    else:
        # the same flags (or a checkpoint that does not record them): the cases under --dataset_dir changed
        fix = "the original --dataset_dir, --val_fraction and --seed, and the cases the run started with"
    raise ValueError(f"This resumed run splits the cases differently from the run it continues ({'; '.join(changes)} "
                     f"against {path}): validation would score cases the model trained on. Resume with {fix}, or "
                     "start a new run in another --output_dir.")


def evaluation_cases(
    dataset_dir: str | os.PathLike, datalist: str | os.PathLike | None = None, label_convention: str | None = None
) -> list[dict[str, Any]]:
    """The labelled cases an evaluation scores.

    Args:
        dataset_dir: without ``datalist``, every labelled case under it (any accepted layout).
        datalist: a training run's ``datalist.json``: its validation cases only, as training split
            them, whatever the layout (flat folders, nnU-Net and MSD folders included), with the
            label maps training gave them.
        label_convention: for ``dataset_dir``: label values of BraTS-named cases (``auto``: by the
            file names; see :func:`app.data.discovery.discover_cases`).

    Raises:
        ValueError: neither is given; the datalist cannot be read, holds no validation case, or names
            files that no longer exist; or both are given and the datalist's cases do not lie under
            ``dataset_dir`` (the user meant one of them, and a report on the other would pass for it).
    """
    check_paths(dataset_dir=dataset_dir, eval_datalist=datalist)
    given_dir = dataset_dir is not None and bool(str(dataset_dir))
    if datalist is None or not str(datalist):
        if not given_dir:
            raise ValueError("No cases to score: pass --dataset_dir (every labelled case under it) or --eval_datalist "
                             "(the held-out cases of a training run, from the datalist.json in its --output_dir).")
        from app.data.discovery import discover_cases

        cases = discover_cases(dataset_dir, require_label=True, label_convention=label_convention)
        warn_header_conflicts(cases)
        return cases
    if str(label_convention or "auto").strip().lower() != "auto":
        logger.warning("label_convention %s is not used with a datalist: its cases keep the label values training "
                       "read them with (their label_map).", label_convention)
    _, val = read_datalist(datalist)
    if not val:
        raise ValueError(f"{datalist} holds out no validation case: train with a larger --val_fraction or more "
                         "cases, or evaluate every case under --dataset_dir instead.")
    _check_scored_records(datalist, val)
    # training writes each case once; a datalist edited by hand or sent from elsewhere may repeat one, which
    # was scored once per entry and weighed that much more in every mean (with a warning per subset only)
    counts = Counter(str(r.get("case")) for r in val if isinstance(r, dict))
    repeated = [(case, n) for case, n in counts.most_common() if n > 1]
    if repeated:
        case, n = repeated[0]
        others = f" (and {len(repeated) - 1} other case(s) more than once)" if len(repeated) > 1 else ""
        raise ValueError(f"{datalist} lists case {case!r} {n} times in its validation cases{others}: each entry would "
                         "be scored and weigh in the means as another case. Remove the repeated entries.")
    from app.data.discovery import record_files

    files = [f for r in val for f in record_files(r, label=True)]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise ValueError(f"{datalist} names {len(missing)} file(s) that do not exist, e.g. {missing[0]}: the data "
                         "moved since training; evaluate the cases where they are now with --dataset_dir.")
    # both given: the datalist decides, so a --dataset_dir of other cases (a test folder) would be ignored and
    # the report on the run's held-out cases taken for one on that folder. The training folder itself (as
    # `python -m app ablate` passes it) names the same cases.
    outside = [f for f in files if given_dir and not _under(f, dataset_dir)]
    if outside:
        raise ValueError(f"--eval_datalist {datalist} scores the held-out cases of a training run, and they do not lie "
                         f"under --dataset_dir {dataset_dir} (e.g. {outside[0]}): pass --eval_datalist alone to score "
                         "that run's held-out cases, or --dataset_dir alone to score every case under that folder.")
    warn_header_conflicts(val)
    return val


def _check_scored_records(datalist: str | os.PathLike, records: Sequence[Any]) -> None:
    """Refuse validation entries of ``datalist`` that evaluation cannot score, naming the entry and the fix.

    Evaluation reads the case records training writes. A datalist assembled by hand from several sites, or
    one in MONAI's own form (``{"image": [...], "label": ...}``, which does not say which file is which
    sequence), stopped with a ``KeyError`` traceback, or, without ``label_map``, with a message about
    re-running discovery that named neither the datalist nor the key to add.

    Raises:
        ValueError: an entry is no case record, or lacks its images, their sequence names, its label or
            the label values of its segmentation.
    """
    from app.data.labels import LABEL_PARTS
    from app.subsets import BRATS_MODALITIES

    record_form = ("{'case': id, 'images': {'flair': path, 't1': ..., 't1ce': ..., 't2': ...} (or an MSD 'image4d' "
                   "with its 'channels'), 'label': path, 'label_map': {'ncr': [1], 'ed': [2], 'et': [4]}}")
    folder_fix = ("or evaluate the cases' folder with --dataset_dir, which reads all this from the files (and "
                  "dataset.json)")
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not record.get("case"):
            what = f"keys {sorted(map(str, record))}" if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{datalist}: validation entry {i + 1} of {len(records)} ({what}) is not a case record: evaluation reads "
                             f"records as training writes them into its datalist.json, {record_form}. Pass that "
                             f"datalist.json, write the entries in that form, {folder_fix}.")
        case, images = record["case"], record.get("images")
        if images is not None and not isinstance(images, dict):
            raise ValueError(f"{datalist}: case {case!r} gives 'images' as {type(images).__name__}, which does not say "
                             f"which file is which sequence: give {{sequence: path}} with sequences from "
                             f"{list(BRATS_MODALITIES)}, {folder_fix}.")
        unknown = sorted(str(q) for q in (images or {}) if q not in BRATS_MODALITIES)
        if unknown:
            raise ValueError(f"{datalist}: case {case!r} names sequence(s) {unknown} in 'images': use "
                             f"{list(BRATS_MODALITIES)} (the MRI sequences the network reads), {folder_fix}.")
        if not images and not record.get("image4d"):
            raise ValueError(f"{datalist}: case {case!r} names no image: give 'images' ({{sequence: path}}) or an MSD "
                             f"'image4d' with its 'channels', {folder_fix}.")
        if record.get("image4d") and not isinstance(record.get("channels"), dict):
            raise ValueError(f"{datalist}: case {case!r} has a 4D image but no 'channels' ({{sequence: index}} as "
                             f"its dataset.json names them, e.g. {{'flair': 0, 't1': 1, 't1ce': 2, 't2': 3}}), "
                             f"{folder_fix}.")
        if not record.get("label"):
            raise ValueError(f"{datalist}: case {case!r} has no 'label': evaluation scores each case against its "
                             "segmentation; add the path of its segmentation, or leave the case out.")
        label_map = record.get("label_map")
        if not isinstance(label_map, dict) or any(p not in label_map for p in LABEL_PARTS):
            raise ValueError(f"{datalist}: case {case!r} has no 'label_map' with {list(LABEL_PARTS)}, the label "
                             "values of its segmentation: add e.g. {'ncr': [1], 'ed': [2], 'et': [4]} (BraTS "
                             f"2018-2021; 'et': [3] for BraTS 2023+), {folder_fix}.")


def _under(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` lies in ``folder``, as written (a folder of symlinks to scans elsewhere) or resolved
    (the same data reached through a symlinked path)."""
    folder = os.path.expanduser(os.fspath(folder))  # as discovery reads --dataset_dir ~/data
    for norm in (os.path.abspath, os.path.realpath):
        p, d = norm(os.fspath(path)), norm(folder)
        if os.path.commonpath([p, d]) == d:
            return True
    return False


def median_spacing(records: Sequence[dict[str, Any]]) -> list[float] | None:
    """Median voxel size (mm, along the RAS axes) of the first image of each record.

    Only headers are read. Training records it in the network (``DSUNet.set_training_spacing``) so
    inference can tell a scan of another resolution. None when there is no record.
    """
    import numpy as np

    sizes = [ras_spacing(img.affine) for img in map(first_image_header, records) if img is not None]
    return [round(float(v), 4) for v in np.median(sizes, axis=0)] if sizes else None


def name_outliers(off: Sequence[tuple[str, Sequence[float]]], shown: int = 3) -> str:
    """``A at [2.0, 2.0, 2.0] mm, B at … and N more``: the first ``shown`` of :func:`spacing_outliers`'s cases."""
    named = ", ".join(f"{case} at {spacing} mm" for case, spacing in off[:shown])
    return named + (f" and {len(off) - shown} more" if len(off) > shown else "")


def spacing_outliers(records: Sequence[dict[str, Any]], reference: Sequence[float],
                     tolerance: float = SPACING_TOLERANCE) -> list[tuple[str, list[float]]]:
    """``(case, voxel size in mm along RAS)`` of each record whose first image is more than ``tolerance`` off
    ``reference`` along some axis (:func:`spacing_differs`), in input order. Only headers are read."""
    off = []
    for record in records:
        img = first_image_header(record)
        if img is not None and spacing_differs(spacing := ras_spacing(img.affine), reference, tolerance):
            off.append((str(record.get("case")), [round(float(v), 4) for v in spacing]))
    return off


def _warn_mixed_spacing(train: Sequence[dict[str, Any]]) -> str | None:
    """Warn when some training cases are at another voxel size than the others.

    Cases are trained on their own grid and the network records the median voxel size
    (:func:`median_spacing`), to which inference resamples scans of another voxel size: cases of a site
    at another resolution teach the tumours at a scale the model is not used at, without a word.
    Returns the warning.
    """
    median = median_spacing(train)
    off = spacing_outliers(train, median) if median is not None else []
    if not off:
        return None
    message = (f"{len(off)} of the {len(train)} training cases ({name_outliers(off)}) have a voxel size more than "
               f"{SPACING_TOLERANCE:.0%} off the training cases' median, {median} mm, which the model records and "
               "inference resamples scans of another voxel size to: they teach it the tumours at another scale. "
               f"Resample them to {median} mm for one scale.")
    logger.warning(message)
    return message


#: Cases named one warning each by :func:`warn_header_conflicts`; the others are counted in one more.
HEADER_CONFLICT_WARNINGS = 5


def warn_header_conflicts(records: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """Warn, once per case, of the NIfTI files whose headers contradict themselves where readers differ
    (:func:`app.data.transforms.header_conflict`, the check inference records as ``header_conflicts``).

    Training and evaluation read every file by its sform, so their results are not affected; but a researcher who
    views such a case in ITK-SNAP or 3D Slicer (which read the qform and pixdim) sees the scan, and its label,
    elsewhere or at another size. Only headers are read; a file that cannot be read is left to the loader, which
    names it with its fix.

    Args:
        records: case records (``images``, ``image4d``, ``label``) as :func:`app.data.discovery.discover_cases`
            gives them.

    Returns:
        ``(case, file, conflict)`` for the first conflicting file of each such case, in input order.
    """
    from app.data.discovery import load_nifti, record_files
    from app.data.transforms import header_conflict

    found: list[tuple[str, str, str]] = []
    for record in records:
        for path in record_files(record, label=True):
            try:
                conflict = header_conflict(load_nifti(path).header)
            except Exception:  # noqa: BLE001 - see above
                continue
            if conflict:
                found.append((str(record.get("case")), path, conflict))
                break  # one warning per case: its files mostly share one writer
    for case, path, conflict in found[:HEADER_CONFLICT_WARNINGS]:
        logger.warning("Case %r: %s: %s. Training and evaluation read the sform (as nibabel and FSL do), so results "
                       "are not affected, but ITK-SNAP and 3D Slicer read the qform (when set) and pixdim, and show "
                       "the case elsewhere or at another size: rewrite the header so both agree (e.g. "
                       "nibabel: img.set_qform(img.get_sform()); fslorient -copysform2qform).", case, path, conflict)
    if len(found) > HEADER_CONFLICT_WARNINGS:
        logger.warning("%d more case(s) have such a NIfTI header (e.g. %r).", len(found) - HEADER_CONFLICT_WARNINGS,
                       found[HEADER_CONFLICT_WARNINGS][0])
    return found


def first_image_header(record: dict[str, Any]) -> Any | None:
    """The nibabel image (header only, no voxels read) of a case's 4D file or first sequence, or None
    when there is none or it cannot be read: a DICOM folder has no cheap header, and a bad file is
    reported, with its fix, by the loader that reads it."""
    from app.data.discovery import load_nifti

    path = record.get("image4d") or next(iter(dict(record.get("images") or {}).values()), None)
    if not path:
        return None
    try:
        return load_nifti(path)
    except Exception:  # noqa: BLE001 - see above
        return None


def ras_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) along R, A and S: each voxel axis's length, put on the RAS axis nearest to it
    (as reorienting to RAS does, oblique affines included)."""
    import numpy as np
    from nibabel.orientations import io_orientation

    affine = np.asarray(affine, dtype=np.float64)
    ras = np.empty(3)
    ras[io_orientation(affine)[:, 0].astype(int)] = np.linalg.norm(affine[:3, :3], axis=0)
    return ras


def spacing_differs(spacing: Sequence[float], reference: Sequence[float], tolerance: float = SPACING_TOLERANCE) -> bool:
    """True when ``spacing`` is off ``reference`` by more than ``tolerance`` (a fraction) along any axis."""
    return any(abs(float(s) / float(r) - 1.0) > tolerance for s, r in zip(spacing, reference))

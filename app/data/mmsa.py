"""MMSA sentiment features (CMU-MOSI / CMU-MOSEI / IEMOCAP-style): safe loading, conversion to
``.npz``, a torch dataset of dict samples and a synthetic generator for tests.

The MMSA layout is ``{split: {"id", "raw_text", "text" [N, L_t, D_t], "audio" [N, L_a, D_a],
"vision" [N, L_v, D_v], "regression_labels" [N], ...}}`` and comes in three flavours:

- **aligned**: every modality padded to one sequence length (word-aligned features);
- **unaligned**: per-modality lengths (``audio_lengths``, ``vision_lengths``, optionally
  ``text_lengths``; MMSA's BERT release gives the text lengths as the attention-mask row of
  ``text_bert [N, 3, L]``);
- **utterance**: one feature vector per modality (length 1), e.g. the bc-LSTM MOSI release.

Padding positions are never read by the model: every modality carries its lengths. A sample whose
length is 0 for a modality does not have that modality (its ``modality_mask`` entry is False).

MMSA ships pickles, and unpickling runs code stored in the file, so :func:`load_mmsa` refuses a
pickle unless ``trust_pickle`` is set. :func:`convert_mmsa` (``python -m app convert-mmsa IN.pkl
OUT.npz``) rewrites one trusted pickle as an ``.npz`` of plain arrays that loads without pickle.

Command line (dispatched by ``python -m app convert-mmsa``)::

    python -m app.data.mmsa IN.pkl OUT.npz
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import pickle
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app.atomic import atomic_write, atomic_write_text, missing_hint
from app.data.errors import check_readable, check_regular_file, unreadable
from app.flags import parse_bool

__all__ = [
    "MMSA_MODALITIES",
    "video_of",
    "NPZ_FORMAT",
    "SPLITS_NAME",
    "MMSAData",
    "MMSADataset",
    "check_labels",
    "convert_mmsa",
    "feature_dims",
    "feature_statistics",
    "load_mmsa",
    "main",
    "make_synthetic_mmsa",
    "mmsa_digest",
    "mmsa_split",
    "save_mmsa_npz",
    "read_mmsa_splits",
    "seen_utterances",
    "utterance_digests",
    "write_mmsa_splits",
    "write_synthetic_mmsa",
]

logger = logging.getLogger(__name__)

MMSA_MODALITIES: tuple[str, ...] = ("text", "audio", "vision")
#: Value of the ``__format__`` entry of the converted ``.npz`` files.
NPZ_FORMAT = "mmsa-npz-1"
#: A training run's record of the utterances it trained and selected on, in its output folder.
SPLITS_NAME = "splits.json"
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".pk")
_LABEL_KEYS = ("regression_labels", "classification_labels")
#: float64 values :func:`feature_statistics` holds at once per block of utterances (8 MiB)
_STATISTICS_BLOCK_VALUES = 1 << 20


# -- loading ---------------------------------------------------------------------------------------
class MMSAData(Mapping):
    """:func:`load_mmsa`'s ``{split: arrays}``, remembering the file it came from for error messages.

    The splits of a converted ``.npz`` are read and checked when first used, then kept: an evaluation of the test
    split held every split of the file (on a CMU-MOSEI-sized file, 3.17 GB of a 4.14 GB peak), and a training the
    test split too. What runs across splits reads only the utterance ids (:meth:`ids`) and the ``.npy`` headers
    (:meth:`feature_sizes`).
    """

    def __init__(self, splits: Mapping[str, Any], source: str | os.PathLike) -> None:
        self._splits: dict[str, Any] = dict(splits)
        self.source = str(source)

    def __getitem__(self, name: str) -> dict[str, np.ndarray]:
        split = self._splits[name]
        if isinstance(split, _NpzSplit):
            split = self._splits[name] = split.load()
        return split

    def __contains__(self, name: object) -> bool:
        # without reading the split: a Mapping asks by reading the item, which held a split the run does not use
        return name in self._splits

    def __iter__(self) -> Iterator[str]:
        return iter(self._splits)

    def __len__(self) -> int:
        return len(self._splits)

    def __repr__(self) -> str:
        return f"MMSAData({self.source!r}, splits={list(self._splits)})"

    def loaded(self) -> list[str]:
        """The splits read so far."""
        return [name for name, split in self._splits.items() if not isinstance(split, _NpzSplit)]

    def ids(self, name: str) -> np.ndarray:
        """Split ``name``'s utterance ids, without reading its features."""
        split = self._splits[name]
        return split.ids() if isinstance(split, _NpzSplit) else split["id"]

    def feature_sizes(self, name: str) -> list[int]:
        """``[D_text, D_audio, D_vision]`` of split ``name``, without reading its features."""
        split = self._splits[name]
        sizes = split.feature_sizes() if isinstance(split, _NpzSplit) else None
        if sizes is None:
            split = self[name]
            sizes = [int(split[m].shape[-1]) for m in MMSA_MODALITIES]
        return sizes


def video_of(utterance_id: Any) -> str:
    """The video an utterance id names: MMSA's ``video$_$clip`` or the bc-LSTM release's ``video_clip``.

    Utterances of one video share a speaker and a topic, so held-out scores and resampling group them by video.
    An id with neither separator is its own group (then per utterance).
    """
    text = str(utterance_id)
    if "$_$" in text:
        return text.split("$_$", 1)[0]
    return text.rsplit("_", 1)[0] if "_" in text else text


def _refuse_pickle(path: Path) -> ValueError:
    target = path.with_suffix(".npz")
    return ValueError(
        f"Refusing to load {path}: it is a pickle, and unpickling runs whatever code the file contains. "
        f"If you trust where it came from, pass --trust_pickle true (trust_pickle=True), or convert it once "
        f"to the safe .npz layout with `python -m app convert-mmsa {path} {target}` and use {target} instead."
    )


def _text_lengths_from_bert(split: Mapping[str, Any], n: int, length: int) -> np.ndarray | None:
    """Text lengths from MMSA's ``text_bert [N, 3, L]`` (row 1 is the attention mask), if usable."""
    bert = split.get("text_bert")
    if bert is None:
        return None
    bert = np.asarray(bert)
    if bert.ndim != 3 or bert.shape[0] != n or bert.shape[1] != 3 or bert.shape[2] != length:
        return None
    return (bert[:, 1, :] > 0).sum(axis=1)


def _normalise_split(name: str, split: Mapping[str, Any], source: Path) -> dict[str, np.ndarray]:
    """Check one split and return plain arrays with lengths for every modality."""
    if not isinstance(split, Mapping):
        raise ValueError(f"Split {name!r} of {source} is a {type(split).__name__}, not a dict of arrays (MMSA layout).")
    missing = [k for k in MMSA_MODALITIES if k not in split]
    if not any(k in split for k in _LABEL_KEYS):
        missing.append("regression_labels")
    if missing:
        raise ValueError(
            f"Split {name!r} of {source} lacks {missing} (found keys {sorted(split)}): an MMSA split needs "
            "text, audio, vision and regression_labels (or classification_labels)."
        )
    out: dict[str, np.ndarray] = {}
    n = None
    bert_lengths: np.ndarray | None = None
    for m in MMSA_MODALITIES:
        x = np.asarray(split[m], dtype=np.float32)
        if x.ndim == 2:  # [N, D]: one vector per utterance
            x = x[:, None, :]
        if x.ndim != 3:
            raise ValueError(f"{source}: {name}/{m} must be [N, L, D] (or [N, D]), got shape {x.shape}.")
        n = x.shape[0] if n is None else n
        if x.shape[0] != n:
            raise ValueError(f"{source}: {name}/{m} has {x.shape[0]} samples, {MMSA_MODALITIES[0]} has {n}.")
        if not np.isfinite(x).all():
            # MMSA's MOSEI release has a few -inf audio values; they would poison every statistic. Said
            # aloud: a failed feature extraction (whole NaN utterances) would otherwise train as zeros
            bad = np.flatnonzero(~np.isfinite(x).reshape(n, -1).all(axis=1))
            logger.warning(f"{source}: {name}/{m} has {int((~np.isfinite(x)).sum())} NaN or infinite value(s) in "
                           f"{bad.size} sample(s) (first: sample {bad[0]}); they are read as 0. If the extraction "
                           f"failed for those samples, set their {m}_lengths to 0 to mark {m} missing instead.")
            x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        out[m] = x
        lengths = split.get(f"{m}_lengths")
        if lengths is None and m == "text":
            lengths = _text_lengths_from_bert(split, n, x.shape[1])
            bert_lengths = lengths
        elif lengths is None and bert_lengths is not None and x.shape[1] == out["text"].shape[1]:
            # word-aligned features (MMSA aligned_50) pad every modality where the text is padded
            lengths = bert_lengths
        lengths = np.full(n, x.shape[1]) if lengths is None else np.asarray(lengths).reshape(-1)
        if lengths.shape[0] != n:
            raise ValueError(f"{source}: {name}/{m}_lengths has {lengths.shape[0]} entries for {n} samples.")
        if lengths.dtype.kind not in "iub" and not np.isfinite(lengths.astype(np.float64)).all():
            bad = np.flatnonzero(~np.isfinite(lengths.astype(np.float64)))
            raise ValueError(f"{source}: {name}/{m}_lengths has {bad.size} non-finite value(s) (first at sample "
                             f"{bad[0]}): give each sample's number of {m} steps (0 for a missing {m}).")
        # MMSA stores the original lengths, which can exceed the padded (truncated) length
        out[f"{m}_lengths"] = np.clip(lengths.astype(np.int64), 0, x.shape[1])
    for key in _LABEL_KEYS:
        if key in split:
            out[key] = _label_array(np.asarray(split[key]), key, n, f"{source}: {name}/{key}")
    for key in ("id", "raw_text"):
        if key in split:
            values = [_text(v) for v in split[key]]  # one entry per sample, whatever each entry is
            if len(values) != n:
                raise ValueError(f"{source}: {name}/{key} has {len(values)} entries for {n} samples: every field "
                                 "of a split needs one entry per sample; re-export the split.")
            out[key] = np.asarray(values, dtype=str)
    if "id" not in out:
        out["id"] = np.asarray([f"{name}_{i}" for i in range(n)], dtype=str)
    return out


def _text(value: Any) -> str:
    """An id or transcript as text (MMSA pickles written under Python 2 hold bytes)."""
    return value.decode("utf-8", errors="replace") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _label_array(y: np.ndarray, key: str, n: int, where: str) -> np.ndarray:
    """``y`` as float32 sentiment scores, or as int64 class ids when they are all class ids.

    Values are checked only where a split's labels are used (:func:`check_labels`): a held-out split
    with hidden (NaN) labels, or a label key the run does not use, must not stop the others. So are
    labels with several values per sample (one-hot class rows) or that are not numbers (emotion names):
    kept as given, and refused by :func:`check_labels` only for a run that reads them."""
    y = y.reshape(y.shape[0], -1)[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y
    if y.ndim == 0 or y.shape[0] != n:
        raise ValueError(f"{where} has shape {y.shape}, not one value for each of the {n} samples.")
    if y.ndim != 1:
        return y
    try:
        values = y.astype(np.float64)
    except (TypeError, ValueError):
        return y
    if key == "regression_labels":
        return values.astype(np.float32)
    if np.isfinite(values).all() and (values == np.round(values)).all() and (values >= 0).all():
        return values.astype(np.int64)
    return values  # kept as given; check_labels names the bad values if this split is used


def check_labels(y: np.ndarray, key: str, where: str, num_classes: int | None = None) -> None:
    """Refuse labels that would train or score on garbage: NaN or infinite values, and class ids
    that are not integers in ``[0, num_classes)``. Sentiment scores outside ``[-3, 3]`` are warned
    about: they are valid numbers, but usually another scale (a 1-7 rating) that the MOSI metrics
    misread.

    Raises:
        ValueError: naming ``where`` (file and split), the first bad sample and the fix.
    """
    shape = np.shape(y)
    if len(shape) != 1:
        what = "sentiment score" if key == "regression_labels" else "class id"
        fix = ("" if key == "regression_labels" else
               " For one-hot or per-class rows [N, C], store each row's class id instead (labels.argmax(axis=1)).")
        raise ValueError(f"{where} has shape {tuple(shape)}, not one {what} per sample: give one value for each of "
                         f"the {shape[0] if shape else 0} samples.{fix}")
    try:
        values = np.asarray(y, dtype=np.float64)
    except (TypeError, ValueError):
        first = next((_text(v) for v in np.asarray(y).reshape(-1) if not _is_number(v)), None)
        fix = (" For named classes (e.g. emotions), store each one's class id 0, 1, 2, ... instead."
               if key == "classification_labels" else "")
        raise ValueError(f"{where} holds values that are not numbers (first: {first!r}).{fix}") from None
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ValueError(f"{where} has {bad.size} missing or infinite label(s) (first at sample {bad[0]}): a NaN "
                         "label trains on nothing and makes every score NaN; fix or drop those samples.")
    if key == "regression_labels":
        # Acc-2 splits at 0 and Acc-7 clips the labels to [-3, 3]: a 1-7 rating scores every utterance
        # positive and every label above 3 as 3, silently
        outside = np.flatnonzero(np.abs(values) > 3.0)
        if outside.size:
            logger.warning(f"{where} has {outside.size} label(s) outside the sentiment range [-3, 3] (first: "
                           f"{values[outside[0]]:g} at sample {outside[0]}): Acc-2 splits at 0 and Acc-7 clips labels "
                           "to [-3, 3], so the scores misread another scale; rescale the labels to [-3, 3].")
        return
    bad = np.flatnonzero((values != np.round(values)) | (values < 0))
    if bad.size:
        raise ValueError(f"{where} has {bad.size} value(s) that are not class ids 0, 1, 2, ... (first: "
                         f"{values[bad[0]]:g} at sample {bad[0]}): classification labels must be non-negative "
                         "integers.")
    if num_classes is not None and values.size and values.max() >= int(num_classes):
        top = int(values.max())
        raise ValueError(f"{where} has class id {top}, but the network has {int(num_classes)} classes (ids 0 to "
                         f"{int(num_classes) - 1}): train with --out_channels {top + 1} or more. A checkpoint "
                         f"trained with {int(num_classes)} classes cannot score this split: evaluate it on data "
                         "labelled with its classes.")


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def load_mmsa(path: str | os.PathLike, trust_pickle: bool | str = False) -> dict[str, dict[str, np.ndarray]]:
    """Load MMSA features from a pickle or from a converted ``.npz``.

    Args:
        path: ``.pkl`` in the MMSA layout, or ``.npz`` written by :func:`convert_mmsa`.
        trust_pickle: allow unpickling (it executes code from the file). ``"true"`` and ``"false"``
            are accepted so the value can come straight from the bundle command line (see
            :func:`app.flags.parse_bool`).

    Returns:
        ``{split: {"text", "audio", "vision": float32 [N, L, D], "<m>_lengths": int64 [N],
        "regression_labels": float32 [N] and/or "classification_labels": int64 [N], "id": str [N],
        "raw_text": str [N] (if present)}}``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a pickle without trust, a file this process may not read, or a file that is not in the MMSA
            layout.
    """
    trusted = parse_bool(trust_pickle, "trust_pickle")  # a bad value is an error for .npz files too
    if not str(path).strip():
        raise ValueError("No MMSA feature file given: pass --data_path PATH, an MMSA .pkl (with --trust_pickle true) "
                         "or a .npz converted from one.")
    path = Path(path)
    # a named pipe (--data_path, convert-mmsa's input) was called "not found", although ls lists it
    check_regular_file(path, "Pass the MMSA .pkl, or a .npz converted from one with python -m app convert-mmsa.")
    if not path.is_file():
        raise FileNotFoundError(f"MMSA feature file {path} not found{missing_hint(path)}: check the path (an MMSA "
                                ".pkl, or a .npz converted from one with python -m app convert-mmsa).")
    # a permission problem, not a damaged file: a .npz read as "not a .npz archive (truncated ...)", a pickle as a
    # PermissionError traceback
    check_readable(path)
    if path.suffix.lower() == ".npz":
        return _load_npz(path)
    if path.suffix.lower() not in _PICKLE_SUFFIXES:
        raise ValueError(f"{path}: expected an MMSA pickle (.pkl) or a converted .npz, got {path.suffix or 'no suffix'!r}.")
    if not trusted:
        raise _refuse_pickle(path)
    try:
        raw = _unpickle(path)
    except OSError:
        raise
    except (ImportError, AttributeError) as err:  # e.g. a pickle of numpy 2 arrays read with numpy 1
        raise ValueError(f"{path} needs Python code this environment lacks to unpickle ({type(err).__name__}: "
                         f"{err}): convert it to .npz with python -m app convert-mmsa where it was written (or with "
                         "the package versions it names), then use the .npz here.") from err
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file can fail in many ways
        raise ValueError(f"{path} cannot be read as a pickle ({type(err).__name__}: {err}): it is truncated or not "
                         "an MMSA feature file; download or export it again.") from err
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"{path} holds a {type(raw).__name__}, not the MMSA layout {{split: {{text, audio, vision, ...}}}}.")
    return MMSAData({str(name): _normalise_split(str(name), split, path) for name, split in raw.items()}, path)


def _unpickle(path: Path) -> Any:
    """Unpickle ``path``, also when Python 2 wrote it (the bc-LSTM and CMU-MultimodalSDK era files).

    Python 2 stored its byte strings, numpy's array buffers among them, as ``str``, which Python 3
    decodes as ASCII by default and fails on the first array. ``latin1`` maps each byte to one
    character and back, which is how numpy reads such buffers; ids and transcripts read that way
    are turned back into their bytes and decoded as UTF-8 (:func:`_py2_text`).
    """
    with open(path, "rb") as f:
        try:
            return pickle.load(f)  # noqa: S301 - only with the caller's explicit trust_pickle
        except UnicodeDecodeError:
            f.seek(0)
            raw = pickle.load(f, encoding="latin1")  # noqa: S301 - as above
    if isinstance(raw, dict):
        for split in raw.values():
            if isinstance(split, dict):
                for key in ("id", "raw_text"):
                    if key in split:
                        split[key] = _py2_text(split[key])
    return raw


def _py2_text(values: Any) -> Any:
    """Ids or transcripts of a Python 2 pickle read with ``latin1``: each string that is a latin1
    reading of UTF-8 bytes is decoded as UTF-8 ("caf\u00c3\u00a9" becomes "caf\u00e9"); others stay."""

    def fix(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return value.encode("latin1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):  # a unicode object, or not UTF-8
            return value

    if isinstance(values, np.ndarray) and values.dtype.kind in "OU":
        return np.asarray([fix(v) for v in values.reshape(-1)], dtype=values.dtype).reshape(values.shape)
    if isinstance(values, (list, tuple)):
        return type(values)(fix(v) for v in values)
    return values


_NPZ_FIX = "convert the MMSA pickle again with python -m app convert-mmsa"
#: Where an ``.npz`` cannot be read: a damaged archive or entry.
_NPZ_READ_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error)


def _load_npz(path: Path) -> MMSAData:
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a .npz archive (truncated, or another format): {_NPZ_FIX}.")
    try:
        return _read_npz(path)
    except _NPZ_READ_ERRORS as err:
        raise _damaged_npz(path, err) from err


def _damaged_npz(path: Path, err: BaseException) -> ValueError:
    if isinstance(err, PermissionError):  # made unreadable after the run opened it: not damaged, nor to convert
        return unreadable(path)
    return ValueError(f"{path} cannot be read ({type(err).__name__}: {err}): it is truncated or damaged; {_NPZ_FIX}.")


def _objects_refused(path: Path, key: str) -> ValueError:
    # numpy stores an object array as a pickle, and unpickling runs code: the entry is refused
    return ValueError(f"{path}: entry {key!r} is an array of Python objects, which loads only by unpickling (refused: "
                      "a pickle runs code from the file). Convert the MMSA pickle with python -m app convert-mmsa, "
                      "which writes plain arrays.")


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _npz_entries(npz: Any, path: Path) -> dict[str, Any]:
    """Every entry's ``(shape, bytes)`` from its ``.npy`` header alone (None where the header is not one this
    reads), refusing entries of Python objects and entries that claim more bytes than they hold.

    numpy allocates what an array's header claims before it reads the data: a few bytes claiming billions of
    values ended in a ``MemoryError`` traceback (or, below what the machine can hand out, in numpy's ``EOF``
    error), and an entry of zeros compressed a thousandfold (a zip bomb) took memory until the machine ran out.
    """
    entries: dict[str, Any] = {}
    for name in npz.zip.namelist():
        info = npz.zip.getinfo(name)
        key = name[:-4] if name.endswith(".npy") else name
        entries[key] = None
        with npz.zip.open(info) as f:
            try:
                version = np.lib.format.read_magic(f)
                reader = _NPY_HEADER_READERS.get(version)
                if reader is None:
                    continue  # a newer format: numpy's own reading decides
                shape, _, dtype = reader(f)
            except ValueError:
                continue  # not an array numpy can read: numpy's own reading names it
            if dtype.hasobject:
                raise _objects_refused(path, key)
            nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
            held = info.file_size - f.tell()
        if nbytes > held:
            raise ValueError(f"{path}: entry {key!r} claims {tuple(shape)} {dtype} values ({nbytes} bytes), but holds "
                             f"{held} bytes: the file is damaged, or was made to exhaust memory. Convert the MMSA "
                             "pickle again with python -m app convert-mmsa.")
        entries[key] = (tuple(int(d) for d in shape), nbytes)
    return entries


def _file_identity(f: Any) -> tuple[int, ...]:
    """The identity of the open file ``f``: a file replaced or rewritten under its name has another.

    Taken from the open file, not its name: a file replaced between a look-up by name and the reading was read
    without its headers' checks, with the feature sizes of the file it replaced."""
    st = os.fstat(f.fileno())
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _read_npz(path: Path) -> MMSAData:
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:
        identity = _file_identity(f)
        if "__format__" not in npz.files or str(npz["__format__"]) != NPZ_FORMAT:
            raise ValueError(
                f"{path} is not an MMSA .npz written by `python -m app convert-mmsa` (no {NPZ_FORMAT!r} marker): "
                "convert the original MMSA pickle with that command."
            )
        entries = _npz_entries(npz, path)
    splits: dict[str, dict[str, Any]] = {}
    for key, info in entries.items():
        if key != "__format__":
            split, _, field = key.partition("/")
            splits.setdefault(split, {})[field] = info
    return MMSAData({name: _NpzSplit(path, name, fields, identity) for name, fields in splits.items()}, path)


class _NpzSplit:
    """A split of a converted ``.npz`` not read yet: its entries' headers, and how to read and check it."""

    def __init__(self, path: Path, name: str, fields: Mapping[str, Any], identity: tuple[int, ...]) -> None:
        self.path, self.name, self.fields, self.identity = path, name, dict(fields), identity

    def _read(self, fields: Sequence[str]) -> dict[str, np.ndarray]:
        try:
            with open(self.path, "rb") as f:
                if _file_identity(f) != self.identity:  # before numpy reads it: a file half written is not damaged
                    raise ValueError(f"{self.path} changed after it was opened, before its split {self.name!r} was "
                                     "read: run the command again once the file is complete.")
                with np.load(f, allow_pickle=False) as npz:
                    out = {}
                    for field in fields:
                        try:
                            out[field] = npz[f"{self.name}/{field}"]
                        except ValueError as err:
                            if "allow_pickle" not in str(err):
                                raise
                            raise _objects_refused(self.path, f"{self.name}/{field}") from None
                    return out
        except FileNotFoundError as err:
            raise ValueError(f"{self.path} was removed after it was opened, before its split {self.name!r} was read: "
                             "run the command again with the file in place.") from err
        except _NPZ_READ_ERRORS as err:
            raise _damaged_npz(self.path, err) from err

    def ids(self) -> np.ndarray:
        """The utterance ids as the split reads them (:func:`_normalise_split`), from the ``id`` entry alone."""
        if "id" in self.fields:
            return np.asarray([_text(v) for v in self._read(["id"])["id"]], dtype=str)
        shape = self._feature_shape("text")
        if shape is None:  # no header to count the utterances by: the split's reading says why
            return self.load()["id"]
        return np.asarray([f"{self.name}_{i}" for i in range(shape[0])], dtype=str)

    def feature_sizes(self) -> list[int] | None:
        """``[D_text, D_audio, D_vision]`` from the headers, or None where a header does not give them."""
        shapes = [self._feature_shape(m) for m in MMSA_MODALITIES]
        return None if any(s is None for s in shapes) else [int(s[-1]) for s in shapes]

    def _feature_shape(self, modality: str) -> tuple[int, ...] | None:
        """The shape of ``modality``'s features from their header where it is one the split reads (``[N, L, D]`` or
        ``[N, D]``), else None: the split's reading then names the shape (:func:`_normalise_split`)."""
        info = self.fields.get(modality)
        return info[0] if info is not None and len(info[0]) in (2, 3) else None

    def load(self) -> dict[str, np.ndarray]:
        """The split's arrays, checked (:func:`_normalise_split`), once the memory they take is known to be there."""
        from app.data.cache import available_memory

        total = sum(info[1] for info in self.fields.values() if info is not None)
        room = available_memory()
        if room is not None and total > room:
            raise ValueError(f"{self.path}: split {self.name!r} takes {total / 2**30:.1f} GiB, more than the "
                             f"{room / 2**30:.1f} GiB of memory left: run on a machine (or container) with more free "
                             "memory.")
        return _normalise_split(self.name, self._read(list(self.fields)), self.path)


def save_mmsa_npz(data: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write ``{split: {field: array}}`` as a pickle-free ``.npz`` (``split/field`` entries).

    Raises:
        ValueError: ``path`` cannot be written.
    """
    path = _check_npz_path(path)
    arrays: dict[str, np.ndarray] = {"__format__": np.asarray(NPZ_FORMAT)}
    for split, fields in data.items():
        for field, value in fields.items():
            arr = np.asarray(value)
            if arr.dtype.kind == "O":
                arr = np.asarray([str(v) for v in arr.reshape(-1)], dtype=str).reshape(arr.shape)
            arrays[f"{split}/{field}"] = arr
    try:
        # a file object: savez would append ".npz" to a temporary name that lacks it
        return atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
    except OSError as err:  # the message would otherwise name the temporary file, not the output
        raise ValueError(f"Cannot write {path} ({err.strerror or type(err).__name__}): pass an output path in a "
                         "folder you can write to.") from err


def _check_npz_path(path: str | os.PathLike) -> Path:
    """``path`` as the ``.npz`` output it must be: a name ending in ``.npz``, not a folder, in a folder that can
    be written (:func:`app.atomic.check_writable_folder`, which also refuses an unexpanded ``~``).

    Raises:
        ValueError: naming the output and the fix.
    """
    from app.atomic import check_path_text, check_writable_folder

    text = os.fspath(path)
    check_path_text(text, f"Output {text}")  # the file, not only its folder, in the message
    path = Path(text)
    if path.suffix.lower() != ".npz":
        raise ValueError(f"Output {path} must end in .npz.")
    if path.is_dir():  # the final rename would fail with a traceback after the whole file is written
        raise ValueError(f"Output {path} is a folder: pass a file name ending in .npz, e.g. {path / 'mmsa.npz'}.")
    check_writable_folder(os.path.dirname(text) or os.curdir, f"Output {text}",
                          file_fix="pass an output path in a folder", write_fix="pass an output path in a folder you "
                          "can write to")
    return path


def convert_mmsa(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Convert a *trusted* MMSA pickle to the safe ``.npz`` layout (this unpickles ``src`` once).

    Only the fields the product reads are kept (features, lengths, labels, ids, raw text). The output is
    checked before the pickle is read: a MOSEI pickle takes minutes to load, and a read-only or mistyped
    output (``~`` left unexpanded) was found only then, or not at all.
    """
    return _convert(src, dst)[0]


def _convert(src: str | os.PathLike, dst: str | os.PathLike) -> tuple[Path, MMSAData]:
    """:func:`convert_mmsa`, also returning the data written (the command line reports its sizes from it)."""
    _check_npz_path(dst)
    data = load_mmsa(src, trust_pickle=True)
    return save_mmsa_npz(data, dst), data


def mmsa_split(data: Mapping[str, Mapping[str, np.ndarray]], split: str, source: str | os.PathLike = "the data file"
               ) -> dict[str, np.ndarray]:
    """One split of :func:`load_mmsa`'s result, or a ``ValueError`` naming the available splits."""
    if split not in data:
        raise ValueError(
            f"Split {split!r} is not in {source}: available splits are {sorted(data)}. Pass one of them "
            f"(the bundles' --train_split, --val_split and --eval_split) or a file that has a {split!r} split."
        )
    return dict(data[split])


def _generated_ids(split: Mapping[str, np.ndarray], name: str) -> bool:
    """Whether the split's ids are the ``<split>_<index>`` ones the loader makes for a file without ids."""
    return [str(i) for i in split["id"]] == [f"{name}_{i}" for i in range(len(split["id"]))]


def utterance_digests(split: Mapping[str, np.ndarray]) -> list[str]:
    """A digest of each utterance's features (the steps its lengths cover, never the padding).

    Identifies utterances of a file without ids, whose ids are only their positions; the labels are
    left out, so a copy with hidden labels is still recognised.
    """
    digests = []
    for i in range(len(split["id"])):
        h = hashlib.blake2b(digest_size=8)
        for m in MMSA_MODALITIES:
            n = int(split[f"{m}_lengths"][i])
            h.update(np.int64(n).tobytes())
            h.update(np.ascontiguousarray(split[m][i, :n], dtype=np.float32).tobytes())
        digests.append(h.hexdigest())
    return digests


def _utterance_record(split: Mapping[str, np.ndarray], name: str, ids_identify: bool = True) -> dict[str, Any]:
    record: dict[str, Any] = {"ids": [str(i) for i in split["id"]]}
    if not ids_identify or _generated_ids(split, name):
        record["digests"] = utterance_digests(split)
    return record


def _ids_identify(data: Mapping[str, Mapping[str, np.ndarray]]) -> bool:
    """Whether every id of the file names one utterance: no id repeats within or across its splits.

    Files that number each split's utterances from 0 reuse the same ids in train and test; there the
    ids cannot tell a training utterance from a test one, and the features' digests must.
    """
    if isinstance(data, MMSAData):  # without reading the splits' features
        ids = [str(i) for name in data for i in data.ids(name)]
    else:
        ids = [str(i) for split in data.values() if isinstance(split, Mapping) and "id" in split for i in split["id"]]
    return len(set(ids)) == len(ids)


def mmsa_digest(data: Mapping[str, Mapping[str, np.ndarray]], splits: Sequence[str], label_key: str,
                source: str | os.PathLike = "the data file") -> str:
    """A digest of what a training run trains and selects on: the utterance ids and ``label_key`` labels of each of
    ``splits``, in order (with the features' digests where the ids do not name one utterance each, as
    :func:`write_mmsa_splits` records them).

    The training checkpoint records it (the bundle's ``settings``): a resume with another ``--data_path`` went on
    training on the other file without a word, while the path alone cannot tell another file from the same data
    converted to ``.npz`` or moved, whose ids and labels load the same.
    """
    ids_identify = _ids_identify(data)
    h = hashlib.sha256()
    for name in splits:
        split = mmsa_split(data, name, source)
        record = _utterance_record(split, name, ids_identify)
        h.update(json.dumps([str(name), record["ids"], record.get("digests")]).encode("utf-8"))
        labels = split.get(label_key)
        if labels is not None:
            h.update(np.ascontiguousarray(np.asarray(labels, dtype=np.float64)).tobytes())
    return h.hexdigest()[:16]


def write_mmsa_splits(output_dir: str | os.PathLike, data: Mapping[str, Mapping[str, np.ndarray]],
                      train_split: str, val_split: str, source: str | os.PathLike = "the data file") -> Path:
    """Record in ``output_dir/splits.json`` the utterances a training run trains and selects on.

    An evaluation of the run's checkpoint reads it back (:func:`read_mmsa_splits`,
    :func:`seen_utterances`) to say when the scored utterances are not held out. Utterances are
    known by their ids, which stay when the file is converted or renamed; a file without ids has
    only positions for ids, and a file whose ids repeat (within or across its splits) has ids that do
    not name one utterance each, so their utterances are also recorded by their features' digests.
    """
    ids_identify = _ids_identify(data)
    train = _utterance_record(mmsa_split(data, train_split, source), train_split, ids_identify)
    val = _utterance_record(mmsa_split(data, val_split, source), val_split, ids_identify)
    record: dict[str, Any] = {"train_split": train_split, "val_split": val_split,
                              "train_ids": train["ids"], "val_ids": val["ids"]}
    for role, split in (("train", train), ("val", val)):
        if "digests" in split:
            record[f"{role}_digests"] = split["digests"]
    return atomic_write_text(Path(output_dir) / SPLITS_NAME, json.dumps(record) + "\n")


def read_mmsa_splits(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record :func:`write_mmsa_splits` wrote, or None when ``path`` holds no such record."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    keys = ("train_split", "val_split", "train_ids", "val_ids")
    return record if isinstance(record, dict) and all(k in record for k in keys) else None


def seen_utterances(record: Mapping[str, Any], split: Mapping[str, np.ndarray], name: str) -> dict[str, int]:
    """How many utterances of ``split`` (called ``name``) the recorded run used, by role:
    ``{"train": n, "val": n}``.

    Ids decide when both files have their own; when either has only positional ids, or the run's file
    repeated ids, the features' digests decide, so two id-less files are not mistaken for each other
    and a test utterance that only shares a training utterance's id is not called seen. The split's
    digests are computed at most once.
    """
    generated = _generated_ids(split, name)
    ids = {str(i) for i in split["id"]}
    digests: set[str] | None = None
    seen = {}
    for role in ("train", "val"):
        if generated or f"{role}_digests" in record:
            if f"{role}_digests" not in record:
                seen[role] = 0  # the run's file had ids, this one has none: nothing to match on
                continue
            digests = set(utterance_digests(split)) if digests is None else digests
            seen[role] = len(set(record[f"{role}_digests"]) & digests)
        else:
            seen[role] = len(set(record[f"{role}_ids"]) & ids)
    return seen


def feature_dims(data: Mapping[str, Mapping[str, np.ndarray]]) -> list[int]:
    """Feature sizes ``[D_text, D_audio, D_vision]`` (from any split; all must agree).

    Raises:
        ValueError: the splits' feature sizes differ.
    """
    dims = ({name: data.feature_sizes(name) for name in data} if isinstance(data, MMSAData)  # from the headers
            else {name: [int(split[m].shape[-1]) for m in MMSA_MODALITIES] for name, split in data.items()})
    distinct = {tuple(d) for d in dims.values()}
    if len(distinct) != 1:
        # one network reads every split, so a split extracted with other features (GloVe text in
        # one, BERT in another) cannot be scored by it; name the odd split(s) against the first's sizes
        first = next(iter(dims))
        odd = {name: d for name, d in dims.items() if d != dims[first]}
        differ = "; ".join(
            f"split {name!r}: " + ", ".join(f"{m} {d[i]}-d" for i, m in enumerate(MMSA_MODALITIES) if d[i] != dims[first][i])
            for name, d in odd.items())
        sizes = ", ".join(f"{m} {dims[first][i]}-d" for i, m in enumerate(MMSA_MODALITIES))
        source = getattr(data, "source", "the MMSA data")
        raise ValueError(f"Feature sizes differ between the splits of {source}: {first!r} has {sizes}, but {differ}. "
                         "Every split needs the same features: extract them again with the same feature extractors, "
                         "or write the odd split(s) to a file of their own.")
    return list(distinct.pop())


def feature_statistics(split: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-feature mean and standard deviation of each modality over the non-padded steps.

    Meant for the training split; the model keeps them as buffers, so a checkpoint carries the
    normalisation it was trained with.

    Args:
        split: one split, as :func:`load_mmsa` returns it or raw (MMSA's pickles, or
            :func:`make_synthetic_mmsa` output, where ``<m>_lengths`` may be absent): a raw split is
            read as :class:`MMSADataset` reads it (lengths from ``text_bert``, else the full length).

    Returns:
        ``{modality: (mean [D], std [D])}``, float32; a standard deviation under 1e-6 becomes 1.
    """
    if any(f"{m}_lengths" not in split for m in MMSA_MODALITIES):
        # the statistics are those of the steps the dataset will feed the network, so read the split as it does
        labels = {} if any(k in split for k in _LABEL_KEYS) else {"regression_labels": np.zeros(len(split["text"]))}
        split = _normalise_split("given", {**split, **labels}, Path("the split given to feature_statistics"))
    stats = {}
    for m in MMSA_MODALITIES:
        x, lengths = split[m], split[f"{m}_lengths"]
        # a float64 copy of every step at once, and numpy's deviations beside it, took over twice the modality's
        # own memory (2.6 GiB for the 1.1 GiB of text of a MOSEI-sized training split); a block of utterances at
        # a time takes about 20 MiB. Two passes, as numpy's std makes them: the same result where one block holds
        # the split (CMU-MOSI), and the same to rounding where several do
        rows = max(1, _STATISTICS_BLOCK_VALUES // max(1, x.shape[1] * x.shape[2]))
        blocks = [slice(start, start + rows) for start in range(0, x.shape[0], rows)]

        def steps(block: slice) -> np.ndarray:
            valid = np.arange(x.shape[1])[None, :] < lengths[block, None]
            return x[block][valid].astype(np.float64)

        count = int(np.minimum(lengths, x.shape[1]).clip(0).sum())
        if count == 0:
            mean, std = np.zeros(x.shape[-1]), np.ones(x.shape[-1])
        else:
            mean = _block_sum(steps(block) for block in blocks) / count
            deviations = (steps(block) - mean for block in blocks)
            std = np.sqrt(_block_sum(np.square(d, out=d) for d in deviations) / count)
        stats[m] = (mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32))
    return stats


def _block_sum(blocks: Iterable[np.ndarray]) -> np.ndarray:
    """The sum over axis 0 of the blocks stacked, block by block: exactly ``block.sum(0)`` for one block."""
    total = None
    for block in blocks:
        total = block.sum(0) if total is None else total + block.sum(0)
    return total


# -- dataset ---------------------------------------------------------------------------------------
class MMSADataset:
    """Map-style dataset of one MMSA split, with dict samples for the subset-aware trainer.

    Each sample is ``{"image": {"text": [L_t, D_t], "audio": ..., "vision": ..., "text_lengths":
    int64 [], "audio_lengths": ..., "vision_lengths": ...}, "label": float32 [1] (regression) or
    int64 [] (classification), "modality_mask": bool [3], "case": id}``; the default collate turns
    them into batched dicts.

    Args:
        data: path of an MMSA ``.pkl``/``.npz``, or an MMSA dict (e.g. returned by :func:`load_mmsa`).
        split: split name (``train``, ``valid``, ``test``).
        trust_pickle: see :func:`load_mmsa` (only used when ``data`` is a path).
        label_key: ``regression_labels`` or ``classification_labels``.
        modalities: modalities to offer; the others are marked missing for every sample.
        task: ``regression`` or ``classification`` when known: the label key must be that task's
            (a class id under an L1 loss would broadcast silently instead of failing).
        num_classes: the network's number of classes; class ids must be below it (a larger id
            fails deep in the loss in training and scores as a plain error in evaluation).

    Raises:
        ValueError: a ``label_key`` of another task, a split without that label, without samples, or with
            a sample that has no offered modality; an unknown modality; and bad labels (:func:`check_labels`).
    """

    def __init__(
        self,
        data: str | os.PathLike | Mapping[str, Mapping[str, np.ndarray]],
        split: str = "train",
        trust_pickle: bool | str = False,
        label_key: str = "regression_labels",
        modalities: Sequence[str] = MMSA_MODALITIES,
        task: str | None = None,
        num_classes: int | None = None,
    ) -> None:
        expected = {"regression": "regression_labels", "classification": "classification_labels"}
        if task is not None and expected.get(task, label_key) != label_key:
            raise ValueError(f"label_key {label_key!r} does not fit task {task!r}: set label_key to {expected[task]!r} "
                             f"(or task to the one of {label_key!r}).")
        source = data if isinstance(data, (str, os.PathLike)) else getattr(data, "source", "the MMSA data")
        loaded = load_mmsa(data, trust_pickle) if isinstance(data, (str, os.PathLike)) else data
        # a dict given directly may be raw MMSA (no lengths yet); normalising is idempotent
        arrays = _normalise_split(split, mmsa_split(loaded, split, source), Path(str(source)))
        if label_key not in arrays:
            have = [k for k in _LABEL_KEYS if k in arrays]
            raise ValueError(f"Split {split!r} of {source} has no {label_key!r} (it has {have}): set label_key to one of them.")
        if arrays["id"].shape[0] == 0:
            raise ValueError(f"Split {split!r} of {source} has no samples: pass a split that has some (the bundles' "
                             "--train_split, --val_split, --eval_split) or a file whose split is not empty.")
        check_labels(arrays[label_key], label_key, f"{source}: {split}/{label_key}",
                     num_classes if label_key == "classification_labels" else None)
        unknown = [m for m in modalities if m not in MMSA_MODALITIES]
        if unknown:
            raise ValueError(f"Unknown modalities {unknown}: choose from {list(MMSA_MODALITIES)}.")
        self.split = split
        self.label_key = label_key
        self.arrays = arrays
        offered = np.asarray([m in modalities for m in MMSA_MODALITIES])
        lengths = np.stack([arrays[f"{m}_lengths"] for m in MMSA_MODALITIES], axis=1)
        self.modality_mask = (lengths > 0) & offered[None, :]
        if not self.modality_mask.any(axis=1).all():
            empty = np.flatnonzero(~self.modality_mask.any(axis=1))
            offered_note = "" if offered.all() else f" among the offered modalities {list(modalities)}"
            raise ValueError(f"{empty.size} sample(s) of split {split!r} of {source} have no modality{offered_note} "
                             f"(all lengths 0; first: sample {empty[0]}, id {str(arrays['id'][empty[0]])!r}): nothing "
                             "can be predicted from them; drop them from the file or give each at least one "
                             "modality's features.")

    def __len__(self) -> int:
        return int(self.arrays["id"].shape[0])

    def statistics(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """:func:`feature_statistics` of this split."""
        return feature_statistics(self.arrays)

    def records(self) -> list[dict[str, Any]]:
        """``{"case": id, "modalities": [names]}`` per sample, the modalities it has (offered, length above 0), as a
        segmentation datalist lists each case's sequences: the training log's data line counts the missing ones."""
        ids = self.arrays["id"]
        return [{"case": str(ids[i]), "modalities": [m for m, on in zip(MMSA_MODALITIES, row) if on]}
                for i, row in enumerate(self.modality_mask.tolist())]

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        a = self.arrays
        image: dict[str, Any] = {}
        for m in MMSA_MODALITIES:
            image[m] = torch.from_numpy(np.ascontiguousarray(a[m][index]))
            image[f"{m}_lengths"] = torch.tensor(int(a[f"{m}_lengths"][index]), dtype=torch.int64)
        y = a[self.label_key][index]
        label = (torch.tensor([float(y)], dtype=torch.float32) if self.label_key == "regression_labels"
                 else torch.tensor(int(y), dtype=torch.int64))
        return {"image": image, "label": label, "modality_mask": torch.from_numpy(self.modality_mask[index].copy()),
                "case": str(a["id"][index])}


# -- synthetic data --------------------------------------------------------------------------------
def make_synthetic_mmsa(
    splits: Mapping[str, int] | None = None,
    layout: str = "utterance",
    dims: Sequence[int] = (100, 73, 100),
    seq_len: int = 8,
    strengths: Sequence[float] = (2.0, 0.5, 0.8),
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Synthetic MMSA-layout data with a dominant text modality.

    A latent sentiment ``z`` drives the label (``3 tanh(z)``, rounded to 0.2 as MOSI's averaged
    annotations are); each modality sees ``z`` through a random projection scaled by its strength
    plus unit noise, so text predicts best and audio worst. Audio and vision get large offsets and
    scales, as openSMILE and CNN features have, to exercise the input normalisation.

    Args:
        splits: ``{split: number of samples}``; default train 64, valid 32, test 32.
        layout: ``utterance`` (length 1), ``aligned`` (all modalities ``seq_len`` steps) or
            ``unaligned`` (per-modality lengths stored as ``<m>_lengths``, zero padding after them).
        dims: feature sizes of text, audio, vision.
        seq_len: padded sequence length for the sequence layouts.
        strengths: signal strength of each modality.
        seed: random seed.

    Returns:
        The MMSA dict ``{split: {id, raw_text, text, audio, vision, regression_labels,
        classification_labels[, audio_lengths, vision_lengths, text_lengths]}}`` with float32 features.

    Raises:
        ValueError: an unknown ``layout``, or ``dims``/``strengths`` without one value per modality.
    """
    if layout not in ("utterance", "aligned", "unaligned"):
        raise ValueError(f"layout must be utterance, aligned or unaligned, got {layout!r}.")
    for name, values in (("dims", dims), ("strengths", strengths)):
        if len(values) != len(MMSA_MODALITIES):
            # zip() below would drop the modalities without a value, and the data would lack them
            raise ValueError(f"{name} needs one value per modality {list(MMSA_MODALITIES)}, got {list(values)}.")
    splits = {"train": 64, "valid": 32, "test": 32} if splits is None else dict(splits)
    rng = np.random.default_rng(seed)
    # unit-norm projections: a modality's total signal-to-noise ratio is its strength squared
    projections = [rng.normal(size=d) / np.sqrt(d) for d in dims]
    offsets = [0.0, 5.0, 2.0]
    scales = [0.4, 20.0, 6.0]
    length = 1 if layout == "utterance" else int(seq_len)
    out: dict[str, dict[str, Any]] = {}
    for split, n in splits.items():
        z = rng.normal(size=n)
        labels = np.clip(np.round(3.0 * np.tanh(z) * 5) / 5, -3.0, 3.0).astype(np.float32)
        entry: dict[str, Any] = {
            "id": [f"{split}vid{i // 4}_{i % 4}" for i in range(n)],
            "raw_text": [f"synthetic utterance {i}" for i in range(n)],
            "regression_labels": labels,
            # IEMOCAP-style class ids derived from the same latent: negative / neutral / positive
            "classification_labels": np.digitize(labels, [-0.5, 0.5]).astype(np.int64),
        }
        for m, (name, d) in enumerate(zip(MMSA_MODALITIES, dims)):
            lengths = (np.full(n, length) if layout != "unaligned"
                       else rng.integers(max(1, length // 2), length + 1, size=n))
            signal = strengths[m] * z[:, None, None] * projections[m][None, None, :]
            x = signal + rng.normal(size=(n, length, d))
            x = (offsets[m] + scales[m] * x).astype(np.float32)
            x[np.arange(length)[None, :] >= lengths[:, None]] = 0.0
            entry[name] = x
            if layout == "unaligned":
                entry[f"{name}_lengths"] = lengths.astype(np.int64)
        out[split] = entry
    return out


def write_synthetic_mmsa(path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write :func:`make_synthetic_mmsa` data as an MMSA pickle (``.pkl``) or a converted ``.npz``."""
    path = Path(path)
    data = make_synthetic_mmsa(**kwargs)
    if path.suffix.lower() == ".npz":
        return save_mmsa_npz({k: _normalise_split(k, v, path) for k, v in data.items()}, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)
    return path


# -- command line ----------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``convert-mmsa IN.pkl OUT.npz``: rewrite a trusted MMSA pickle as a pickle-free ``.npz``."""
    parser = argparse.ArgumentParser(
        prog="python -m app convert-mmsa",
        description="Convert an MMSA feature pickle to the safe .npz layout. This unpickles IN once: "
        "run it only on a file whose source you trust; the .npz then loads without pickle.",
    )
    parser.add_argument("src", help="MMSA pickle (.pkl)")
    parser.add_argument("dst", help="output .npz")
    args = parser.parse_args(argv)
    # the sizes of the data just written: reading the .npz back took a quarter of a MOSEI conversion's time
    out, data = _convert(args.src, args.dst)
    sizes = ", ".join(f"{k}: {len(v['id'])}" for k, v in data.items())
    print(f"Wrote {out} ({sizes}; feature sizes {feature_dims(data)}).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

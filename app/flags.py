"""One strict reading of the bundles' and command lines' knobs: booleans, counts and rates.

``python -m monai.bundle run ... --amp false`` hands the config the *string* ``"false"``, which
Python's ``bool`` reads as True. Every boolean knob therefore goes through :func:`parse_bool`,
which accepts only the spellings the documentation uses and names the flag when it refuses one.
Counts (:func:`check_counts`) and rates (:func:`check_positive`) are checked where a run starts,
and where a network is built from them, so a bad value is named before torch fails on it. Folder
settings go through :func:`check_paths`: the command line reads a folder named ``2021`` as a number.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np

__all__ = ["check_bools", "check_counts", "check_paths", "check_positive", "check_share", "parse_bool"]

_TRUE = ("true", "1")
_FALSE = ("false", "0")


def parse_bool(value: Any, name: str) -> bool:
    """``value`` as a bool: a bool, ``0``/``1``, or ``"true"``/``"false"``/``"1"``/``"0"`` (any case).

    Args:
        value: the knob's value, from a config file or the command line.
        name: the knob, as its command-line flag is spelt without ``--`` (for the error message).

    Raises:
        ValueError: any other value (``"yes"``, ``"ture"``, ``None``, ...): a typo must never switch
            a behaviour such as trusting a pickle.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError(f"--{name} must be true or false, got {value!r}: pass --{name} true or --{name} false.")


def check_bools(**values: Any) -> None:
    """Raise :func:`parse_bool`'s ``ValueError`` naming the first knob (``amp=...``) that is not true or false.

    Checked where a run starts, with :func:`check_counts`: knobs read only when the trainer is built
    (``amp``, ``progress_bar``) were otherwise refused after the data split, ``models/`` and
    ``tensorboard/`` had been written into the output folder.
    """
    for name, value in values.items():
        parse_bool(value, name)


def _check_each(values: Mapping[str, Any], ok: Callable[[Any], bool], requirement: str, example: Any) -> None:
    """Raise a ``ValueError`` naming the first setting whose value fails ``ok`` (or is a bool)."""
    for name, value in values.items():
        try:
            good = not isinstance(value, bool) and ok(value)
        except (TypeError, ValueError):
            good = False
        if not good:
            raise ValueError(f"--{name} {value!r} must be {requirement}, e.g. --{name} {example}.")


def check_counts(at_least: int = 1, **counts: Any) -> None:
    """Raise a ``ValueError`` naming the setting when a count (``max_epochs=...``) is not a whole number
    >= ``at_least`` (0 for settings where 0 means off, such as ``checkpoint_interval``).

    A count is an integer, or its digits as text (a quoted YAML value, ``python -m app ablate``'s ``gmd:5``); a
    float is refused even when whole: ``--batch_size 2.0`` reached torch's ``DataLoader`` and ``--num_samples 2.0``
    MONAI's crop as a float, which they refuse with a traceback (the crop only at the first training step).
    Checked before the data split is written, so such a run leaves nothing behind.
    """
    for name, value in counts.items():
        if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
            raise ValueError(f"--{name} {value!r} must be a whole number written without a decimal point (a count "
                             f"that is a float stops torch), e.g. --{name} {int(value)}.")
    _check_each(counts, lambda v: int(v) == float(v) and int(v) >= at_least, f"a whole number >= {at_least}",
                max(at_least, 1))


def check_positive(allow_zero: bool = False, **values: Any) -> None:
    """Raise a ``ValueError`` naming the setting when a value (``learning_rate=...``) is not a finite
    number > 0 (>= 0 with ``allow_zero``, e.g. ``weight_decay``, which the optimizer refuses below 0 only
    when the trainer is built, with a traceback); checked with :func:`check_counts`, before the data split
    is written."""
    if allow_zero:
        _check_each(values, lambda v: math.isfinite(float(v)) and float(v) >= 0, "a number >= 0", 0.01)
    else:
        _check_each(values, lambda v: math.isfinite(float(v)) and float(v) > 0, "a number > 0", 0.001)


def check_paths(**paths: Any) -> None:
    """Raise a ``ValueError`` naming the setting when a path (``dataset_dir=...``) is a number or a bool.

    ``python -m monai.bundle run`` reads its values as Python literals (python-fire), so
    ``--dataset_dir 2021``, a folder named after a BraTS release, reaches the config as the number
    2021 (and ``3.10`` as 3.1): the run then stopped with ``TypeError: expected str, bytes or
    os.PathLike object, not int`` at the bottom of a traceback. ``None`` (not given) passes.
    """
    for name, value in paths.items():
        if isinstance(value, (bool, int, float, np.bool_, np.number)):
            example = f"./{value}" if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else "./NAME"
            raise ValueError(f"--{name} {value} was read as a number, not as a folder or file (the command line "
                             f"reads a bare name such as 2021 as one): write it as a path, e.g. --{name} {example}, "
                             "or give its absolute path.")


def check_share(**values: Any) -> None:
    """Raise a ``ValueError`` naming the setting when a value (``sw_overlap=...``) is not a number >= 0 and
    < 1; checked with :func:`check_counts`, before the data split is written (MONAI's sliding window refused
    ``--sw_overlap 1`` only at the first validation, with a traceback)."""
    _check_each(values, lambda v: 0 <= float(v) < 1, "a number >= 0 and < 1", 0.5)

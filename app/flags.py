"""One strict reading of true/false for every boolean knob of the bundles and command lines.

``python -m monai.bundle run ... --amp false`` hands the config the *string* ``"false"``, which
Python's ``bool`` reads as True. Every boolean knob therefore goes through :func:`parse_bool`,
which accepts only the spellings the documentation uses and names the flag when it refuses one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["parse_bool"]

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

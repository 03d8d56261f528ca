"""The command line of ``python -m monai.bundle run``, checked against the bundle's settings.

MONAI adds an unknown ``--key`` to the config as a new, unused entry, so a misspelt override is
silently ignored and the run uses the default. Training, evaluation and batch inference alike call
:func:`check_overrides` first. This module needs no engine: the inference image imports it too.
"""

from __future__ import annotations

import ast
import difflib
import os
import re
import sys
from typing import Any, Sequence

import monai

__all__ = ["check_overrides"]

_MONAI_DIR = os.path.dirname(os.path.abspath(monai.__file__)) + os.sep

# the arguments of ``monai.bundle run`` itself; every other ``--key`` is a config override
_RUN_ARGS = frozenset({"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking",
                       "args_file"})


def _cli_options(args: Sequence[str]) -> dict[str, str | None]:
    """``--key value`` / ``--key=value`` pairs of a ``monai.bundle run`` command line, keys as Fire
    reads them (``-`` becomes ``_``)."""
    options: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--") or len(arg) == 2:
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq and i < len(args) and not args[i].startswith("--"):
            value = args[i]
            i += 1
        options[key.replace("-", "_")] = value if (eq or value) else None
    return options


def check_overrides(argv: Sequence[str] | None = None) -> None:
    """Refuse a ``--key`` of ``python -m monai.bundle run`` that names no setting of the config files.

    MONAI adds an unknown key to the config as a new, unused entry, so a misspelt override
    (``--patch_sizes``, ``--max_epoch``) is silently ignored and the run uses the default: a
    reproduced table then quietly differs. Only the command line of ``python -m monai.bundle``
    (``sys.argv``, also under ``torchrun``) is checked; an in-process ``monai.bundle.run(...)`` is
    not, since its keywords cannot be told apart from the config here.

    Raises:
        ValueError: names the unknown key, the close settings and the config files.
    """
    from monai.bundle import ConfigParser

    argv = list(sys.argv if argv is None else argv)
    if not argv or not os.path.abspath(argv[0]).startswith(os.path.join(_MONAI_DIR, "bundle") + os.sep):
        return
    options: dict[str, Any] = _cli_options(argv[1:])
    if options.get("args_file"):  # defaults and overrides from a file, the command line wins
        options = {**ConfigParser.load_config_file(options["args_file"]), **options}
    config_file: Any = options.get("config_file")
    if not config_file:
        return
    if isinstance(config_file, str) and config_file.lstrip().startswith("["):
        try:
            config_file = ast.literal_eval(config_file)
        except (ValueError, SyntaxError):
            return  # MONAI reports the malformed list itself
    known = set(ConfigParser.load_config_files(config_file)) | {"_meta_"}
    for key in options:
        top = re.split(r"::|#", key, maxsplit=1)[0]
        if key in _RUN_ARGS or top in known:
            continue
        close = difflib.get_close_matches(top, sorted(known), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join('--' + c for c in close)}?" if close else "check its spelling."
        files = config_file if isinstance(config_file, str) else ", ".join(map(str, config_file))
        raise ValueError(f"--{key} is not a setting of {files}: {hint} The run would ignore it and use the default; "
                         "the settings are the top-level keys of those files.")

"""Command line: ``python -m app <command> ...``.

Commands:
    phantoms        write BraTS-named synthetic cases (the built-in demo data)
    plot-conflicts  plot GMD conflict diagnostics of a training run
    convert-mmsa    convert a trusted MMSA feature pickle to the safe .npz layout
    infer           segment one case from any subset of FLAIR, T1, T1ce, T2
    ablate          train a bundle with several strategies at the same seed and budget; tabulate
    compare         tabulate evaluation reports made apart, each model against the first case by case
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

COMMANDS = {
    "phantoms": "app.data.phantoms",
    "convert-mmsa": "app.data.mmsa",
    "plot-conflicts": "app.reports.conflicts",
    "infer": "app.inference.cli",
    "ablate": "app.ablation",
    "compare": "app.reports.compare",
}


def main(argv: list[str] | None = None) -> int:
    """Run ``<command> ...`` (default: ``sys.argv[1:]``); returns its exit status, 2 with one line on stderr
    for an unknown command or a ``ValueError``/``FileNotFoundError`` of the command, or an output it could not
    write (:class:`app.atomic.WriteError`: a full disk, a read-only folder)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"Unknown command {command!r}: choose one of {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    from app.atomic import WriteError, run_interruptible

    def work() -> int:
        # imported here: torch takes seconds to import, and Ctrl-C then printed an import traceback
        module = importlib.import_module(COMMANDS[command])
        try:
            return int(module.main(rest) or 0)
        except (ValueError, FileNotFoundError, WriteError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # the reader went away (`python -m app compare ... | head`): as coreutils end
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
            return 128 + 13  # SIGPIPE's status

    return run_interruptible(work)


if __name__ == "__main__":
    from app.atomic import exit_with

    exit_with(main())

"""Atomic file writes: readers see the previous file or the complete new one, never a partial write.

Every writer of results, datalists, checkpoints and exported models goes through
:func:`atomic_write`: the data goes to a temporary file ``.<name>.<pid>.<random>.tmp`` in the same
folder (a rename is atomic only within one file system), is flushed and fsynced, optionally
checked, then ``os.replace`` moves it over the destination. On an error (or a failed check) the
temporary file is removed and the destination is untouched; after a kill it stays behind, and
:func:`stale_temporaries` finds it. :func:`run_interruptible` makes SIGTERM (``docker stop``, a
scheduler's cancel) unwind like Ctrl-C, so the command-line tools remove their temporaries then too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import sys
import tempfile
import threading
import unicodedata
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Mapping, NoReturn

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "check_path_text", "check_writable_folder",
           "escape_unsafe", "exit_with", "fsync_dir", "lock_folder", "locked_folder", "missing_hint",
           "run_interruptible", "remove_abandoned_temporaries", "replace_file_set", "stale_temporaries",
           "unexpanded_home", "unsafe_character", "write_error", "WriteError"]


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries to disk, so a rename in it survives a power loss (POSIX; a no-op
    where folders cannot be opened, e.g. on Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _RecordingFile:
    """A binary file whose ``write`` keeps the ``OSError`` it raised (``error``), for writers that
    replace it with an error of their own; everything else is the file's."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str) -> object:
        return getattr(self.file, name)


#: the fix named when an output folder cannot take new files (inference; the bundles name their option)
_WRITE_FIX = ("choose a folder you can write to (Docker: mount it writable for the user the container runs as, "
              "--user $(id -u):$(id -g))")


#: Unicode categories of the characters a path or a case id may not hold: control characters (C0 and C1: a
#: carriage return from a job script saved with Windows line endings, a tab, a newline that splits a one-line message
#: or a report row, an escape sequence that rewrites a terminal line), format characters (bidi overrides, zero-width
#: spaces: the name reads as another), line and paragraph separators, and the surrogates Python gives the bytes of a
#: file name that are not UTF-8 (printing them fails).
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
#: Format characters that are part of how words are written in some scripts (the zero-width non-joiner and joiner
#: of Persian and Indic names), not a way to hide or reorder text: accepted.
_WRITING_JOINERS = frozenset({"\u200c", "\u200d"})


def unsafe_character(char: str) -> bool:
    """Whether ``char`` is one a path or a case id must not hold: a control or invisible character (see
    :data:`_UNSAFE_CATEGORIES`). Output paths (:func:`check_path_text`) and case discovery both ask here, so
    that a name refused as a case id is refused as an output path too."""
    return unicodedata.category(char) in _UNSAFE_CATEGORIES and char not in _WRITING_JOINERS


def escape_unsafe(text: str) -> str:
    """``text`` with each character :func:`unsafe_character` refuses written as its escape (``\\r``, ``\\u202e``),
    so that it prints on one line and as it is spelt: printed as it is, a carriage return sends the rest of the
    message over its start, and a bidi override reverses it."""
    return "".join(repr(c)[1:-1] if unsafe_character(c) else c for c in text)


def unexpanded_home(path: str | os.PathLike) -> str | None:
    """The path a leading ``~`` stands for, when the shell left it unexpanded (quoted, or after ``=``); else None."""
    text = os.fspath(path)
    expanded = os.path.expanduser(text)
    return expanded if text.startswith("~") and expanded != text else None


def check_path_text(path: str | os.PathLike, what: str) -> None:
    """Raise ``ValueError`` for an output path as the shell should not have left it.

    - A ``~`` the shell left unexpanded: only the shell expands ``~``, and not in quotes or after ``=``
      (``--out=~/x``, ``--output_dir=~/runs``). Unexpanded, the output went into a folder named ``~`` under
      the current one, while the inputs came from the home folder (case discovery expands ``~``), and a
      bundle training split its files between the two (ignite's checkpoint saver expands ``~``, the other
      writers do not).
    - A control or invisible character (:func:`unsafe_character`, the characters a case id may not hold
      either), mostly the carriage return that ends every line of a job script saved with Windows line
      endings: the last argument of a line (``--output_dir /data/out``) carries it, and the run wrote into a
      folder named ``out\\r``, which every message showed as ``out``. A bidi override or a C1 control made the
      path print as another, and was written as it was.

    Args:
        path: the output file or folder, as given.
        what: the option and value that gave it, named first in the message.
    """
    text = os.fspath(path)
    if any(unsafe_character(c) for c in text):
        cause = ("ends with a carriage return (\\r): the job script has Windows line endings; convert it with "
                 "dos2unix SCRIPT (or sed -i 's/\\r$//' SCRIPT)") if text.endswith("\r") else \
            "holds a control or invisible character: retype the path"
        raise ValueError(f"{escape_unsafe(what)}: the path {text!r} {cause}.")
    home = unexpanded_home(text)
    if home is not None:
        raise ValueError(f"{what}: '~' is not expanded here (the shell expands it only unquoted and not after "
                         f"'='): give {home} instead of a folder named '~' in {os.getcwd()}.")


def missing_hint(path: str | os.PathLike) -> str:
    """For the message of an input that was not found: why a path that looks right is not there, or ``""``.

    ``--ckpt_path=~/runs/model.pt`` (a ``~`` the shell leaves alone after ``=`` or in quotes) was reported as
    not found although the file exists: the message names the path to give instead. A scan that ``ls`` lists
    but that is a symbolic link to a moved or unmounted file gets the link's target named, and a path that
    ends with the carriage return of a job script with Windows line endings gets that said.
    """
    text = os.fspath(path)
    if text.endswith("\r"):
        return (" (the path ends with a carriage return, \\r: the job script has Windows line endings; convert it "
                "with dos2unix SCRIPT)")
    home = unexpanded_home(text)
    if home is not None:
        return f" ('~' is not expanded here: the shell expands it only unquoted and not after '='; give {home})"
    if os.path.islink(text) and not os.path.exists(text):
        return f" (it is a symbolic link to {os.readlink(text)}, which does not exist: a moved or unmounted file)"
    return ""


def check_writable_folder(folder: str | os.PathLike, what: str, file_fix: str = "choose another output folder",
                          write_fix: str = _WRITE_FIX) -> None:
    """Raise ``ValueError`` unless files can be created in ``folder`` (or, when it does not exist yet,
    in the folder it would be created in): checked before any work, so nothing runs for an output
    that cannot be written, and nothing is created for a refused run. A path starting with ``~`` that the
    shell left unexpanded (quoted, or after ``--out=``) is refused with the path it stands for, and so is a
    symbolic link on the path whose target does not exist.

    Args:
        folder: the output folder.
        what: the option and value that gave it, named first in the message.
        file_fix: the fix when a file stands where a folder of the path should be.
        write_fix: the fix when the folder cannot be written.
    """
    check_path_text(folder, what)
    wanted = os.path.abspath(os.fspath(folder))
    probe_dir = wanted
    while not os.path.exists(probe_dir):
        if os.path.islink(probe_dir):
            # a link to a disk that is not mounted (or a moved folder): the folder cannot be made in its place,
            # and the run stopped with FileExistsError when it made it, after the work in single-case inference
            raise ValueError(f"{what}: {probe_dir} is a symbolic link to {os.readlink(probe_dir)}, which does not "
                             "exist (a disk that is not mounted, or a moved folder): mount or create its target, or "
                             "choose another output folder.")
        parent = os.path.dirname(probe_dir)
        if parent == probe_dir:  # e.g. a drive or share that is not there
            raise ValueError(f"{what}: no part of {wanted} exists: choose an output folder on a disk that is mounted.")
        probe_dir = parent
    if not os.path.isdir(probe_dir):
        raise ValueError(f"{what}: {probe_dir} is a file, not a folder: {file_fix}.")
    try:  # a real file: permissions, read-only mounts and immutable folders all show here
        fd, probe = tempfile.mkstemp(prefix=".brats_gmd_write_test.", dir=probe_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"{what}: cannot write in {probe_dir} ({err.strerror or err}): {write_fix}.") from None


#: Descriptors holding a :func:`lock_folder` lock in this process, with the (device, inode) of their folder: a
#: forked child closes its copies.
_HELD_LOCKS: dict[int, tuple[int, int]] = {}


def _drop_inherited_locks() -> None:
    """In a forked child (a data-loader worker), close the copies of the parent's folder locks: an ``flock``
    lasts until every descriptor sharing it is closed, so workers outliving a stopped run by a second or two
    kept its output folder locked, and the resume a scheduler starts at once was refused as a second run.
    Closing (not unlocking) leaves the parent's lock in place. A descriptor the caller of :func:`lock_folder`
    closed itself may since hold another file under the same number: only one still open on its folder is
    closed (closing another file broke the child)."""
    for fd, folder in _HELD_LOCKS.items():
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == folder:
                os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


def lock_folder(folder: str | os.PathLike) -> int | None:
    """Take the kernel's exclusive lock (``flock``) on ``folder`` itself (created if need be), without waiting.

    No lock file is left behind, and the kernel releases the lock of a killed process, so a crashed run
    never blocks the next one.

    Returns:
        The descriptor holding the lock (closing it releases the lock), or ``None`` where the folder
        cannot be locked: Windows, a folder that may be written but not listed (mode ``-wx``), a file
        system without folder locks (some network mounts). The caller then runs unlocked.

    Raises:
        BlockingIOError: another process holds the lock.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        return None
    os.makedirs(folder, exist_ok=True)
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:
        os.close(fd)
        return None
    st = os.fstat(fd)
    _HELD_LOCKS[fd] = (st.st_dev, st.st_ino)
    return fd


@contextlib.contextmanager
def locked_folder(folder: str | os.PathLike, busy: str) -> Iterator[None]:
    """Hold :func:`lock_folder` on ``folder`` for the ``with`` block (unlocked where it cannot be locked).

    Args:
        folder: the output folder, created if need be.
        busy: the error message when another process holds it (name the folder and the fix).

    Raises:
        ValueError: ``busy``, when another process holds the lock.
    """
    try:
        fd = lock_folder(folder)
    except BlockingIOError:
        raise ValueError(busy) from None
    try:
        yield
    finally:
        if fd is not None:
            _HELD_LOCKS.pop(fd, None)
            os.close(fd)  # releases the lock


class WriteError(OSError):
    """An output could not be written (a full disk, a quota, a read-only folder or file): the message names
    the file and the fix, and ``errno`` is the disk's. The command-line tools print it as their one ``error:``
    line, as a bundle run does, where another ``OSError`` (a bug) keeps its traceback."""


def write_error(err: OSError, path: str | os.PathLike, error_type: type[OSError] = WriteError) -> OSError:
    """An ``error_type`` (by default a :class:`WriteError`) for a failed write of ``path`` that names the file
    and the fix.

    The disk's own errors (``[Errno 28] No space left on device``) name neither: a full disk at the
    end of an evaluation or a training epoch used to end in a traceback with that line at its bottom.
    The errno is kept.
    """
    reason = err.strerror or " ".join(str(err).split()) or type(err).__name__
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space on that disk (or raise the quota), or write to another folder"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "make the folder writable, or write to another folder"
    elif err.errno == errno.ENAMETOOLONG:
        # the name may fit, and the hidden temporary written first (some 30 characters longer) not
        fix = (f"use a shorter name ({len(os.fsencode(os.path.basename(os.fspath(path))))} bytes; file systems allow "
               "255 per name, and the temporary file written first adds about 30); in a batch, shorten the case's name")
    else:
        fix = "check that disk, or write to another folder"
    error = error_type(f"Cannot write {os.fspath(path)} ({reason}): {fix}.")
    error.errno = err.errno  # set after: error_type(errno, text) would print "[Errno 28]" before the text
    return error


def _write_temporary(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write a complete, fsynced temporary file beside ``path`` with ``write(binary_file)`` (parent folders
    created) and return its path; on an error nothing is left. Named as :data:`_TEMPORARY_NAME` says, so
    that :func:`remove_abandoned_temporaries` finds one a kill left."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        raise write_error(err, path) from err
    try:
        out = _RecordingFile(os.fdopen(fd, "wb"))
        try:
            with out.file:
                write(out)  # type: ignore[arg-type]
                out.file.flush()
                os.fsync(out.file.fileno())
        except OSError as err:  # a full disk, a quota: name the file and the fix
            raise write_error(err, path) from err
        except Exception as err:
            if out.error is None:
                raise
            # torch.save turns the disk's error into "RuntimeError: ... unexpected pos 704 vs 598"
            raise write_error(out.error, path) from err
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[BinaryIO], None],
    sync_dir: bool = False,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``path`` atomically with ``write(binary_file)``.

    Parent folders are created; the file gets the usual ``0o666 & ~umask`` permissions.

    Args:
        path: the destination.
        write: writes the whole content into the open binary file it is given.
        sync_dir: also fsync the folder after the rename (checkpoints: the new file survives a
            power loss, not only a killed process).
        check: called with the path of the complete temporary file before it replaces ``path``
            (e.g. reload and verify an exported model); whatever it raises is raised with ``path``
            left as it was.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: the file could not be written (a full disk, a quota, a read-only folder); the message
            names ``path`` and the fix (:func:`write_error`), and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = _write_temporary(path, write)
    try:
        if check is not None:
            check(tmp)  # what it raises is its own message
        try:
            os.replace(tmp, path)
        except OSError as err:
            raise write_error(err, path) from err
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)
    return path


def replace_file_set(files: Mapping[str | os.PathLike, bytes | None], last: str | os.PathLike) -> list[Path]:
    """Replace a set of files that describe one result together, so that no reader takes files of two
    runs for one set.

    Each file written one by one (atomically) left, after a kill or a full disk between two of them, a
    new file beside its predecessor's siblings, and nothing told them apart. Here every new file is
    written to a temporary first (a full disk or any error stops the call with the previous set as it
    was); then ``last``, the file that marks a whole set, is removed, then the other old files, then the
    new ones are renamed into place and ``last`` comes last. Renames and removals take no space and
    a moment, and at every instant the folder holds either a whole set, with ``last``, or part of one
    run's set without ``last``: never a file beside a sibling of another run.

    Args:
        files: every file of the set (the same folder), with its new bytes, or ``None`` for a file that has
            no part in the new set (a picture that is not drawn): an old one is removed.
        last: the file among ``files`` whose presence says that the set is whole (written last, removed first).

    Returns:
        The files written, ``last`` last.

    Raises:
        OSError: a file could not be written (:func:`write_error`); the previous set is left as it was.
    """
    paths = {Path(p): data for p, data in files.items()}
    last = Path(last)
    if paths.get(last) is None:
        raise ValueError(f"{last} must be one of the files to write, with its bytes.")
    order = [p for p in paths if p != last] + [last]
    staged: dict[Path, Path] = {}
    try:
        for path in order:
            data = paths[path]
            if data is not None:
                staged[path] = _write_temporary(path, lambda f, data=data: f.write(data))
        # from here on nothing needs space: the old set goes (its marker first), then the new one comes
        for path in (last, *order[:-1]):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for path in order:
            if path in staged:
                try:
                    os.replace(staged[path], path)
                except OSError as err:
                    raise write_error(err, path) from err
                del staged[path]
    except BaseException:
        for tmp in staged.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    fsync_dir(last.parent)
    return [p for p in order if paths[p] is not None]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


#: the name :func:`atomic_write` gives its temporary file: ``.<name>.<process id>.<8 hex digits>.tmp``
_TEMPORARY_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")


def remove_abandoned_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files :func:`atomic_write` left in ``folder`` when its process was killed.

    A kill mid-write (SIGKILL, the out-of-memory killer) leaves a hidden ``.<name>.<pid>.<hex>.tmp``.
    Those whose writer is gone are removed; those of a process still running (an evaluation writing
    into the same folder) stay.

    Returns:
        The files removed.
    """
    removed: list[Path] = []
    if not os.path.isdir(folder):
        return removed
    for entry in os.scandir(folder):
        match = _TEMPORARY_NAME.fullmatch(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        try:
            os.kill(int(match.group("pid")), 0)  # signal 0: only asks whether the process exists
            continue
        except ProcessLookupError:
            pass
        except OSError:  # it exists (another user's process)
            continue
        with contextlib.suppress(FileNotFoundError):
            os.remove(entry.path)
            removed.append(Path(entry.path))
    return sorted(removed)


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files :func:`atomic_write` left next to ``path`` when its process was killed mid-write."""
    target = Path(path)
    if not target.parent.is_dir():
        return []
    return sorted(target.parent.glob(f".{target.name}.*.tmp"))


class _Stopped(KeyboardInterrupt):
    """A stop request by signal, raised in the main thread so that cleanup code runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def run_interruptible(work: Callable[[], int]) -> int:
    """Run a command-line tool's ``work`` so that SIGTERM and Ctrl-C stop it cleanly.

    Python ignores SIGTERM's default action only as PID 1 (a container's entrypoint), and otherwise
    dies without unwinding, leaving temporaries behind. Here both signals raise in the main thread:
    every write in progress removes its temporary file, and the tool prints one line and returns
    128 + the signal number (130 for Ctrl-C, 143 for SIGTERM), which :func:`exit_with` turns back
    into death by that signal. Outputs finished before the stop stay.
    """
    def stop(signum: int, frame: object) -> None:
        raise _Stopped(signum)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
    try:
        return work()
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"error: stopped by {signal.Signals(signum).name}: the file being written was removed; what was "
              "finished before the stop is kept.", file=sys.stderr)
        return 128 + int(signum)
    finally:
        if main_thread:
            # None: a handler installed outside Python, which cannot be put back; the default then
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def exit_with(status: int) -> NoReturn:
    """End the process with ``status``; a :func:`run_interruptible` stop (130, 143) ends it by that
    signal instead, so that a calling shell sees the signal (a loop over cases stops at Ctrl-C).
    As PID 1 (a container) the signal's default action would be ignored, so the status is used."""
    signum = status - 128
    if signum in (signal.SIGINT, signal.SIGTERM) and os.getpid() != 1:
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    sys.exit(status)

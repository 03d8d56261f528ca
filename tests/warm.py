"""Runs of ``python -m monai.bundle …`` and ``python -m app ablate …`` for the tests, without their imports each time.

Such a run spends about 5 s of a CPU core importing torch, MONAI and ignite before the product's code starts, and the
suite starts well over a hundred of them. :func:`run` hands each to a server (one per test process and kind of run) that
made those imports once and forks a child per run. The child is a process of its own, with the run's working
directory, environment, exit status, standard streams and signal handlers, and starts from the state a fresh
interpreter reaches after the same imports (the modules a run imports first anyway); it then runs the module as
``python -m`` does, and ends as the interpreter does (non-daemon threads joined, ``atexit`` functions run).

A run is forked only where that start is the same as a fresh one's:

- the variables read while those modules load (``OMP_*``, ``MKL_*``, ``PYTHON*`` but ``PYTHONPATH``, ``TORCH*``,
  ``MONAI*``, ``CUDA*``, …) are the server's: a run with other values gets a server of its own;
- a command other than ``python -m monai.bundle …`` or ``python -m app ablate …``, or a machine without
  ``os.fork`` and ``os.pidfd_open`` (Linux 5.3 and later have them), runs in a fresh interpreter, as
  ``subprocess.run`` does.

The signal handlers a child starts with are those the test process had when its server started (a test that
changes them for a run it starts uses ``subprocess``), and so are the tests that signal a run or need it to be
the test process's own child.
"""

from __future__ import annotations

import atexit
import importlib
import json
import locale
import os
import random
import runpy
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

__all__ = ["run"]

REPO = Path(__file__).resolve().parents[1]

#: what a server imports before it forks, per kind of run: the first imports of ``python -m monai.bundle`` (its
#: package and what its ``__main__`` imports) and of ``python -m app ablate``
PRELOAD: dict[tuple[str, ...], tuple[str, ...]] = {
    ("monai.bundle",): ("monai.bundle", "monai.bundle.scripts", "monai.utils", "fire"),
    ("app", "ablate"): ("app", "app.atomic", "app.ablation"),
}
#: environment variables read while torch, its libraries, numpy or MONAI load, or by the interpreter at its start
_LOAD_TIME_PREFIXES = ("PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS", "GOTO", "VECLIB", "NUMEXPR", "TORCH",
                       "PYTORCH", "CUDA", "NVIDIA", "MONAI", "LD_", "MALLOC", "KINETO", "NUMPY")
_READY = b"ready\n"


def _load_time_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_LOAD_TIME_PREFIXES) and k != "PYTHONPATH"}


def _kind(cmd: Sequence[str]) -> tuple[str, ...] | None:
    args = [str(a) for a in cmd]
    if len(args) < 3 or args[0] != sys.executable or args[1] != "-m":
        return None
    for kind in PRELOAD:
        if tuple(args[2:2 + len(kind)]) == kind:
            return kind
    return None


# ---------------------------------------------------------------------------------------------------------------
# the server, in a process of its own: python -m tests.warm SOCKET MODULE...


def _exit_code(code: Any) -> int:
    """The exit status of ``SystemExit(code)``, as the interpreter gives it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _open_on(fd: int, path: str, flags: int) -> None:
    new = os.open(path, flags, 0o644)
    os.dup2(new, fd)
    os.close(new)


def _child(request: dict[str, Any], server_fds: list[int]) -> None:
    """Become the run of ``request`` and end with its exit status; never returns."""
    code = 1
    try:
        for fd in server_fds:
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        _open_on(0, os.devnull, os.O_RDONLY)
        _open_on(1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        _open_on(2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        # a fresh interpreter seeds these from the system; forked children would all share the server's state
        random.seed()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        # python -m puts the working directory first, then PYTHONPATH, then the installation's own entries
        extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [request["cwd"], *extra, *request["base_path"]]
        module, *args = request["argv"][2:]  # after the interpreter and -m
        sys.argv = [module, *args]  # runpy puts the module's file first, as python -m does
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except KeyboardInterrupt:
            sys.excepthook(*sys.exc_info())
            code = -signal.SIGINT
        except BaseException:  # noqa: BLE001 - the interpreter reports any error the same way
            sys.excepthook(*sys.exc_info())
            code = 1
        threading._shutdown()  # noqa: SLF001 - what the interpreter does at exit: join the non-daemon threads
        atexit._run_exitfuncs()  # noqa: SLF001
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed stream has nothing left to write
                pass
    finally:
        if code < 0:  # ended by Ctrl-C: the interpreter ends by the signal itself
            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
        os._exit(code)


def _serve(sock_path: str, modules: list[str]) -> None:
    for name in modules:
        importlib.import_module(name)
    # without the working directory python -m put first, nor this server's PYTHONPATH: each run puts its own
    own = set(filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    base_path = [p for p in sys.path[1:] if p not in own]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(16)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(0, selectors.EVENT_READ, "client")
    waiting: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, connection)
    os.write(1, _READY)
    while True:
        for key, _ in selector.select():
            if key.data == "client":
                if not os.read(0, 4096):  # the test process ended
                    for pid, _conn in waiting.values():
                        os.kill(pid, signal.SIGKILL)
                    return
            elif key.data == "accept":
                conn, _ = listener.accept()
                request = json.loads(_read_line(conn, bytearray()))
                request["base_path"] = base_path
                sys.stdout.flush()
                sys.stderr.flush()
                fds = [listener.fileno(), selector.fileno(), conn.fileno(),
                       *[fd for fd in waiting], *[c.fileno() for _, c in waiting.values()]]
                pid = os.fork()
                if pid == 0:
                    _child(request, fds)
                pidfd = os.pidfd_open(pid)
                waiting[pidfd] = (pid, conn)
                selector.register(pidfd, selectors.EVENT_READ, "exit")
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            else:
                pidfd = key.fd
                pid, conn = waiting.pop(pidfd)
                selector.unregister(pidfd)
                os.close(pidfd)
                _, status = os.waitpid(pid, 0)
                try:
                    conn.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
                except OSError:  # the test gave up on it (a timeout)
                    pass
                conn.close()


# ---------------------------------------------------------------------------------------------------------------
# the client, in the test process


def _read_line(conn: socket.socket, buffer: bytearray) -> bytes:
    while b"\n" not in buffer:
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError("the warm server closed the connection")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


class _Server:
    def __init__(self, kind: tuple[str, ...], load_env: dict[str, str]):
        self.folder = tempfile.mkdtemp(prefix="warm-")
        if len(self.folder) > 90:  # a socket's path holds at most 107 bytes on Linux
            os.rmdir(self.folder)
            self.folder = tempfile.mkdtemp(prefix="warm-", dir="/tmp")
        self.socket = os.path.join(self.folder, "socket")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        env = {k: v for k, v in env.items() if not k.startswith(_LOAD_TIME_PREFIXES) or k == "PYTHONPATH"}
        env.update(load_env)
        self.log = open(os.path.join(self.folder, "server.log"), "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.warm", self.socket, *PRELOAD[kind]], cwd=REPO,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        if self.proc.stdout.readline() != _READY:
            self.proc.wait()
            log = Path(self.folder, "server.log").read_text()[-3000:]
            self.stop()  # nothing keeps it: its folder goes now
            raise RuntimeError(f"the warm server for {' '.join(kind)} did not start:\n{log}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.log):
            stream.close()
        for name in ("socket", "server.log"):
            Path(self.folder, name).unlink(missing_ok=True)
        os.rmdir(self.folder)


_servers: dict[tuple[tuple[str, ...], tuple[tuple[str, str], ...]], _Server] = {}
_lock = threading.Lock()


def _stop_servers(kind: tuple[str, ...] | None = None) -> None:
    """Stop the servers of ``kind`` (all by default)."""
    with _lock:
        for key in [k for k in _servers if kind is None or k[0] == kind]:
            _servers.pop(key).stop()


def _server(kind: tuple[str, ...], env: dict[str, str]) -> _Server | None:
    if not (hasattr(os, "fork") and hasattr(os, "pidfd_open")):
        return None
    load_env = _load_time_env(env)
    key = (kind, tuple(sorted(load_env.items())))
    with _lock:
        server = _servers.get(key)
        if server is None or not server.alive():
            if server is not None:  # ended: its log and socket folder go with it, and it with them
                _servers.pop(key).stop()
            server = _servers[key] = _Server(kind, load_env)
    return server


def _text(path: str) -> str:
    data = Path(path).read_bytes().decode(locale.getpreferredencoding(False))
    return data.replace("\r\n", "\n").replace("\r", "\n")  # subprocess.run(text=True) reads universal newlines


def run(cmd: Sequence[str], *, cwd: str | os.PathLike = REPO, env: dict[str, str] | None = None,
        timeout: float | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)``, forked from a warm
    server where the command and its environment allow it (see the module's docstring)."""
    env = dict(os.environ if env is None else env)
    kind = _kind(cmd)
    server = None if kind is None else _server(kind, env)
    if server is None:
        return subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="warm-run-") as folder:
        out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        request = {"argv": [str(a) for a in cmd], "cwd": os.path.abspath(cwd), "env": env, "stdout": out,
                   "stderr": err}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(server.socket)
            conn.sendall(json.dumps(request).encode() + b"\n")
            buffer = bytearray()
            pid = json.loads(_read_line(conn, buffer))["pid"]
            conn.settimeout(timeout)
            try:
                code = json.loads(_read_line(conn, buffer))["returncode"]
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)  # as subprocess.run does
                raise subprocess.TimeoutExpired(list(cmd), timeout, output=_text(out), stderr=_text(err)) from None
        return subprocess.CompletedProcess(list(cmd), code, _text(out), _text(err))


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2:])
else:
    atexit.register(_stop_servers)

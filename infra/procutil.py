"""Small process helpers shared by every background service (broker, app, worker, sink)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().split(b") ", 1)[1][:1] != b"Z"
    except OSError:
        return True


def read_pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno in (errno.EADDRINUSE, errno.EACCES)
    return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def spawn_detached(cmd: list[str], log_file: Path, pid_file: Path, cwd: Path) -> subprocess.Popen[bytes]:
    """A background service (the broker, the registry): its own session (a terminal's Ctrl-C or
    our exit does not stop it), output appended to ``log_file``, its pid recorded in ``pid_file``."""
    with open(log_file, "ab") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=cwd
        )
    pid_file.write_text(str(proc.pid))
    return proc


def stop_recorded(pid_file: Path, timeout: float = 30.0) -> bool:
    """Graceful stop of the service whose pid ``pid_file`` records (see :func:`terminate`), and
    the record removed. False if it was not running."""
    pid = read_pid(pid_file)
    if pid is not None:
        terminate(pid, timeout=timeout)
    pid_file.unlink(missing_ok=True)
    return pid is not None


def terminate(pid: int, timeout: float = 30.0) -> bool:
    """SIGTERM the process group, wait, then SIGKILL. Returns True if it stopped gracefully."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return True
    _signal_group(pgid, pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            _reap(pid)
            return True
        time.sleep(0.1)
    _signal_group(pgid, pid, signal.SIGKILL)
    _reap(pid)
    return False


def _signal_group(pgid: int, pid: int, sig: int) -> None:
    try:
        if pgid == pid:
            os.killpg(pgid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"

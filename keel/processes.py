"""Server processes on loopback, one way for everything that starts them: the quickstart, the
tests and the benchmarks. A free port, a process started with its output in a log file, ready
when an HTTP health route answers 200, and stopped with SIGTERM (then SIGKILL after a grace
period). A process that exits before it is ready, or is not ready in time, fails with the last
lines of its log."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from data.errors import KeelError

LOG_TAIL_LINES = 40


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {log})"


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Until `url` answers 200. Raises KeelError, with the log's last lines, if `proc` exits
    first or `timeout_s` passes."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise KeelError(f"the process exited with {proc.returncode} before {url} answered; "
                            f"last lines of {log}:\n{log_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise KeelError(f"{url} did not answer within {timeout_s:.0f}s; last lines of {log}:\n{log_tail(log)}")


def stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM, then SIGKILL after `grace_s`. A process started in a session of its own
    (`new_session=True`) is signalled with its whole process group (its workers too)."""
    if proc.poll() is not None:
        return
    group = _own_group(proc)
    _signal(proc, signal.SIGTERM, group)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _signal(proc, signal.SIGKILL, group)
        proc.wait()


def _own_group(proc: subprocess.Popen) -> bool:
    try:
        return os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return False


def _signal(proc: subprocess.Popen, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass


def start_server(args: list[str], *, log: Path, port: int, env: dict[str, str] | None = None,
                 cwd: str | Path | None = None, health: str = "/health", timeout_s: float = 600,
                 new_session: bool = False) -> tuple[subprocess.Popen, str]:
    """(process, base URL) of a server started from `args`, listening on 127.0.0.1:`port`, once
    `health` answers 200. Its output goes to `log`. The caller stops it (`stop`)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as logf:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=new_session)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + health, proc, log, timeout_s)
    except BaseException:
        stop(proc)
        raise
    return proc, url


@contextmanager
def running_server(args: list[str], *, grace_s: float = 30, **kwargs) -> Iterator[str]:
    """`with running_server(cmd, log=..., port=...) as url:` the server is stopped on leaving,
    whatever happens (`kwargs` as for start_server)."""
    proc, url = start_server(args, **kwargs)
    try:
        yield url
    finally:
        stop(proc, grace_s)

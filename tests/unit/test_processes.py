"""keel/processes.py, the one way the quickstart, the tests and the benchmarks start servers:
a real HTTP server process on loopback is ready when it answers, stopped on leaving; one that
dies first is reported with its log."""

import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from data.errors import KeelError
from keel.processes import free_port, running_server, start_server, stop


def test_a_server_is_ready_when_it_answers_and_gone_after_the_block(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    (tmp_path / "health").write_text("ok")
    with running_server(cmd, log=tmp_path / "server.log", port=port, health="/health", timeout_s=60) as url:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            assert r.read() == b"ok"
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/health", timeout=5)


def test_a_server_that_dies_before_it_answers_is_reported_with_its_log(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('bad flag --nope'); sys.exit(3)"]
    with pytest.raises(KeelError, match=r"exited with 3 before .* answered(.|\n)*bad flag --nope"):
        start_server(cmd, log=tmp_path / "server.log", port=free_port(), timeout_s=60)


def test_stop_ends_a_process_group_started_in_its_own_session(tmp_path):
    # a server whose workers are its children (as mlflow server's are): SIGTERM to the group ends them all
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    psutil_proc = psutil.Process(proc.pid)
    for _ in range(50):
        if psutil_proc.children():
            break
        time.sleep(0.1)
    child = psutil_proc.children()[0]
    stop(proc, grace_s=10)
    child.wait(timeout=10)
    assert proc.returncode is not None and not child.is_running()

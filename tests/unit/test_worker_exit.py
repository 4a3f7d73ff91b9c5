"""How a training worker (`python -m trainer` under torchrun) ends.

A finished rank must exit 0 whatever its threads are doing: the interpreter's teardown aborted
finished ranks ("terminate called without an active exception", SIGABRT) when a thread was
inside a torch.distributed call as the teardown began; torchrun then reported a failed job for
a complete model. And a rank that dies by a fatal signal must say where it was.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from keel.torchrun import last_error_line
from dist_helpers import REPO

# A thread inside a torch.distributed call (a store wait) when the worker ends; the call returns
# while the interpreter tears down (a module's finalizer releases it and takes its time), as a
# slow store reply or a collective's thread would. Then the worker's entry point runs to its end.
WORKER_WITH_A_THREAD_IN_TORCH = textwrap.dedent("""
    import datetime, runpy, sys, threading, time
    from torch.distributed import TCPStore
    from keel.processes import free_port

    port = free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    client = TCPStore("127.0.0.1", port, is_master=False)  # a connection of the thread's own

    def waiter():
        client.wait(["released"], datetime.timedelta(seconds=60))

    threading.Thread(target=waiter, daemon=True).start()

    class ReleasedAtTeardown:
        def __init__(self, store):
            self.store = store

        def __del__(self):
            self.store.set("released", "1")
            time.sleep(30)  # ends at once when the released thread aborts the process

    sys.modules["released_at_teardown"] = type(sys)("released_at_teardown")
    sys.modules["released_at_teardown"].obj = ReleasedAtTeardown(store)
    sys.argv = ["trainer", "--help"]
    runpy.run_module("trainer", run_name="__main__", alter_sys=True)
""")


def test_a_finished_worker_exits_0_with_a_thread_inside_torch_distributed():
    proc = subprocess.run([sys.executable, "-c", WORKER_WITH_A_THREAD_IN_TORCH], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert "terminate called" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stderr[-2000:]
    # what the worker printed reached the pipe, though the process ended without the teardown
    assert proc.stdout.startswith("usage: torchrun"), proc.stdout


def test_the_same_thread_aborts_a_plain_interpreter_exit():
    """The control: without the worker's way of ending, the same thread aborts the process. If this
    stops failing (a torch or Python that survives it), the test above proves nothing."""
    plain = WORKER_WITH_A_THREAD_IN_TORCH.replace(
        'runpy.run_module("trainer", run_name="__main__", alter_sys=True)', "sys.exit(0)")
    proc = subprocess.run([sys.executable, "-c", plain], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -6, (proc.returncode, proc.stderr[-2000:])  # SIGABRT
    assert "terminate called without an active exception" in proc.stderr


def test_a_rank_killed_by_a_fatal_signal_writes_its_stack_and_the_summary_names_it(tmp_path):
    code = textwrap.dedent("""
        import os
        from trainer.resilience.launcher import report_fatal_signals

        report_fatal_signals()

        def export_the_model():
            os.abort()

        export_the_model()
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -6
    assert "Fatal Python error: Aborted" in proc.stderr
    assert "in export_the_model" in proc.stderr  # where the rank was
    log = tmp_path / "stderr.log"
    log.write_text(proc.stderr)
    # keel train's one-line summary of the failure quotes it instead of "printing no error"
    assert last_error_line(log) == "Fatal Python error: Aborted"

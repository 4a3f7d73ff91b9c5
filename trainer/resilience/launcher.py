"""A worker ends when its launcher does.

torchrun (torch elastic) starts every worker in a session of its own, so that it can signal
the worker's process group. A signal to `keel train`'s process group therefore never reaches
the workers, and a launcher killed outright (SIGKILL: `kill -9`, the OOM killer, a container
runtime killing the parent) is not there to stop them: they would train on as orphans,
holding memory, GPU memory and ports. So each worker asks the kernel for SIGKILL when its
parent dies (prctl PR_SET_PDEATHSIG, Linux), and ends at once if the parent died before it
asked. The parent is the thread that started the worker: torchrun starts and restarts workers
from its main thread. torchrun itself ends the same way with `keel train`, which started it
(keel/torchrun.py), so killing `keel train` alone ends the job too.

A worker also ends without the interpreter's teardown once its outcome is settled (`leave`).
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import signal
import sys

LAUNCHER_PID_ENV = "KEEL_LAUNCHER_PID"  # set by keel.torchrun for its workers: their parent's pid
TRAIN_PID_ENV = "KEEL_TRAIN_PID"  # set by keel train for keel.torchrun: its parent's pid
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def end_with_parent(parent: int) -> None:
    """On Linux: SIGKILL this process when its parent (pid `parent`) dies, and now if it has."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != parent:  # it died before the request: no signal will come
        os.kill(os.getpid(), signal.SIGKILL)


def end_with_launcher() -> None:
    """Under torchrun: end this worker when its parent, the launcher, dies."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return  # not a torchrun worker (a single `python -m trainer`): nothing to end with
    # keel.torchrun passes its pid; under a plain torchrun the parent now stands in for it (exact
    # unless the launcher died in the instant since it started this process)
    end_with_parent(int(os.environ.get(LAUNCHER_PID_ENV) or os.getppid()))


def report_fatal_signals() -> None:
    """A rank killed by SIGSEGV, SIGABRT, SIGBUS, SIGFPE or SIGILL writes every thread's Python
    stack to its stderr first ("Fatal Python error: Aborted", then the stacks): without it such
    a rank ends printing nothing, and nobody can tell where it was."""
    faulthandler.enable(all_threads=True)


def leave(code: int) -> None:
    """End this worker with exit status `code` now that its outcome is settled: output flushed,
    then os._exit, as multiprocessing ends its children, not through the interpreter's teardown.

    By then (trainer.train.main) a finished run is exported, its files closed, its MLflow run
    ended and its process group destroyed; a failed one has printed its error. What teardown would
    still do is destroy the C++ objects of torch.distributed, gloo/NCCL and DeepSpeed, and stop
    daemon threads that may be inside their calls; on CPU with gloo that has aborted a finished
    rank ("terminate called without an active exception", SIGABRT): torchrun then reported a
    failed job for a complete model, or restarted its workers to find the run finished.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can reach it
            pass
    os._exit(code)

"""Which rank is stuck: per-rank heartbeats in the job's rendezvous store.

`distributed.timeout_s` bounds every collective, so a rank that stops (a hung kernel, a
SIGSTOPped or swapped-out process, a dead node) makes its peers' next collective fail after
that long, with an error that says only that a collective timed out. Each rank runs a small
thread that writes its last finished step and the time into the c10d store (hosted by the
torchrun agent, which outlives the workers) every few seconds; the thread keeps beating while
its own main thread waits in a collective, and stops when the process stops. A rank that hits
the timeout reads the beats back and names the ranks whose beat went stale.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time

from transformers import TrainerCallback

KEY = "keel/heartbeat/{rank}"
INTERVAL_S = 2.0
STALE_AFTER_S = 4 * INTERVAL_S


def _store_client():
    """A client of the job's store of its own (the thread must not share the trainer's)."""
    from torch.distributed import TCPStore

    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    try:
        return TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=10),
                        wait_for_workers=False)
    except (RuntimeError, ValueError):
        return None


class Heartbeat(TrainerCallback):
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.identity = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid()}
        self.step = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        store = _store_client()
        if store is None:
            return
        while not self._stop.is_set():
            try:
                store.set(KEY.format(rank=self.rank),
                          json.dumps({**self.identity, "step": self.step, "time": time.time()}))
            except RuntimeError:
                return  # the store (the torchrun agent) is gone: the job is ending anyway
            self._stop.wait(INTERVAL_S)

    def on_train_begin(self, args, state, control, **kwargs):
        self.step = state.global_step
        if self.world_size > 1 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="keel-heartbeat", daemon=True)
            self._thread.start()

    def on_step_end(self, args, state, control, **kwargs):
        self.step = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        self._stop.set()

    def report(self) -> str:
        """Names the ranks whose heartbeat went stale, for the error after a collective timeout."""
        store = _store_client()
        if store is None:
            return "the job's store is not reachable, so the stuck rank cannot be named"
        now, stale = time.time(), []
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            try:
                beat = json.loads(store.get(KEY.format(rank=rank)))
            except RuntimeError:
                stale.append(f"rank {rank} (never reported)")
                continue
            age = now - beat["time"]
            if age > STALE_AFTER_S:
                stale.append(f"rank {rank} (host {beat['host']}, pid {beat['pid']}, last finished step "
                             f"{beat['step']}, silent for {age:.0f}s)")
        if not stale:
            return "every other rank is still alive; a collective is mismatched or the network is stalled"
        return "stuck: " + "; ".join(stale)


def is_collective_timeout(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return "timed out" in text or "timeout" in text or "distbackenderror" in text

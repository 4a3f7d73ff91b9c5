"""SIGTERM: save a checkpoint, then stop, within a bounded grace period.

Kubernetes (preemption, a drained node, a deleted job) and Slurm send SIGTERM, wait a grace
period (Kubernetes: terminationGracePeriodSeconds, 30 s by default), then SIGKILL. torchrun
forwards SIGTERM to its workers and kills them 30 s later. A worker that gets SIGTERM finishes
its current optimizer step, every rank agrees on that step (an all-reduce: ranks get the
signal at slightly different moments, and a sharded save needs all of them), saves a
checkpoint there and exits with 143 (128 + SIGTERM) without exporting. A re-run resumes from
that checkpoint. If no checkpoint is complete within the grace period (a step or a save too
slow for it), the worker exits anyway, naming the latest complete checkpoint: the one being
written has no completion marker and is never loaded.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from transformers import TrainerCallback

from data.errors import KeelError

GRACE_ENV = "KEEL_SIGTERM_GRACE_S"
DEFAULT_GRACE_S = 25.0  # under torchrun's and Kubernetes' 30 s, leaving time to exit
EXIT_STATUS = 128 + signal.SIGTERM


class StoppedBySignal(KeelError):
    """Training stopped on SIGTERM after saving a checkpoint."""


def grace_s() -> float:
    return float(os.environ.get(GRACE_ENV) or DEFAULT_GRACE_S)


class StopOnSigterm(TrainerCallback):
    def __init__(self, *, rank: int, ckpt_root: Path):
        self.rank = rank
        self.ckpt_root = ckpt_root
        self.requested = False
        self.stopped_at: int | None = None
        self.grace_s = grace_s()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.requested:
            return  # a signal to the whole process group arrives twice: from the sender and from torchrun
        self.requested = True
        timer = threading.Timer(self.grace_s, self._give_up)
        timer.daemon = True
        timer.start()
        if self.rank == 0:
            print(f"[keel] SIGTERM: saving a checkpoint at the end of this step, then stopping "
                  f"(grace {self.grace_s:.0f}s, {GRACE_ENV})", flush=True)

    def _give_up(self) -> None:
        from trainer.resilience.checkpoints import latest_complete_checkpoint

        if self.rank == 0:
            latest = latest_complete_checkpoint(self.ckpt_root)
            where = f"the latest complete checkpoint is {latest}" if latest else "no complete checkpoint exists yet"
            print(f"keel: stopped by SIGTERM without a new checkpoint: none was complete within {self.grace_s:.0f}s "
                  f"({GRACE_ENV}); {where}", file=sys.stderr, flush=True)
        os._exit(EXIT_STATUS)

    def on_step_end(self, args, state, control, **kwargs):
        from trainer.resilience.checkpoints import any_rank

        if any_rank(self.requested):  # every rank stops after the same step
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step

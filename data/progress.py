"""Progress of a long preparation: a tqdm bar on a terminal, otherwise (pod logs, CI) a line
every PERIOD_S seconds with the count, the rate and, when the total is known, the ETA."""

from __future__ import annotations

import sys
import time

PERIOD_S = 15.0


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    def __init__(self, desc: str, *, total: int | None = None, unit: str = "rows", stream=None):
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream or sys.stderr
        self.count = 0
        self.t0 = self._last = time.monotonic()
        self._bar = None
        if self.stream.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= PERIOD_S:
            self._last = now
            self._line(now)

    def _line(self, now: float, done: bool = False) -> None:
        elapsed = max(now - self.t0, 1e-9)
        rate = self.count / elapsed
        of = f"/{self.total}" if self.total else ""
        eta = ""
        if not done and self.total and rate > 0 and self.count < self.total:
            eta = f", eta {_duration((self.total - self.count) / rate)}"
        state = "done in " + _duration(elapsed) if done else "elapsed " + _duration(elapsed)
        print(f"[keel] {self.desc}: {self.count}{of} {self.unit}, {rate:.0f} {self.unit}/s, {state}{eta}",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        else:
            self._line(time.monotonic(), done=True)

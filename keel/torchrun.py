"""torchrun as `keel train` runs it: `python -m keel.torchrun [torchrun options] -m trainer ...`
takes torchrun's options and runs torchrun's own launcher (torch.distributed.run.run), with two
differences:

- a failed job ends without torchrun's traceback: the first failure (global rank, local rank,
  host, exit code or signal, the rank's output file) goes to `failure.json` in --log-dir, from
  which `keel train` prints one summary (failure_summary);
- every rank's output is line-prefixed with its global rank (torchrun prefixes local ranks,
  which repeat on every node), and unbuffered, so that what --tee shows live and keeps in
  --log-dir is what the rank wrote, when it wrote it;
- the workers know its pid ($KEEL_LAUNCHER_PID), and end if it dies, even by SIGKILL
  (trainer/resilience/launcher.py); started by `keel train` ($KEEL_TRAIN_PID), it ends with it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from pathlib import Path

from trainer.resilience.launcher import LAUNCHER_PID_ENV, TRAIN_PID_ENV, end_with_parent

FAILURE_FILE = "failure.json"
# the last line of a rank's stderr that reads as an error: Keel's own, a Python exception's, or
# the first line of the stacks a rank killed by a fatal signal writes (report_fatal_signals)
ERROR_LINE = re.compile(r"^(keel: error\b|keel: stopped\b|Fatal Python error: |"
                        r"[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b)")


def rank_logs(log_dir: Path, local_rank: int) -> Path | None:
    """The directory holding the last attempt's output of `local_rank` under torchrun's --log-dir
    (log_dir/<run id>_<random>/attempt_<n>/<local rank>/stdout.log, stderr.log)."""
    found = [(int(p.parent.name.split("_")[1]), p) for p in log_dir.glob(f"*/attempt_*/{local_rank}") if p.is_dir()]
    return max(found)[1] if found else None


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    os.environ.setdefault("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE", "[rank${rank}]:")
    if TRAIN_PID_ENV in os.environ:  # started by keel train: end with it, as the workers end with this process
        end_with_parent(int(os.environ.pop(TRAIN_PID_ENV)))
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # its workers end with it (trainer/resilience/launcher.py)
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if args.log_dir:
            logs = rank_logs(Path(args.log_dir), failure.local_rank)
            record = {"rank": rank, "local_rank": failure.local_rank, "host": socket.gethostname(),
                      "exitcode": failure.exitcode, "signal": failure.signal_name() if failure.exitcode < 0 else None,
                      "pid": failure.pid, "logs": str(logs) if logs else None, "max_restarts": args.max_restarts}
            path = Path(args.log_dir) / FAILURE_FILE
            tmp = path.with_name(f".{FAILURE_FILE}.tmp")
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            tmp.replace(path)
        return 1
    except SignalException as exc:  # keel train passed on a SIGTERM or SIGINT; the workers were told
        return 128 + int(exc.sigval)
    return 0


def last_error_line(stderr_log: Path) -> str | None:
    """The last line of a rank's stderr that reads as an error (Keel's, or a Python exception)."""
    try:
        lines = stderr_log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    return next((line.strip() for line in reversed(lines) if ERROR_LINE.match(line.strip())), None)


def failure_summary(log_dir: Path) -> str | None:
    """One paragraph on the failure torchrun ended with, from log_dir/failure.json; None when the
    launcher wrote none (it ended otherwise)."""
    try:
        record = json.loads((log_dir / FAILURE_FILE).read_text())
    except (OSError, ValueError):
        return None
    how = (f"was killed by {record['signal']}" if record.get("signal")
           else f"exited with code {record['exitcode']}")
    logs = Path(record["logs"]) if record.get("logs") else None
    error = last_error_line(logs / "stderr.log") if logs else None
    attempts = int(logs.parent.name.split("_")[1]) if logs else 0
    restarts = (f" after {attempts} restart{'s' * (attempts != 1)} of the workers (--max-restarts="
                f"{record['max_restarts']})" if attempts else "")
    said = f": {error}" if error else ", printing no error"
    where = f" Each rank's full output: {logs.parent}/<local rank>/stdout.log and stderr.log." if logs else ""
    return (f"training failed: rank {record['rank']} (local rank {record['local_rank']} on {record['host']}) {how}"
            f"{restarts}{said}.{where}")


if __name__ == "__main__":
    sys.exit(main())


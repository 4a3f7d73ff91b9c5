"""Shared pieces of the torchrun tests: a small, fast recipe on the tiny model, launching
`keel train`, finding its worker processes, and reading a run's per-step losses."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_RECIPE = REPO / "recipes" / "quickstart" / "sft-tool-calling.yaml"


def small_data(dst: Path, rows: int = 48) -> Path:
    lines = (REPO / "data" / "examples" / "tool-calling.jsonl").read_text().splitlines()[:rows]
    dst.write_text("\n".join(lines) + "\n")
    return dst


def train_cmd(tiny_model: Path, run_dir: Path, data: Path, *overrides: str, nproc: int = 2,
              launcher: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "keel.cli", "train", str(QUICKSTART_RECIPE), f"--nproc-per-node={nproc}",
            *launcher, f"model.path={tiny_model}", f"output.dir={run_dir}", f"data.train={data}",
            "training.seq_len=512", "training.warmup_ratio=0", "training.log_every_steps=1",
            "tracking.mlflow.experiment=keel-dist-tests", *overrides]


def run(cmd: list[str], env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from the run's local metrics record (the last record of a step wins)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def max_rel_diff(a: dict[int, float], b: dict[int, float], steps) -> float:
    return max(abs(a[s] - b[s]) / max(abs(b[s]), 1e-12) for s in steps)


def workers(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """global rank -> worker process, for a running `keel train`."""
    found = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            cmd = child.cmdline()
            if "-m" in cmd and "trainer" in cmd and not {"torch.distributed.run", "keel.torchrun"} & set(cmd):
                found[int(child.environ().get("RANK", "-1"))] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, every_s: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}")
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")

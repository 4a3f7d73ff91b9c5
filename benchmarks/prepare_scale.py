"""`keel prepare` at scale: synthetic tool-calling conversations at two sizes (10x apart), run
through the real command (progress lines, num_proc workers), then run again to show the cache is
reused. Records wall time, examples/s and the peak memory of the whole process tree (sampled
every 0.2 s), so "memory stays flat when the input grows 10x" is a measurement, not a claim.

    PYTHONPATH=. python benchmarks/prepare_scale.py --model runs/tiny --rows 10000 100000 --num-proc 1 2

Writes benchmarks/results/prepare_scale.json (command, machine, versions, results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RECIPE = REPO / "recipes" / "quickstart" / "sft-tool-calling.yaml"


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def keel_prepare(data: Path, model: str, cache: Path, num_proc: int) -> dict:
    cmd = [sys.executable, "-m", "keel.cli", "prepare", str(RECIPE), f"model.path={model}", f"data.train={data}",
           f"data.cache_dir={cache}", f"data.num_proc={num_proc}", "training.packing=true"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    ps, peak, lines = psutil.Process(proc.pid), 0, []
    import threading

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "rows/s" in line or "examples/s" in line or line.startswith("train:"):
                print("   ", line.rstrip()[-160:], flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(0.2)
    reader.join()
    seconds = time.perf_counter() - t0
    out = "".join(lines)
    if proc.returncode != 0:
        raise SystemExit(f"keel prepare failed:\n{out[-3000:]}")
    summary = next((line for line in out.splitlines() if line.startswith("train:")), "")
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(peak / 1e6), "summary": summary,
            "reused": "reused" in summary}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "prepare_scale.json"))
    a = p.parse_args(argv)
    from data.synthetic import generate_conversations, write_jsonl

    work = Path(tempfile.mkdtemp(prefix="keel-prepare-scale-"))
    results = []
    for rows in a.rows:
        data = work / f"conversations-{rows}.jsonl"
        t0 = time.time()
        write_jsonl(generate_conversations(rows, seed=0, long_tail=True), data)
        print(f"{rows} rows written ({data.stat().st_size / 1e6:.0f} MB) in {time.time() - t0:.0f}s", flush=True)
        procs = a.num_proc if rows == min(a.rows) else [max(a.num_proc)]
        for num_proc in procs:
            cache = work / f"cache-{rows}-{num_proc}"
            first = keel_prepare(data, a.model, cache, num_proc)
            again = keel_prepare(data, a.model, cache, num_proc)
            r = {"rows": rows, "input_mb": round(data.stat().st_size / 1e6), "num_proc": num_proc,
                 "first": first, "second": again, "rows_per_s": round(rows / first["seconds"], 1)}
            print(json.dumps(r), flush=True)
            results.append(r)
    import datasets
    import tokenizers
    import torch

    record = {
        "command": "PYTHONPATH=. python benchmarks/prepare_scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, "
                   f"{psutil.virtual_memory().total / 2**30:.0f} GiB (shared with other jobs while measured)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "datasets": datasets.__version__, "tokenizers": tokenizers.__version__},
        "results": results,
    }
    Path(a.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

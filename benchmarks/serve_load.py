"""Bounded load test of `keel serve` on loopback: a seeded mix of tool calls, plain chat,
streaming and not, and some malformed requests, at a fixed concurrency.

    python benchmarks/serve_load.py --model-dir runs/quickstart/sft/model          # starts keel serve
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --api-key KEY      # an running server

Passes (exit 0) when no request got a 5xx, every request got an answer within the timeout,
and every malformed request got a 4xx. Writes benchmarks/results/serve_load-DATE.{csv,md,png}:
one row per request, the summary (throughput, p50/p99 latency, TTFT for streams) with the
command, machine and versions, and latency distributions per kind.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load_client import (LOGS, RESULTS, Record, server, first_model, free_port, machine, percentile, records_as_rows,  # noqa: E402
                    request_mix, run_load, write_csv)

API_KEY = "keel-load-test"


def summarize(records: list[Record], wall_s: float) -> dict:
    ok = [r for r in records if r.status == 200]
    malformed = [r for r in records if r.kind.startswith("malformed")]
    streams = [r.ttft_s for r in ok if r.ttft_s is not None]
    return {
        "requests": len(records), "wall_s": round(wall_s, 2),
        "status_2xx": len(ok), "status_4xx": sum(400 <= r.status < 500 for r in records),
        "status_5xx": sum(r.status >= 500 for r in records), "no_answer": sum(r.status == 0 for r in records),
        "malformed": len(malformed), "malformed_not_4xx": sum(not 400 <= r.status < 500 for r in malformed),
        "well_formed_not_200": sum(r.status != 200 for r in records if not r.kind.startswith("malformed")),
        "requests_per_s": round(len(records) / wall_s, 2),
        "output_tokens_per_s": round(sum(r.output_tokens for r in ok) / wall_s, 1),
        "latency_p50_s": round(percentile([r.latency_s for r in ok], 0.5), 3),
        "latency_p99_s": round(percentile([r.latency_s for r in ok], 0.99), 3),
        "ttft_p50_s": round(percentile(streams, 0.5), 3), "ttft_p99_s": round(percentile(streams, 0.99), 3),
    }


def passed(summary: dict) -> bool:
    return (summary["status_5xx"] == 0 and summary["no_answer"] == 0 and summary["malformed_not_4xx"] == 0
            and summary["well_formed_not_200"] == 0)


def by_kind(records: list[Record]) -> dict[str, dict]:
    out = {}
    for kind in sorted({r.kind for r in records}):
        rs = [r for r in records if r.kind == kind]
        out[kind] = {"n": len(rs), "statuses": sorted({r.status for r in rs}),
                     "p50_s": round(percentile([r.latency_s for r in rs], 0.5), 3),
                     "p99_s": round(percentile([r.latency_s for r in rs], 0.99), 3)}
    return out


def plot(records: list[Record], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for kind in sorted({r.kind for r in records}):
        xs = sorted(r.latency_s for r in records if r.kind == kind)
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=f"{kind} ({len(xs)})")
    ax.set_xlabel("latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(stem: Path, command: str, summary: dict, kinds: dict, records: list[Record], args) -> None:
    write_csv(stem.with_suffix(".csv"), records_as_rows(records))
    plot(records, stem.with_suffix(".png"),
         f"keel serve: {summary['requests']} requests at concurrency {args.concurrency}")
    lines = [f"# keel serve load test ({time.strftime('%Y-%m-%d')})", "", "```", command, "```", "",
             f"Result: **{'PASS' if passed(summary) else 'FAIL'}** (no 5xx, every request answered, "
             "every malformed request a 4xx)", "", "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary.items()]
    lines += ["", "| kind | n | statuses | p50 latency (s) | p99 latency (s) |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['n']} | {v['statuses']} | {v['p50_s']} | {v['p99_s']} |" for k, v in kinds.items()]
    lines += ["", "Machine and versions:", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in machine().items()]
    lines += ["", f"Per-request rows: `{stem.with_suffix('.csv').name}`; latency CDF: `{stem.with_suffix('.png').name}`.",
              ""]
    stem.with_suffix(".md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model-dir", help="start `keel serve` on this model dir (loopback, a free port)")
    where.add_argument("--url", help="an already running server")
    p.add_argument("--api-key", default=None, help="with --url: the server's key")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--malformed", type=float, default=0.05, help="fraction of malformed requests")
    p.add_argument("--timeout", type=float, default=300, help="seconds before a request counts as hung")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="results stem (default benchmarks/results/serve_load-DATE)")
    args = p.parse_args(argv)
    command = "python benchmarks/serve_load.py " + " ".join(sys.argv[1:] if argv is None else argv)
    stem = args.out or RESULTS / f"serve_load-{time.strftime('%Y%m%d')}"
    stem.parent.mkdir(parents=True, exist_ok=True)

    def load(url: str, key: str | None) -> int:
        model = first_model(url, key)
        reqs = request_mix(args.requests, model, seed=args.seed, malformed=args.malformed, max_tokens=args.max_tokens)
        records, wall = run_load(url, key, reqs, concurrency=args.concurrency, timeout_s=args.timeout)
        summary, kinds = summarize(records, wall), by_kind(records)
        write_report(stem, command, summary, kinds, records, args)
        print("\n".join(f"{k}: {v}" for k, v in summary.items()))
        print(f"wrote {stem}.md, .csv, .png")
        return 0 if passed(summary) else 1

    if args.url:
        return load(args.url, args.api_key)
    port = free_port()
    cmd = [sys.executable, "-m", "keel.cli", "serve", args.model_dir, "--host", "127.0.0.1", "--port", str(port),
           "--api-key", API_KEY]
    with server(cmd, port, dict(os.environ), LOGS / "serve_load-server.log") as url:
        return load(url, API_KEY)


if __name__ == "__main__":
    sys.exit(main())

"""`keel serve` against the bare vLLM OpenAI server on the same model and the same load: does
Keel (its middleware, its tool parser, its derived settings) cost anything?

    python benchmarks/serve_overhead.py --model-dir runs/quickstart/sft/model --repeats 7

Both servers run at once on loopback (each a free port) and are loaded in turn, so machine
noise (other jobs, thermal state) falls on both alike; the order alternates each repeat. Bare
vLLM gets what a user would pass by hand for this model (the exported chat template, vLLM's
hermes and qwen3 parsers, the context length and dtype), the same API key and the same engine
environment (VLLM_CPU_KVCACHE_SPACE on CPU, as Keel derives it). Each round sends
the same seeded streaming tool-calling requests at a fixed concurrency; per round: output
tokens/s and median time to first token. Reported: keel/bare ratios per repeat, their median
and spread. Keel must add no measurable overhead: median throughput ratio >= 0.98.

Writes benchmarks/results/serve_overhead-DATE.{csv,md,png}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load_client import (LOGS, RESULTS, REPO, server, first_model, free_port, machine, percentile,  # noqa: E402
                    request_mix, run_load, write_csv)

from data.model_dir import load_model_format, read_export_info  # noqa: E402
from serving.server import VLLM_SERVER_MODULE, server_env  # noqa: E402

API_KEY = "keel-overhead-benchmark"
THRESHOLD = 0.98


def bare_vllm_command(model_dir: Path, port: int) -> list[str]:
    fmt = load_model_format(model_dir)
    info = read_export_info(model_dir)
    return [sys.executable, "-m", VLLM_SERVER_MODULE, "--model", str(model_dir), "--host", "127.0.0.1",
            "--port", str(port), "--chat-template", str(model_dir / fmt.spec.chat_template),
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser",
            fmt.spec.vllm.reasoning_parser, "--max-model-len", str(info.seq_len), "--dtype", str(info.dtype)]


def one_round(url: str, n: int, concurrency: int, seed: int, max_tokens: int) -> dict:
    model = first_model(url, API_KEY)
    reqs = request_mix(n, model, seed=seed, malformed=0.0, max_tokens=max_tokens, kinds=("tools-stream",))
    records, wall = run_load(url, API_KEY, reqs, concurrency=concurrency)
    bad = [r for r in records if r.status != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed, e.g. {bad[0]}")
    tokens = sum(r.output_tokens for r in records)
    return {"output_tokens": tokens, "wall_s": round(wall, 3), "output_tokens_per_s": round(tokens / wall, 2),
            "ttft_p50_s": round(percentile([r.ttft_s for r in records], 0.5), 4)}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    repeats = sorted({r["repeat"] for r in rows})
    ratio = {m: [] for m in ("output_tokens_per_s", "ttft_p50_s")}
    for k in repeats:
        pair = {r["server"]: r for r in rows if r["repeat"] == k}
        for m in ratio:
            ratio[m].append(pair["keel"][m] / pair["bare"][m])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(repeats, ratio["output_tokens_per_s"], "o-", label="output tokens/s: keel / bare")
    ax.plot(repeats, ratio["ttft_p50_s"], "s-", label="median TTFT: keel / bare")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(THRESHOLD, color="red", lw=0.8, ls="--", label=f"throughput floor {THRESHOLD}")
    ax.set_xlabel("repeat")
    ax.set_ylabel("ratio")
    ax.set_title("keel serve vs bare vLLM, same model and load")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(rows: list[dict]) -> dict:
    out = {}
    for metric in ("output_tokens_per_s", "ttft_p50_s"):
        ratios = []
        for k in sorted({r["repeat"] for r in rows}):
            pair = {r["server"]: r for r in rows if r["repeat"] == k}
            ratios.append(pair["keel"][metric] / pair["bare"][metric])
        out[metric] = {"median": round(statistics.median(ratios), 4), "min": round(min(ratios), 4),
                       "max": round(max(ratios), 4), "q1": round(percentile(ratios, 0.25), 4),
                       "q3": round(percentile(ratios, 0.75), 4), "ratios": [round(x, 4) for x in ratios]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, type=Path)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--requests", type=int, default=64, help="requests per round")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--out", type=Path, default=None, help="results stem (default benchmarks/results/serve_overhead-DATE)")
    args = p.parse_args(argv)
    command = "python benchmarks/serve_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
    stem = args.out or RESULTS / f"serve_overhead-{time.strftime('%Y%m%d')}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir.resolve()
    bare_port, keel_port = free_port(), free_port()
    # Both get the key by env (bare vLLM reads VLLM_API_KEY) and the same engine environment
    # (on CPU: the KV cache space Keel derives), so the comparison isolates what Keel adds on the
    # request path (middleware, tool parser) rather than a different cache size.
    from serving.engine import Target
    from serving.model_source import resolve
    from serving.server import plan_served

    engine_env = plan_served(resolve(str(model_dir)), host="127.0.0.1", port=keel_port, target=Target()).env
    env = server_env(API_KEY, engine_env)
    keel_cmd = [sys.executable, "-m", "keel.cli", "serve", str(model_dir), "--host", "127.0.0.1",
                "--port", str(keel_port), "--api-key", API_KEY]
    rows = []
    with server(bare_vllm_command(model_dir, bare_port), bare_port, env, LOGS / "overhead-bare.log") as bare_url, \
            server(keel_cmd, keel_port, dict(os.environ), LOGS / "overhead-keel.log") as keel_url:
        urls = {"bare": bare_url, "keel": keel_url}
        for name, url in urls.items():  # warm-up: first requests compile and fill caches
            one_round(url, min(16, args.requests), args.concurrency, seed=999, max_tokens=args.max_tokens)
        for k in range(args.repeats):
            order = ["bare", "keel"] if k % 2 == 0 else ["keel", "bare"]
            for name in order:
                row = {"repeat": k, "server": name, **one_round(urls[name], args.requests, args.concurrency,
                                                               seed=k, max_tokens=args.max_tokens)}
                rows.append(row)
                print(row, flush=True)
    summary = summarize(rows)
    ok = summary["output_tokens_per_s"]["median"] >= THRESHOLD
    write_csv(stem.with_suffix(".csv"), rows)
    plot(rows, stem.with_suffix(".png"))
    t, f = summary["output_tokens_per_s"], summary["ttft_p50_s"]
    lines = [f"# keel serve vs bare vLLM ({time.strftime('%Y-%m-%d')})", "", "```", command, "```", "",
             f"Same model ({model_dir.name}), same seeded load: {args.requests} streaming tool-calling requests per "
             f"round at concurrency {args.concurrency}, max_tokens {args.max_tokens}, temperature 0; "
             f"{args.repeats} repeats, order alternating, both servers up throughout.", "",
             f"Result: **{'PASS' if ok else 'FAIL'}** (median throughput ratio {t['median']} vs floor {THRESHOLD})", "",
             "| keel / bare | median | q1 | q3 | min | max |", "|---|---|---|---|---|---|",
             f"| output tokens/s | {t['median']} | {t['q1']} | {t['q3']} | {t['min']} | {t['max']} |",
             f"| median TTFT (lower is better) | {f['median']} | {f['q1']} | {f['q3']} | {f['min']} | {f['max']} |",
             "", "Bare vLLM command (what a user would run for this model):", "", "```",
             " ".join(bare_vllm_command(model_dir, 0)).replace(str(REPO) + "/", ""), "```", "",
             "| repeat | server | output tokens | wall (s) | output tokens/s | median TTFT (s) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['repeat']} | {r['server']} | {r['output_tokens']} | {r['wall_s']} | {r['output_tokens_per_s']} | "
              f"{r['ttft_p50_s']} |" for r in rows]
    lines += ["", "Machine and versions:", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in machine().items()]
    lines += [""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print(summary)
    print(f"wrote {stem}.md, .csv, .png")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

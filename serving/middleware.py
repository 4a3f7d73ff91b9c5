"""ASGI middleware `keel serve` loads into vLLM's own server (`--middleware
serving.middleware.KeelMiddleware`), so the server stays vLLM's and Keel adds only what vLLM
leaves to the operator:

1. The API key on every route except the probes. vLLM's `--api-key` guards only paths under
   /v1, /v2, /inference and /cohere: POST /invocations runs the model and POST /tokenize the
   tokenizer without a key (vllm#58144, seen on 0.32). Here every path needs the key unless it
   is in OPEN_PATHS (liveness, readiness, Prometheus, version), so a route vLLM adds later is
   guarded by default. The key comes from $KEEL_API_KEY (never argv) and is compared in
   constant time.
2. Refusal while draining. On SIGTERM vLLM (--shutdown-timeout) lets in-flight requests
   finish, but a request arriving meanwhile fails inside vLLM with a 500 ("cannot schedule new
   futures after shutdown") and /health still says 200, so a load balancer keeps sending
   traffic. From SIGTERM on, every new request gets a 503 (probes too), in-flight ones finish.
   The signal reaches Keel through a Python handler chained in front of vLLM's own, installed
   at ASGI startup, after vLLM has installed its handler.
3. An exit status. vLLM exits 0 when its engine process dies; at ASGI shutdown this records
   whether the engine died without a shutdown signal, and serving/vllm_server.py (the process
   `keel serve` execs) then exits 1.
4. Clear errors on /invocations. vLLM tries an /invocations body against every request type
   and reports the last failure, so a chat body with an invalid tool is answered "Either prompt
   or prompt_embeds must be provided". A body with `messages` is validated as the chat request
   it is, and its own errors are the answer.
5. History as trained. vLLM drops a client-sent `reasoning_content` on incoming assistant
   messages (it keeps `reasoning`, vllm#38488), so a client that sends back what SGLang and
   older vLLM returned would get a prompt without that reasoning: a history rendered unlike
   training. `reasoning_content` is copied to `reasoning` on incoming assistant messages, so
   the chat template (which reads either) renders the turn as training did. (vLLM 0.32's
   request model renames it as well; this stays for the versions that drop it.) Responses
   carry `reasoning`, from the chat template's reasoning parser or, for gpt-oss, harmony's
   analysis channel alike.
6. The trained reasoning effort (gpt-oss). vLLM writes "Reasoning: medium" into the harmony
   system message unless a request names `reasoning_effort`, and has no server setting for
   it; `keel serve` passes the format's harmony.reasoning_effort in $KEEL_REASONING_EFFORT and
   a chat request that names none gets it, so the default prompt is the trained one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal

API_KEY_ENV = "KEEL_API_KEY"
REASONING_EFFORT_ENV = "KEEL_REASONING_EFFORT"  # serving/server.py sets it for harmony formats
# Chat requests whose prompt vLLM renders with harmony for gpt-oss (render: the prompt ids only, no
# generation, served only with vLLM's --enable-scale-out; /tokenize renders with a chat template,
# which a harmony export has none of).
CHAT_PATHS = frozenset({"/v1/chat/completions", "/invocations", "/v1/chat/completions/render"})
# Open without a key: probes and scraping must work without the secret, and none of these
# runs the model or the tokenizer.
OPEN_PATHS = frozenset({"/health", "/ping", "/metrics", "/version"})
# Routes whose JSON body may carry chat messages.
MESSAGE_PATHS = frozenset({"/v1/chat/completions", "/invocations", "/tokenize", "/v1/chat/completions/render"})
_engine_died = False


def exit_status() -> int:
    """The server process's exit status: 1 when the engine died on its own, else 0."""
    return 1 if _engine_died else 0


def _json_response(status: int, message: str, err_type: str, headers: list = ()):
    body = json.dumps({"error": {"message": message, "type": err_type, "param": None, "code": status}}).encode()

    async def send_response(send):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *headers]})
        await send({"type": "http.response.body", "body": body})

    return send_response


def reasoning_as_trained(payload: dict) -> bool:
    """Copy `reasoning_content` to `reasoning` on assistant messages; True if anything changed."""
    changed = False
    for msg in payload.get("messages") or ():
        if (isinstance(msg, dict) and msg.get("role") == "assistant" and msg.get("reasoning_content")
                and not msg.get("reasoning")):
            msg["reasoning"] = msg["reasoning_content"]
            changed = True
    return changed


def default_reasoning_effort(payload: dict, effort: str) -> bool:
    """Name `effort` in a chat request that names no reasoning_effort; True if anything changed."""
    if "messages" not in payload or payload.get("reasoning_effort") is not None:
        return False
    payload["reasoning_effort"] = effort
    return True


class KeelMiddleware:
    def __init__(self, app):
        self.app = app
        self._reasoning_effort = os.environ.get(REASONING_EFFORT_ENV) or None
        key = os.environ.get(API_KEY_ENV) or ""
        self._key_digest = hashlib.sha256(key.encode()).digest() if key else None
        self.draining = False

    def _watch_shutdown(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)

            def handler(signum, frame, previous=previous):
                self.draining = True
                if callable(previous):
                    previous(signum, frame)  # vLLM's (uvloop's) handler: the drain itself

            signal.signal(sig, handler)

    def _record_engine_state(self, app) -> None:
        global _engine_died
        engine = getattr(getattr(app, "state", None), "engine_client", None)
        if engine is not None and engine.errored and not self.draining:
            _engine_died = True

    async def _lifespan(self, scope, receive, send):
        async def startup_aware_receive():
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._watch_shutdown()
            elif message["type"] == "lifespan.shutdown":
                self._record_engine_state(scope.get("app"))
            return message

        await self.app(scope, startup_aware_receive, send)

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    # Digests first: compare_digest is constant-time only for equal lengths.
                    return hmac.compare_digest(hashlib.sha256(token.strip().encode()).digest(), self._key_digest)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path") or "")
        if self.draining:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1001})
                return
            await _json_response(503, "The server is shutting down; send the request to another replica.",
                                 "service_unavailable", [(b"connection", b"close"), (b"retry-after", b"1")])(send)
            return
        if (self._key_digest is not None and scope.get("method") != "OPTIONS"
                and path.rstrip("/") not in OPEN_PATHS and not self._authorized(scope)):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await _json_response(401, "Missing or wrong API key: send 'Authorization: Bearer KEY'.",
                                 "authentication_error", [(b"www-authenticate", b"Bearer")])(send)
            return
        if scope["type"] == "http" and scope.get("method") == "POST" and path in MESSAGE_PATHS:
            scope, receive, refusal = await self._check_messages(
                scope, receive, invocation=path == "/invocations",
                effort=self._reasoning_effort if path in CHAT_PATHS else None)
            if refusal is not None:
                await refusal(send)
                return
        await self.app(scope, receive, send)

    async def _check_messages(self, scope, receive, *, invocation: bool, effort: str | None = None):
        """(scope, receive, None), the body rewritten if needed; or a 400 answer to send."""
        chunks, more, messages = [], True, []
        while more:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # client went away: hand on what arrived
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        complete = bool(messages) and messages[-1]["type"] == "http.request"
        payload = None
        if complete and (invocation or effort or b'"reasoning_content"' in body):
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None  # vLLM answers malformed JSON with its own 400
        if invocation and isinstance(payload, dict) and "messages" in payload:
            problem = chat_body_problem(json.loads(body))  # a copy: vLLM's validators edit messages
            if problem:
                return scope, receive, _json_response(400, problem, "BadRequestError")
        changed = isinstance(payload, dict) and reasoning_as_trained(payload)
        if isinstance(payload, dict) and effort and default_reasoning_effort(payload, effort):
            changed = True
        if changed:
            body = json.dumps(payload, ensure_ascii=False).encode()
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
            scope = dict(scope, headers=headers + [(b"content-length", str(len(body)).encode())])
            messages = [{"type": "http.request", "body": body, "more_body": False}]
        pending = list(messages)

        async def replay():
            return pending.pop(0) if pending else await receive()

        return scope, replay, None


def chat_body_problem(payload: dict) -> str | None:
    """Why a chat body is invalid, in vLLM's words, or None.

    vLLM's /invocations tries the body against each request type it serves and reports the
    last failure, so a chat body with, say, an invalid tool comes back as "Either prompt or
    prompt_embeds must be provided" (the completion request's complaint). A body with
    `messages` is a chat request; its own validation errors are the clear answer.
    """
    from pydantic import ValidationError
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    try:
        ChatCompletionRequest.model_validate(payload)
    except ValidationError as exc:
        errors = exc.errors()
        return f"{len(errors)} validation error(s) in the chat request: " + "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(body)'}: {e['msg']}" for e in errors)
    except ValueError as exc:
        return f"invalid chat request: {exc}"
    return None

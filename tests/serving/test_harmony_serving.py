"""`keel serve` on a gpt-oss export (format `harmony`): one real vLLM server for the module.

vLLM renders gpt_oss prompts with the harmony encoding (no chat template) and parses output
with its HarmonyParser; Keel must pass the harmony flags, pin the system message's date to the
one training rendered, and keep its response contract (`reasoning`, no markup in content). The
served prompt is read back with `return_token_ids` (POST /tokenize uses the HF chat template,
which a harmony export does not have). A tiny random gpt-oss is built here, so outputs are
noise: the tests assert the prompt and the response's shape, not what the model says.
"""

from __future__ import annotations

import datetime
import json
import re

import pytest
import requests

from conftest import API_KEY, export_untrained, free_port, keel_cmd, start_server, stop
from data.formats import load_format

pytestmark = [pytest.mark.serving, pytest.mark.slow]

FMT = load_format("harmony")
START_DATE = FMT.spec.harmony.start_date
SEQ_LEN = 1024
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
MARKUP = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>")


def export_tiny_gptoss(root):
    """`keel tiny-model --arch gpt_oss` (bf16, harmony's tokenizer, shaped for vLLM's CPU kernels),
    written out by the export's own model-dir writer as a trained harmony model is: the spec as
    training used it, no chat template (harmony renders), the stop ids."""
    from trainer.models.tiny import build_tiny_model

    base = build_tiny_model(root / "base", arch="gpt_oss", hidden=64)
    return export_untrained(base, FMT, root / "run" / "model", seq_len=SEQ_LEN, dtype="bfloat16")


@pytest.fixture(scope="module")
def harmony_server(tmp_path_factory, keel_env):
    root = tmp_path_factory.mktemp("harmony-serve")
    model_dir = export_tiny_gptoss(root)
    port = free_port()
    log = root / "server.log"
    env = {k: v for k, v in keel_env.items() if k not in ("VLLM_SYSTEM_START_DATE", "KEEL_REASONING_EFFORT")}
    proc, url = start_server(keel_cmd("serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                                      "--api-key", API_KEY, "--", "--enforce-eager"),  # no torch.compile: ~50 s less
                             log=log, env=env, port=port, timeout_s=300)
    try:
        name = requests.get(url + "/v1/models", headers=auth(), timeout=30).json()["data"][0]["id"]
        yield {"url": url, "name": name, "log": log, "model_dir": model_dir}
    finally:
        stop(proc)


def auth() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


def chat(server, body: dict, **kw) -> requests.Response:
    return requests.post(server["url"] + "/v1/chat/completions", headers=auth(), timeout=120,
                         json={"model": server["name"], "max_tokens": 8, "temperature": 0, **body}, **kw)


def served_prompt(server, messages: list[dict], tools: list[dict] | None = None) -> tuple[list[int], dict]:
    """The prompt ids the server rendered for these messages (return_token_ids) and its response."""
    r = chat(server, {"messages": messages, "tools": tools, "return_token_ids": True})
    assert r.status_code == 200, r.text
    data = r.json()
    return data["prompt_token_ids"], data


def decode(ids: list[int]) -> str:
    from data.harmony_tokenizer import harmony_encoding

    return harmony_encoding().decode(ids)


def assert_keel_shape(message: dict) -> None:
    """Keel's response contract: reasoning under `reasoning` (None when the model wrote none),
    never `reasoning_content`; no harmony markup left in what a client reads."""
    assert "reasoning" in message and "reasoning_content" not in message, message
    for text in (message.get("content"), message.get("reasoning")):
        assert not any(m in (text or "") for m in MARKUP), message


def test_command_line_has_the_harmony_flags(harmony_server):
    line = next(x for x in harmony_server["log"].read_text().splitlines() if x.startswith("[keel] ")
                and "serving.vllm_server" in x)
    assert re.search(r"--reasoning-parser openai_gptoss\b", line), line
    assert "--enable-auto-tool-choice --tool-call-parser openai" in line, line
    assert "--chat-template" not in line and "--tool-parser-plugin" not in line, line
    assert f"VLLM_SYSTEM_START_DATE={START_DATE}" in harmony_server["log"].read_text()


CONVERSATION = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "reasoning_content": "Need the weather tool for Paris.",
                 "tool_calls": [{"id": "call_1", "type": "function", "function": {
                     "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 21}"}]


def test_served_prompt_is_harmony_with_the_trained_date_and_tools(harmony_server, monkeypatch):
    ids, data = served_prompt(harmony_server, CONVERSATION, TOOLS)
    prompt = decode(ids)
    today = datetime.date.today().isoformat()
    assert f"Current date: {START_DATE}" in prompt and (today == START_DATE or today not in prompt), prompt
    assert f"Reasoning: {FMT.spec.harmony.reasoning_effort}" in prompt, prompt
    assert "namespace functions" in prompt and "type get_weather = " in prompt, prompt
    assert "# Instructions\n\nAnswer briefly." in prompt, prompt  # the client's system text, as developer text
    # a client's reasoning_content in a tool loop reaches the prompt (analysis kept before a final)
    assert "<|channel|>analysis<|message|>Need the weather tool for Paris.<|end|>" in prompt, prompt
    assert "to=functions.get_weather" in prompt and "<|start|>functions.get_weather" in prompt, prompt
    assert prompt.endswith("<|start|>assistant"), prompt[-200:]
    assert_keel_shape(data["choices"][0]["message"])

    # /tokenize renders chat messages with a chat template, which a harmony export has none of: it
    # cannot show the served prompt (return_token_ids does; vLLM's /v1/chat/completions/render
    # would too, but only with --enable-scale-out)
    r = requests.post(harmony_server["url"] + "/tokenize", headers=auth(), timeout=60,
                      json={"model": harmony_server["name"], "messages": CONVERSATION, "tools": TOOLS})
    assert r.status_code == 400 and "chat template" in r.text, r.text

    # `ids` is the served prompt for the messages before the next assistant turn. Training renders
    # that turn of the same conversation (data/harmony.py, without vLLM) on exactly these ids,
    # and trains from the next token on; keel eval renders prompts with vLLM's own functions
    # (serving/harmony.py), so its scores are of what the server sees too.
    from data.conversation import validate_conversation
    from data.harmony import render_conversation

    answer = {"role": "assistant", "content": "It is 21 C in Paris.", "reasoning_content": "The tool said 21."}
    row = validate_conversation({"messages": [*CONVERSATION, answer], "tools": TOOLS}, FMT.row_rules())
    examples = render_conversation(row, FMT)
    example_ids, trained = next((e_ids, mask) for e_ids, mask in examples if e_ids[:len(ids)] == ids)
    # (the earlier call turn is trained in the same example; the prompt's own tokens after it are not)
    assert not trained[len(ids) - 1] and trained[len(ids)], "the served prompt is not where training starts"
    from serving import harmony

    monkeypatch.setenv("VLLM_SYSTEM_START_DATE", START_DATE)
    assert harmony.prompt_ids(CONVERSATION, TOOLS, reasoning_effort=FMT.spec.harmony.reasoning_effort) == ids


def test_a_request_naming_its_reasoning_effort_gets_it(harmony_server):
    ids, _ = served_prompt(harmony_server, [{"role": "user", "content": "hi"}])
    assert "Reasoning: medium" in decode(ids)
    r = chat(harmony_server, {"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "high",
                              "return_token_ids": True})
    assert r.status_code == 200, r.text
    assert "Reasoning: high" in decode(r.json()["prompt_token_ids"])


def test_tool_request_and_streamed_request_keep_keels_shape(harmony_server):
    r = chat(harmony_server, {"messages": CONVERSATION[:2], "tools": TOOLS, "tool_choice": "auto"})
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert_keel_shape(message)
    for call in message.get("tool_calls") or []:
        json.loads(call["function"]["arguments"])

    r = chat(harmony_server, {"messages": CONVERSATION[:2], "tools": TOOLS, "stream": True}, stream=True)
    assert r.status_code == 200, r.text
    deltas, finish = [], None
    for line in r.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data: ") or line == "data: [DONE]":
            continue
        choice = json.loads(line[len("data: "):])["choices"]
        if choice:
            deltas.append(choice[0]["delta"])
            finish = choice[0].get("finish_reason") or finish
    assert deltas and finish in ("stop", "length", "tool_calls"), deltas
    assert all("reasoning_content" not in d for d in deltas), deltas
    joined = {k: "".join(d.get(k) or "" for d in deltas) for k in ("content", "reasoning")}
    assert not any(m in joined["content"] + joined["reasoning"] for m in MARKUP), joined

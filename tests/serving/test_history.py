"""Multi-turn requests are rendered exactly as training rendered them.

For held conversations with reasoning, tool calls and tool results over several user turns,
the prompt the server builds for each assistant turn (POST /tokenize with the messages before
that turn and the tools, as a client would send them) must be token for token the prompt
that preceded that turn in the training ids (data/render.py, the prepared cache's rendering).
Clients send earlier reasoning back as `reasoning` (what vLLM returns) or `reasoning_content`
(what SGLang and older vLLM return, and what vLLM drops on input, vllm#38488); both must render
as trained."""

from __future__ import annotations

import json

import pytest
import requests

from data.conversation import validate_conversation
from data.model_dir import load_model_format
from data.prepare import read_jsonl
from data.render import IGNORE_INDEX, render_conversation, split_examples
from tests.conftest import QUICKSTART_DATA

pytestmark = pytest.mark.serving


def multi_turn_rows(n: int) -> list[dict]:
    """Rows with several user turns, tool calls and reasoning before the last user message."""
    rows = []
    for _, row in read_jsonl(QUICKSTART_DATA):
        msgs = row["messages"]
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        if len(users) > 1 and any(m.get("tool_calls") for m in msgs[:users[-1]]) and \
                any(m["role"] == "tool" for m in msgs[users[-1]:]):
            rows.append(row)
    assert len(rows) >= n
    return rows[:n]


def as_client_sends(messages: list[dict], reasoning_key: str) -> list[dict]:
    out = []
    for m in messages:
        m = dict(m)
        if m["role"] == "assistant":
            reasoning = m.pop("reasoning_content", None)
            if reasoning is not None:
                m[reasoning_key] = reasoning
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.dumps(
                    c["function"]["arguments"], ensure_ascii=False)}} for c in m["tool_calls"]]
        out.append(m)
    return out


def trained_starts(labels: list[int]) -> list[int]:
    return [k for k, lab in enumerate(labels) if lab != IGNORE_INDEX and (k == 0 or labels[k - 1] == IGNORE_INDEX)]


@pytest.mark.parametrize("reasoning_key", ["reasoning", "reasoning_content"])
def test_served_prompt_equals_training_prompt(served_model, api_key, trained_run, base_model_name, reasoning_key):
    from transformers import AutoTokenizer

    fmt = load_model_format(trained_run.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(trained_run.model_dir)
    checked = 0
    for row in multi_turn_rows(4):
        conv = validate_conversation(row, fmt.row_rules())
        examples = render_conversation(conv, tokenizer=tokenizer, fmt=fmt)
        for example, (_end, trained) in zip(examples, split_examples(conv["messages"], fmt, conv["tools"])):
            for index, start in zip(trained, trained_starts(example.labels)):
                body = {"model": base_model_name, "tools": conv["tools"], "add_generation_prompt": True,
                        "messages": as_client_sends(conv["messages"][:index], reasoning_key)}
                r = requests.post(served_model + "/tokenize", json=body, timeout=60,
                                  headers={"Authorization": f"Bearer {api_key}"})
                assert r.status_code == 200, r.text
                served = r.json()["tokens"]
                if served != example.input_ids[:start]:
                    text = tokenizer.decode(served)
                    want = tokenizer.decode(example.input_ids[:start])
                    pytest.fail(f"turn {index} renders differently:\nserved:  {text[-300:]!r}\ntrained: {want[-300:]!r}")
                checked += 1
    # reasoning of turns after the last user message (a tool loop) is in those prompts
    assert checked >= 8

"""The capstone: the tiny model, trained by `keel train` on 2 processes, served by `keel serve`
with real vLLM (CPU build), answers a question that needs a tool with parsed reasoning and a
parsed tool call, through the official openai client."""

from __future__ import annotations

import json

import pytest

from data.synthetic import TOOLS

pytestmark = pytest.mark.e2e

QUESTIONS = [
    ("What's the weather in Paris?", "get_weather", {"city": "Paris"}),
    ("What time is it in Tokyo?", "get_local_time", {"city": "Tokyo"}),
    ("What is NVDA trading at?", "get_stock_price", {"ticker": "NVDA"}),
]


@pytest.mark.parametrize("question, tool, args", QUESTIONS)
def test_served_model_thinks_then_calls_the_tool(openai_client, question, tool, args):
    model = openai_client.models.list().data[0].id
    resp = openai_client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], tools=TOOLS,
        temperature=0, max_tokens=200,
    )
    choice = resp.choices[0]
    msg = choice.message
    assert msg.reasoning, f"no reasoning parsed: {msg}"
    assert "<think>" not in (msg.reasoning or "") and "</think>" not in (msg.content or "")
    assert msg.tool_calls, f"no tool call parsed: {msg}"
    assert choice.finish_reason == "tool_calls"
    call = msg.tool_calls[0]
    assert call.function.name == tool
    assert json.loads(call.function.arguments) == args
    assert "<tool_call>" not in (msg.content or "")

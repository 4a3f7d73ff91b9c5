"""`keel serve` runs vLLM's OpenAI server configured from the model dir alone."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.serving


def get(url: str, key: str | None = None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None


def test_api_key_is_required(served_model, api_key):
    assert get(served_model + "/v1/models")[0] == 401
    assert get(served_model + "/v1/models", "wrong-key")[0] == 401
    status, body = get(served_model + "/v1/models", api_key)
    assert status == 200 and len(body["data"]) == 1


def test_context_length_comes_from_training(served_model, api_key):
    _, body = get(served_model + "/v1/models", api_key)
    assert body["data"][0]["max_model_len"] == 1024  # the recipe's training.seq_len, from keel-export.yaml


def test_answer_without_a_tool_call_stops_at_end_of_turn(openai_client):
    """Small talk (in the training data with the same tools) ends with the trained end-of-turn
    token: finish_reason "stop", plain content, no tool call, no markup left in the text."""
    from data.synthetic import TOOLS

    model = openai_client.models.list().data[0].id
    resp = openai_client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi! Who are you?"}], tools=TOOLS,
        temperature=0, max_tokens=150)
    choice = resp.choices[0]
    assert choice.finish_reason == "stop", choice
    assert choice.message.content and not choice.message.tool_calls
    assert choice.message.reasoning
    for markup in ("<|im_end|>", "<think>", "</think>", "<tool_call>"):
        assert markup not in choice.message.content

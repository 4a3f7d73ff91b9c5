"""GRPO rollouts start from the served prompt: the prompt ids Keel prepares for a conversation
(data/prompts.py) equal the ids a live `keel serve` builds for the same messages and tools
(POST /tokenize, as a client would send them). The session's SFT model is served: its export
carries the same format and tokenizer a GRPO run renders with."""

from __future__ import annotations

import pytest
import requests

from data.model_dir import load_model_format
from data.prepare import read_jsonl
from data.prompts import prompt_row
from data.synthetic import generate_tool_choice, generate_tool_prompts
from tests.conftest import QUICKSTART_DATA

pytestmark = pytest.mark.serving


def test_rollout_prompt_ids_equal_the_served_prompt_ids(served_model, api_key, trained_run, base_model_name):
    from transformers import AutoTokenizer

    fmt = load_model_format(trained_run.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(trained_run.model_dir)
    # tool calling with schemas, with names only, and multi-turn conversations with tool results
    rows = generate_tool_prompts(3, seed=5) + generate_tool_choice(3, seed=5)
    rows += [row for _, row in read_jsonl(QUICKSTART_DATA)][:6]
    for row in rows:
        prepared = prompt_row(row, "messages", tokenizer=tokenizer, fmt=fmt, max_prompt_tokens=4096,
                              needs_reference="tool_call")
        # earlier reasoning goes back as `reasoning`, as vLLM returns it (it drops reasoning_content, vllm#38488)
        messages = [{("reasoning" if k == "reasoning_content" else k): v for k, v in m.items()}
                    for m in row["messages"][:-1]]
        body = {"model": base_model_name, "messages": messages, "add_generation_prompt": True}
        if row.get("tools"):
            body["tools"] = row["tools"]
        r = requests.post(served_model + "/tokenize", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {api_key}"})
        assert r.status_code == 200, r.text
        served = r.json()["tokens"]
        assert served == prepared["prompt_ids"], (
            f"served:   {tokenizer.decode(served)[-300:]!r}\nprepared: {prepared['prompt'][-300:]!r}")

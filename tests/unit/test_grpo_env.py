"""A multi-turn GRPO rollout executes the model's tool call, feeds the result back in the format's
layout, and trains only on what the model wrote (the env_mask TRL takes the loss with).

The policy here writes fixed turns (the test is about the environment, not about sampling): its
tokens are what a model trained on the format writes. The whole rollout must be token for token
what the template renders for the same conversation, the rendering the server applies."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from data.formats import load_format
from data.render import render_text
from trainer.techniques.tool_env import last_turn, roll_out

FMT = load_format("hermes-qwen3")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = '<think>Need the weather.</think><tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call><|im_end|>'
ANSWER = "<think>The tool answered.</think>It is 3°C in Oslo.<|im_end|>"


def get_weather(city: str) -> dict:
    return {"city": city, "temperature": "3°C"}


@pytest.fixture
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def scripted(tok, turns):
    written = []

    def generate(ids, budget):
        text = turns[len(written)]
        new = tok(text, add_special_tokens=False)["input_ids"]
        written.append(new)
        return new[:budget]
    return generate, written


def test_multi_turn_rollout_runs_the_tool_and_masks_everything_but_model_tokens(tok):
    prompt = [{"role": "user", "content": "Weather in Oslo?"}]
    prompt_ids = tok(render_text({"messages": prompt, "tools": TOOLS}, fmt=FMT, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
    generate, written = scripted(tok, [CALL, ANSWER])
    r = roll_out(prompt_messages=prompt, prompt_ids=prompt_ids, tools=TOOLS, generate=generate,
                 tool_fns={"get_weather": get_weather}, fmt=FMT, tokenizer=tok, max_turns=3, max_tokens=200)
    assert r.tool_calls == 1 and len(r.turn_starts) == 2
    # the model's tokens, exactly as sampled, are the masked-in ones; everything inserted is masked out
    model_tokens = [t for t, m in zip(r.completion_ids, r.env_mask) if m]
    assert model_tokens == written[0] + written[1]
    inserted = tok.decode([t for t, m in zip(r.completion_ids, r.env_mask) if not m], skip_special_tokens=False)
    assert inserted == '\n<|im_start|>tool\n{"city": "Oslo", "temperature": "3°C"}<|im_end|>\n<|im_start|>assistant\n'
    # the rollout is the served layout of the same conversation
    conversation = prompt + [
        {"role": "assistant", "content": "", "reasoning": "Need the weather.",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "content": json.dumps(get_weather("Oslo"), ensure_ascii=False)},
        {"role": "assistant", "content": "It is 3°C in Oslo.", "reasoning": "The tool answered."}]
    served = render_text({"messages": conversation, "tools": TOOLS}, fmt=FMT)
    assert tok.decode(prompt_ids + r.completion_ids, skip_special_tokens=False) == served.removesuffix("\n")
    # rewards score the last assistant turn
    assert last_turn(r.completion_ids, r.turn_starts) == written[1]


def test_a_failing_or_unknown_tool_is_an_error_result_the_model_sees(tok):
    prompt = [{"role": "user", "content": "Weather in Oslo?"}]
    ids = tok(render_text({"messages": prompt, "tools": TOOLS}, fmt=FMT, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    generate, _ = scripted(tok, [CALL, ANSWER])
    r = roll_out(prompt_messages=prompt, prompt_ids=ids, tools=TOOLS, generate=generate, tool_fns={}, fmt=FMT,
                 tokenizer=tok, max_turns=2, max_tokens=200)
    inserted = tok.decode([t for t, m in zip(r.completion_ids, r.env_mask) if not m])
    assert "unknown tool 'get_weather'" in inserted
    # max_turns bounds the turns: one turn, no tool run
    generate, _ = scripted(tok, [CALL])
    one = roll_out(prompt_messages=prompt, prompt_ids=ids, tools=TOOLS, generate=generate,
                   tool_fns={"get_weather": get_weather}, fmt=FMT, tokenizer=tok, max_turns=1, max_tokens=200)
    assert one.tool_calls == 0 and all(one.env_mask)


def test_tools_module_needs_the_opt_in():
    from tests.unit.test_grpo import error, recipe

    assert "grpo.trust_python_code: true" in error(lambda r: r["grpo"].update(tools_module="my_tools", max_turns=3))
    assert "grpo.tools_module" in error(lambda r: r["grpo"].update(max_turns=3))
    r = recipe(lambda r: r["grpo"].update(tools_module="my_tools", max_turns=3, trust_python_code=True))
    assert r.grpo.max_turns == 3

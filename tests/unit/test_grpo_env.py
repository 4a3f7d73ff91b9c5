"""A multi-turn GRPO rollout executes the model's tool call (or replays the result recorded in the
data for a matching call), feeds the result back in the format's layout, and trains only on what
the model wrote (the env_mask TRL takes the loss with).

The policy here writes fixed turns (the test is about the environment, not about sampling): its
tokens are what a model trained on the format writes. The whole rollout must be token for token
what the template renders for the same conversation, the rendering the server applies."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from data.formats import load_format
from data.render import render_text
from trainer.techniques.tool_env import last_turn, module_tools, recorded_results, roll_out

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
                 call_tool=module_tools({"get_weather": get_weather}), fmt=FMT, tokenizer=tok, max_turns=3, max_tokens=200)
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
    r = roll_out(prompt_messages=prompt, prompt_ids=ids, tools=TOOLS, generate=generate, call_tool=module_tools({}), fmt=FMT,
                 tokenizer=tok, max_turns=2, max_tokens=200)
    inserted = tok.decode([t for t, m in zip(r.completion_ids, r.env_mask) if not m])
    assert "unknown tool 'get_weather'" in inserted
    # max_turns bounds the turns: one turn, no tool run
    generate, _ = scripted(tok, [CALL])
    one = roll_out(prompt_messages=prompt, prompt_ids=ids, tools=TOOLS, generate=generate,
                   call_tool=module_tools({"get_weather": get_weather}), fmt=FMT, tokenizer=tok, max_turns=1, max_tokens=200)
    assert one.tool_calls == 0 and all(one.env_mask)


def test_tools_module_needs_the_opt_in():
    from tests.unit.test_grpo import error, recipe

    assert "grpo.trust_python_code: true" in error(lambda r: r["grpo"].update(tools_module="my_tools", max_turns=3))
    assert "grpo.tools_module" in error(lambda r: r["grpo"].update(max_turns=3))
    r = recipe(lambda r: r["grpo"].update(tools_module="my_tools", max_turns=3, trust_python_code=True))
    assert r.grpo.max_turns == 3


# --------------------------------------------------------------------------- recorded tool results

UNIT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}, "required": ["city"]}}}]
RECORDED_RESULT = '{"city": "Oslo", "temperature": -4, "unit": "celsius"}'
# a recorded episode: the question, the call with its recorded result, the final answer (the reference)
EPISODE = {"tools": UNIT_TOOLS, "messages": [
    {"role": "user", "content": "Weather in Oslo, in celsius?"},
    {"role": "assistant", "content": "", "reasoning_content": "Need the weather.",
     "tool_calls": [{"id": "call_7", "type": "function",
                     "function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}}]},
    {"role": "tool", "tool_call_id": "call_7", "content": RECORDED_RESULT},
    {"role": "assistant", "content": "It is -4°C in Oslo.", "reasoning_content": "The tool answered."}]}


def model_call(arguments: str) -> str:
    return f'<think>Need the weather.</think><tool_call>{{"name": "get_weather", "arguments": {arguments}}}</tool_call><|im_end|>'


def recorded_rollout(tok, call_text: str, max_turns: int = 3):
    from data.prompts import prompt_row

    p = prompt_row(EPISODE, "messages", tokenizer=tok, fmt=FMT, max_prompt_tokens=400, needs_reference="answer_match",
                   recorded_results=True)
    generate, written = scripted(tok, [call_text, ANSWER])
    r = roll_out(prompt_messages=json.loads(p["messages"]), prompt_ids=p["prompt_ids"], tools=json.loads(p["tools"]),
                 generate=generate, call_tool=recorded_results(json.loads(p["recorded"])), fmt=FMT, tokenizer=tok,
                 max_turns=max_turns, max_tokens=300)
    return p, r, written


def test_a_call_matching_a_recorded_one_gets_the_recorded_result(tok):
    # the same arguments as JSON values, written in another key order and spacing than the data's
    p, r, written = recorded_rollout(tok, model_call('{"unit": "celsius",  "city": "Oslo"}'))
    # the prompt is the episode's question, rendered as the server renders it; the reference is the final answer
    question = EPISODE["messages"][:1]
    assert p["prompt"] == render_text({"messages": question, "tools": UNIT_TOOLS}, fmt=FMT, add_generation_prompt=True)
    assert json.loads(p["reference"]) == {"content": "It is -4°C in Oslo.", "tool_calls": []}
    assert r.tool_calls == 1 and len(r.turn_starts) == 2
    # exactly the recorded result, in the tool turn the template renders; the model's tokens are the only trained ones
    inserted = tok.decode([t for t, m in zip(r.completion_ids, r.env_mask) if not m], skip_special_tokens=False)
    assert inserted == f"\n<|im_start|>tool\n{RECORDED_RESULT}<|im_end|>\n<|im_start|>assistant\n"
    assert [t for t, m in zip(r.completion_ids, r.env_mask) if m] == written[0] + written[1]
    assert len(r.env_mask) == len(r.completion_ids) and r.env_mask[:len(written[0])] == [1] * len(written[0])
    conversation = question + [
        {"role": "assistant", "content": "", "reasoning": "Need the weather.", "tool_calls": [{"type": "function",
         "function": {"name": "get_weather", "arguments": '{"unit": "celsius",  "city": "Oslo"}'}}]},
        {"role": "tool", "content": RECORDED_RESULT},
        {"role": "assistant", "content": "It is 3°C in Oslo.", "reasoning": "The tool answered."}]
    served = render_text({"messages": conversation, "tools": UNIT_TOOLS}, fmt=FMT)
    assert tok.decode(p["prompt_ids"] + r.completion_ids, skip_special_tokens=False) == served.removesuffix("\n")


@pytest.mark.parametrize("arguments", ['{"city": "Bergen", "unit": "celsius"}', '{"city": "Oslo"}',
                                       '{"city": "Oslo", "unit": "celsius", "days": 1}'],
                         ids=["other-value", "missing-key", "extra-key"])
def test_a_call_without_a_recorded_match_gets_an_error_result(tok, arguments):
    _, r, written = recorded_rollout(tok, model_call(arguments))
    inserted = tok.decode([t for t, m in zip(r.completion_ids, r.env_mask) if not m], skip_special_tokens=False)
    assert RECORDED_RESULT not in inserted
    error = json.loads(inserted.split("<|im_start|>tool\n")[1].split("<|im_end|>")[0])
    assert error["error"].startswith("no recorded result for this call: the data records no call of 'get_weather'")
    assert [t for t, m in zip(r.completion_ids, r.env_mask) if m] == written[0] + written[1]
    # another tool's name with the recorded arguments does not match either
    other = recorded_results([{"name": "get_weather", "arguments": '{"city": "Oslo"}', "result": "3"}])
    assert other("get_forecast", '{"city": "Oslo"}').startswith('{"error": "no recorded result')
    assert other("get_weather", '{ "city":"Oslo" }') == "3"


def test_recorded_prompts_are_refused_when_no_row_records_a_result(tiny_model, tmp_path):
    from data.errors import KeelError
    from data.prompts import prepare_prompts
    from data.synthetic import generate_tool_prompts, write_jsonl
    from trainer.train import describe_prepared

    write_jsonl(generate_tool_prompts(3), tmp_path / "p.jsonl")  # questions and calls, no tool results
    kw = {"tokenizer_dir": tiny_model, "fmt": FMT, "seq_len": 512, "max_completion_tokens": 64,
          "needs_reference": None, "recorded_results": True}
    with pytest.raises(KeelError) as exc:
        prepare_prompts(tmp_path / "p.jsonl", cache_root=tmp_path / "c", **kw)
    assert "grpo.tool_results" in str(exc.value) and "no row of" in str(exc.value)
    write_jsonl([EPISODE, *generate_tool_prompts(2)], tmp_path / "e.jsonl")
    prepared = prepare_prompts(tmp_path / "e.jsonl", cache_root=tmp_path / "c", **kw)
    assert prepared.stats.with_recorded_results == 1
    assert "(3 with a reference, 1 with recorded tool results)" in describe_prepared(prepared)
    recorded = json.loads(prepared.load()[0]["recorded"])
    assert recorded == [{"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}',
                         "result": RECORDED_RESULT}]


def test_recorded_tool_results_need_no_opt_in_and_refuse_what_cannot_work():
    from tests.unit.test_grpo import error, recipe

    r = recipe(lambda r: r["grpo"].update(tool_results="recorded", max_turns=3))
    assert r.grpo.tool_results == "recorded" and not r.grpo.trust_python_code
    assert "grpo.max_turns: 2" in error(lambda r: r["grpo"].update(tool_results="recorded"))
    assert "remove grpo.tools_module" in error(lambda r: r["grpo"].update(
        tool_results="recorded", max_turns=3, tools_module="my_tools", trust_python_code=True))
    assert "grpo.tool_results: recorded" in error(lambda r: r["grpo"].update(max_turns=3))
    unknown = error(lambda r: r["grpo"].update(tool_results="replayed", max_turns=3))
    assert "grpo.tool_results" in unknown and "'recorded'" in unknown, unknown

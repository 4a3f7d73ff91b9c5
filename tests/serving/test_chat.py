"""Chat behaviour of `keel serve` through the official openai client, against the shared real
vLLM server: reasoning and tool calls parsed, streaming equal to non-streaming, parallel calls,
tool results fed back, every tool_choice, calls cut by max_tokens, LoRA adapters by name.

The tiny model (0.56M parameters) reliably writes the format but not the right argument values,
so tests check what the server guarantees (parsing, finish reasons, no markup, schema-valid
calls) and only the tool choices the model has learned (weather -> get_weather).

Not tested here, because the tiny model does not do it on demand: writing parallel calls
itself. Asked to compare two cities it never closes its reasoning (seen 2026-11-26: every
"Compare the weather in A and B." of the training data, greedy), and for small talk it calls a
tool rather than answering. tests/serving/test_taught_behaviour.py teaches a model both and
serves it (slow tier); parsing of parallel calls, whole and streamed through vLLM's own
serving classes, is also covered by tests/unit/test_parsers.py. Here parallel calls appear as
history a client sends back with their results (test_tool_results_fed_back_get_an_answer), and
small talk is answered with tool_choice "none"."""

from __future__ import annotations

import json

import jsonschema
import pytest

from data.synthetic import TOOLS

pytestmark = pytest.mark.serving

SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
WEATHER = [{"role": "user", "content": "What's the weather in Paris?"}]
# What a client sends back after two parallel calls (the model does not write them on demand).
PARALLEL_CALLS = [
    {"role": "user", "content": "Compare the weather in Lisbon and Denver."},
    {"role": "assistant", "content": "",
     "reasoning": "The user wants the weather in two cities. I will call get_weather for Lisbon and for Denver.",
     "tool_calls": [{"id": f"call_{n}", "type": "function",
                     "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
                    for n, city in enumerate(["Lisbon", "Denver"])]},
    *({"role": "tool", "tool_call_id": f"call_{n}", "content": json.dumps({"temperature": t, "condition": c})}
      for n, (t, c) in enumerate([(18, "sunny"), (-2, "snow")])),
]
SMALL_TALK = [{"role": "user", "content": "Hi! Who are you?"}]
MARKUP = ("<tool_call>", "</tool_call>", "<think>", "</think>", "<|im_end|>", "<|im_start|>")


def no_markup(text: str | None) -> bool:
    return not any(m in (text or "") for m in MARKUP)


def ask(client, model, messages, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 200)
    return client.chat.completions.create(model=model, messages=messages, tools=TOOLS, seed=7, **kw).choices[0]


def ask_streaming(client, model, messages, **kw):
    """The streamed message reassembled, and the order in which its parts arrived."""
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 200)
    stream = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, seed=7, stream=True, **kw)
    reasoning, content, calls, order, finish = "", "", {}, [], None
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            if getattr(delta, "reasoning", None):
                reasoning += delta.reasoning
                order.append("reasoning")
            if delta.content:
                content += delta.content
                order.append("content")
            for tc in delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                call["name"] += tc.function.name or ""
                call["arguments"] += tc.function.arguments or ""
                order.append("tool_call")
            finish = choice.finish_reason or finish
    return {"reasoning": reasoning or None, "content": content or None,
            "calls": [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())],
            "finish": finish, "order": order}


def as_dict(choice) -> dict:
    m = choice.message
    return {"reasoning": m.reasoning or None, "content": m.content or None,
            "calls": [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls or []],
            "finish": choice.finish_reason}


def check_calls(calls):
    for name, args in calls:
        assert name in SCHEMAS
        jsonschema.validate(args, SCHEMAS[name])


@pytest.mark.parametrize("messages,kw", [(WEATHER, {}), (SMALL_TALK, {"tool_choice": "none"})],
                         ids=["call", "answer"])
def test_streaming_equals_non_streaming_reasoning_first(openai_client, base_model_name, messages, kw):
    whole = as_dict(ask(openai_client, base_model_name, messages, **kw))
    streamed = ask_streaming(openai_client, base_model_name, messages, **kw)
    order = streamed.pop("order")
    assert streamed == whole
    assert whole["reasoning"] and no_markup(whole["reasoning"]) and no_markup(whole["content"])
    assert whole["calls"] or whole["content"]
    # reasoning deltas first, then content or tool-call deltas
    assert order[0] == "reasoning" and "reasoning" not in order[order.index(next(o for o in order if o != "reasoning")):]


def answer_to(messages, choice):
    """Messages, the assistant turn as returned, then one result per call: a tool loop's next request."""
    out = [*messages, choice.message.model_dump(exclude_none=True)]
    for call in choice.message.tool_calls:
        out.append({"role": "tool", "tool_call_id": call.id,
                    "content": json.dumps({"temperature": "18°C", "condition": "sunny"})})
    return out


@pytest.mark.parametrize("calls", ["one-generated", "two-parallel"])
def test_tool_results_fed_back_get_an_answer(openai_client, base_model_name, calls):
    if calls == "one-generated":
        first = ask(openai_client, base_model_name, WEATHER)
        assert first.message.tool_calls
        messages = answer_to(WEATHER, first)
    else:
        messages = PARALLEL_CALLS
    second = ask(openai_client, base_model_name, messages)
    assert second.finish_reason == "stop" and not second.message.tool_calls
    assert second.message.content and no_markup(second.message.content) and second.message.reasoning
    streamed = ask_streaming(openai_client, base_model_name, messages)
    streamed.pop("order")
    assert streamed == as_dict(second)


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_tool_choice_auto(openai_client, base_model_name, streaming):
    got = (ask_streaming(openai_client, base_model_name, WEATHER, tool_choice="auto") if streaming
           else as_dict(ask(openai_client, base_model_name, WEATHER, tool_choice="auto")))
    assert got["finish"] == "tool_calls" and [n for n, _ in got["calls"]] == ["get_weather"]
    check_calls(got["calls"])


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_tool_choice_required(openai_client, base_model_name, streaming):
    # small talk: required must still come back as a parsed call (structured outputs)
    got = (ask_streaming(openai_client, base_model_name, SMALL_TALK, tool_choice="required") if streaming
           else as_dict(ask(openai_client, base_model_name, SMALL_TALK, tool_choice="required")))
    assert got["finish"] == "tool_calls" and got["calls"]
    check_calls(got["calls"])
    assert no_markup(got["content"])


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_tool_choice_named_function(openai_client, base_model_name, streaming):
    named = {"type": "function", "function": {"name": "get_stock_price"}}
    got = (ask_streaming(openai_client, base_model_name, WEATHER, tool_choice=named) if streaming
           else as_dict(ask(openai_client, base_model_name, WEATHER, tool_choice=named)))
    # OpenAI's convention: a forced function ends with "stop"
    assert got["finish"] == "stop" and [n for n, _ in got["calls"]] == ["get_stock_price"]
    check_calls(got["calls"])


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_tool_choice_none_returns_no_call_and_no_markup(openai_client, base_model_name, streaming):
    # the model calls a tool here under "auto" (test_tool_choice_auto)
    got = (ask_streaming(openai_client, base_model_name, WEATHER, tool_choice="none") if streaming
           else as_dict(ask(openai_client, base_model_name, WEATHER, tool_choice="none")))
    assert got["calls"] == [] and got["finish"] in ("stop", "length")
    assert no_markup(got["content"]), got["content"]


def test_call_cut_by_max_tokens(openai_client, base_model_name):
    """Every cut inside the call: finish "length", no half-parsed call, no partial markup."""
    full = openai_client.chat.completions.create(model=base_model_name, messages=WEATHER, tools=TOOLS,
                                                 temperature=0, max_tokens=200)
    assert full.choices[0].finish_reason == "tool_calls"
    reasoning_tokens = full.usage.completion_tokens_details.reasoning_tokens
    total = full.usage.completion_tokens
    cuts = sorted({reasoning_tokens + 2, reasoning_tokens + 4, (reasoning_tokens + total) // 2, total - 2})
    assert reasoning_tokens + 2 < total - 1
    for n in cuts:
        for got in (as_dict(ask(openai_client, base_model_name, WEATHER, max_tokens=n)),
                    ask_streaming(openai_client, base_model_name, WEATHER, max_tokens=n)):
            assert got["finish"] == "length" and got["calls"] == [], (n, got)
            assert no_markup(got["content"]) and '{"' not in (got["content"] or ""), (n, got)


def test_adapters_are_served_by_name(served_model, api_key, openai_client, base_model_name, adapter_name):
    models = {m.id: m for m in openai_client.models.list().data}
    assert set(models) == {base_model_name, adapter_name}
    assert models[adapter_name].model_dump().get("parent") == base_model_name
    choice = ask(openai_client, adapter_name, WEATHER)
    assert choice.message.reasoning and no_markup(choice.message.content)
    check_calls(as_dict(choice)["calls"])
    # the adapter changes the model: the first token's log-probabilities differ from the base's
    first = {}
    for model in (base_model_name, adapter_name):
        resp = openai_client.chat.completions.create(model=model, messages=WEATHER, tools=TOOLS, temperature=0,
                                                     max_tokens=1, logprobs=True, top_logprobs=5)
        first[model] = [(t.token, round(t.logprob, 4)) for t in resp.choices[0].logprobs.content[0].top_logprobs]
    assert first[base_model_name] != first[adapter_name]

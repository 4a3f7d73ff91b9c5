"""Keel's tool parser (serving/parsers.py) inside the parser vLLM's server composes from the
format spec's names, fed model outputs a real server gets: whole (non-streaming) and token by
token through vLLM's incremental detokenizer (streaming). The served server tests
(tests/serving/) check the same contract end to end; these cover outputs the tiny model does not
write on demand (an invalid call, a stray closing tag, think tags after the reasoning, parallel
calls, whitespace)."""

from __future__ import annotations

import json

import pytest

from data.formats import load_format

pytest.importorskip("vllm")

from serving.parsers import parse_call, partial_suffix, split_output  # noqa: E402
from tests.unit.test_roundtrip import Server  # noqa: E402

FMT = load_format("hermes-qwen3")
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]


def call(name, args):
    return "<tool_call>" + json.dumps({"name": name, "arguments": args}) + "</tool_call>"


# (model output after "<think>r</think>", expected content, expected calls)
OUTPUTS = [
    ("Hello there.", "Hello there.", []),
    (call("f", {"a": 1}), None, [("f", {"a": 1})]),
    (call("f", {"a": 1}) + call("g", {"b": "x"}), None, [("f", {"a": 1}), ("g", {"b": "x"})]),
    ("Let me check." + call("f", {}), "Let me check.", [("f", {})]),
    ("\n" + call("f", {"a": 1}), None, [("f", {"a": 1})]),
    # cut by max_tokens: no call, no partial markup
    ('<tool_call>{"name": "f", "argu', None, []),
    (call("f", {"a": 1}) + '<tool_call>{"name": "g"', None, [("f", {"a": 1})]),
    # not a call: dropped, markup never shown
    ("<tool_call>not json</tool_call>", None, []),
    ('<tool_call>{"name": "f", "arguments": "a string"}</tool_call>', None, []),
    # a stray closing tag (the model wrote a call's JSON without its opening tag)
    ('{"name": "f"}</tool_call>', '{"name": "f"}', []),
    ("a < b and b > c", "a < b and b > c", []),
    # think tags after the reasoning ended (a collapsed model wrote `</think>` until max_tokens):
    # dropped from the content, streamed as whole (vLLM's qwen3 parser drops a repeated `</think>`
    # from a whole answer only). Not covered: a think tag inside a call's JSON, which vLLM's qwen3
    # parser removes from a whole answer before Keel's parser sees the text, and a stream keeps.
    ("</think></think>Hello.", "Hello.", []),
    ("</think></think></think>", None, []),
    ("a<think>b</think>c", "abc", []),
    ("</think>\n" + call("f", {}), None, [("f", {})]),
]


@pytest.fixture(scope="module")
def server(tiny_model):
    return Server(tiny_model, FMT.spec)


def request(tool_choice):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest(model="keel", messages=[{"role": "user", "content": "x"}], tools=TOOLS,
                                 tool_choice=tool_choice)


def run(server, output: str, tool_choice: str, streaming: bool):
    prompt = server.tokenizer.encode("<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n")
    ids = server.tokenizer.encode("<think>r</think>" + output + "<|im_end|>")
    req = request(tool_choice)
    parser = server.parser_cls(server.tokenizer, req.tools, chat_template_kwargs={})
    if not streaming:
        text = "".join(t for t, _ in server.deltas(prompt, ids))
        parser.set_prompt_token_ids(prompt)
        reasoning, content, calls = parser.parse(text, req, enable_auto_tools=True, model_output_token_ids=ids)
        return reasoning, content, [(c.name, json.loads(c.arguments)) for c in calls or []]
    reasoning, content, calls = "", "", {}
    deltas = list(server.deltas(prompt, ids))
    for k, (text, tok) in enumerate(deltas):
        delta = parser.parse_delta(delta_text=text, delta_token_ids=[tok], request=req, prompt_token_ids=prompt,
                                   finished=k == len(deltas) - 1)
        if delta is not None:
            reasoning += delta.reasoning or ""
            content += delta.content or ""
            for tc in delta.tool_calls or []:
                # each call arrives whole, in one delta, once it is known to be complete and valid
                assert tc.index not in calls and tc.id and tc.function.name
                calls[tc.index] = (tc.function.name, json.loads(tc.function.arguments))
    return reasoning or None, content or None, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("output,content,calls", OUTPUTS, ids=range(len(OUTPUTS)))
def test_auto(server, output, content, calls, streaming):
    assert run(server, output, "auto", streaming) == ("r", content, calls)


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("output,content,calls", OUTPUTS, ids=range(len(OUTPUTS)))
def test_none_returns_no_call_and_no_markup(server, output, content, calls, streaming):
    reasoning, got, got_calls = run(server, output, "none", streaming)
    assert reasoning == "r" and got_calls == []
    assert "<tool_call>" not in (got or "") and "</tool_call>" not in (got or "")


def test_none_forbids_the_call_delimiters(server):
    """tool_choice none keeps the tools in the prompt (as trained) and rules out the tokens that
    open and close a call, so the model answers in text."""
    ids = {server.tokenizer.convert_tokens_to_ids(t) for t in ("<tool_call>", "</tool_call>")}
    req = server.parser_cls(server.tokenizer, TOOLS, chat_template_kwargs={}).adjust_request(request("none"))
    assert {int(k) for k, v in (req.logit_bias or {}).items() if v == -100} == ids
    req = server.parser_cls(server.tokenizer, TOOLS, chat_template_kwargs={}).adjust_request(request("auto"))
    assert not req.logit_bias


def test_pieces():
    assert split_output("a<tool_call>1</tool_call>b<tool_call>2", "<tool_call>", "</tool_call>") == ("ab", ["1"], ["2"])
    assert partial_suffix("text <tool_", "<tool_call>") == 6 and partial_suffix("text", "<tool_call>") == 0
    assert parse_call('{"name": "f", "arguments": {"q": "\\u003c/tool_call>"}}').arguments == '{"q": "</tool_call>"}'
    assert parse_call('{"name": "", "arguments": {}}') is None


# --------------------------------------------------------------------------- deepseek-r1
# What vLLM's deepseek_r1 reasoning parser makes of outputs after the prompt
# "...<｜Assistant｜><think>\n" (the prompt opens the reasoning), whole and streamed: the trained
# shape, a reply cut by max_tokens inside the reasoning, and a model that opens <think> again.
# (output, ended by the stop token, expected reasoning, expected content)
DEEPSEEK_OUTPUTS = [
    ("r</think>Answer.", True, "r", "Answer."),
    ("</think>Answer.", True, None, "Answer."),
    ("still thinking when max_tokens cut it", False, "still thinking when max_tokens cut it", None),
    ("<think>r</think>Answer.", True, "r", "Answer."),
]


@pytest.fixture(scope="module")
def deepseek_server(tiny_model_for):
    return Server(tiny_model_for("deepseek-r1"), load_format("deepseek-r1").spec)


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("output,stopped,reasoning,content", DEEPSEEK_OUTPUTS, ids=range(len(DEEPSEEK_OUTPUTS)))
def test_deepseek_r1_reasoning_after_a_prompt_that_opened_think(deepseek_server, output, stopped, reasoning, content,
                                                               streaming):
    server = deepseek_server
    prompt = server.tokenizer.encode("<｜begin▁of▁sentence｜><｜User｜>x<｜Assistant｜><think>\n")
    ids = server.tokenizer.encode(output + ("<｜end▁of▁sentence｜>" if stopped else ""))
    parse = server.parse_streaming if streaming else server.parse
    got = parse(prompt, ids, None)
    assert (got["reasoning"] or None, got["content"] or None, got["calls"]) == (reasoning, content, [])



NESTED = {"filters": {"tags": ["a", "b"], "range": {"from": 1, "to": 2.5}}, "deep": [[{"x": None}], True]}


# What vLLM's deepseek_v3 tool parser, behind the deepseek_r1 reasoning parser, makes of assistant
# turns the deepseek-r1 template writes with tools, whole and streamed token by token after the
# prompt the template renders (it opened <think>). (assistant message, expected reasoning, content, calls)
DEEPSEEK_TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
                  for n in ("get_weather", "search", "now")]
DEEPSEEK_TRICKY = {"q": 'say "hi" \\ {not json} ```json\n``` `tick` 東京 — ünï\n', "emoji": "🙂", "empty": ""}
DEEPSEEK_MARKUP = {"q": "<｜tool▁calls▁begin｜> <｜tool▁call▁end｜>\n``` </think> <think> <｜end▁of▁sentence｜> <｜tool▁sep｜>"}


def deepseek_calls(*calls, content="", reasoning="Check."):
    return {"role": "assistant", "reasoning_content": reasoning, "content": content, "tool_calls": [
        {"id": f"call_{k}", "type": "function", "function": {"name": name, "arguments": args}}
        for k, (name, args) in enumerate(calls)]}


DEEPSEEK_TURNS = [
    ({"role": "assistant", "reasoning_content": "Easy.", "content": "Sunny [18°C]."}, "Easy.", "Sunny [18°C].", []),
    (deepseek_calls(("get_weather", {"city": "Paris"})), "Check.", "", [("get_weather", {"city": "Paris"})]),
    (deepseek_calls(("get_weather", {"city": "Paris"}), ("now", {}), ("search", {"q": "x"})), "Check.", "",
     [("get_weather", {"city": "Paris"}), ("now", {}), ("search", {"q": "x"})]),
    (deepseek_calls(("search", NESTED)), "Check.", "", [("search", NESTED)]),
    (deepseek_calls(("search", DEEPSEEK_TRICKY), ("search", DEEPSEEK_MARKUP)), "Check.", "",
     [("search", DEEPSEEK_TRICKY), ("search", DEEPSEEK_MARKUP)]),
    (deepseek_calls(("now", {}), content="Let me look it up.", reasoning=""), "", "Let me look it up.", [("now", {})]),
]


def deepseek_ids(server, answer: dict, template: str | None = None):
    from data.conversation import validate_conversation
    from data.render import render_conversation

    fmt = load_format("deepseek-r1")
    if template is not None:
        fmt.chat_template = template
    row = {"messages": [{"role": "user", "content": "What's up?"}, answer], "tools": DEEPSEEK_TOOLS}
    [ex] = render_conversation(validate_conversation(row, fmt.row_rules()), tokenizer=server.tokenizer, fmt=fmt)
    start = next(k for k, lab in enumerate(ex.labels) if lab != -100)
    return ex.input_ids[:start], ex.input_ids[start:]


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("answer,reasoning,content,calls", DEEPSEEK_TURNS, ids=range(len(DEEPSEEK_TURNS)))
def test_deepseek_v3_parser_gives_back_the_written_turn(deepseek_server, answer, reasoning, content, calls, streaming):
    server = deepseek_server
    prompt, ids = deepseek_ids(server, answer)
    assert server.tokenizer.decode(prompt).endswith("<｜Assistant｜><think>\n")
    assert server.tokenizer.decode(ids[-1:]) == "<｜end▁of▁sentence｜>"
    parse = server.parse_streaming if streaming else server.parse
    assert parse(prompt, ids, DEEPSEEK_TOOLS) == {"reasoning": reasoning, "content": content, "calls": calls}


def test_deepseek_calls_are_written_back_to_back_because_the_published_newline_streams_as_content(deepseek_server):
    """Why the template leaves out the "\n" the published template puts between two calls:
    vLLM's deepseek_v3 parser reads such a turn whole, but streamed it returns each "\n" as
    content, so the client would get text the model was not meant to say."""
    server = deepseek_server
    template = load_format("deepseek-r1").chat_template
    joined = "calls.text + '<｜tool▁call▁begin｜>function"
    assert joined in template
    published = template.replace(joined, "calls.text + ('\\n' if calls.text else '') + '<｜tool▁call▁begin｜>function")
    answer, reasoning, _, calls = DEEPSEEK_TURNS[2]
    prompt, ids = deepseek_ids(server, answer, published)
    assert "<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>" in server.tokenizer.decode(ids)
    assert server.parse(prompt, ids, DEEPSEEK_TOOLS) == {"reasoning": reasoning, "content": "", "calls": calls}
    assert server.parse_streaming(prompt, ids, DEEPSEEK_TOOLS) == {"reasoning": reasoning, "content": "\n\n",
                                                                   "calls": calls}


# --------------------------------------------------------------------------- mistral
# What vLLM's mistral parser (HF tokenizer, pre-v11 path: [TOOL_CALLS] then a JSON list) makes of
# assistant turns the mistral template writes, whole and streamed token by token, after the
# prompt the template renders with the tools. (assistant message, expected content, expected calls)
MISTRAL_TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
                 for n in ("get_weather", "search", "now")]


def mistral_calls(*calls):
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": f"call_{k}", "type": "function", "function": {"name": name, "arguments": args}}
        for k, (name, args) in enumerate(calls)]}


TRICKY = {"q": 'say "hi" \\ {not json} [brackets] 東京 — ünï', "emoji": "🙂", "empty": ""}
MARKUP = {"q": "[TOOL_CALLS] [INST] [/INST] </s> <s> [TOOL_RESULTS] [/AVAILABLE_TOOLS]"}
MISTRAL_TURNS = [
    ({"role": "assistant", "content": "Paris, mostly sunny [18°C]."}, "Paris, mostly sunny [18°C].", []),
    (mistral_calls(("get_weather", {"city": "Paris"})), "", [("get_weather", {"city": "Paris"})]),
    (mistral_calls(("get_weather", {"city": "Paris"}), ("now", {}), ("search", {"q": "x"})), "",
     [("get_weather", {"city": "Paris"}), ("now", {}), ("search", {"q": "x"})]),
    (mistral_calls(("search", NESTED)), "", [("search", NESTED)]),
    (mistral_calls(("search", TRICKY), ("search", MARKUP)), "", [("search", TRICKY), ("search", MARKUP)]),
]


@pytest.fixture(scope="module")
def mistral_server(tiny_model_for):
    return Server(tiny_model_for("mistral"), load_format("mistral").spec)


def mistral_ids(server, answer: dict):
    from data.conversation import validate_conversation
    from data.render import render_conversation

    fmt = load_format("mistral")
    row = {"messages": [{"role": "user", "content": "What's up?"}, answer], "tools": MISTRAL_TOOLS}
    conv = validate_conversation(row, fmt.row_rules())
    [ex] = render_conversation(conv, tokenizer=server.tokenizer, fmt=fmt)
    start = next(k for k, lab in enumerate(ex.labels) if lab != -100)
    return ex.input_ids[:start], ex.input_ids[start:]


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("answer,content,calls", MISTRAL_TURNS, ids=range(len(MISTRAL_TURNS)))
def test_mistral_parser_gives_back_the_written_turn(mistral_server, answer, content, calls, streaming):
    prompt, ids = mistral_ids(mistral_server, answer)
    assert mistral_server.tokenizer.decode(ids[-1:]) == "</s>"
    parse = mistral_server.parse_streaming if streaming else mistral_server.parse
    assert parse(prompt, ids, MISTRAL_TOOLS) == {"reasoning": "", "content": content, "calls": calls}


def test_mistral_parser_needs_the_tool_call_token_kept_in_the_text(mistral_server):
    """Why Keel's round-trip harness follows the server's request adjustment: [TOOL_CALLS] is a
    special token, and vLLM's mistral parser turns skip_special_tokens off for requests with
    tools; skipped, the calls would come back as content."""
    prompt, ids = mistral_ids(mistral_server, MISTRAL_TURNS[1][0])
    parser = mistral_server.parser_cls(mistral_server.tokenizer, MISTRAL_TOOLS, chat_template_kwargs={})
    assert mistral_server.adjusted(parser, MISTRAL_TOOLS).skip_special_tokens is False
    skipped = "".join(t for t, _ in mistral_server.deltas(prompt, ids, True))
    assert "[TOOL_CALLS]" not in skipped and skipped.lstrip().startswith('[{"name": "get_weather"')

"""The harmony format (gpt-oss): Keel's training examples against vLLM's own harmony path.

For every trained turn of a set of conversations, the ids before the turn must be what vLLM's
chat completions sends to the engine for that request (OnlineRenderer._make_request_with_harmony
called on a ChatCompletionRequest, the server's start date pinned as `keel serve` pins it), and
the trained ids must be what vLLM's HarmonyParser (built by ParserManager from the spec's
parser names, as the server builds it) turns back into the row's reasoning, content and call,
fed whole and token by token. Data preparation itself never imports vLLM; this test does.
"""

from __future__ import annotations

import copy
import json
import os
from types import SimpleNamespace

import pytest

from conftest import trained_spans
from data.conversation import RowError, validate_conversation, validate_preference
from data.errors import KeelError
from data.formats import load_format, resolve_format
from data.render import IGNORE_INDEX, check_tokenizer, render_conversation, render_preference

FMT = load_format("harmony")
START, RETURN, CALL = 200006, 200002, 200012
ASSISTANT = 173781

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}}
BOOK = {"type": "function", "function": {
    "name": "book_trip", "description": "Book a trip",
    "parameters": {"type": "object", "properties": {
        "who": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}},
        "legs": {"type": "array", "items": {"type": "object", "properties": {
            "from": {"type": "string"}, "to": {"type": "string"}, "date": {"type": "string"}}}},
        "notes": {"type": ["string", "null"]}}}}}


def call(cid, name, args):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


CONVERSATIONS = {
    "plain": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    "system": {"messages": [{"role": "system", "content": "Answer in French."},
                            {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "De rien."}]},
    "reasoning": {"messages": [{"role": "user", "content": "2+2?"},
                               {"role": "assistant", "reasoning_content": "Add them.", "content": "4"}]},
    "multi_turn": {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "reasoning_content": "Easy: 4.", "content": "4"},
        {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "reasoning_content": "Six.", "content": "6"},
        {"role": "user", "content": "Goodbye now"}, {"role": "assistant", "content": "Bye!"}]},
    "tool_loop": {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "reasoning_content": "I should call the tool.", "content": "",
         "tool_calls": [call("c1", "get_weather", {"city": "Paris"})]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 18}"},
        {"role": "assistant", "reasoning_content": "It is 18.", "content": "18 degrees in Paris."},
        {"role": "user", "content": "And Rome, in f?"},
        {"role": "assistant", "tool_calls": [call("c2", "get_weather", {"city": "Rome", "unit": "f"})]},
        {"role": "tool", "tool_call_id": "c2", "content": "{\"temp_f\": 75}"},
        {"role": "assistant", "content": "75 F."}]},
    "content_reasoning_call": {"tools": [WEATHER], "messages": [
        {"role": "system", "content": "You help with weather."},
        {"role": "user", "content": "Zürich?"},
        {"role": "assistant", "reasoning_content": "Need data.", "content": "Let me check.",
         "tool_calls": [call("x", "get_weather", {"city": "Zürich"})]},
        {"role": "tool", "tool_call_id": "x", "content": "{\"sky\": \"cold\"}"},
        {"role": "assistant", "reasoning_content": "Say it.", "content": "It is cold."}]},
    "content_and_call": {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Oslo?"},
        {"role": "assistant", "content": "Checking Oslo.", "tool_calls": [call("o", "get_weather", {"city": "Oslo"})]},
        {"role": "tool", "tool_call_id": "o", "content": "{\"c\": -3}"},
        {"role": "assistant", "content": "-3 degrees."}]},
    "unicode_nested": {"tools": [WEATHER, BOOK], "messages": [
        {"role": "system", "content": "日本語で答えて 🙂"},
        {"role": "user", "content": "Book 東京 → Zürich for Zoë, \"quoted\"\tand\nnewlines"},
        {"role": "assistant", "reasoning_content": "Legs: one.\n\nNotes none.",
         "tool_calls": [call("b1", "book_trip", {"who": {"name": "Zoë", "age": 31},
                                                 "legs": [{"from": "東京", "to": "Zürich", "date": "2026-03-01"}],
                                                 "notes": None})]},
        {"role": "tool", "tool_call_id": "b1", "content": "{\"ok\": true, \"ref\": \"ÅÉ-42\"}"},
        {"role": "assistant", "reasoning_content": "Booked.", "content": "予約しました (ÅÉ-42) 🚀"}]},
}


@pytest.fixture(scope="module")
def vllm():
    """vLLM's harmony path: the prompt its chat completions builds, and its HarmonyParser."""
    os.environ["VLLM_SYSTEM_START_DATE"] = FMT.spec.harmony.start_date  # what `keel serve` sets
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.parser.parser_manager import ParserManager
    from vllm.renderers.online_renderer import OnlineRenderer

    server = SimpleNamespace(supports_browsing=False, supports_code_interpreter=False, renderer=None)
    parser_cls = ParserManager.get_parser(tool_parser_name=FMT.spec.vllm.tool_parser,
                                          reasoning_parser_name=FMT.spec.vllm.reasoning_parser,
                                          enable_auto_tools=True, is_harmony=True)

    def request(messages, tools, **extra):
        """A client's request for these (validated) messages: reasoning_content sent as vLLM's
        `reasoning` (Keel's serving middleware maps it), arguments as the JSON string the server
        returned for the call."""
        out = []
        for m in messages:
            m = dict(m)
            if "reasoning_content" in m:
                m["reasoning"] = m.pop("reasoning_content")
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
                                   for c in m["tool_calls"]]
            out.append(m)
        return ChatCompletionRequest(model="m", messages=out, tools=tools or None, **extra)

    def prompt(messages, tools, **extra):
        _, [engine_input] = OnlineRenderer._make_request_with_harmony(server, request(messages, tools, **extra))
        return list(engine_input["prompt_token_ids"])

    def parse(ids, tools):
        reasoning, content, calls = parser_cls(None, tools).parse("", request([], tools), True, ids)
        return {"reasoning": reasoning or "", "content": content or "",
                "calls": [(c.name, json.loads(c.arguments)) for c in calls or []]}

    def parse_streaming(ids, tools):
        parser, req = parser_cls(None, tools), request([], tools)
        got = {"reasoning": "", "content": "", "calls": []}
        args = []
        for k, tok in enumerate(ids):
            delta = parser.parse_delta("", [tok], req, finished=k == len(ids) - 1)
            if delta is None:
                continue
            got["reasoning"] += delta.reasoning or ""
            got["content"] += delta.content or ""
            for tc in delta.tool_calls or []:
                if tc.function.name:
                    got["calls"].append(tc.function.name)
                    args.append("")
                args[-1] += tc.function.arguments or ""
        got["calls"] = [(n, json.loads(a)) for n, a in zip(got["calls"], args)]
        return got

    return SimpleNamespace(prompt=prompt, parse=parse, parse_streaming=parse_streaming)


def rendered(name, fmt=FMT):
    conv = validate_conversation(copy.deepcopy(CONVERSATIONS[name]), fmt.row_rules())
    return conv, render_conversation(conv, tokenizer=None, fmt=fmt)


def trained_turns(name, fmt=FMT):
    """(conversation, assistant index, example ids, run start, run end) of every trained turn."""
    conv, examples = rendered(name, fmt)
    turns = [i for i, m in enumerate(conv["messages"]) if m["role"] == "assistant"]
    if fmt.spec.train_on == "last":
        turns = turns[-1:]
    spans = [(ex.input_ids, s, e) for ex in examples for s, e in trained_spans(ex.labels)]
    assert len(spans) == len(turns), name
    return [(conv, i, *span) for i, span in zip(turns, spans)]


def expected(msg):
    return {"reasoning": msg.get("reasoning_content") or "", "content": msg["content"] or "",
            "calls": [(c["function"]["name"], c["function"]["arguments"]) for c in msg.get("tool_calls", [])]}


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_prompt_of_every_trained_turn_is_what_vllm_sends(name, vllm):
    for conv, i, ids, start, _end in trained_turns(name):
        assert ids[:start] == vllm.prompt(conv["messages"][:i], conv["tools"]), (name, i)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_trained_tokens_parse_back_to_the_row_whole_and_streamed(name, vllm):
    for conv, i, ids, start, end in trained_turns(name):
        want = expected(conv["messages"][i])
        assert vllm.parse(ids[start:end], conv["tools"]) == want, (name, i)
        assert vllm.parse_streaming(ids[start:end], conv["tools"]) == want, (name, i)
        # the engine may hand the parser the output without its stop token
        assert vllm.parse(ids[start:end - 1], conv["tools"]) == want, (name, i)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_only_what_the_assistant_writes_is_trained(name):
    """Each trained run starts right after the prompt's `<|start|>assistant`, ends on the stop
    token generation ends with, and holds no message of another author; every other token
    (system, developer, user, tool results, history) is not trained."""
    conv, examples = rendered(name)
    for ex in examples:
        assert all(lab in (IGNORE_INDEX, tok) for tok, lab in zip(ex.input_ids, ex.labels))
        for s, e in trained_spans(ex.labels):
            assert ex.input_ids[s - 2:s] == [START, ASSISTANT]
            assert ex.input_ids[e - 1] in (RETURN, CALL)
            inner = [k for k in range(s, e) if ex.input_ids[k] == START]
            assert all(ex.input_ids[k + 1] == ASSISTANT for k in inner)
            assert RETURN not in ex.input_ids[s:e - 1] and CALL not in ex.input_ids[s:e - 1]
    from data.harmony import encoding

    trained = "".join(encoding().decode_utf8([t for t in ex.labels if t != IGNORE_INDEX]) for ex in examples)
    for m in conv["messages"]:
        if m["role"] != "assistant":
            assert m["content"] not in trained, (name, m)
        else:
            assert m["content"] in trained and (m.get("reasoning_content") or "") in trained, (name, m)


@pytest.mark.parametrize("name, examples", [
    ("plain", 1),
    ("tool_loop", 2),  # one per stretch between user messages: the loop is one example
    ("multi_turn", 3),  # vLLM drops earlier reasoning and reads <|return|> as <|end|> after a user message
    ("content_reasoning_call", 2),  # the next prompt holds the preamble before the reasoning
    ("content_and_call", 1),
])
def test_turns_share_an_example_exactly_while_the_served_prompt_continues_it(name, examples):
    _, got = rendered(name)
    assert len(got) == examples


def test_train_on_last_trains_the_last_turn_only(vllm):
    fmt = resolve_format("harmony", train_on="last")
    [(conv, i, ids, start, end)] = trained_turns("tool_loop", fmt)
    assert i == len(conv["messages"]) - 1
    assert ids[:start] == vllm.prompt(conv["messages"][:i], conv["tools"]) and end == len(ids)


def test_the_specs_reasoning_effort_is_the_one_vllm_writes_for_a_request_naming_it(vllm):
    from data.formats import Format, HarmonyPrompt

    high = Format(FMT.spec.model_copy(update={"harmony": HarmonyPrompt(start_date=FMT.spec.harmony.start_date,
                                                                       reasoning_effort="high")}), None, FMT.directory)
    [(conv, i, ids, start, _)] = trained_turns("reasoning", high)
    assert ids[:start] == vllm.prompt(conv["messages"][:i], None, reasoning_effort="high")
    assert ids[:start] != vllm.prompt(conv["messages"][:i], None)  # medium, what a request naming none gets


def test_a_tool_result_without_an_id_is_written_from_the_tool_it_answers():
    """vLLM names a result's author by tool_call_id; a row that pairs them another way (Keel's
    validation accepts results without ids when the calls have none) gets the called tool's name,
    as vLLM writes it for a client that sends the id."""
    from data.harmony import encoding

    row = {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                                "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "{\"temp\": 18}"}, {"role": "assistant", "content": "18."}]}
    [ex] = render_conversation(validate_conversation(row, FMT.row_rules()), tokenizer=None, fmt=FMT)
    assert "<|start|>functions.get_weather<|channel|>commentary to=assistant<|message|>{\"temp\": 18}<|end|>" in \
        encoding().decode_utf8(ex.input_ids)


def test_history_reasoning_is_not_an_option_for_harmony():
    with pytest.raises(KeelError, match="data.history_reasoning: format 'harmony' renders the history as vLLM"):
        resolve_format("harmony", history_reasoning="keep")


def test_preference_pair_prompt_is_vllms_and_each_answer_parses_back(vllm):
    row = {"prompt": CONVERSATIONS["tool_loop"]["messages"][:3], "tools": [WEATHER],
           "chosen": {"role": "assistant", "reasoning_content": "18.", "content": "18 degrees."},
           "rejected": {"role": "assistant", "tool_calls": [call("c9", "get_weather", {"city": "Rome"})]}}
    pair = validate_preference(row, FMT.row_rules())
    got = render_preference(pair, tokenizer=None, fmt=FMT)
    assert got.prompt_ids == vllm.prompt(pair["prompt"], pair["tools"])
    assert vllm.parse(got.chosen_ids, pair["tools"]) == expected(pair["chosen"])
    assert vllm.parse(got.rejected_ids, pair["tools"]) == expected(pair["rejected"])
    assert got.chosen_ids[-1] == RETURN and got.rejected_ids[-1] == CALL


def _refused(row):
    with pytest.raises(RowError) as err:
        render_conversation(validate_conversation(row, FMT.row_rules()), tokenizer=None, fmt=FMT)
    return str(err.value)


@pytest.mark.parametrize("row, where, says", [
    ({"messages": [{"role": "user", "content": "say <|channel|> please"}, {"role": "assistant", "content": "no"}]},
     "messages[0].content", "literal format token '<|channel|>'"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "reasoning_content": "x <|reserved_200017|> y", "content": "ok"}]},
     "messages[1].reasoning_content", "'<|reserved_200017|>'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": "ends <|end|> here"}}],
      "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
     "tools[0].function.description", "'<|end|>'"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}],
      "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
     "tools[0].function.name", "rename the tool"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "other"}}], "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call("a", "get_weather", {"city": "x"})]},
        {"role": "tool", "tool_call_id": "a", "content": "1"},
        {"role": "assistant", "tool_calls": [call("a", "other", {})]},
        {"role": "tool", "tool_call_id": "a", "content": "2"}, {"role": "assistant", "content": "done"}]},
     "messages[3].tool_calls[0].id", "give each call its own id"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "reasoning_content": "thinking only"}]},
     "messages[1]", "add the answer or the call"),
])
def test_rows_harmony_cannot_carry_are_refused_with_the_place_and_the_fix(row, where, says):
    message = _refused(row)
    assert message.startswith(where) and says in message, message


def test_two_calls_in_one_turn_are_refused():
    row = {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [call("a", "get_weather", {"city": "x"}), call("b", "get_weather", {"city": "y"})]},
        {"role": "tool", "tool_call_id": "a", "content": "1"}, {"role": "tool", "tool_call_id": "b", "content": "2"},
        {"role": "assistant", "content": "ok"}]}
    with pytest.raises(RowError, match=r"messages\[1\]\.tool_calls: format 'harmony' takes one tool call per turn"):
        validate_conversation(row, FMT.row_rules())


def test_a_tokenizer_that_is_not_harmonys_is_refused_naming_the_fix():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    with pytest.raises(KeelError, match=r"models/x: format 'harmony' needs gpt-oss's o200k_harmony tokenizer.*"
                                        r"keel tiny-model --arch gpt_oss"):
        check_tokenizer(fast, FMT, where="models/x")


@pytest.mark.slow  # the harmony tokenizer is built once (about 12 s)
def test_prepare_writes_the_harmony_examples_and_rejects_bad_rows_with_the_reason(tmp_path):
    """The real preparation path (tokenizer check, workers, Arrow cache) with the harmony
    tokenizer, which passes check_tokenizer: the cache holds render_conversation's ids and labels; a row harmony cannot carry
    is left out with its reason; a second prepare reuses the cache."""
    from data.harmony_tokenizer import build_harmony_tokenizer
    from data.prepare import PrepOptions, prepare_file

    build_harmony_tokenizer().save_pretrained(tmp_path / "tok")
    rows = [CONVERSATIONS[n] for n in ("tool_loop", "unicode_nested", "multi_turn")]
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a <|call|> b"}]}
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [*rows, bad]), encoding="utf-8")
    options = PrepOptions(on_invalid="skip")
    prepared = prepare_file(data, tokenizer_dir=tmp_path / "tok", fmt=FMT, seq_len=4096, cache_root=tmp_path / "c",
                            options=options, num_proc=1)
    assert (prepared.stats.rows, prepared.stats.rejected) == (4, 1)
    [rejected] = [json.loads(line) for line in prepared.rejected_file.read_text().splitlines()]
    assert rejected["where"].endswith(":4") and "messages[1].content" in rejected["reason"]
    want = [ex for r in rows for ex in render_conversation(validate_conversation(copy.deepcopy(r), FMT.row_rules()),
                                                           tokenizer=None, fmt=FMT)]
    got = prepared.load()
    assert [list(x) for x in got["input_ids"]] == [ex.input_ids for ex in want]
    assert [list(x) for x in got["labels"]] == [ex.labels for ex in want]
    again = prepare_file(data, tokenizer_dir=tmp_path / "tok", fmt=FMT, seq_len=4096, cache_root=tmp_path / "c",
                         options=options, num_proc=1)
    assert again.reused and again.path == prepared.path


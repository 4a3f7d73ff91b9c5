"""Rendering and loss masks, checked against an independent construction of what the
assistant writes, and the prepared-data cache."""

from __future__ import annotations

import copy

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data.conversation import validate_conversation
from data.errors import KeelError
from data.formats import Delimiters, Format, load_format
from data.prepare import COMPLETE_MARKER, prepare_file, read_jsonl
from data.render import IGNORE_INDEX, check_tokenizer, render_conversation, render_text

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "examples" / "tool-calling.jsonl"
FMT = load_format("hermes-qwen3")


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def conversations(limit=None):
    rows = [row for _, row in read_jsonl(DATA)][:limit]
    return [validate_conversation(r, FMT.markup_strings()) for r in rows]


def expected_turn(msg: dict) -> str:
    """What the assistant writes for one turn, built without the template."""
    calls = "".join(
        "<tool_call>" + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                   ensure_ascii=False) + "</tool_call>"
        for c in msg.get("tool_calls", [])
    )
    return f"<think>{msg.get('reasoning_content') or ''}</think>{msg['content']}{calls}<|im_end|>"


def trained_spans(tokenizer, ex) -> list[str]:
    spans, cur = [], []
    for tok, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE_INDEX:
            assert lab == tok
            cur.append(tok)
        elif cur:
            spans.append(tokenizer.decode(cur))
            cur = []
    if cur:
        spans.append(tokenizer.decode(cur))
    return spans


def test_mask_covers_exactly_what_the_assistant_writes(tokenizer):
    """Over the whole quickstart set: trained text == the assistant turns after the last user
    message, end-of-turn token included; system, user and tool text never trained."""
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for conv in conversations():
        msgs = conv["messages"]
        user_idx = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        examples = render_conversation(conv, tokenizer=tokenizer, fmt=FMT)
        assert len(examples) == len(user_idx)  # one example per stretch between user messages
        for k, ex in enumerate(examples):
            end = user_idx[k + 1] if k + 1 < len(user_idx) else len(msgs)
            want = [expected_turn(m) for m in msgs[user_idx[k]:end] if m["role"] == "assistant"]
            assert trained_spans(tokenizer, ex) == want
            trained_ends = [t for t, lab in zip(ex.input_ids, ex.labels) if lab == end_id]
            assert len(trained_ends) == len(want)  # every trained turn ends with a trained <|im_end|>


def test_history_reasoning_is_dropped_before_the_last_user_message(tokenizer):
    conv = next(c for c in conversations() if sum(m["role"] == "user" for m in c["messages"]) > 1)
    last_example = render_conversation(conv, tokenizer=tokenizer, fmt=FMT)[-1]
    text = tokenizer.decode(last_example.input_ids)
    first_reasoning = next(m["reasoning_content"] for m in conv["messages"] if m["role"] == "assistant")
    assert first_reasoning not in text.split("<|im_start|>user")[-1]  # not after the last user turn either
    history = text.rsplit("<|im_start|>user", 1)[0]
    assert "<think>" not in history


def test_rendering_matches_transformers_apply_chat_template(tokenizer):
    """The server renders with tokenizer.apply_chat_template; training must produce the same text."""
    for conv in conversations(40):
        for gen in (False, True):
            msgs = conv["messages"][:-1] if gen else conv["messages"]
            ours = render_text({"messages": msgs, "tools": conv["tools"]}, fmt=FMT, add_generation_prompt=gen)
            theirs = tokenizer.apply_chat_template(msgs, tools=conv["tools"], chat_template=FMT.chat_template,
                                                   tokenize=False, add_generation_prompt=gen)
            assert ours == theirs


def test_format_tokens_are_single_tokens(tokenizer):
    check_tokenizer(tokenizer, FMT, "tiny")
    spec = FMT.spec.model_copy(update={"think": Delimiters(open="<reason>", close="</reason>")})
    other = Format(spec, FMT.chat_template, FMT.directory)
    with pytest.raises(KeelError, match="'<reason>', '</reason>' as single tokens"):
        check_tokenizer(tokenizer, other, "tiny")


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_prepare_reports_bad_rows_with_file_and_line(tmp_path, tiny_model):
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:12]]
    rows[2] = '{"messages": [{"role": "user", "content": "truncated'
    k = next(i for i in range(3, len(rows)) if any(m.get("tool_calls") for m in rows[i]["messages"]))
    for m in rows[k]["messages"]:
        for c in m.get("tool_calls", []):
            c["function"]["arguments"] = "{not json"
    data = write_rows(tmp_path / "rows.jsonl", rows)
    with pytest.raises(KeelError) as err:
        prepare_file(data, tokenizer_dir=tiny_model, fmt=FMT, seq_len=1024, cache_root=tmp_path / "cache")
    msg = str(err.value)
    assert "2 of 12 rows are invalid" in msg
    assert f"{data}:3: not valid JSON" in msg
    assert f"{data}:{k + 1}: messages[" in msg and "arguments are not valid JSON" in msg
    assert not any((tmp_path / "cache").glob(f"*/{COMPLETE_MARKER}"))  # nothing half-written


def test_prepare_caches_and_reuses(tmp_path, tiny_model):
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:30]]
    data = write_rows(tmp_path / "rows.jsonl", rows)
    kwargs = dict(tokenizer_dir=tiny_model, fmt=FMT, cache_root=tmp_path / "cache")
    first = prepare_file(data, seq_len=1024, **kwargs)
    again = prepare_file(data, seq_len=1024, **kwargs)
    assert not first.reused and again.reused and again.path == first.path
    assert first.stats.rows == 30 and first.stats.examples >= 30 and first.stats.truncated == 0
    ds = again.load()
    assert len(ds) == first.stats.examples and set(ds.column_names) == {"input_ids", "labels"}
    short = prepare_file(data, seq_len=460, **kwargs)
    assert short.path != first.path and short.stats.truncated > 0
    assert max(len(x) for x in short.load()["input_ids"]) <= 460


def test_empty_dataset_is_an_error(tmp_path, tiny_model):
    data = write_rows(tmp_path / "empty.jsonl", [])
    with pytest.raises(KeelError, match="holds nothing to train on"):
        prepare_file(data, tokenizer_dir=tiny_model, fmt=FMT, seq_len=512, cache_root=tmp_path / "c")


def test_deepseek_r1_trains_what_the_model_writes_after_the_opened_think(tiny_model_for):
    """The server's prompt for a turn ends with the published generation prompt
    <｜Assistant｜><think>\\n; what is trained is what the model writes after it (reasoning,
    </think>, the answer, <｜end▁of▁sentence｜>), nothing of the prompt; history turns carry no
    reasoning; and the text is what the server's apply_chat_template renders."""
    fmt = load_format("deepseek-r1")
    tok = AutoTokenizer.from_pretrained(tiny_model_for("deepseek-r1"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "reasoning_content": "Add them.", "content": "4"},
                {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "reasoning_content": "Add again.", "content": "6"}]
    conv = validate_conversation({"messages": messages}, fmt.row_rules())
    first, second = render_conversation(conv, tokenizer=tok, fmt=fmt)
    assert trained_spans(tok, first) == ["Add them.</think>4<｜end▁of▁sentence｜>"]
    assert trained_spans(tok, second) == ["Add again.</think>6<｜end▁of▁sentence｜>"]
    assert tok.decode(second.input_ids) == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>2+2?<｜Assistant｜>4<｜end▁of▁sentence｜>"
        "<｜User｜>and 3+3?<｜Assistant｜><think>\nAdd again.</think>6<｜end▁of▁sentence｜>")
    prompt = render_text({"messages": messages[:-1]}, fmt=fmt, add_generation_prompt=True)
    assert prompt.endswith("<｜User｜>and 3+3?<｜Assistant｜><think>\n")
    assert tok.decode(second.input_ids).startswith(prompt)
    for gen in (False, True):
        msgs = messages[:-1] if gen else messages
        assert render_text({"messages": msgs}, fmt=fmt, add_generation_prompt=gen) == tok.apply_chat_template(
            msgs, chat_template=fmt.chat_template, tokenize=False, add_generation_prompt=gen)



DEEPSEEK_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <｜now｜>.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "now"}}]
DEEPSEEK_AGENT = {"messages": [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "Weather in Paris and the time?"},
    {"role": "assistant", "reasoning_content": "Two tools.", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris Île"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": "18°C"}'},
    {"role": "assistant", "reasoning_content": "Both in.", "content": "18°C at noon."},
    {"role": "user", "content": "And tomorrow?"},
    {"role": "assistant", "reasoning_content": "Ask again.", "content": "Let me look.", "tool_calls": [
        {"id": "call_3", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call_3", "content": "20°C"},
    {"role": "assistant", "reasoning_content": "", "content": "20°C."}], "tools": DEEPSEEK_TOOLS}


def deepseek_tools_text(messages: list[dict], tools: list[dict]) -> str:
    """DeepSeek-R1's tool layout, built without the template: the tool list at the end of the
    system text, calls back to back between <｜tool▁calls▁begin｜> and <｜tool▁calls▁end｜>, results
    joined by "\n" and closed by <｜tool▁outputs▁end｜>, after which the next assistant turn
    follows without <｜Assistant｜>; reasoning only after the last user message."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    out = "<｜begin▁of▁sentence｜>" + messages[0]["content"] + "\n\n## Tools\n\nYou may call one or more of these functions. Each is one JSON object:"
    for t in tools:
        out += "\n" + json.dumps(t, ensure_ascii=False).replace("<｜", "\\u003c｜")
    for i, m in enumerate(messages):
        if m["role"] == "user":
            out += "<｜User｜>" + m["content"]
        elif m["role"] == "assistant":
            out += "" if messages[i - 1]["role"] == "tool" else "<｜Assistant｜>"
            if i > last_user:
                out += "<think>\n" + m["reasoning_content"] + "</think>"
            out += m["content"]
            if m.get("tool_calls"):
                out += "<｜tool▁calls▁begin｜>" + "".join(
                    f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{c['function']['name']}\n```json\n"
                    f"{json.dumps(c['function']['arguments'], ensure_ascii=False)}\n```<｜tool▁call▁end｜>"
                    for c in m["tool_calls"]) + "<｜tool▁calls▁end｜>"
            out += "<｜end▁of▁sentence｜>"
        elif m["role"] == "tool":
            out += ("\n" if messages[i - 1]["role"] == "tool" else "<｜tool▁outputs▁begin｜>")
            out += "<｜tool▁output▁begin｜>" + m["content"] + "<｜tool▁output▁end｜>"
            if i + 1 == len(messages) or messages[i + 1]["role"] != "tool":
                out += "<｜tool▁outputs▁end｜>"
    return out


def test_deepseek_r1_writes_tools_calls_and_results_and_trains_only_what_the_model_writes(tiny_model_for):
    """Tools listed in the system text, parallel calls after the reasoning, results as tool
    outputs. The loss covers reasoning, </think>, the content, the calls and
    <｜end▁of▁sentence｜>, never the tool list, the results or the prompt's <think>\n; reasoning of
    turns before the last user message is dropped (one example per user stretch); the prompt
    the server renders for every trained turn, after a user turn or after tool outputs, is
    exactly the ids before that turn in its example. Results are written in the order of the
    calls they answer (the layout has no ids to pair them by)."""
    fmt = load_format("deepseek-r1")
    tok = AutoTokenizer.from_pretrained(tiny_model_for("deepseek-r1"))
    conv = validate_conversation(copy.deepcopy(DEEPSEEK_AGENT), fmt.row_rules())
    msgs, tools = conv["messages"], conv["tools"]
    # the layout has no call ids: validation puts the results in the order of their calls
    assert [m["tool_call_id"] for m in msgs[3:5]] == ["call_1", "call_2"]
    assert [m["tool_call_id"] for m in DEEPSEEK_AGENT["messages"][3:5]] == ["call_2", "call_1"]
    assert render_text(conv, fmt=fmt) == deepseek_tools_text(msgs, tools)
    assert render_text({"messages": msgs[:6], "tools": tools}, fmt=fmt) == deepseek_tools_text(msgs[:6], tools)
    first, second = render_conversation(conv, tokenizer=tok, fmt=fmt)
    assert trained_spans(tok, first) == [
        "Two tools.</think><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
        '{"city": "Paris Île"}\n```<｜tool▁call▁end｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>now\n```json\n{}\n```'
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>",
        "Both in.</think>18°C at noon.<｜end▁of▁sentence｜>"]
    assert trained_spans(tok, second) == [
        "Ask again.</think>Let me look.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
        '```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>',
        "</think>20°C.<｜end▁of▁sentence｜>"]
    # the first stretch's calls are history in the second example: no reasoning, not trained
    assert "Two tools." not in tok.decode(second.input_ids)
    for t in ("<｜tool▁outputs▁begin｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<｜tool▁outputs▁end｜>",
              "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>",
              "<｜tool▁calls▁end｜>"):  # one token each
        assert len(tok.encode(t, add_special_tokens=False)) == 1 and tok.convert_tokens_to_ids(t) in first.input_ids
    for example, turns in ((first, (2, 5)), (second, (7, 9))):
        starts = [k for k, lab in enumerate(example.labels) if lab != IGNORE_INDEX and example.labels[k - 1] == IGNORE_INDEX]
        for index, start in zip(turns, starts, strict=True):
            served = tok.apply_chat_template(msgs[:index], tools=tools, chat_template=fmt.chat_template,
                                             add_generation_prompt=True, tokenize=False)
            assert served.endswith("<｜tool▁outputs▁end｜><think>\n" if index in (5, 9) else "<｜Assistant｜><think>\n")
            assert tok(served, add_special_tokens=False)["input_ids"] == example.input_ids[:start], index


# --------------------------------------------------------------------------- gemma3

# a system message and two turns, for the formats with no tools and no reasoning
SYSTEM_AND_TWO_TURNS = {"messages": [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And its population?"},
    {"role": "assistant", "content": "About 2.1 million.\nCity proper."}]}


def gemma_text(messages: list[dict], *, generation_prompt: bool = False) -> str:
    """Gemma 3's published layout, built without the template."""
    system = messages[0]["content"] + "\n\n" if messages[0]["role"] == "system" else ""
    out = "<bos>"
    for m in messages:
        if m["role"] == "user":
            out += f"<start_of_turn>user\n{system}{m['content']}<end_of_turn>\n"
            system = ""
        elif m["role"] == "assistant":
            out += f"<start_of_turn>model\n{m['content']}<end_of_turn>\n"
    return out + ("<start_of_turn>model\n" if generation_prompt else "")


def test_gemma3_writes_gemma_turns_and_trains_only_the_model_text(tiny_model_for):
    """System text opens the first user turn; the assistant is `model`; only each model turn's
    text and its <end_of_turn> are trained, in one example per conversation."""
    fmt = load_format("gemma3")
    tok = AutoTokenizer.from_pretrained(tiny_model_for("gemma3"))
    check_tokenizer(tok, fmt, "tiny gemma3")
    conv = validate_conversation(copy.deepcopy(SYSTEM_AND_TWO_TURNS), fmt.row_rules())
    msgs = conv["messages"]
    assert render_text(conv, fmt=fmt) == gemma_text(msgs)
    for k in (2, 4):  # the prompt the server builds before each model turn
        prompt = render_text({"messages": msgs[:k]}, fmt=fmt, add_generation_prompt=True)
        assert prompt == gemma_text(msgs[:k], generation_prompt=True)
        assert prompt == tok.apply_chat_template(msgs[:k], chat_template=fmt.chat_template, tokenize=False,
                                                 add_generation_prompt=True)
    [ex] = render_conversation(conv, tokenizer=tok, fmt=fmt)
    assert trained_spans(tok, ex) == ["Paris.<end_of_turn>", "About 2.1 million.\nCity proper.<end_of_turn>"]
    end_id = tok.convert_tokens_to_ids("<end_of_turn>")
    ends = [lab for t, lab in zip(ex.input_ids, ex.labels) if t == end_id]
    assert ends == [IGNORE_INDEX, end_id, IGNORE_INDEX, end_id]  # user turns' ends untrained, model turns' trained


# --------------------------------------------------------------------------- mistral


def mistral_text(messages: list[dict], *, generation_prompt: bool = False) -> str:
    """Mistral's instruct layout, built without the template (the system message at the start of
    the first user turn, Keel's fixed place for it). The generation prompt is the [/INST] itself."""
    system = messages[0]["content"] + "\n\n" if messages[0]["role"] == "system" else ""
    out = "<s>"
    for m in messages:
        if m["role"] == "user":
            out += f"[INST] {system}{m['content']}[/INST]"
            system = ""
        elif m["role"] == "assistant":
            out += f"{m['content']}</s>"
    return out


def test_mistral_writes_inst_turns_and_trains_only_the_answers(tiny_model_for):
    """<s>[INST] user[/INST]answer</s> per turn, the system text opening the first user turn (for
    one turn exactly where Mistral's template puts it); only each answer and its </s> are trained,
    in one example per conversation; the server's prompt is what apply_chat_template renders."""
    fmt = load_format("mistral")
    tok = AutoTokenizer.from_pretrained(tiny_model_for("mistral"))
    check_tokenizer(tok, fmt, "tiny mistral")
    conv = validate_conversation(copy.deepcopy(SYSTEM_AND_TWO_TURNS), fmt.row_rules())
    msgs = conv["messages"]
    assert render_text(conv, fmt=fmt) == mistral_text(msgs) == (
        "<s>[INST] Answer in one line.\n\nCapital of France?[/INST]Paris.</s>"
        "[INST] And its population?[/INST]About 2.1 million.\nCity proper.</s>")
    for k in (2, 4):  # the prompt the server builds before each assistant turn
        prompt = render_text({"messages": msgs[:k]}, fmt=fmt, add_generation_prompt=True)
        assert prompt == mistral_text(msgs[:k], generation_prompt=True) and prompt.endswith("[/INST]")
        assert prompt == tok.apply_chat_template(msgs[:k], chat_template=fmt.chat_template, tokenize=False,
                                                 add_generation_prompt=True)
    [ex] = render_conversation(conv, tokenizer=tok, fmt=fmt)
    assert trained_spans(tok, ex) == ["Paris.</s>", "About 2.1 million.\nCity proper.</s>"]
    for t in ("<s>", "[INST]", "[/INST]"):  # control tokens are single tokens, never trained
        tid = tok.convert_tokens_to_ids(t)
        assert tid in ex.input_ids and all(lab == IGNORE_INDEX for i, lab in zip(ex.input_ids, ex.labels) if i == tid)


MISTRAL_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "now"}}]
MISTRAL_AGENT = {"messages": [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "Weather in Paris and the time?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris Île"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": "18°C"}'},
    {"role": "assistant", "content": "18°C at noon."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."}], "tools": MISTRAL_TOOLS}


def mistral_tools_text(messages: list[dict], tools: list[dict]) -> str:
    """Mistral's v0.3 tool layout, built without the template: the tool list before the last
    user turn, calls as one JSON list after [TOOL_CALLS], each result as a JSON object."""
    system = messages[0]["content"] + "\n\n" if messages[0]["role"] == "system" else ""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    out = "<s>"
    for i, m in enumerate(messages):
        if m["role"] == "user":
            if i == last_user:
                out += "[AVAILABLE_TOOLS] " + json.dumps(tools, ensure_ascii=False) + "[/AVAILABLE_TOOLS]"
            out += f"[INST] {system}{m['content']}[/INST]"
            system = ""
        elif m["role"] == "assistant" and m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"],
                      "id": "0000" + c["id"].replace("_", "")} for c in m["tool_calls"]]
            out += "[TOOL_CALLS] " + json.dumps(calls, ensure_ascii=False) + "</s>"
        elif m["role"] == "assistant":
            out += f"{m['content']}</s>"
        elif m["role"] == "tool":
            result = {"content": m["content"], "call_id": "0000" + m["tool_call_id"].replace("_", "")}
            out += "[TOOL_RESULTS] " + json.dumps(result, ensure_ascii=False) + "[/TOOL_RESULTS]"
    return out


def test_mistral_writes_tools_calls_and_results_and_trains_only_the_calls_and_answers(tiny_model_for):
    """Tools before the last [INST], parallel calls as [TOOL_CALLS] [...]</s>, results as
    [TOOL_RESULTS] {...}[/TOOL_RESULTS]. The loss covers the calls and their </s> and each answer,
    never the tool list, the results or the user text. The tool list moves with the last user
    turn, so the conversation is two examples, one per user turn, and the prompt the server
    renders for every trained turn is exactly the ids before that turn in its example."""
    fmt = load_format("mistral")
    tok = AutoTokenizer.from_pretrained(tiny_model_for("mistral"))
    conv = validate_conversation(copy.deepcopy(MISTRAL_AGENT), fmt.row_rules())
    msgs, tools = conv["messages"], conv["tools"]
    assert render_text(conv, fmt=fmt) == mistral_tools_text(msgs, tools)
    assert render_text({"messages": msgs[:6], "tools": tools}, fmt=fmt) == mistral_tools_text(msgs[:6], tools)
    first, second = render_conversation(conv, tokenizer=tok, fmt=fmt)
    assert trained_spans(tok, first) == [
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris Île"}, "id": "0000call1"}, '
        '{"name": "now", "arguments": {}, "id": "0000call2"}]</s>', "18°C at noon.</s>"]
    assert trained_spans(tok, second) == ["You're welcome.</s>"]
    for t in ("[AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[INST]"):  # one token each, never trained
        tid = tok.convert_tokens_to_ids(t)
        assert tid in first.input_ids and all(lab == IGNORE_INDEX for i, lab in zip(first.input_ids, first.labels) if i == tid)
    for example, turns in ((first, (2, 5)), (second, (7,))):
        starts = [k for k, lab in enumerate(example.labels) if lab != IGNORE_INDEX and example.labels[k - 1] == IGNORE_INDEX]
        for index, start in zip(turns, starts, strict=True):
            served = tok.apply_chat_template(msgs[:index], tools=tools, chat_template=fmt.chat_template,
                                             add_generation_prompt=True, tokenize=False)
            assert tok(served, add_special_tokens=False)["input_ids"] == example.input_ids[:start], index

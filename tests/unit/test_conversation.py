"""Row validation: each listed mistake is caught with a reason that says where it is."""

from __future__ import annotations

import copy
import json

import pytest

from data.conversation import RowError, normalize_tools, validate_conversation
from data.formats import load_format
from data.synthetic import TOOLS

MARKUP = load_format("hermes-qwen3").markup_strings() + ["<|im_end|>"]


def call(cid, name="get_weather", args='{"city": "Paris"}'):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


def good_row():
    return {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris and Oslo?"},
            {"role": "assistant", "reasoning_content": "Two cities.", "content": "",
             "tool_calls": [call("a"), call("b", args={"city": "Oslo"})]},
            {"role": "tool", "tool_call_id": "b", "content": "{\"t\": 3}"},
            {"role": "tool", "tool_call_id": "a", "content": "{\"t\": 18}"},
            {"role": "assistant", "content": "Paris 18, Oslo 3."},
        ],
        "tools": TOOLS,
    }


def test_valid_row_is_normalised():
    out = validate_conversation(good_row(), MARKUP)
    calls = out["messages"][2]["tool_calls"]
    assert calls[0]["function"]["arguments"] == {"city": "Paris"}  # JSON string -> object
    assert calls[1]["function"]["arguments"] == {"city": "Oslo"}
    assert out["messages"][2]["content"] == ""  # content "" with tool calls is the normal OpenAI shape
    assert [t["function"]["name"] for t in out["tools"]] == [t["function"]["name"] for t in TOOLS]


def test_tools_may_be_a_json_string_and_flat():
    row = good_row()
    row["tools"] = json.dumps([t["function"] for t in TOOLS])
    assert validate_conversation(row, MARKUP)["tools"][0]["type"] == "function"


def mutated(fn):
    row = copy.deepcopy(good_row())
    fn(row)
    return row


@pytest.mark.parametrize("mutate, expected", [
    (lambda r: r["messages"].insert(2, {"role": "user", "content": "and?"}), "two user messages in a row"),
    (lambda r: r["messages"].pop(1), "must follow a user or tool message"),
    (lambda r: r["messages"].append({"role": "system", "content": "x"}), "system message is only allowed first"),
    (lambda r: r["messages"][3].update(tool_call_id="zzz"), "tool_call_id 'zzz' matches no pending tool call"),
    (lambda r: r["messages"].pop(4), "have no tool result"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="{city: Paris"), "arguments are not valid JSON"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="[1, 2]"), "must be a JSON object"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments={"city": 7}), "do not match the tool's parameters schema"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments={"town": "x"}), "'city' is a required property"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(name="get_wether"), "not among the row's tools"),
    (lambda r: r["messages"][5].update(content=""), "empty assistant turn"),
    (lambda r: r["messages"][5].update(content="<think>hm</think>Paris 18"), "literal format token '<think>'"),
    (lambda r: r["messages"][1].update(content="say <tool_call>"), "literal format token '<tool_call>'"),
    (lambda r: r["messages"].append({"role": "user", "content": "ok"}), "ends with a user message"),
    (lambda r: r["messages"][1].update(role="human"), "role 'human' is not one of"),
    (lambda r: r.update(messages=[]), "'messages' must be a non-empty list"),
    (lambda r: r["tools"].append(TOOLS[0]), "declared twice"),
    (lambda r: r["tools"][0]["function"].update(parameters={"type": "objekt"}), "not a valid JSON schema"),
])
def test_invalid_rows_are_caught_with_the_place(mutate, expected):
    with pytest.raises(RowError, match=None) as err:
        validate_conversation(mutated(mutate), MARKUP)
    assert expected in str(err.value)


def test_tool_result_without_any_call():
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                        {"role": "tool", "content": "x"}, {"role": "assistant", "content": "ok"}]}
    with pytest.raises(RowError, match="must follow an assistant message with tool_calls"):
        validate_conversation(row, MARKUP)


def test_ids_missing_are_matched_by_name_then_order():
    row = {"messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "A"}}},
                                             {"function": {"name": "get_local_time", "arguments": {"city": "A"}}}]},
        {"role": "tool", "name": "get_local_time", "content": "12:00"},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "done"}], "tools": TOOLS}
    assert len(validate_conversation(row, MARKUP)["messages"]) == 5


def test_normalize_tools_rejects_non_function():
    with pytest.raises(RowError, match="only tools of type 'function'"):
        normalize_tools([{"type": "code_interpreter"}])


# ------------------------------------------------------------------ what a format can express

LLAMA = load_format("llama3-json").row_rules()


def turn(**assistant):
    return {"messages": [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", **assistant}],
            "tools": TOOLS}


@pytest.mark.parametrize("row, expected", [
    (turn(reasoning_content="I should call it.", content="ok"),
     "messages[1].reasoning_content: format 'llama3-json' has no place for reasoning"),
    (turn(content="Let me check.", tool_calls=[call("a")]), "format 'llama3-json' cannot hold content next to tool calls"),
    (turn(content='{"answer": 1}'), "starts with '{', which format 'llama3-json' reads as a tool call"),
    (turn(content='Call it like {"name": "get_weather", "arguments": {}} please'),
     "holds a JSON object with 'name' and 'arguments'"),
    (turn(content="end <|eot_id|> here"), "literal format token '<|eot_id|>'"),
])
def test_rows_a_format_cannot_express_are_refused_with_the_reason(row, expected):
    with pytest.raises(RowError) as err:
        validate_conversation(row, LLAMA)
    assert expected in str(err.value)


def test_what_llama3_json_can_express_passes():
    ok = [turn(content="", reasoning_content="", tool_calls=[call("a"), call("b", args={"city": "Oslo"})]),
          turn(content="Use {} for an empty object."), turn(content="Plain answer.")]
    for row in ok:
        validate_conversation(row, LLAMA)


def test_nan_arguments_are_not_json():
    row = turn(content="", tool_calls=[call("a", args='{"city": NaN}')])
    with pytest.raises(RowError, match="arguments are not valid JSON \\(NaN is not JSON\\)"):
        validate_conversation(row, MARKUP)

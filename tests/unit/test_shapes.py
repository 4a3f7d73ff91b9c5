"""Dataset shapes -> canonical rows: detection, each converter, and preference pairs through
validation and the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data.conversation import RowError, validate_conversation, validate_preference
from data.errors import KeelError
from data.formats import load_format
from data.prepare import PrepOptions, prepare_file
from data.shapes import detect_shape, to_canonical
from data.synthetic import TOOLS

FMT = load_format("hermes-qwen3")
RULES = FMT.row_rules()

SHAREGPT = {
    "system": "Be brief.",
    "tools": json.dumps(TOOLS),  # LLaMA-Factory keeps tools as JSON text
    "conversations": [
        {"from": "human", "value": "Weather in Paris and Oslo?"},
        {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}},
                                                       {"name": "get_weather", "arguments": {"city": "Oslo"}}])},
        {"from": "observation", "value": "{\"t\": 18}"},
        {"from": "observation", "value": "{\"t\": 3}"},
        {"from": "gpt", "value": "Paris 18, Oslo 3."},
        {"from": "human", "value": "Thanks"},
        {"from": "gpt", "value": "You're welcome."},
    ],
}
ALPACA = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour",
          "history": [["Hi", "Hello!"]]}
PC_TEXT = {"prompt": "What is 2+2?", "completion": "4"}
PC_CHAT = {"prompt": [{"role": "user", "content": "Weather in Paris?"}],
           "completion": [{"role": "assistant", "content": "", "tool_calls": [
               {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
               {"role": "tool", "tool_call_id": "a", "content": "18C"},
               {"role": "assistant", "content": "18C in Paris."}],
           "tools": TOOLS}
PREF = {"prompt": [{"role": "user", "content": "Weather in Paris?"}],
        "chosen": [{"role": "assistant", "reasoning_content": "Call the tool.", "content": "", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}],
        "rejected": [{"role": "assistant", "content": "It is always sunny in Paris."}],
        "tools": TOOLS}


@pytest.mark.parametrize("row, shape", [
    ({"messages": []}, "messages"), (SHAREGPT, "sharegpt"), (ALPACA, "alpaca"), (PC_TEXT, "prompt_completion"),
    (PREF, "preference"), ({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference"), ({"text": "doc"}, "text"),
])
def test_auto_detects_the_shape_from_the_first_row(row, shape):
    assert detect_shape(row, "f:1") == shape


def test_auto_says_when_it_cannot_tell():
    with pytest.raises(KeelError, match="f:1: the first row's keys fit several shapes \\(messages, text\\)"):
        detect_shape({"messages": [], "text": "x"}, "f:1")
    with pytest.raises(KeelError, match="cannot tell the data's shape from the first row's keys \\(question, answer\\)"):
        detect_shape({"question": "q", "answer": "a"}, "f:1")


def test_sharegpt_with_function_calls_becomes_a_valid_tool_conversation():
    conv = validate_conversation(to_canonical("sharegpt", SHAREGPT), RULES)
    roles = [m["role"] for m in conv["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "tool", "assistant", "user", "assistant"]
    calls = conv["messages"][2]["tool_calls"]
    assert [c["function"]["arguments"] for c in calls] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert [m["tool_call_id"] for m in conv["messages"][3:5]] == [c["id"] for c in calls]
    assert len(conv["tools"]) == len(TOOLS)


def test_sharegpt_unknown_speaker_is_named():
    row = {"conversations": [{"from": "robot", "value": "x"}]}
    with pytest.raises(RowError, match="conversations\\[0\\].from: 'robot' is not a ShareGPT speaker"):
        to_canonical("sharegpt", row)


def test_alpaca_joins_instruction_and_input_and_keeps_history():
    msgs = validate_conversation(to_canonical("alpaca", ALPACA), RULES)["messages"]
    assert [m["content"] for m in msgs] == ["Hi", "Hello!", "Translate to French.\n\nGood morning", "Bonjour"]


def test_prompt_completion_text_and_conversational():
    assert [m["role"] for m in to_canonical("prompt_completion", PC_TEXT)["messages"]] == ["user", "assistant"]
    conv = validate_conversation(to_canonical("prompt_completion", PC_CHAT), RULES)
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant", "tool", "assistant"]


def test_messages_as_json_text_are_parsed_and_bad_json_is_named():
    row = {"messages": json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])}
    assert len(validate_conversation(to_canonical("messages", row), RULES)["messages"]) == 2
    with pytest.raises(RowError, match="messages: a string that is not valid JSON"):
        to_canonical("messages", {"messages": "[{\"role\": "})


def test_preference_pair_is_validated_with_the_conversation_rules():
    pair = validate_preference(to_canonical("preference", PREF), RULES)
    assert pair["chosen"]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert pair["chosen"]["reasoning_content"] == "Call the tool." and pair["prompt"][0]["role"] == "user"


def test_implicit_prompt_is_the_shared_start_of_chosen_and_rejected():
    user = {"role": "user", "content": "Hi?"}
    row = {"chosen": [user, {"role": "assistant", "content": "Hello!"}],
           "rejected": [user, {"role": "assistant", "content": "Go away."}]}
    pair = validate_preference(to_canonical("preference", row), RULES)
    assert pair["prompt"] == [user] and pair["chosen"]["content"] == "Hello!"


def bad_pref(**changes):
    row = json.loads(json.dumps(PREF))
    row.update(changes)
    return row


@pytest.mark.parametrize("row, expected", [
    (bad_pref(prompt=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
     "prompt: must end with a user or tool message"),
    (bad_pref(prompt=[{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]),
     "prompt + chosen: messages[0]: an assistant message must follow a user or tool message"),
    (bad_pref(chosen=[{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": "{city"}}]}]), "prompt + chosen: messages[1].tool_calls[0]: arguments are not valid JSON"),
    (bad_pref(rejected=[{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"town": "x"}}}]}]), "prompt + rejected: messages[1].tool_calls[0]: arguments do not match"),
    (bad_pref(rejected=[{"role": "assistant", "content": ""}]), "prompt + rejected: messages[1]: empty assistant turn"),
    (bad_pref(rejected=[{"role": "assistant", "content": "<think>x</think>y"}]), "literal format token '<think>'"),
    (bad_pref(rejected=PREF["chosen"]), "chosen and rejected are the same answer"),
    (bad_pref(chosen=[{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]),
     "chosen: must be one assistant message, got a list of 2"),
    (bad_pref(prompt=[{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "zz", "content": "r"}]),
     "a tool result must follow an assistant message with tool_calls"),
])
def test_invalid_preference_pairs_are_caught_with_the_place(row, expected):
    with pytest.raises(RowError) as err:
        validate_preference(to_canonical("preference", row), RULES)
    assert expected in str(err.value)


def test_preference_pairs_prepare_to_trl_dpo_columns(tiny_model, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(PREF) + "\n" + json.dumps({"prompt": "Hi?", "chosen": "Hello!", "rejected": "No."}) + "\n")
    prepared = prepare_file(data, tokenizer_dir=tiny_model, fmt=FMT, seq_len=2048, cache_root=tmp_path / "c")
    assert prepared.kind == "preference" and prepared.stats.examples == 2
    ds = prepared.load()
    assert set(ds.column_names) == {"prompt_ids", "chosen_ids", "rejected_ids"}
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert tok.decode(ds[0]["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert tok.decode(ds[0]["chosen_ids"]) == ('<think>Call the tool.</think><tool_call>{"name": "get_weather", '
                                               '"arguments": {"city": "Paris"}}</tool_call><|im_end|>')
    assert tok.decode(ds[1]["rejected_ids"]) == "<think></think>No.<|im_end|>"


def test_shape_set_in_options_overrides_detection(tiny_model, tmp_path):
    data = tmp_path / "alpaca.jsonl"
    data.write_text(json.dumps({**ALPACA, "text": "ignored"}) + "\n")
    with pytest.raises(KeelError, match="fit several shapes"):
        prepare_file(data, tokenizer_dir=tiny_model, fmt=FMT, seq_len=512, cache_root=tmp_path / "c")
    prepared = prepare_file(data, tokenizer_dir=tiny_model, fmt=FMT, seq_len=512, cache_root=tmp_path / "c",
                            options=PrepOptions(shape="alpaca"))
    assert prepared.kind == "conversation" and prepared.stats.examples == 2  # history stretch + answer


def test_preference_pairs_are_refused_for_sft_training(tiny_model, tmp_path):
    from trainer.recipe import load_recipe
    from trainer.train import prepared_split

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello!", "rejected": "No."}) + "\n")
    quickstart = Path(__file__).resolve().parents[2] / "recipes" / "quickstart" / "sft-tool-calling.yaml"
    recipe = load_recipe(quickstart, [f"model.path={tiny_model}", f"data.train={data}",
                                      f"data.cache_dir={tmp_path / 'c'}"])
    with pytest.raises(KeelError, match="holds preference pairs .* but technique 'sft' trains on conversations"):
        prepared_split(recipe, "train", local_rank=0)

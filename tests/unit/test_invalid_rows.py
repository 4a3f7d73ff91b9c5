"""data.on_invalid: `error` stops and lists each invalid row with its place and reason;
`skip` leaves them out, writes each with its reason to rejected.jsonl next to the prepared
data, and counts them in PrepStats (which the trainer logs). Nothing is dropped silently."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict

import pytest

from data.errors import KeelError
from data.formats import load_format
from data.prepare import REJECTED_FILE, PrepOptions, prepare_file
from data.synthetic import TOOLS

FMT = load_format("hermes-qwen3")


def good():
    return {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "reasoning_content": "Call it.", "content": "", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "18C"},
        {"role": "assistant", "content": "18C in Paris."}], "tools": TOOLS}


def broken(fn):
    row = copy.deepcopy(good())
    fn(row)
    return row


# (row or raw line, reason it is rejected)
INVALID = [
    (broken(lambda r: r["messages"].insert(0, {"role": "assistant", "content": "hi"})), "must follow a user or tool message"),
    (broken(lambda r: r["messages"][2].update(tool_call_id="zzz")), "tool_call_id 'zzz' matches no pending tool call"),
    (broken(lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="{city")), "arguments are not valid JSON"),
    (broken(lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments={"city": 3})),
     "arguments do not match the tool's parameters schema"),
    (broken(lambda r: r["messages"][3].update(content="")), "empty assistant turn"),
    (broken(lambda r: r["messages"][3].update(content="<tool_call>{}</tool_call>")), "literal format token '<tool_call>'"),
    ('{"messages": [', "not valid JSON"),
]


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def mixed(tmp_path):
    rows = [good(), *[r for r, _ in INVALID], good()]
    return write(tmp_path / "mixed.jsonl", rows)


def test_error_lists_every_invalid_row_with_line_and_reason(mixed, tiny_model, tmp_path):
    with pytest.raises(KeelError) as err:
        prepare_file(mixed, tokenizer_dir=tiny_model, fmt=FMT, seq_len=1024, cache_root=tmp_path / "c")
    msg = str(err.value)
    assert f"{len(INVALID)} of {len(INVALID) + 2} rows are invalid" in msg and "data.on_invalid: skip" in msg
    for line, (_, reason) in enumerate(INVALID, start=2):
        assert f"  - {mixed}:{line}: " in msg and reason in msg.split(f"{mixed}:{line}: ")[1].split("\n")[0]


def test_skip_leaves_invalid_rows_out_and_lists_them_with_reasons(mixed, tiny_model, tmp_path):
    kwargs = dict(tokenizer_dir=tiny_model, fmt=FMT, seq_len=1024, cache_root=tmp_path / "c",
                  options=PrepOptions(on_invalid="skip"))
    prepared = prepare_file(mixed, **kwargs)
    s = prepared.stats
    assert (s.rows, s.rejected, s.examples) == (len(INVALID) + 2, len(INVALID), 2)
    rejected = [json.loads(line) for line in prepared.rejected_file.read_text().splitlines()]
    assert prepared.rejected_file == prepared.path / REJECTED_FILE
    assert [r["where"] for r in rejected] == [f"{mixed}:{n}" for n in range(2, len(INVALID) + 2)]
    for rec, (row, reason) in zip(rejected, INVALID):
        assert reason in rec["reason"]
        assert rec["row"] == (None if isinstance(row, str) else row)  # the row as it was in the file
    again = prepare_file(mixed, **kwargs)  # the cache keeps the list and the count
    assert again.reused and again.stats.rejected == len(INVALID) and again.rejected_file is not None
    # the trainer logs every scalar stat to MLflow as a number (trainer/tracking/tracker.py log_stats)
    numbers = s.numbers()
    assert numbers["rejected"] == len(INVALID) and numbers["examples"] == 2
    assert set(numbers) == {k for k, v in asdict(s).items() if isinstance(v, int)}


def test_skip_with_every_row_invalid_is_still_an_error(tiny_model, tmp_path):
    data = write(tmp_path / "bad.jsonl", [r for r, _ in INVALID])
    with pytest.raises(KeelError, match=f"holds nothing to train on \\({len(INVALID)} rows, {len(INVALID)} rejected\\)"):
        prepare_file(data, tokenizer_dir=tiny_model, fmt=FMT, seq_len=1024, cache_root=tmp_path / "c",
                     options=PrepOptions(on_invalid="skip"))


def test_skip_applies_to_preference_pairs(tiny_model, tmp_path):
    pair = {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}
    same = {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Hello!"}
    data = write(tmp_path / "pairs.jsonl", [pair, same, pair])
    prepared = prepare_file(data, tokenizer_dir=tiny_model, fmt=FMT, seq_len=512, cache_root=tmp_path / "c",
                            options=PrepOptions(on_invalid="skip"))
    assert (prepared.kind, prepared.stats.examples, prepared.stats.rejected) == ("preference", 2, 1)
    [rec] = [json.loads(x) for x in prepared.rejected_file.read_text().splitlines()]
    assert rec["where"] == f"{data}:2" and "chosen and rejected are the same answer" in rec["reason"]

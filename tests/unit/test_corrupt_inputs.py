"""Corrupt data files: each gives an error naming the file and row, and the fix.

Covered elsewhere, not repeated here: a tokenizer without the format's tokens as single
tokens (test_render.py::test_format_tokens_are_single_tokens), a chat template that cannot
render tools (test_formats.py::test_native_template_that_cannot_render_the_data_is_refused_with_the_reason),
invalid rows of every kind (test_invalid_rows.py).

Very long rows are accepted, never refused for their size: a conversation is truncated at
training.seq_len (counted in stats.truncated; when no trained token is left it is dropped
and counted), a document is cut into seq_len blocks, in order (stats.documents_split).
Preparation time grows linearly with the row: a 10 MB row takes about a minute here.
"""

from __future__ import annotations

import json

import pytest

from data.errors import KeelError
from data.formats import load_format
from data.prepare import PrepOptions, prepare_file
from tests.unit.test_invalid_rows import good

FMT = load_format("hermes-qwen3")


def prepare(data, tiny_model, tmp_path, **options):
    return prepare_file(data, tokenizer_dir=tiny_model, fmt=FMT, seq_len=512, cache_root=tmp_path / "cache",
                        options=PrepOptions(**options), num_proc=1)


def test_a_truncated_last_line_says_the_file_was_cut(tmp_path, tiny_model):
    whole = json.dumps(good())
    data = tmp_path / "cut.jsonl"
    data.write_text(whole + "\n" + whole[: len(whole) // 2])  # a copy interrupted mid-line
    with pytest.raises(KeelError) as err:
        prepare(data, tiny_model, tmp_path)
    msg = str(err.value)
    assert f"{data}:2: not valid JSON" in msg and "the file ends inside this line, so it was probably cut short" in msg
    assert "copy it again" in msg and "data.on_invalid: skip" in msg


def test_invalid_utf8_names_the_line_and_the_byte(tmp_path, tiny_model):
    data = tmp_path / "latin1.jsonl"
    line = json.dumps(good()).replace("Weather in Paris?", "Météo à Paris ?", 1).encode("latin-1", errors="strict")
    data.write_bytes(json.dumps(good()).encode() + b"\n" + line + b"\n")
    with pytest.raises(KeelError, match=rf"{data}:2: not valid UTF-8 \(byte \d+ of the line\); save the file as UTF-8"):
        prepare(data, tiny_model, tmp_path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank-lines"])
def test_an_empty_dataset_names_the_file_and_the_fix(tmp_path, tiny_model, content):
    data = tmp_path / "train.jsonl"
    data.write_text(content)
    with pytest.raises(KeelError, match=rf"data.train: {data} holds nothing to train on \(0 rows, 0 rejected\): it is "
                                        r"empty .* point data.train at the data file, or add rows"):
        prepare(data, tiny_model, tmp_path)


def long_rows(chars: int) -> list[dict]:
    text = ("The river runs north past the old mill. " * (chars // 40 + 1))[:chars]
    user_long = {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "Short."}]}
    answer_long = {"messages": [{"role": "user", "content": "Tell me."}, {"role": "assistant", "content": text}]}
    return [user_long, answer_long, {"text": text}]


def check_long_rows(tmp_path, tiny_model, chars: int) -> None:
    user_long, answer_long, document = long_rows(chars)
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps(user_long) + "\n" + json.dumps(answer_long) + "\n" + json.dumps(good()) + "\n")
    s = prepare(data, tiny_model, tmp_path).stats
    # the long prompt leaves no trained token within seq_len: dropped, counted; the long answer: cut
    assert (s.rows, s.rejected, s.truncated, s.dropped_no_trained_tokens_after_truncation) == (3, 0, 2, 1)
    assert s.examples == 2 and s.max_tokens > 512
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps(document) + "\n")
    d = prepare(docs, tiny_model, tmp_path).stats
    assert d.documents_split == 1 and d.examples == -(-d.tokens // 512) and d.tokens == d.max_tokens


def test_a_long_row_is_truncated_or_split_not_refused(tmp_path, tiny_model):
    check_long_rows(tmp_path, tiny_model, 50_000)


@pytest.mark.slow
def test_a_10_mb_row_is_truncated_not_refused(tmp_path, tiny_model):
    """The size the hardening issue names, once: a 10 MB answer, cut at seq_len, its first
    tokens trained."""
    data = tmp_path / "big.jsonl"
    data.write_text(json.dumps(long_rows(10_000_000)[1]) + "\n")
    s = prepare(data, tiny_model, tmp_path).stats
    assert (s.rows, s.examples, s.truncated, s.tokens) == (1, 1, 1, 512) and s.trained_tokens > 400

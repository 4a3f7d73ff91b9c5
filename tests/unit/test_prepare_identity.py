"""Making preparation faster must not change what it prepares: the same input gives the same
cache, bit for bit (every row of every column, the statistics, the rejected-rows file) under the
same fingerprint (the cache directory's name).

The golden digests in tests/data/prepare_identity.json were computed with the preparation code
as it was before it was optimised (issue 18); a change that is meant to change the prepared
data bumps data/prepare.py PREP_VERSION and rewrites them on purpose:

    KEEL_WRITE_PREP_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_prepare_identity.py

The source's fingerprint hashes the file's absolute path, which is a fresh temporary directory in
every test session; here it is taken over the file's name and bytes only, so the fingerprint is
comparable across sessions. Every other part of the fingerprint (format, template, tokenizer
files, seq_len, options, PREP_VERSION) is the product's own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import data.sources
import data.workers
from data.formats import load_format
from data.prepare import REJECTED_FILE, STATS_FILE, PrepOptions, prepare_file
from data.synthetic import generate_conversations, write_jsonl

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "data" / "prepare_identity.json"
WRITE = os.environ.get("KEEL_WRITE_PREP_GOLDEN") == "1"


def _tool_calling(tmp: Path) -> Path:
    return REPO / "data" / "examples" / "tool-calling.jsonl"


def _long_tail_with_bad_rows(tmp: Path) -> Path:
    """Long-tailed synthetic conversations with invalid rows of several kinds among them."""
    rows = [json.dumps(r) for r in generate_conversations(260, seed=3, long_tail=True)]
    rows[5] = '{"messages": ['  # not JSON
    bad = json.loads(rows[40])
    bad["messages"] = [m for m in bad["messages"] if m["role"] != "user"]
    rows[40] = json.dumps(bad)  # no user turn
    for k, (index, args) in enumerate([(70, '{"amount": "five"}'), (120, "{not json")]):
        row = json.loads(rows[index])
        for m in row["messages"]:
            for call in m.get("tool_calls") or []:
                call["function"]["arguments"] = args  # arguments against the schema / not JSON
        rows[index] = json.dumps(row)
    row = json.loads(rows[150])
    row["tools"] = row["tools"][:1]  # calls a tool the row does not declare (when it calls another)
    rows[150] = json.dumps(row)
    rows[200] = json.dumps({"messages": [{"role": "user", "content": "hi <tool_call> there"},
                                         {"role": "assistant", "content": "hello"}]})  # markup in text
    path = tmp / "long-tail.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def _preference(tmp: Path) -> Path:
    """Preference pairs from the example conversations: the last answer chosen, a refusal rejected."""
    rows = []
    for line in (REPO / "data" / "examples" / "tool-calling.jsonl").read_text().splitlines()[:150]:
        conv = json.loads(line)
        rows.append({"prompt": conv["messages"][:-1], "chosen": conv["messages"][-1:],
                     "rejected": [{"role": "assistant", "content": "I cannot help with that."}],
                     "tools": conv.get("tools")})
    path = tmp / "preference.jsonl"
    write_jsonl(rows, path)
    return path


def _documents(tmp: Path) -> Path:
    docs = tmp / "docs"
    docs.mkdir()
    shutil.copy(REPO / "data" / "corpus" / "prose.txt", docs / "prose.txt")
    (docs / "notes.md").write_text("# Notes\n\n" + "A short note about tokenizers and packing. " * 40 + "\n")
    return docs


# name -> (input, format, seq_len, options, num_proc)
CASES = {
    "tool-calling": (_tool_calling, "hermes-qwen3", 1024, PrepOptions(), 1),
    "tool-calling-packed-2-workers": (_tool_calling, "hermes-qwen3", 1024, PrepOptions(packing=True), 2),
    "long-tail-bad-rows-skipped-packed": (_long_tail_with_bad_rows, "hermes-qwen3", 512,
                                          PrepOptions(packing=True, on_invalid="skip"), 1),
    "long-tail-bad-rows-skipped-2-workers": (_long_tail_with_bad_rows, "hermes-qwen3", 512,
                                             PrepOptions(on_invalid="skip"), 2),
    "preference": (_preference, "hermes-qwen3", 512, PrepOptions(on_invalid="skip"), 1),
    "documents-packed": (_documents, "hermes-qwen3", 128, PrepOptions(packing=True), 1),
    "deepseek-r1-tool-calling": (_tool_calling, "deepseek-r1", 1024, PrepOptions(on_invalid="skip"), 1),
}


def _stable_fingerprint(self) -> str:
    h = hashlib.sha256(self.kind.encode())
    for name in self._all_files():
        h.update(Path(name).name.encode())
        h.update(Path(name).read_bytes())
    return h.hexdigest()


def _digests(prepared, data_path: Path) -> dict:
    """A digest of every column (each row's values and length), of the statistics and of the
    rejected rows (their places with the temporary directory written as <data>)."""
    ds = prepared.load()
    columns = {}
    for name in ds.column_names:
        h = hashlib.sha256()
        for row in ds.data.table.column(name).to_pylist():
            h.update(len(row).to_bytes(4, "little"))
            h.update(b"".join(int(v).to_bytes(4, "little", signed=True) for v in row))
        columns[name] = h.hexdigest()
    rejected = prepared.path / REJECTED_FILE
    rejected_text = rejected.read_text().replace(str(data_path), "<data>") if rejected.is_file() else ""
    return {"fingerprint": prepared.path.name, "rows": len(ds), "columns": columns,
            "stats": hashlib.sha256((prepared.path / STATS_FILE).read_bytes()).hexdigest(),
            "rejected": hashlib.sha256(rejected_text.encode()).hexdigest(),
            "rejected_rows": len(rejected_text.splitlines())}


@pytest.mark.parametrize("case", list(CASES))
def test_prepared_cache_is_bit_for_bit_the_golden_one(case, tiny_model_for, tmp_path, monkeypatch):
    make_input, fmt_name, seq_len, options, num_proc = CASES[case]
    monkeypatch.setattr(data.sources.Source, "fingerprint", _stable_fingerprint)
    monkeypatch.setattr(data.workers, "CHUNK_ROWS", 16)  # the pool really runs for a few hundred rows
    data_path = make_input(tmp_path)
    prepared = prepare_file(data_path, tokenizer_dir=tiny_model_for(fmt_name), fmt=load_format(fmt_name),
                            seq_len=seq_len, cache_root=tmp_path / "cache", options=options, num_proc=num_proc)
    got = _digests(prepared, data_path)
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if WRITE:
        golden[case] = got
        GOLDEN.write_text(json.dumps(golden, indent=2, sort_keys=True) + "\n")
        return
    assert got == golden[case]


def test_the_comparison_can_fail(tiny_model, tmp_path, monkeypatch):
    """Negative control: one changed character in one row changes the digests and the fingerprint."""
    monkeypatch.setattr(data.sources.Source, "fingerprint", _stable_fingerprint)
    rows = (REPO / "data" / "examples" / "tool-calling.jsonl").read_text().splitlines()
    row = json.loads(rows[3])
    row["messages"][0]["content"] += "!"
    rows[3] = json.dumps(row)
    path = tmp_path / "tool-calling.jsonl"
    path.write_text("\n".join(rows) + "\n")
    fmt = load_format("hermes-qwen3")
    prepared = prepare_file(path, tokenizer_dir=tiny_model, fmt=fmt, seq_len=1024, cache_root=tmp_path / "c",
                            options=PrepOptions(), num_proc=1)
    got = _digests(prepared, path)
    golden = json.loads(GOLDEN.read_text())["tool-calling"]
    assert got["fingerprint"] != golden["fingerprint"]
    assert got["columns"]["input_ids"] != golden["columns"]["input_ids"]

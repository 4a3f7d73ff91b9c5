"""Reading rows from every kind of source: the same conversations stored as JSONL, JSON,
Parquet, CSV, a saved dataset, compressed, or behind an fsspec URL prepare to the same token
ids; errors point at the row in the source; the Arrow struct trap is caught."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.errors import KeelError
from data.formats import load_format
from data.prepare import prepare_file
from data.sources import open_source
from tests.data.make_roundtrip import OUT as CORPUS

FMT = load_format("hermes-qwen3")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines()[:12]]


def as_json_text(row: dict) -> dict:
    """Messages and tools as JSON strings: how they survive any columnar store unchanged."""
    return {"messages": json.dumps(row["messages"], ensure_ascii=False), "tools": json.dumps(row["tools"], ensure_ascii=False)}


def write_all_kinds(rows: list[dict], d: Path) -> dict[str, str]:
    from datasets import Dataset

    d.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (d / "rows.jsonl").write_text(lines, encoding="utf-8")
    (d / "list.json").write_text(json.dumps(rows), encoding="utf-8")
    (d / "wrapped.json").write_text(json.dumps({"data": rows}), encoding="utf-8")
    (d / "lines.json").write_text(lines, encoding="utf-8")  # JSON Lines named .json, as many datasets ship
    with gzip.open(d / "rows.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    text_rows = [as_json_text(r) for r in rows]
    pq.write_table(pa.Table.from_pylist(text_rows), d / "rows.parquet")
    with open(d / "rows.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["messages", "tools"])
        writer.writeheader()
        writer.writerows(text_rows)
    Dataset.from_list(text_rows).save_to_disk(str(d / "saved"))
    mem = fsspec.filesystem("memory")
    mem.pipe("/keel-test/rows.jsonl", lines.encode())
    mem.pipe("/keel-test/rows.parquet", (d / "rows.parquet").read_bytes())
    Dataset.from_list(text_rows).save_to_disk("memory://keel-test/saved")
    return {"jsonl": str(d / "rows.jsonl"), "json list": str(d / "list.json"), "json data": str(d / "wrapped.json"),
            "json lines": str(d / "lines.json"), "gzip": str(d / "rows.jsonl.gz"), "parquet": str(d / "rows.parquet"),
            "csv": str(d / "rows.csv"), "saved dataset": str(d / "saved"),
            "file url": (d / "rows.jsonl").as_uri(), "memory jsonl": "memory://keel-test/rows.jsonl",
            "memory parquet": "memory://keel-test/rows.parquet", "memory saved dataset": "memory://keel-test/saved"}


def test_every_source_kind_prepares_to_the_same_token_ids(rows, tmp_path, tiny_model):
    sources = write_all_kinds(rows, tmp_path / "src")
    prepared = {name: prepare_file(loc, tokenizer_dir=tiny_model, fmt=FMT, seq_len=4096, cache_root=tmp_path / "c")
                for name, loc in sources.items()}
    reference = prepared["jsonl"].load()
    assert prepared["jsonl"].stats.rows == len(rows) and prepared["jsonl"].stats.rejected == 0
    for name, prep in prepared.items():
        ds = prep.load()
        assert ds["input_ids"] == reference["input_ids"], name
        assert ds["labels"] == reference["labels"], name
    # the file:// URL of the JSONL file is the same data: it reuses that cache; the others differ
    assert prepared["file url"].reused and prepared["file url"].path == prepared["jsonl"].path
    assert len({p.path for p in prepared.values()}) == len(prepared) - 1


def test_tools_and_arguments_as_json_strings_round_trip_exactly(rows, tmp_path):
    """Parquet and saved datasets hand back exactly the JSON text that went in."""
    sources = write_all_kinds(rows, tmp_path / "src")
    for name in ("parquet", "saved dataset", "csv", "memory parquet", "memory saved dataset"):
        got = [row for _, row in open_source(sources[name]).rows()]
        assert got == [as_json_text(r) for r in rows], name


def test_struct_columns_that_arrow_unified_are_reported(tmp_path, tiny_model):
    from datasets import Dataset

    quickstart = Path(__file__).resolve().parents[2] / "data" / "examples" / "tool-calling.jsonl"
    rows = [json.loads(line) for line in quickstart.read_text().splitlines()[:12]]
    # tools as objects: Arrow merges the properties of every tool into one struct type
    Dataset.from_list(rows).to_parquet(str(tmp_path / "structs.parquet"))
    with pytest.raises(KeelError) as err:
        prepare_file(tmp_path / "structs.parquet", tokenizer_dir=tiny_model, fmt=FMT, seq_len=4096, cache_root=tmp_path / "c")
    msg = str(err.value)
    assert f"{tmp_path / 'structs.parquet'}[0]: tools[0].parameters.properties." in msg
    assert "Arrow merges the keys" in msg and "JSON strings" in msg


def test_row_numbers_point_at_the_row_in_the_source(rows, tmp_path, tiny_model):
    bad = dict(rows[2])
    bad["messages"] = bad["messages"][:1]  # ends with the user's message
    mixed = rows[:2] + [bad] + rows[3:5]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n" + "\n".join(json.dumps(r) for r in mixed) + "\n")  # a blank first line
    pq.write_table(pa.Table.from_pylist([as_json_text(r) for r in mixed]), tmp_path / "rows.parquet")
    with open(tmp_path / "rows.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["messages", "tools"])
        w.writeheader()
        w.writerows(as_json_text(r) for r in mixed)
    for path, where in [(jsonl, f"{jsonl}:4"), (tmp_path / "rows.parquet", f"{tmp_path / 'rows.parquet'}[2]"),
                        (tmp_path / "rows.csv", f"{tmp_path / 'rows.csv'}[2]")]:
        with pytest.raises(KeelError, match="1 of 5 rows are invalid") as err:
            prepare_file(path, tokenizer_dir=tiny_model, fmt=FMT, seq_len=4096, cache_root=tmp_path / "c")
        assert f"  - {where}: the conversation ends with a user message" in str(err.value)


def test_source_mistakes_are_clear(tmp_path, monkeypatch):
    from datasets import Dataset, DatasetDict

    (tmp_path / "obj.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(KeelError, match="'data' key holds that list \\(found: rows\\)"):
        list(open_source(str(tmp_path / "obj.json")).rows())
    (tmp_path / "x.xlsx").write_bytes(b"x")
    with pytest.raises(KeelError, match="Keel reads .jsonl"):
        open_source(str(tmp_path / "x.xlsx"))
    with pytest.raises(KeelError, match="does not exist"):
        open_source(str(tmp_path / "missing.jsonl"))
    DatasetDict({"train": Dataset.from_list([{"text": "a"}])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(KeelError, match=f"point the recipe at one split, e.g. {tmp_path / 'dd'}/train"):
        list(open_source(str(tmp_path / "dd")).rows())
    # no credentials anywhere (and no instance metadata to ask): a clear error, not a botocore trace
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(KeelError, match=r"data.train: cannot read s3://some-bucket/rows.jsonl: .*credentials"):
        open_source("s3://some-bucket/rows.jsonl")

"""Rows out of the files people have: JSON Lines, JSON, Parquet, CSV, a saved `datasets`
directory, or documents (.txt, .md, .pdf, .docx, .pptx), from a local path or any fsspec URL
(s3://, gs://, file://, memory://, ...).

Each row comes with where it is, so an error points at it:

    file:LINE     JSON Lines: the line number, from 1, as editors show it
    file[INDEX]   JSON arrays, Parquet, CSV, saved datasets: the row index, from 0, as
                  `dataset[INDEX]` (for CSV, the first row after the header is [0])
    file          a document file (one document each)

Rows are Python objects read straight from the file. Parquet and saved datasets are read back
with pyarrow (`to_pylist`), never rebuilt through `datasets.Dataset.from_list`, whose Arrow
structs merge the keys of every row's tool schemas. A
column written that way is detected: a null inside a tool schema or tool-call arguments held
as an Arrow struct makes the row invalid with the reason, and the fix is to store `tools` and
`arguments` as JSON strings, which round-trip exactly.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from data.conversation import RowError
from data.documents import DOCUMENT_SUFFIXES, document_text
from data.errors import KeelError

BATCH_ROWS = 1000
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
TABLE_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _filesystem(location: str, key: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(location)
    except ImportError as exc:
        raise KeelError(f"{key}: reading {location} needs a package that is not installed ({exc}); "
                        "s3:// needs s3fs (a Keel dependency); for gs:// install Keel's `cloud` extra (gcsfs)") from None
    except ValueError as exc:
        raise KeelError(f"{key}: {location} is not a path or URL Keel can read ({exc})") from None


def _suffix(path: str) -> str:
    name = path.rsplit("/", 1)[-1].lower()
    for comp in COMPRESSIONS:
        if name.endswith(comp):
            name = name[: -len(comp)]
    return "." + name.rsplit(".", 1)[-1] if "." in name else ""


@dataclass
class Source:
    """Where a split's data is, and how to read it."""

    location: str  # as the user wrote it
    kind: str  # jsonl | json | parquet | csv | dataset | documents
    fs: Any
    path: str
    files: tuple[str, ...]  # for kind "documents": every file; else the one file (or the dataset dir)

    def rows(self) -> Iterator[tuple[str, Any]]:
        """(where, row) for each row; a row that cannot be read is a RowError in its place."""
        reader = {"jsonl": self._jsonl, "json": self._json, "parquet": self._parquet, "csv": self._csv,
                  "dataset": self._dataset, "documents": self._documents}[self.kind]
        return reader()

    def fingerprint(self) -> str:
        """Changes when the data changes: the bytes of local files, the fsspec key of remote ones
        (ETag or modification time and size, whatever the filesystem reports)."""
        h = hashlib.sha256(self.kind.encode())
        local = "local" in type(self.fs).__name__.lower()
        for name in self._all_files():
            h.update(name.encode())
            if local:
                with self.fs.open(name, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
            else:
                h.update(str(self.fs.ukey(name)).encode())
        return h.hexdigest()

    def count_rows(self) -> int | None:
        """About how many rows there are, when that is cheap to know (for progress and its ETA):
        Parquet from its metadata, documents by file, uncompressed local JSON Lines by counting
        lines (blank ones too); None otherwise."""
        if self.kind == "documents":
            return len(self.files)
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            try:
                with self._open(self.path) as f:
                    return pq.ParquetFile(f).metadata.num_rows
            except Exception:  # noqa: BLE001 - not Parquet after all: reading the rows says so, naming the file
                return None
        local = "local" in type(self.fs).__name__.lower()
        if self.kind == "jsonl" and local and not self.path.lower().endswith(COMPRESSIONS):
            lines = 0
            with self.fs.open(self.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    lines += block.count(b"\n")
            return lines
        return None

    def _all_files(self) -> list[str]:
        if self.kind == "dataset":
            return sorted(p for p in self.fs.find(self.path) if self.fs.isfile(p))
        return list(self.files)

    def _open(self, path: str, mode: str = "rb"):
        return self.fs.open(path, mode, compression="infer")

    # ------------------------------------------------------------------ readers

    def _jsonl(self):
        with self._open(self.path) as f:
            for lineno, raw in enumerate(f, start=1):
                if raw.strip():
                    row = _json_line(raw)
                    if isinstance(row, RowError) and not raw.endswith(b"\n") and lineno > 1:
                        # a last line without its newline that does not parse: the file was cut
                        row = RowError(f"{row}; the file ends inside this line, so it was probably cut short "
                                       "(an interrupted copy, download or write): copy it again from its source")
                    yield f"{self.location}:{lineno}", row

    def _json(self):
        with self._open(self.path) as f:
            data = f.read()
        try:
            doc = json.loads(data)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data":  # JSON Lines in a .json file, as many datasets ship
                for lineno, raw in enumerate(data.splitlines(), start=1):
                    if raw.strip():
                        yield f"{self.location}:{lineno}", _json_line(raw)
                return
            raise KeelError(f"{self.location}: not valid JSON ({exc.msg} at line {exc.lineno} col {exc.colno})") from None
        except UnicodeDecodeError as exc:
            raise KeelError(f"{self.location}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8") from None
        if isinstance(doc, dict) and isinstance(doc.get("data"), list):
            doc = doc["data"]
        if not isinstance(doc, list):
            keys = ", ".join(map(str, doc)) if isinstance(doc, dict) else type(doc).__name__
            raise KeelError(f"{self.location}: a JSON file must hold a list of rows, or an object whose "
                            f"'data' key holds that list (found: {keys})")
        for i, row in enumerate(doc):
            yield f"{self.location}[{i}]", row

    def _parquet(self):
        import pyarrow.parquet as pq

        with self._open(self.path) as f:
            try:
                pf = pq.ParquetFile(f)
            except Exception as exc:  # pyarrow raises ArrowInvalid and others for a bad file
                raise KeelError(f"{self.location}: not a readable Parquet file ({exc})") from None
            structs = struct_columns(pf.schema_arrow)
            i = 0
            for batch in pf.iter_batches(batch_size=BATCH_ROWS):
                for row in batch.to_pylist():
                    yield f"{self.location}[{i}]", struct_problem(row, structs) or row
                    i += 1

    def _csv(self):
        with self.fs.open(self.path, "rt", compression="infer", encoding="utf-8", newline="") as f:
            try:
                for i, row in enumerate(csv.DictReader(f)):
                    if None in row:
                        yield f"{self.location}[{i}]", RowError("more cells than header columns")
                        continue
                    # an empty cell is a missing value: CSV cannot tell the two apart
                    yield f"{self.location}[{i}]", {k: (None if v == "" else v) for k, v in row.items()}
            except (UnicodeDecodeError, csv.Error) as exc:
                raise KeelError(f"{self.location}: not a readable UTF-8 CSV file ({exc})") from None

    def _dataset(self):
        from datasets import Dataset, load_from_disk

        ds = load_from_disk(self.location if "://" in self.location else self.path)
        if not isinstance(ds, Dataset):
            raise KeelError(f"{self.location}: a saved DatasetDict with splits {', '.join(ds)}; "
                            f"point the recipe at one split, e.g. {self.location.rstrip('/')}/{next(iter(ds))}")
        table = ds.data.table
        structs = struct_columns(table.schema)
        i = 0
        for batch in table.to_batches(max_chunksize=BATCH_ROWS):
            for row in batch.to_pylist():
                yield f"{self.location}[{i}]", struct_problem(row, structs) or row
                i += 1

    def _documents(self):
        for name in self.files:
            where = self._display(name)
            try:
                self._check_inside(name)
                with self.fs.open(name, "rb") as f:
                    yield where, {"text": document_text(name, f.read())}
            except RowError as exc:
                yield where, exc

    def _check_inside(self, name: str) -> None:
        """A document in a local directory must be inside it: a symbolic link that leads out (to
        ~/.ssh, /etc, another user's files) is refused, not read into training data."""
        if len(self.files) == 1 or "local" not in type(self.fs).__name__.lower():
            return
        root, real = os.path.realpath(self.path), os.path.realpath(name)
        if os.path.commonpath([root, real]) != root:
            raise RowError(f"a symbolic link to {real}, outside {self.location}; Keel reads only the files inside "
                           "the data directory: copy the file in instead of linking it")

    def _display(self, name: str) -> str:
        if len(self.files) == 1:
            return self.location
        rel = name[len(self.path):].lstrip("/")
        return f"{self.location.rstrip('/')}/{rel}"


def _json_line(raw: bytes | str):
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return RowError(f"not valid UTF-8 (byte {exc.start} of the line); save the file as UTF-8")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        return RowError(f"not valid JSON ({exc.msg} at char {exc.pos})")
    except RecursionError:  # Python's json parser recurses once per level of nesting
        return RowError("nested too deeply to read (JSON arrays or objects inside each other about "
                        f"{sys.getrecursionlimit()} levels deep); flatten the row")


def open_source(location: str, *, key: str = "data.train") -> Source:
    """The rows of a file, dataset directory or directory of documents, local or remote."""
    location = str(location)
    fs, path = _filesystem(location, key)
    try:
        exists, is_dir = fs.exists(path), fs.isdir(path)
    except Exception as exc:  # noqa: BLE001 - each storage backend raises its own errors
        hint = ("; for s3:// Keel uses the usual AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE or the pod's role) and AWS_ENDPOINT_URL for S3-compatible stores"
                if location.startswith("s3://") else "")
        raise KeelError(f"{key}: cannot read {location}: {type(exc).__name__}: {exc}{hint}") from None
    if not exists:
        raise KeelError(f"{key}: {location} does not exist")
    if is_dir:
        return _directory_source(location, fs, path, key)
    suffix = _suffix(path)
    if suffix in TABLE_SUFFIXES:
        return Source(location, TABLE_SUFFIXES[suffix], fs, path, (path,))
    if suffix in DOCUMENT_SUFFIXES:
        return Source(location, "documents", fs, path, (path,))
    raise KeelError(f"{key}: {location}: Keel reads {', '.join(TABLE_SUFFIXES)} files, a directory saved by "
                    f"datasets' save_to_disk, or documents ({', '.join(DOCUMENT_SUFFIXES)}); got {suffix or 'no suffix'}")


def _directory_source(location: str, fs, path: str, key: str) -> Source:
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    if "dataset_dict.json" in names or "state.json" in names or "dataset_info.json" in names:
        return Source(location, "dataset", fs, path, (path,))
    docs = sorted(p for p in fs.find(path) if _suffix(p) in DOCUMENT_SUFFIXES)
    if not docs:
        raise KeelError(f"{key}: {location} is a directory, but neither a saved dataset (save_to_disk) nor "
                        f"one holding documents ({', '.join(DOCUMENT_SUFFIXES)})")
    return Source(location, "documents", fs, path, tuple(docs))


# ---------------------------------------------------------------------- Arrow struct trap


def _has_struct(arrow_type) -> bool:
    import pyarrow as pa

    if pa.types.is_struct(arrow_type):
        return True
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        return _has_struct(arrow_type.value_type)
    return False


def struct_columns(schema) -> set[str]:
    """Columns stored as Arrow structs (at any depth), where Arrow merged keys across rows."""
    return {field.name for field in schema if _has_struct(field.type)}


def _first_null(value: Any, path: str) -> str | None:
    if value is None:
        return path
    if isinstance(value, dict):
        for k, v in value.items():
            found = _first_null(v, f"{path}.{k}")
            if found:
                return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _first_null(v, f"{path}[{i}]")
            if found:
                return found
    return None


def _null_in_struct_json(row: dict, structs: set[str]) -> str | None:
    """Where a null sits inside a tool schema or tool-call arguments held as Arrow structs."""
    if "tools" in structs and isinstance(row.get("tools"), list):
        for i, tool in enumerate(row["tools"]):
            fn = tool.get("function") if isinstance(tool, dict) and isinstance(tool.get("function"), dict) else tool
            if isinstance(fn, dict):
                found = _first_null(fn.get("parameters"), f"tools[{i}].parameters")
                if found:
                    return found
    for col in sorted(structs - {"tools"}):
        messages = row.get(col)
        for j, msg in enumerate(messages if isinstance(messages, list) else []):
            for k, call in enumerate((msg.get("tool_calls") or []) if isinstance(msg, dict) else []):
                fn = call.get("function") if isinstance(call, dict) else None
                args = fn.get("arguments") if isinstance(fn, dict) else None
                if isinstance(args, dict):
                    found = _first_null(args, f"{col}[{j}].tool_calls[{k}].function.arguments")
                    if found:
                        return found
    return None


def struct_problem(row: dict, structs: set[str]) -> RowError | None:
    if not structs:
        return None
    where = _null_in_struct_json(row, structs)
    if where is None:
        return None
    return RowError(
        f"{where} is null in a column stored as Arrow structs. Arrow merges the keys of every row's "
        "structs, so this null may be another row's key rather than your data (a tool schema would "
        "gain other tools' properties). Store `tools` and tool-call `arguments` as JSON strings "
        "(json.dumps) when writing Parquet or a saved dataset; Keel reads them back exactly."
    )

"""Prepare a dataset once: read, convert, validate, render, tokenize, truncate, cache.

read (data/sources.py) -> canonical row (data/shapes.py) -> validated (data/conversation.py)
-> token ids (data/render.py) -> an Arrow dataset of token ids only, so no JSON schema ever
passes through Arrow's struct unification (../shared/FIELD-NOTES.md section 1):

    conversations, documents    input_ids, labels (IGNORE_INDEX where not trained)
    preference pairs            prompt_ids, chosen_ids, rejected_ids (TRL's DPO columns)

The cache directory's name is a hash of everything that changes the result (the data, the
tokenizer, the format with its options, seq_len, the preparation options, this module's
version), so a second run with the same inputs reuses it. It is built under a temporary name
and renamed when complete: a reader never sees half a cache, and two nodes preparing at once
on a shared volume both end with a whole one.

Invalid rows (data.on_invalid): `error` stops with the first rows' place and reason; `skip`
leaves them out and writes each, with its place and reason, to `rejected.jsonl` inside the
cache directory (the count is `stats.rejected`; the trainer prints and logs it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from data.conversation import RowError, validate_conversation, validate_document, validate_preference
from data.errors import KeelError
from data.formats import Format
from data.shapes import KINDS, detect_shape, to_canonical
from data.sources import Source, open_source

PREP_VERSION = "2"
COMPLETE_MARKER = "_COMPLETE"
STATS_FILE = "stats.json"
META_FILE = "meta.json"
REJECTED_FILE = "rejected.jsonl"
MAX_REPORTED_ERRORS = 10
IGNORE_INDEX = -100
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def default_cache_root() -> Path:
    return Path(os.environ.get("KEEL_CACHE", Path.home() / ".cache" / "keel")) / "prepared"


@dataclass(frozen=True)
class PrepOptions:
    """How rows are read and what happens to invalid ones (the recipe's data section)."""

    shape: str = "auto"
    on_invalid: Literal["error", "skip"] = "error"


@dataclass
class PrepStats:
    rows: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped_no_trained_tokens_after_truncation: int = 0
    max_tokens: int = 0
    rejected: int = 0
    documents_split: int = 0  # documents longer than seq_len, cut into several examples


@dataclass
class Prepared:
    path: Path
    stats: PrepStats
    reused: bool
    kind: str = "conversation"  # conversation | preference | document

    @property
    def rejected_file(self) -> Path | None:
        p = self.path / REJECTED_FILE
        return p if p.is_file() else None

    def load(self):
        from datasets import load_from_disk

        return load_from_disk(str(self.path))


def cache_key(source: Source, tokenizer_dir: Path, fmt: Format, seq_len: int, options: PrepOptions) -> str:
    h = hashlib.sha256()
    h.update(f"keel-prepare-v{PREP_VERSION}|seq_len={seq_len}|{json.dumps(asdict(options), sort_keys=True)}|".encode())
    h.update(fmt.spec.model_dump_json().encode())
    h.update(fmt.chat_template.encode())
    for name in TOKENIZER_FILES:
        p = tokenizer_dir / name
        if p.is_file():
            h.update(name.encode())
            h.update(p.read_bytes())
    h.update(source.fingerprint().encode())
    return h.hexdigest()[:20]


def read_jsonl(path: Path):
    """Yield (line_number, row) for each non-blank line; bad JSON is a RowError naming the line."""
    for where, row in open_source(str(path)).rows():
        yield int(where.rsplit(":", 1)[1]), row


@dataclass
class _Output:
    """What preparation collects: token columns, stats, rejected rows."""

    kind: str = "conversation"
    columns: dict[str, list] = field(default_factory=dict)
    stats: PrepStats = field(default_factory=PrepStats)
    errors: list[tuple[str, str, object]] = field(default_factory=list)  # (where, reason, row)

    def add(self, row: dict[str, list[int]], tokens: int, trained: int) -> None:
        for name, values in row.items():
            self.columns.setdefault(name, []).append(values)
        self.stats.examples += 1
        self.stats.tokens += tokens
        self.stats.trained_tokens += trained


def _canonical_rows(source: Source, options: PrepOptions, out: _Output):
    """(where, raw row, canonical row or RowError), deciding the shape at the first object row."""
    shape = None if options.shape == "auto" else options.shape
    if source.kind == "documents":
        if shape not in (None, "text"):
            raise KeelError(f"{source.location}: documents are read as data.shape 'text', not {shape!r}")
        shape = "text"
    for where, raw in source.rows():
        if shape is None and isinstance(raw, dict):
            shape = detect_shape(raw, where)
        if isinstance(raw, RowError) or shape is None:
            yield where, raw, raw if isinstance(raw, RowError) else RowError("a row must be an object")
            continue
        out.kind = KINDS[shape]
        try:
            yield where, raw, to_canonical(shape, raw)
        except RowError as exc:
            yield where, raw, exc


def _add_conversation(out: _Output, conv: dict, tokenizer, fmt: Format, seq_len: int) -> None:
    from data.render import render_conversation

    rendered = render_conversation(validate_conversation(conv, fmt.row_rules()), tokenizer=tokenizer, fmt=fmt)
    if any(ex.trained_tokens == 0 for ex in rendered):
        raise RowError("no token is trained (the loss mask is empty); the chat template marks no assistant text")
    for ex in rendered:
        n = len(ex.input_ids)
        out.stats.max_tokens = max(out.stats.max_tokens, n)
        ids, labels = ex.input_ids, ex.labels
        if n > seq_len:
            out.stats.truncated += 1
            ids, labels = ids[:seq_len], labels[:seq_len]
            if all(t == IGNORE_INDEX for t in labels[1:]):
                out.stats.dropped_no_trained_tokens_after_truncation += 1
                continue
        out.add({"input_ids": ids, "labels": labels}, len(ids), sum(1 for t in labels if t != IGNORE_INDEX))


def _add_preference(out: _Output, row: dict, tokenizer, fmt: Format, seq_len: int) -> None:
    from data.render import render_preference

    pair = render_preference(validate_preference(row, fmt.row_rules()), tokenizer=tokenizer, fmt=fmt)
    prompt, chosen, rejected = pair.prompt_ids, pair.chosen_ids, pair.rejected_ids
    longest = len(prompt) + max(len(chosen), len(rejected))
    out.stats.max_tokens = max(out.stats.max_tokens, longest)
    if longest > seq_len:  # keep the whole prompt, cut the answers
        out.stats.truncated += 1
        room = seq_len - len(prompt)
        if room <= 0:
            out.stats.dropped_no_trained_tokens_after_truncation += 1
            return
        chosen, rejected = chosen[:room], rejected[:room]
    out.add({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected},
            len(prompt) + len(chosen) + len(rejected), len(chosen) + len(rejected))


def _add_document(out: _Output, row: dict, tokenizer, fmt: Format, seq_len: int) -> None:
    from data.render import render_document

    control = tuple(dict.fromkeys([*fmt.spec.control_tokens, *tokenizer.all_special_tokens]))
    ids = render_document(validate_document(row, control), tokenizer=tokenizer)
    out.stats.max_tokens = max(out.stats.max_tokens, len(ids))
    if len(ids) > seq_len:  # a long document becomes several examples, in order; none is cut away
        out.stats.documents_split += 1
    for start in range(0, len(ids), seq_len):
        chunk = ids[start:start + seq_len]
        out.add({"input_ids": chunk, "labels": list(chunk)}, len(chunk), len(chunk))


ADDERS = {"conversation": _add_conversation, "preference": _add_preference, "document": _add_document}


def _prepare_rows(source: Source, tokenizer, fmt: Format, seq_len: int, options: PrepOptions) -> _Output:
    out = _Output()
    for where, raw, row in _canonical_rows(source, options, out):
        out.stats.rows += 1
        try:
            if isinstance(row, RowError):
                raise row
            ADDERS[out.kind](out, row, tokenizer, fmt, seq_len)
        except RowError as exc:
            out.errors.append((where, str(exc), None if isinstance(raw, RowError) else raw))
    out.stats.rejected = len(out.errors)
    return out


def _raise_for_errors(out: _Output, split: str) -> None:
    shown = "\n".join(f"  - {where}: {reason}" for where, reason, _ in out.errors[:MAX_REPORTED_ERRORS])
    more = len(out.errors) - MAX_REPORTED_ERRORS
    raise KeelError(
        f"data.{split}: {len(out.errors)} of {out.stats.rows} rows are invalid (place: reason):\n{shown}"
        + (f"\n  ... and {more} more" if more > 0 else "")
        + "\nFix or remove these rows, or set data.on_invalid: skip to leave them out (they are then "
        f"listed in {REJECTED_FILE} in the prepared data's directory)."
    )


def _write_rejected(path: Path, errors: list[tuple[str, str, object]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for where, reason, row in errors:
            f.write(json.dumps({"where": where, "reason": reason, "row": row}, ensure_ascii=False, default=str) + "\n")


def _dataset(out: _Output):
    from datasets import Dataset, Features, Sequence, Value

    features = Features({name: Sequence(Value("int32")) for name in out.columns})
    return Dataset.from_dict(out.columns, features=features)


def prepare_file(data: str | Path, *, tokenizer_dir: str | Path, fmt: Format, seq_len: int,
                 cache_root: str | Path | None = None, split: str = "train",
                 options: PrepOptions | None = None) -> Prepared:
    """Prepared token ids for one data location (file, directory or URL), from the cache when there."""
    options = options or PrepOptions()
    tokenizer_dir = Path(tokenizer_dir)
    source = open_source(str(data), key=f"data.{split}")
    root = Path(cache_root) if cache_root else default_cache_root()
    final = root / cache_key(source, tokenizer_dir, fmt, seq_len, options)
    if (final / COMPLETE_MARKER).exists():
        return _read_prepared(final)

    from transformers import AutoTokenizer

    from data.render import check_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    check_tokenizer(tokenizer, fmt, where=str(tokenizer_dir))
    t0 = time.time()
    out = _prepare_rows(source, tokenizer, fmt, seq_len, options)
    if out.errors and options.on_invalid == "error":
        _raise_for_errors(out, split)
    if out.stats.examples == 0:
        raise KeelError(f"data.{split}: {data} holds nothing to train on ({out.stats.rows} rows, "
                        f"{out.stats.rejected} rejected)")

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _dataset(out).save_to_disk(str(tmp))
    if out.errors:
        _write_rejected(tmp / REJECTED_FILE, out.errors)
    (tmp / STATS_FILE).write_text(json.dumps(asdict(out.stats), indent=2))
    (tmp / META_FILE).write_text(json.dumps({"kind": out.kind, "source": str(data), "options": asdict(options)}))
    (tmp / COMPLETE_MARKER).write_text(f"prepared in {time.time() - t0:.1f}s\n")
    try:
        tmp.rename(final)
    except OSError:  # another process published the same cache first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return Prepared(final, out.stats, reused=False, kind=out.kind)


def _read_prepared(path: Path) -> Prepared:
    meta = json.loads((path / META_FILE).read_text())
    return Prepared(path, PrepStats(**json.loads((path / STATS_FILE).read_text())), reused=True, kind=meta["kind"])


def wait_for_prepared(data: str | Path, *, tokenizer_dir: str | Path, fmt: Format, seq_len: int,
                      cache_root: str | Path | None = None, timeout_s: float = 3600,
                      options: PrepOptions | None = None) -> Prepared:
    """For processes that are not the preparing one: wait on the completion marker.

    This waits on a file, not inside a collective, so a long preparation never trips a
    process-group timeout (the NCCL-timeout-while-rank-0-tokenizes trap).
    """
    root = Path(cache_root) if cache_root else default_cache_root()
    source = open_source(str(data))
    final = root / cache_key(source, Path(tokenizer_dir), fmt, seq_len, options or PrepOptions())
    deadline = time.time() + timeout_s
    while not (final / COMPLETE_MARKER).exists():
        if time.time() > deadline:
            raise KeelError(f"gave up after {timeout_s:.0f}s waiting for prepared data at {final}")
        time.sleep(1.0)
    return _read_prepared(final)

"""Prepare a dataset once: read, validate, render, tokenize, truncate, cache.

The cache is an Arrow dataset (via `datasets`) holding only token ids and labels, so no JSON
schema ever passes through Arrow's struct unification (../shared/FIELD-NOTES.md section 1).
Its directory name is a hash of everything that changes the result (data bytes, tokenizer,
format, seq_len, this module's version), so a second run with the same inputs reuses it.
The directory is built under a temporary name and renamed when complete: a reader never sees
half a cache, and two nodes preparing at once on a shared volume both end with a whole one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from data.conversation import RowError, validate_conversation
from data.errors import KeelError
from data.formats import Format

PREP_VERSION = "1"
COMPLETE_MARKER = "_COMPLETE"
STATS_FILE = "stats.json"
MAX_REPORTED_ERRORS = 10
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def default_cache_root() -> Path:
    return Path(os.environ.get("KEEL_CACHE", Path.home() / ".cache" / "keel")) / "prepared"


@dataclass
class PrepStats:
    rows: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped_no_trained_tokens_after_truncation: int = 0
    max_tokens: int = 0


@dataclass
class Prepared:
    path: Path
    stats: PrepStats
    reused: bool

    def load(self):
        from datasets import load_from_disk

        return load_from_disk(str(self.path))


def cache_key(data_file: Path, tokenizer_dir: Path, fmt: Format, seq_len: int) -> str:
    h = hashlib.sha256()
    h.update(f"keel-prepare-v{PREP_VERSION}|seq_len={seq_len}|".encode())
    h.update(fmt.spec.model_dump_json().encode())
    h.update(fmt.chat_template.encode())
    for name in TOKENIZER_FILES:
        p = tokenizer_dir / name
        if p.is_file():
            h.update(name.encode())
            h.update(p.read_bytes())
    with open(data_file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:20]


def read_jsonl(path: Path):
    """Yield (line_number, row) for each non-blank line; bad JSON is a RowError naming the line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, RowError(f"not valid UTF-8 (byte {exc.start})")
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as exc:
                yield lineno, RowError(f"not valid JSON ({exc.msg} at char {exc.pos})")


def _render_file(data_file: Path, tokenizer, fmt: Format, seq_len: int):
    from data.render import render_conversation

    markup = fmt.markup_strings() + list(fmt.spec.control_tokens)
    ids, labels, stats, errors = [], [], PrepStats(), []
    for lineno, row in read_jsonl(data_file):
        stats.rows += 1
        try:
            if isinstance(row, RowError):
                raise row
            conv = validate_conversation(row, markup)
            rendered = render_conversation(conv, tokenizer=tokenizer, fmt=fmt)
            if any(ex.trained_tokens == 0 for ex in rendered):
                raise RowError("no token is trained (the loss mask is empty); the chat template marks no assistant text")
        except RowError as exc:
            errors.append(f"  - {data_file}:{lineno}: {exc}")
            continue
        for ex in rendered:
            n = len(ex.input_ids)
            stats.max_tokens = max(stats.max_tokens, n)
            ex_ids, ex_labels = ex.input_ids, ex.labels
            if n > seq_len:
                stats.truncated += 1
                ex_ids, ex_labels = ex_ids[:seq_len], ex_labels[:seq_len]
                if all(t == -100 for t in ex_labels[1:]):
                    stats.dropped_no_trained_tokens_after_truncation += 1
                    continue
            ids.append(ex_ids)
            labels.append(ex_labels)
            stats.examples += 1
            stats.tokens += len(ex_ids)
            stats.trained_tokens += sum(1 for t in ex_labels if t != -100)
    return ids, labels, stats, errors


def prepare_file(data_file: str | Path, *, tokenizer_dir: str | Path, fmt: Format, seq_len: int,
                 cache_root: str | Path | None = None, split: str = "train") -> Prepared:
    """Prepared token ids + labels for one JSONL file, from the cache when it is there."""
    data_file, tokenizer_dir = Path(data_file), Path(tokenizer_dir)
    if not data_file.is_file():
        raise KeelError(f"data.{split}: {data_file} does not exist or is not a file")
    root = Path(cache_root) if cache_root else default_cache_root()
    final = root / cache_key(data_file, tokenizer_dir, fmt, seq_len)
    if (final / COMPLETE_MARKER).exists():
        return Prepared(final, PrepStats(**json.loads((final / STATS_FILE).read_text())), reused=True)

    from datasets import Dataset, Features, Sequence, Value
    from transformers import AutoTokenizer

    from data.render import check_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    check_tokenizer(tokenizer, fmt, where=str(tokenizer_dir))
    t0 = time.time()
    ids, labels, stats, errors = _render_file(data_file, tokenizer, fmt, seq_len)
    if errors:
        shown = "\n".join(errors[:MAX_REPORTED_ERRORS])
        more = f"\n  ... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        raise KeelError(
            f"data.{split}: {len(errors)} of {stats.rows} rows are invalid (file:line: reason):\n{shown}{more}\n"
            "Fix or remove these rows."
        )
    if stats.examples == 0:
        raise KeelError(f"data.{split}: {data_file} holds no trainable conversation ({stats.rows} rows)")

    features = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32"))})
    dataset = Dataset.from_dict({"input_ids": ids, "labels": labels}, features=features)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.save_to_disk(str(tmp))
    (tmp / STATS_FILE).write_text(json.dumps(asdict(stats), indent=2))
    (tmp / COMPLETE_MARKER).write_text(f"prepared in {time.time() - t0:.1f}s\n")
    try:
        tmp.rename(final)
    except OSError:  # another process published the same cache first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return Prepared(final, stats, reused=False)


def wait_for_prepared(data_file: str | Path, *, tokenizer_dir: str | Path, fmt: Format, seq_len: int,
                      cache_root: str | Path | None = None, timeout_s: float = 3600) -> Prepared:
    """For processes that are not the preparing one: wait on the completion marker.

    This waits on a file, not inside a collective, so a long preparation never trips a
    process-group timeout (the NCCL-timeout-while-rank-0-tokenizes trap).
    """
    root = Path(cache_root) if cache_root else default_cache_root()
    final = root / cache_key(Path(data_file), Path(tokenizer_dir), fmt, seq_len)
    deadline = time.time() + timeout_s
    while not (final / COMPLETE_MARKER).exists():
        if time.time() > deadline:
            raise KeelError(f"gave up after {timeout_s:.0f}s waiting for prepared data at {final}")
        time.sleep(1.0)
    return Prepared(final, PrepStats(**json.loads((final / STATS_FILE).read_text())), reused=True)

"""Prepare a dataset once: read, convert, validate, render, tokenize, truncate, pack, cache.

read (data/sources.py) -> canonical row (data/shapes.py) -> validated (data/conversation.py)
-> token ids (data/render.py, data/tokenized.py; in `num_proc` processes, data/workers.py)
-> packed rows (data/packing.py, when asked) -> an Arrow file of token ids only, so no JSON
schema ever passes through Arrow's struct unification:

    conversations, documents    input_ids, labels (IGNORE_INDEX where not trained),
                                and seq_lengths when packed
    preference pairs            prompt_ids, chosen_ids, rejected_ids (TRL's DPO columns; never packed)

Rows stream from the source to the Arrow file (datasets' ArrowWriter) a window at a time, so
peak memory does not grow with the input. The cache directory holds:

    data.arrow       the rows (`datasets.Dataset.from_file` reads it, memory-mapped)
    stats.json       PrepStats, with the length histogram as data
    lengths.png      the length histogram drawn
    meta.json        kind, packed or not, options
    rejected.jsonl   with on_invalid: skip, each left-out row with its place and reason
    prepared_by.json prepared across nodes: which node tokenized which shards (rows, seconds)
    _COMPLETE        written last

The directory's name is a hash of everything that changes the result (the data, the
tokenizer, the format with its options, seq_len, the preparation options, this module's
version), not of how it is computed (num_proc), so a second run with the same inputs reuses
it. It is built under a temporary name and renamed when complete: a reader never sees half a
cache. One process prepares while the others wait: on a volume that several nodes share, the
first to create `.<name>.lock` (O_EXCL) prepares and keeps the lock's mtime fresh; the others
wait on the completion marker (on a file, never inside a collective, where a long preparation
would trip the process-group timeout). A lock whose holder died goes stale and is taken over.
Without a shared volume each node's cache root is its own, so each node prepares its copy.
With `node` (one of several nodes on a shared volume), each node tokenizes its share of the rows
into shards and one process assembles the cache from them (data/shards.py): the same bytes.

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
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from data.errors import KeelError
from data.files import read_json
from data.formats import Format
from data import shards as sharding
from data.shapes import KINDS
from data.shards import STALE_LOCK_S, Lock, NodeShare, ShardDir, list_array
from data.sources import Source, open_source
from data.tokenized import COLUMNS, IGNORE_INDEX  # noqa: F401  (IGNORE_INDEX: part of this module's API)
from data.workers import heap_frozen

PREP_VERSION = "3"
COMPLETE_MARKER = "_COMPLETE"
DATA_FILE = "data.arrow"
STATS_FILE = "stats.json"
META_FILE = "meta.json"
REJECTED_FILE = "rejected.jsonl"
LENGTHS_PLOT = "lengths.png"
NODES_FILE = "prepared_by.json"  # preparation across nodes: which node tokenized which shards
MAX_REPORTED_ERRORS = 10
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
WRITE_EXAMPLES = 2000  # unpacked examples per Arrow write
PACK_WINDOW_TOKENS = 4_000_000  # packed per window (at least 64 rows' worth): bounds memory, not packing quality
WAIT_TIMEOUT_S = 4 * 3600.0  # how long a process waits for another to finish preparing


def default_cache_root() -> Path:
    return Path(os.environ.get("KEEL_CACHE", Path.home() / ".cache" / "keel")) / "prepared"


@dataclass(frozen=True)
class PrepOptions:
    """What changes the prepared result besides data, tokenizer, format and seq_len."""

    shape: str = "auto"
    on_invalid: Literal["error", "skip"] = "error"
    packing: bool = False  # bin-pack examples into rows of seq_len (never preference pairs)


@dataclass
class PrepStats:
    rows: int = 0  # rows read from the source
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped_no_trained_tokens_after_truncation: int = 0
    max_tokens: int = 0
    rejected: int = 0
    documents_split: int = 0  # documents longer than seq_len, cut into several examples
    sequences: int = 0  # rows of the prepared dataset: packed rows, or one per example
    padding_fraction: float | None = None  # packed: 1 - tokens / (sequences * seq_len); None when not packed
    length_histogram: dict = field(default_factory=dict)  # data/lengths.py

    def numbers(self) -> dict[str, float]:
        """The scalar statistics, as MLflow metrics take them."""
        return {k: float(v) for k, v in asdict(self).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass
class Prepared:
    path: Path
    stats: PrepStats
    reused: bool
    kind: str = "conversation"  # conversation | preference | document
    packed: bool = False
    seq_len: int = 0

    @property
    def rejected_file(self) -> Path | None:
        p = self.path / REJECTED_FILE
        return p if p.is_file() else None

    def report_files(self) -> list[Path]:
        """What a run logs next to the statistics: stats.json (with the histogram's data) and its plot."""
        return [p for p in (self.path / STATS_FILE, self.path / LENGTHS_PLOT) if p.is_file()]

    def load(self):
        from datasets import Dataset

        return Dataset.from_file(str(self.path / DATA_FILE))


def cache_key(source: Source, tokenizer_dir: Path, fmt: Format, seq_len: int, options: PrepOptions) -> str:
    h = hashlib.sha256()
    h.update(f"keel-prepare-v{PREP_VERSION}|seq_len={seq_len}|{json.dumps(asdict(options), sort_keys=True)}|".encode())
    h.update(fmt.spec.model_dump_json().encode())
    h.update((fmt.chat_template or "").encode())
    if fmt.harmony:  # no template: the harmony library renders, and its releases have changed the layout
        from data.harmony import library_version

        h.update(f"|harmony={library_version()}".encode())
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


# ----------------------------------------------------------------------------- writing


class _CacheWriter:
    """Examples in, Arrow rows out: as they come, or packed a window at a time."""

    def __init__(self, path: Path, *, kind: str, seq_len: int, packing: bool):
        from datasets import Features, Sequence, Value
        from datasets.arrow_writer import ArrowWriter

        from data.packing import SEQ_LENGTHS

        self.seq_len, self.packing = seq_len, packing
        names = list(COLUMNS[kind]) + ([SEQ_LENGTHS] if packing else [])
        self.features = Features({name: Sequence(Value("int32")) for name in names})
        self.writer = ArrowWriter(features=self.features, path=str(path))
        self.window: list[dict[str, np.ndarray]] = []
        self.window_tokens = 0
        self.limit = max(PACK_WINDOW_TOKENS, 64 * seq_len) if packing else None
        self.sequences = 0
        self.sequence_tokens = 0

    def add(self, example: dict[str, np.ndarray], tokens: int) -> None:
        self.window.append(example)
        self.window_tokens += tokens
        if (self.window_tokens >= self.limit) if self.packing else (len(self.window) >= WRITE_EXAMPLES):
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        from data.packing import pack_window

        if not self.window:
            return
        if self.packing:
            columns = pack_window(self.window, self.seq_len)
        else:
            columns = {name: [ex[name] for ex in self.window] for name in self.window[0]}
        table = pa.table({name: list_array(arrays) for name, arrays in columns.items()})
        self.writer.write_table(table.select(list(self.features)))
        self.sequences += table.num_rows
        self.sequence_tokens += sum(len(a) for a in columns[next(iter(self.features))])
        self.window, self.window_tokens = [], 0

    def close(self) -> None:
        self._flush()
        self.writer.finalize()


# ----------------------------------------------------------------------------- building


def _raise_for_errors(shown: list[tuple[str, str]], count: int, rows: int, split: str) -> None:
    listed = "\n".join(f"  - {where}: {reason}" for where, reason in shown)
    more = count - len(shown)
    raise KeelError(
        f"data.{split}: {count} of {rows} rows are invalid (place: reason):\n{listed}"
        + (f"\n  ... and {more} more" if more > 0 else "")
        + "\nFix or remove these rows, or set data.on_invalid: skip to leave them out (they are then "
        f"listed in {REJECTED_FILE} in the prepared data's directory)."
    )


class _Rejected:
    """Invalid rows: the first few kept for the error message, every one streamed to a file."""

    def __init__(self, path: Path):
        self.path, self.file = path, None
        self.shown: list[tuple[str, str]] = []

    def add(self, where: str, reason: str, row_json: str) -> None:
        if len(self.shown) < MAX_REPORTED_ERRORS:
            self.shown.append((where, reason))
        if self.file is None:
            self.file = open(self.path, "w", encoding="utf-8")
        # json.dumps({"where": ..., "reason": ..., "row": row}) with the row already written (a shard holds it so)
        self.file.write(f'{{"where": {json.dumps(where, ensure_ascii=False)}, "reason": '
                        f'{json.dumps(reason, ensure_ascii=False)}, "row": {row_json}}}\n')

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _row_json(raw) -> str:
    return json.dumps(raw, ensure_ascii=False, default=str)


class _Output:
    """Tokenized rows in source order -> the cache's files: the Arrow rows, the statistics with
    the length histogram and its plot, the rejected rows. One node's preparation and the
    assembly of several nodes' shards (data/shards.py) both write through it."""

    def __init__(self, tmp: Path, *, seq_len: int, options: PrepOptions):
        from data.lengths import LengthHistogram

        self.tmp, self.seq_len, self.options = tmp, seq_len, options
        self.stats, self.histogram = PrepStats(), LengthHistogram(seq_len)
        self.rejected = _Rejected(tmp / REJECTED_FILE)
        self.kind, self.writer = "conversation", None

    def add(self, where: str, shape: str | None, result, raw=None, *, row_json: str | None = None) -> None:
        stats = self.stats
        stats.rows += 1
        if shape is not None:
            self.kind = KINDS[shape]
        if result.error is not None:
            stats.rejected += 1
            self.rejected.add(where, result.error, row_json if row_json is not None else _row_json(raw))
            return
        self.histogram.add(result.lengths)
        stats.max_tokens = max(stats.max_tokens, *result.lengths, 0)
        stats.truncated += result.truncated
        stats.dropped_no_trained_tokens_after_truncation += result.dropped
        stats.documents_split += result.documents_split
        for example, tokens, trained in zip(result.examples, result.tokens, result.trained):
            if self.writer is None:
                self.writer = _CacheWriter(self.tmp / DATA_FILE, kind=self.kind, seq_len=self.seq_len,
                                           packing=self.options.packing and self.kind != "preference")
            self.writer.add(example, tokens)
            stats.examples += 1
            stats.tokens += tokens
            stats.trained_tokens += trained

    def finish(self, data, split: str) -> tuple[PrepStats, str, bool]:
        """Refuse invalid or empty data, else close the Arrow file and draw the histogram."""
        from data.lengths import plot_lengths

        stats, writer, seq_len = self.stats, self.writer, self.seq_len
        self.rejected.close()
        if stats.rejected and self.options.on_invalid == "error":
            _raise_for_errors(self.rejected.shown, stats.rejected, stats.rows, split)
        if writer is None:
            fix = ("it is empty (no rows, or only blank lines): point data." + split + " at the data file, or add rows"
                   if stats.rows == 0 else "every row was rejected (set data.on_invalid: error to list each with "
                   "its reason) or had no trained token left after truncation (raise training.seq_len)")
            raise KeelError(f"data.{split}: {data} holds nothing to train on ({stats.rows} rows, "
                            f"{stats.rejected} rejected): {fix}")
        writer.close()
        stats.sequences = writer.sequences
        if writer.packing:
            stats.padding_fraction = round(1 - writer.sequence_tokens / (writer.sequences * seq_len), 6)
        stats.length_histogram = self.histogram.to_dict()
        plot_lengths(stats.length_histogram, self.tmp / LENGTHS_PLOT,
                     title=f"data.{split}: {stats.examples} examples, seq_len {seq_len}, {stats.truncated} truncated"
                           + (f"; packed into {stats.sequences} rows, {stats.padding_fraction:.1%} padding"
                              if writer.packing else ""))
        return stats, self.kind, writer.packing


def _tokenizer(tokenizer_dir: Path, fmt: Format, trust_remote_code: bool):
    from data.model_loading import LoadPolicy, load_tokenizer
    from data.render import check_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir, LoadPolicy(trust_remote_code=trust_remote_code))
    check_tokenizer(tokenizer, fmt, where=str(tokenizer_dir))
    return tokenizer


def _build(source: Source, tmp: Path, *, data, tokenizer_dir: Path, fmt: Format, seq_len: int, split: str,
           options: PrepOptions, num_proc: int, trust_remote_code: bool = False) -> tuple[PrepStats, str, bool]:
    """Write the cache into `tmp`; (stats, kind, packed)."""
    from data.progress import Progress
    from data.workers import tokenized_rows

    tokenizer = _tokenizer(tokenizer_dir, fmt, trust_remote_code)
    out = _Output(tmp, seq_len=seq_len, options=options)
    progress = Progress(f"prepare data.{split}", total=source.count_rows())
    try:
        for where, raw, shape, result in tokenized_rows(source, options.shape, tokenizer=tokenizer,
                                                        tokenizer_dir=tokenizer_dir, fmt=fmt, seq_len=seq_len,
                                                        num_proc=num_proc, trust_remote_code=trust_remote_code):
            progress.update()
            out.add(where, shape, result, raw)
    finally:
        progress.close()
        out.rejected.close()
    return out.finish(data, split)


def _publish(tmp: Path, final: Path) -> None:
    try:
        tmp.rename(final)
    except OSError:  # another process published the same cache first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_file(data: str | Path, *, tokenizer_dir: str | Path, fmt: Format, seq_len: int,
                 cache_root: str | Path | None = None, split: str = "train",
                 options: PrepOptions | None = None, num_proc: int | None = None,
                 timeout_s: float = WAIT_TIMEOUT_S, trust_remote_code: bool = False,
                 node: NodeShare | None = None) -> Prepared:
    """Prepared token ids for one data location (file, directory or URL), from the cache when
    there; built here, or waited for while another process builds it. With `node` one of
    several (data/shards.py), this node tokenizes its share of the rows into the shared cache
    directory and the cache is assembled from every node's shards."""
    from data.workers import default_num_proc

    options = options or PrepOptions()
    tokenizer_dir = Path(tokenizer_dir)
    source = open_source(str(data), key=f"data.{split}")
    root = Path(cache_root) if cache_root else default_cache_root()
    final = root / cache_key(source, tokenizer_dir, fmt, seq_len, options)
    deadline = time.time() + timeout_s
    num_proc = num_proc or default_num_proc()
    args = dict(data=data, tokenizer_dir=tokenizer_dir, fmt=fmt, seq_len=seq_len, split=split, options=options,
                num_proc=num_proc, trust_remote_code=trust_remote_code)
    if node is not None and node.count > 1 and not (final / COMPLETE_MARKER).exists():
        shards = ShardDir(root / f".{final.name}.shards", node)
        _prepare_share(source, shards, final, deadline, timeout_s, **args)
        return _build_once(source, final, deadline, timeout_s, lambda tmp: _assemble(shards, tmp, **args),
                           shards=shards, **args)
    return _build_once(source, final, deadline, timeout_s, lambda tmp: _build(source, tmp, **args), **args)


def _build_once(source: Source, final: Path, deadline: float, timeout_s: float, build, *, data, seq_len: int,
                options: PrepOptions, shards: ShardDir | None = None, **_) -> Prepared:
    """The cache at `final`: reused, or built by `build(tmp)` under the cache lock and published by
    rename, or waited for while another process holds the lock."""
    root = final.parent
    while not (final / COMPLETE_MARKER).exists():
        root.mkdir(parents=True, exist_ok=True)
        lock = Lock.take(root / f".{final.name}.lock")
        if lock is None:
            _wait_while_locked(final, root / f".{final.name}.lock", deadline, timeout_s, shards)
            continue
        with lock:
            if (final / COMPLETE_MARKER).exists():
                break
            t0 = time.time()
            tmp = root / f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                with heap_frozen():  # data/workers.py: full garbage-collector passes skip the process's own heap
                    stats, kind, packed = build(tmp)
            except KeelError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                if shards is not None:  # the nodes waiting for this cache fail with the same message
                    shards.fail(str(exc))
                raise
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            (tmp / STATS_FILE).write_text(json.dumps(asdict(stats), indent=2))
            (tmp / META_FILE).write_text(json.dumps({"kind": kind, "packed": packed, "seq_len": seq_len,
                                                     "source": str(data), "options": asdict(options)}))
            (tmp / COMPLETE_MARKER).write_text(f"prepared in {time.time() - t0:.1f}s\n")
            _publish(tmp, final)
            if shards is not None:
                shutil.rmtree(shards.path, ignore_errors=True)
            return Prepared(final, stats, reused=False, kind=kind, packed=packed, seq_len=seq_len)
    return _read_prepared(final)


# ----------------------------------------------------------------------------- across nodes


def _prepare_share(source: Source, shards: ShardDir, final: Path, deadline: float, timeout_s: float, *,
                   split: str, **args) -> None:
    """Tokenize this node's shards, then any missing shard whose node died or cannot be seen,
    until every shard is present (or the cache is already complete)."""
    shards.start()
    node, told = shards.node, False
    own = True  # the first pass: this node's own shards
    while not (final / COMPLETE_MARKER).exists():
        if shards.failed():
            raise KeelError(shards.failed())
        total, done = shards.rows(), shards.done()
        if own:
            pick = (lambda s: node.owns(s) and s not in done)
        elif total is None:  # the shards were just assembled and removed by another node (or are being)
            if time.time() > deadline:
                raise KeelError(f"gave up after {timeout_s:.0f}s waiting for {final} ({shards.path} lost its row count)")
            time.sleep(1.0)
            continue
        else:
            missing = [s for s in range(_shard_count(total)) if s not in done]
            if not missing:
                return
            free = {s for s in missing if shards.claimable(s)}
            if not free:
                if not told:
                    print(f"[keel] data.{split}, node {node.rank}: waiting for shards {_ranges(missing)} from the "
                          "other nodes", file=sys.stderr, flush=True)
                    told = True
                if time.time() > deadline:
                    raise KeelError(f"gave up after {timeout_s:.0f}s waiting for shards {_ranges(missing)} of "
                                    f"{final} (other nodes' claims in {shards.path})")
                time.sleep(2.0)
                continue
            pick = free.__contains__
        _tokenize_shards(source, shards, pick, split=split, **args)
        own = False


def _shard_count(rows: int) -> int:
    return (rows + sharding.SHARD_ROWS - 1) // sharding.SHARD_ROWS


def _ranges(shards: list[int]) -> str:
    return ", ".join(map(str, shards[:8])) + (f" and {len(shards) - 8} more" if len(shards) > 8 else "")


def _tokenize_shards(source: Source, shards: ShardDir, pick, *, data, tokenizer_dir: Path, fmt: Format, seq_len: int,
                     split: str, options: PrepOptions, num_proc: int, trust_remote_code: bool) -> None:
    """One pass over the source: the rows of the shards `pick` selects (and this process
    claims) are tokenized and written shard by shard; the row count is recorded."""
    from collections import deque

    from data.progress import Progress
    from data.shards import write_shard
    from data.workers import shaped_rows, tokenized_rows

    size, node = sharding.SHARD_ROWS, shards.node
    held = Lock()
    claimed: dict[int, bool] = {}
    places: deque = deque()  # row index of each selected row, in order: results come back in that order
    count = [0]

    def selected():
        for i, row in enumerate(shaped_rows(source, options.shape)):
            count[0] = i + 1
            s = i // size
            if s not in claimed:
                claimed[s] = pick(s) and shards.claim(s, held)
            if claimed[s]:
                places.append(i)
                yield row

    expected = source.count_rows()
    progress = Progress(f"prepare data.{split} (node {node.rank} of {node.count})",
                        total=expected // node.count if expected else None)
    t0, done, rows, current, buffer = time.time(), [], 0, None, []

    def flush():
        write_shard(shards.shard(current), buffer)
        shards.release(current, held)
        done.append(current)

    with held, heap_frozen():
        tokenizer = _tokenizer(tokenizer_dir, fmt, trust_remote_code)
        try:
            for where, raw, shape, result in tokenized_rows(source, options.shape, tokenizer=tokenizer,
                                                            tokenizer_dir=tokenizer_dir, fmt=fmt, seq_len=seq_len,
                                                            num_proc=num_proc, trust_remote_code=trust_remote_code,
                                                            rows=selected()):
                s = places.popleft() // size
                if s != current and buffer:
                    flush()
                    buffer = []
                current = s
                buffer.append((where, shape, _row_json(raw) if result.error is not None else None, result))
                rows += 1
                progress.update()
            if buffer:
                flush()
        finally:
            progress.close()
    shards.set_rows(count[0])
    shards.record(done, rows, time.time() - t0)
    if done:
        print(f"[keel] data.{split}, node {node.rank} of {node.count}: prepared shards {_ranges(done)} "
              f"({rows} rows) in {time.time() - t0:.1f}s", file=sys.stderr, flush=True)


def _assemble(shards: ShardDir, tmp: Path, *, data, seq_len: int, split: str, options: PrepOptions, **_):
    """The cache from every shard, in source order, through the single-node writer."""
    from data.shards import read_shard

    out = _Output(tmp, seq_len=seq_len, options=options)
    total = shards.rows()
    try:
        for s in range(_shard_count(total)):
            for where, shape, row_json, result in read_shard(shards.shard(s)):
                out.add(where, shape, result, row_json=row_json)
    finally:
        out.rejected.close()
    result = out.finish(data, split)
    records = shards.records()
    (tmp / NODES_FILE).write_text(json.dumps(records, indent=2))
    print(f"[keel] data.{split} prepared by {len(records)} nodes: " + "; ".join(
        f"node {r['node']} ({r['host']}) shards {_ranges(r['shards'])}, {r['rows']} rows in {r['seconds']}s"
        for r in records), file=sys.stderr, flush=True)
    return result


def _read_prepared(path: Path) -> Prepared:
    try:
        meta = read_json(path / META_FILE, what="prepared-data record", expect=dict)
        stats = PrepStats(**read_json(path / STATS_FILE, what="prepared-data statistics", expect=dict))
        return Prepared(path, stats, reused=True, kind=meta["kind"], packed=meta["packed"], seq_len=meta["seq_len"])
    except (KeelError, TypeError, KeyError) as exc:
        why = str(exc) if isinstance(exc, KeelError) else f"{path}: {type(exc).__name__}: {exc}"
        raise KeelError(f"{why}; the prepared-data cache is damaged: delete {path} and prepare again") from None


# ----------------------------------------------------------------------------- one preparer


def _wait_while_locked(final: Path, lock: Path, deadline: float, timeout_s: float,
                       shards: ShardDir | None = None) -> None:
    """Wait until the cache is complete, or the lock is gone (its holder failed: take over) or stale;
    across nodes, raise the assembling node's error about the data."""
    try:
        holder = lock.read_text().strip()
    except OSError:
        return
    print(f"[keel] {holder} is preparing {final.name}; waiting for {final / COMPLETE_MARKER}", file=sys.stderr,
          flush=True)
    while not (final / COMPLETE_MARKER).exists():
        if shards is not None and shards.failed():
            raise KeelError(shards.failed())
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > STALE_LOCK_S:
            print(f"[keel] the lock {lock} was not refreshed for {age:.0f}s ({holder} died?); taking over",
                  file=sys.stderr, flush=True)
            lock.unlink(missing_ok=True)
            return
        if time.time() > deadline:
            raise KeelError(f"gave up after {timeout_s:.0f}s waiting for {holder} to prepare {final} (remove "
                            f"{lock} if no process is preparing it)")
        time.sleep(2.0)


def wait_for_prepared(data: str | Path, *, tokenizer_dir: str | Path, fmt: Format, seq_len: int,
                      cache_root: str | Path | None = None, timeout_s: float = WAIT_TIMEOUT_S,
                      options: PrepOptions | None = None, trust_remote_code: bool = False) -> Prepared:  # noqa: ARG001 (loads nothing)
    """For processes that are not the preparing one (local ranks other than 0): wait on the
    completion marker.

    This waits on a file, not inside a collective, so a long preparation never trips a
    process-group timeout (the NCCL-timeout-while-rank-0-tokenizes trap).
    """
    root = Path(cache_root) if cache_root else default_cache_root()
    source = open_source(str(data))
    final = root / cache_key(source, Path(tokenizer_dir), fmt, seq_len, options or PrepOptions())
    wait_for_marker(final, timeout_s, "prepared data")
    return _read_prepared(final)


def wait_for_marker(final: Path, timeout_s: float, what: str) -> None:
    """Wait until another process has published `final` (its completion marker is there)."""
    deadline = time.time() + timeout_s
    while not (final / COMPLETE_MARKER).exists():
        if time.time() > deadline:
            raise KeelError(f"gave up after {timeout_s:.0f}s waiting for {what} at {final}")
        time.sleep(1.0)

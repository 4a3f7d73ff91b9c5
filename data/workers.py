"""Tokenize a source's rows in order, in this process or in `num_proc` worker processes.

The preparing process reads the source (data/sources.py streams every kind but a JSON list),
decides the shape at the first object row, and hands chunks of rows to workers, which run
data/tokenized.py on them; results come back in source order. At most a few chunks per
worker are in flight, so memory holds a bounded window of rows whatever the input's size
(multiprocessing.Pool.imap would read the whole input ahead of slow workers).

Written by hand rather than with `datasets.map(num_proc=...)`: that needs the input as an
Arrow dataset first (a second copy of the data, and the struct-unification trap for JSON
rows), and it loses the row places errors point at.
Both paths run the same function on the same chunks, so the result does not depend on
num_proc (tests/unit/test_prepare_scale.py checks the caches are equal).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain, islice
from typing import Any

from data.conversation import RowError
from data.formats import Format
from data.shapes import detect_shape
from data.sources import Source
from data.tokenized import RowExamples, tokenize_row

CHUNK_ROWS = 64  # rows per task: large enough that inter-process overhead is small, small enough to balance
IN_FLIGHT_PER_WORKER = 4
POOL_AFTER_CHUNKS = 2  # a source that ends within this many chunks is tokenized here: no pool start-up

_state: dict[str, Any] = {}  # the tokenizer, format and seq_len of this process (worker or not)


def default_num_proc() -> int:
    """The CPUs this process may use (its affinity mask, which containers and taskset narrow;
    os.cpu_count() off Linux): rendering and tokenizing scale with processes, and only one process
    per node prepares while the others wait (data/prepare.py), so the node's cores are free."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus)


@contextmanager
def heap_frozen():
    """Keep the objects that exist now out of the garbage collector's full passes while rows
    are tokenized (gc.freeze), and give them back after.

    Preparation makes many short-lived objects per row (parsed JSON, Jinja's output), so the
    collector runs often, and now and then a full pass walks every object of the process:
    in a process with torch and transformers loaded (keel train, the benchmark) that is half a
    million objects, about 0.3 s a pass, a full pass per couple of thousand rows. The rows'
    own objects are still collected as usual. Worker processes forked inside inherit the
    frozen heap (and do not dirty its pages by walking it). A caller that has frozen the heap
    itself keeps its own arrangement."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _init_worker(tokenizer_dir: str, fmt: Format, seq_len: int, trust_remote_code: bool = False) -> None:
    from data.model_loading import LoadPolicy, load_tokenizer

    _state.update(tokenizer=load_tokenizer(tokenizer_dir, LoadPolicy(trust_remote_code=trust_remote_code)),
                  fmt=fmt, seq_len=seq_len)


def _tokenize_chunk(items: list[tuple[Any, str] | None]) -> list[RowExamples | None]:
    tokenizer, fmt, seq_len = _state["tokenizer"], _state["fmt"], _state["seq_len"]
    return [None if item is None else tokenize_row(item[0], item[1], tokenizer=tokenizer, fmt=fmt, seq_len=seq_len)
            for item in items]


def shaped_rows(source: Source, shape_option: str) -> Iterator[tuple[str, Any, str | RowError]]:
    """(where, raw row, its shape or why it cannot be read), the shape decided at the first object row."""
    shape = None if shape_option == "auto" else shape_option
    if source.kind == "documents":
        from data.errors import KeelError

        if shape not in (None, "text"):
            raise KeelError(f"{source.location}: documents are read as data.shape 'text', not {shape!r}")
        shape = "text"
    for where, raw in source.rows():
        if shape is None and isinstance(raw, dict):
            shape = detect_shape(raw, where)
        if isinstance(raw, RowError):
            yield where, raw, raw
        elif shape is None:
            yield where, raw, RowError("a row must be an object")
        else:
            yield where, raw, shape


def _chunks(rows: Iterator, size: int) -> Iterator[list]:
    while chunk := list(islice(rows, size)):
        yield chunk


def _results(chunk: list, tokenized: list[RowExamples | None]):
    for (where, raw, shape), result in zip(chunk, tokenized):
        if result is None:  # unreadable before tokenizing: `shape` holds the RowError
            yield where, None if isinstance(raw, RowError) else raw, None, RowExamples(error=str(shape))
        else:
            yield where, raw, shape, result


def _task(chunk: list) -> list[tuple[Any, str] | None]:
    return [None if isinstance(shape, RowError) else (raw, shape) for _, raw, shape in chunk]


def tokenized_rows(source: Source, shape_option: str, *, tokenizer, tokenizer_dir: str, fmt: Format, seq_len: int,
                   num_proc: int, trust_remote_code: bool = False,
                   rows: Iterator | None = None) -> Iterator[tuple[str, Any, str | None, RowExamples]]:
    """(where, raw row, shape, RowExamples) for every row of the source, in source order; or for
    `rows`, some of shaped_rows(source) (a node's shards, data/shards.py)."""
    chunks = _chunks(shaped_rows(source, shape_option) if rows is None else rows, CHUNK_ROWS)
    head = list(islice(chunks, POOL_AFTER_CHUNKS + 1))
    if num_proc <= 1 or len(head) <= POOL_AFTER_CHUNKS:
        _state.update(tokenizer=tokenizer, fmt=fmt, seq_len=seq_len)
        for chunk in chain(head, chunks):
            yield from _results(chunk, _tokenize_chunk(_task(chunk)))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the Rust pool does not survive fork
    # fork on Linux: workers start at once, with the modules already imported; spawn elsewhere.
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    print(f"[keel] tokenizing in {num_proc} worker processes (data.num_proc)", file=sys.stderr, flush=True)
    if ctx.get_start_method() == "fork":  # workers inherit this process's loaded tokenizer: no reload in each
        _state.update(tokenizer=tokenizer, fmt=fmt, seq_len=seq_len)
        init, initargs = None, ()
    else:
        init, initargs = _init_worker, (str(tokenizer_dir), fmt, seq_len, trust_remote_code)
    with ctx.Pool(num_proc, initializer=init, initargs=initargs) as pool:
        pending: deque = deque()
        for chunk in chain(head, chunks):
            pending.append((chunk, pool.apply_async(_tokenize_chunk, (_task(chunk),))))
            if len(pending) >= IN_FLIGHT_PER_WORKER * num_proc:
                done, result = pending.popleft()
                yield from _results(done, result.get())
        while pending:
            done, result = pending.popleft()
            yield from _results(done, result.get())

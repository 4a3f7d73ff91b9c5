"""Preparation at scale: worker processes give the same cache (same place, same rows, same
errors with the same row places), statistics and the length plot are written with the cache,
one process prepares while another waits on the marker, and progress is reported."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time

import pytest

import data.workers
from data.errors import KeelError
from data.formats import load_format
from data.prepare import COMPLETE_MARKER, LENGTHS_PLOT, STATS_FILE, PrepOptions, prepare_file
from data.progress import Progress
from data.synthetic import generate_conversations, write_jsonl

FMT = load_format("hermes-qwen3")


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4 rows, so a few dozen rows already go through the worker pool."""
    monkeypatch.setattr(data.workers, "CHUNK_ROWS", 4)


def _rows(n: int, seed: int = 5) -> list:
    return generate_conversations(n, seed=seed, long_tail=True)


def _columns(prepared) -> dict:
    ds = prepared.load()
    return {name: ds[name] for name in ds.column_names}


@pytest.mark.parametrize("packing", [False, True])
def test_num_proc_does_not_change_the_cache(tiny_model, tmp_path, small_chunks, capfd, packing):
    data = tmp_path / "rows.jsonl"
    write_jsonl(_rows(40), data)
    kwargs = dict(tokenizer_dir=tiny_model, fmt=FMT, seq_len=1024, options=PrepOptions(packing=packing))
    one = prepare_file(data, cache_root=tmp_path / "one", num_proc=1, **kwargs)
    two = prepare_file(data, cache_root=tmp_path / "two", num_proc=2, **kwargs)
    assert "tokenizing in 2 worker processes" in capfd.readouterr().err  # the pool really ran
    assert one.path.name == two.path.name  # the cache key does not depend on num_proc
    assert _columns(one) == _columns(two)
    assert one.stats == two.stats


def test_workers_report_the_same_row_places_and_rejected_rows(tiny_model, tmp_path, small_chunks):
    rows = [json.dumps(r) for r in _rows(30)]
    rows[6] = '{"messages": ['  # line 7: not JSON
    bad = json.loads(rows[21])
    bad["messages"] = [m for m in bad["messages"] if m["role"] != "user"]  # line 22: no user turn
    rows[21] = json.dumps(bad)
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(rows) + "\n")
    errors, rejected = {}, {}
    for num_proc in (1, 2):
        with pytest.raises(KeelError) as err:
            prepare_file(data, tokenizer_dir=tiny_model, fmt=FMT, seq_len=1024, cache_root=tmp_path / f"e{num_proc}",
                         num_proc=num_proc)
        errors[num_proc] = str(err.value)
        skipped = prepare_file(data, tokenizer_dir=tiny_model, fmt=FMT, seq_len=1024, num_proc=num_proc,
                               cache_root=tmp_path / f"s{num_proc}", options=PrepOptions(on_invalid="skip"))
        rejected[num_proc] = skipped.rejected_file.read_text()
    assert "2 of 30 rows are invalid" in errors[2] and f"{data}:7: not valid JSON" in errors[2]
    assert f"{data}:22: " in errors[2]
    assert errors[1] == errors[2] and rejected[1] == rejected[2]
    assert [json.loads(x)["where"] for x in rejected[2].splitlines()] == [f"{data}:7", f"{data}:22"]


def test_statistics_and_length_plot_are_written_with_the_cache(tiny_model, tmp_path):
    data = tmp_path / "rows.jsonl"
    write_jsonl(_rows(40), data)
    prepared = prepare_file(data, tokenizer_dir=tiny_model, fmt=FMT, seq_len=1024, cache_root=tmp_path / "c",
                            options=PrepOptions(packing=True))
    stats = json.loads((prepared.path / STATS_FILE).read_text())
    hist = stats["length_histogram"]
    assert len(hist["bin_edges"]) == len(hist["counts"]) + 1 and hist["bin_edges"][-1] == 1024
    # one length per rendered example, before truncation (dropped ones included)
    assert sum(hist["counts"]) + hist["over_seq_len"] == stats["examples"] + stats[
        "dropped_no_trained_tokens_after_truncation"]
    assert hist["over_seq_len"] == stats["truncated"] > 0
    assert stats["sequences"] < stats["examples"] and 0 < stats["padding_fraction"] < 1
    plot = prepared.path / LENGTHS_PLOT
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert prepared.report_files() == [prepared.path / STATS_FILE, plot]
    again = prepare_file(data, tokenizer_dir=tiny_model, fmt=FMT, seq_len=1024, cache_root=tmp_path / "c",
                         options=PrepOptions(packing=True))
    assert again.reused and again.stats == prepared.stats and again.packed and again.seq_len == 1024


def test_one_process_prepares_while_another_waits_on_the_marker(tiny_model, tmp_path, capfd):
    """Two nodes on one shared volume: the second finds the lock and waits for the first's cache."""
    data = tmp_path / "rows.jsonl"
    write_jsonl(_rows(6), data)
    kwargs = dict(tokenizer_dir=tiny_model, fmt=FMT, seq_len=1024)
    built_elsewhere = prepare_file(data, cache_root=tmp_path / "elsewhere", **kwargs)
    shared = tmp_path / "shared"
    shared.mkdir()
    lock = shared / f".{built_elsewhere.path.name}.lock"
    lock.write_text("node-0 pid 1\n")  # node 0 is preparing

    def node_0_finishes():
        time.sleep(3)
        shutil.copytree(built_elsewhere.path, shared / built_elsewhere.path.name)
        lock.unlink()

    capfd.readouterr()
    finisher = threading.Thread(target=node_0_finishes)
    finisher.start()
    t0 = time.time()
    waited = prepare_file(data, cache_root=shared, **kwargs)
    finisher.join()
    assert waited.reused and waited.path == shared / built_elsewhere.path.name and time.time() - t0 >= 3
    err = capfd.readouterr().err
    assert "node-0 pid 1 is preparing" in err and "prepare data.train" not in err  # it did not build


def test_a_lock_whose_holder_died_is_taken_over(tiny_model, tmp_path, capfd):
    data = tmp_path / "rows.jsonl"
    write_jsonl(_rows(6), data)
    kwargs = dict(tokenizer_dir=tiny_model, fmt=FMT, seq_len=1024, cache_root=tmp_path / "shared")
    name = prepare_file(data, **{**kwargs, "cache_root": tmp_path / "probe"}).path.name
    (tmp_path / "shared").mkdir()
    lock = tmp_path / "shared" / f".{name}.lock"
    lock.write_text("node-1 pid 7\n")
    old = time.time() - 3600
    os.utime(lock, (old, old))  # not refreshed for an hour
    capfd.readouterr()
    prepared = prepare_file(data, **kwargs)
    assert not prepared.reused and (prepared.path / COMPLETE_MARKER).exists() and not lock.exists()
    assert "taking over" in capfd.readouterr().err


def test_progress_lines_carry_rate_and_eta_without_a_terminal(monkeypatch):
    import data.progress

    monkeypatch.setattr(data.progress, "PERIOD_S", 0.0)
    out = io.StringIO()
    progress = Progress("prepare data.train", total=10, stream=out)
    for _ in range(4):
        progress.update()
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[keel] prepare data.train: 1/10 rows, ") and "rows/s" in lines[0] and "eta " in lines[0]
    assert lines[-1].startswith("[keel] prepare data.train: 4/10 rows, ") and "done in" in lines[-1]


def test_workers_default_to_every_cpu_the_process_may_use(monkeypatch):
    """data.num_proc unset: as many workers as CPUs in the process's affinity mask (what a
    container or taskset allows), not the machine's count and not a fixed cap."""
    monkeypatch.setattr(data.workers.os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    assert data.workers.default_num_proc() == 12
    monkeypatch.setattr(data.workers.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert data.workers.default_num_proc() == 1


def test_preparing_leaves_the_processs_garbage_collector_as_it_was(tiny_model, tmp_path):
    """Preparation freezes the heap while it builds (data/workers.py heap_frozen); the process that
    prepared (keel train's, a notebook's) gets its collector back as it was, after a failure too, and a
    process that froze its own heap keeps it frozen."""
    import gc

    data = tmp_path / "rows.jsonl"
    write_jsonl(_rows(20), data)
    kwargs = dict(tokenizer_dir=tiny_model, fmt=FMT, seq_len=1024, options=PrepOptions(packing=True))
    assert gc.get_freeze_count() == 0
    prepare_file(data, cache_root=tmp_path / "a", **kwargs)
    assert gc.get_freeze_count() == 0 and gc.isenabled()

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(KeelError, match="holds nothing to train on"):
        prepare_file(empty, cache_root=tmp_path / "b", **kwargs)
    assert gc.get_freeze_count() == 0

    gc.freeze()
    try:
        prepare_file(data, cache_root=tmp_path / "c", **kwargs)
        assert gc.get_freeze_count() > 0  # (objects freed meanwhile leave the frozen set: not an equal count)
    finally:
        gc.unfreeze()

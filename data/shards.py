"""Preparation across nodes: the rows cut into shards, each node tokenizing its share into the
shared cache directory, the cache assembled from the shards in source order.

    shard s = rows [s * SHARD_ROWS, (s + 1) * SHARD_ROWS) of the source; node r of n owns the
    shards with s % n == r

Each node's preparing process (local rank 0 under torchrun, or `keel prepare` in each pod) reads
the whole source (reading is a small part of preparation; every node decides the shape at the
same first row) and tokenizes only its shards, writing each as `shard-NNNNNN.arrow` under
`.<cache name>.shards/` next to the cache: the rows' examples as Arrow columns, and per row its
place, counts and, for an invalid row, the row itself (the bytes rejected.jsonl will hold), in
the file's metadata. A shard file is written under a temporary name and renamed into place:
present means complete, so a re-run after a node died redoes only the missing shards.

A node claims a shard before tokenizing it (`claim-NNNNNN`, created with O_EXCL, its mtime kept
fresh, as the cache lock in data/prepare.py); when its own shards are done it takes over missing
shards whose claim went stale (their node died) or whose node never showed up in the directory
within NODE_ABSENT_S (it has not started, or does not share the volume: then every node ends up
preparing every shard, as before, a minute later). When every shard
is present, one process takes the cache lock, replays the shards in order through the same
writer a single-node preparation uses, and publishes the cache by an atomic rename: the result
is the single-node one, bit for bit (tests/unit/test_prepare_nodes.py).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.errors import KeelError
from data.tokenized import RowExamples

SHARD_ROWS = 4096  # rows per shard: a few seconds to minutes of work, a few MB on disk
HEARTBEAT_S = 30.0
STALE_LOCK_S = 300.0  # a lock or claim not refreshed for this long: its holder died
NODE_ABSENT_S = 60.0  # a node not seen in the shard directory this long after the first began: its shards are taken
ROWS_FILE = "rows.json"  # the source's row count, written by every node that read it whole
FAILED_FILE = "failed.txt"  # why the assembly refused the data: every waiting node raises it too


@dataclass(frozen=True)
class NodeShare:
    """Which node this is (rank) of how many prepare the data together."""

    rank: int = 0
    count: int = 1

    def owns(self, shard: int) -> bool:
        return shard % self.count == self.rank


def _int(env, name: str) -> int | None:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        return None


def _nodes(value: str) -> int | None:
    """PET_NNODES as a fixed count: "2", or "2:2" (torchrun's MIN:MAX); None for a range."""
    low, _, high = value.partition(":")
    try:
        return int(low) if int(high or low) == int(low) else None
    except ValueError:
        return None


def node_share_from_env(env=None) -> NodeShare:
    """The node's share from the launcher's environment: torchrun's GROUP_RANK and
    WORLD_SIZE / LOCAL_WORLD_SIZE inside a torchrun worker; otherwise PET_NODE_RANK and
    PET_NNODES (what the PyTorchJob and TrainJob operators inject, and what Keel's pod entrypoint
    hands to torchrun, a count or MIN:MAX with MIN = MAX); otherwise one node. An elastic node range
    (PET_NNODES=1:4) has no fixed share: one node."""
    env = os.environ if env is None else env
    if _int(env, "LOCAL_WORLD_SIZE") and _int(env, "GROUP_RANK") is not None and _int(env, "WORLD_SIZE"):
        rank, count = _int(env, "GROUP_RANK"), _int(env, "WORLD_SIZE") // _int(env, "LOCAL_WORLD_SIZE")
    elif _nodes(env.get("PET_NNODES", "")) and _int(env, "PET_NODE_RANK") is not None:
        rank, count = _int(env, "PET_NODE_RANK"), _nodes(env["PET_NNODES"])
    else:
        return NodeShare()
    if not 0 <= rank < count:
        raise KeelError(f"node rank {rank} is outside the job's {count} nodes (GROUP_RANK / PET_NODE_RANK and "
                        "WORLD_SIZE / PET_NNODES disagree)")
    return NodeShare(rank, count)


class Lock:
    """A file created with O_EXCL (atomic on local disks, NFS v3+, Lustre, EFS) whose mtime is
    refreshed while its holder works. Only work is saved by it: two processes that both do the
    same work (a takeover race) write identical results by rename."""

    def __init__(self, *paths: Path):
        self.paths = list(paths)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)

    @staticmethod
    def create(path: Path, holder: str) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(holder + "\n")
        return True

    @classmethod
    def take(cls, path: Path) -> Lock | None:
        return cls(path) if cls.create(path, f"{socket.gethostname()} pid {os.getpid()}") else None

    def add(self, path: Path) -> None:
        self.paths.append(path)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            for path in list(self.paths):
                try:
                    os.utime(path)
                except OSError:
                    pass

    def __enter__(self) -> Lock:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for path in self.paths:
            path.unlink(missing_ok=True)


def age_s(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


class ShardDir:
    """`.<cache name>.shards/`: the shard files, their claims, the row count, each node's record."""

    def __init__(self, path: Path, node: NodeShare):
        self.path, self.node = path, node
        self.holder = f"node {node.rank} {socket.gethostname()} pid {os.getpid()}"

    def shard(self, s: int) -> Path:
        return self.path / f"shard-{s:06d}.arrow"

    def done(self) -> set[int]:
        return {int(p.name[6:12]) for p in self.path.glob("shard-*.arrow")}

    def rows(self) -> int | None:
        try:
            return int(json.loads((self.path / ROWS_FILE).read_text())["rows"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def set_rows(self, n: int) -> None:
        _write_atomic(self.path / ROWS_FILE, json.dumps({"rows": n}).encode())

    def claim(self, s: int, lock: Lock) -> bool:
        """Claim shard s for this process: free, stale, or left by this node's earlier process."""
        path = self.path / f"claim-{s:06d}"
        for _ in range(2):
            if Lock.create(path, self.holder):
                lock.add(path)
                return True
            try:
                mine = path.read_text().startswith(f"node {self.node.rank} ")
            except OSError:
                continue  # released meanwhile: try again
            if mine or (age_s(path) or 0.0) > STALE_LOCK_S:
                path.unlink(missing_ok=True)
        return False

    def start(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        Lock.create(self.path / "created", self.holder)  # its mtime: when the first node began
        Lock.create(self.path / f"hello-{self.node.rank}", self.holder)

    def claimable(self, s: int) -> bool:
        """Shard s may be taken over: its claim went stale; or nobody claimed it although the first
        node began long ago: NODE_ABSENT_S when its node never showed up here (it has not started,
        or the cache directory is not shared with it), STALE_LOCK_S when it is slow to reach it."""
        age = age_s(self.path / f"claim-{s:06d}")
        if age is not None:
            return age > STALE_LOCK_S
        seen = (self.path / f"hello-{s % self.node.count}").exists()
        return (age_s(self.path / "created") or 0.0) > (STALE_LOCK_S if seen else NODE_ABSENT_S)

    def release(self, s: int, lock: Lock) -> None:
        path = self.path / f"claim-{s:06d}"
        if path in lock.paths:
            lock.paths.remove(path)
        path.unlink(missing_ok=True)

    def record(self, shards: list[int], rows: int, seconds: float) -> None:
        """What this node prepared (added to by each of its passes)."""
        path = self.path / f"node-{self.node.rank}.json"
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = {"shards": [], "rows": 0, "seconds": 0.0}
        _write_atomic(path, json.dumps({"node": self.node.rank, "host": socket.gethostname(),
                                        "shards": sorted(set(old["shards"]) | set(shards)),
                                        "rows": old["rows"] + rows,
                                        "seconds": round(old["seconds"] + seconds, 1)}).encode())

    def records(self) -> list[dict]:
        out = []
        for p in sorted(self.path.glob("node-*.json")):
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                continue
        return sorted(out, key=lambda r: r["node"])

    def failed(self) -> str | None:
        try:
            return (self.path / FAILED_FILE).read_text()
        except OSError:
            return None

    def fail(self, message: str) -> None:
        _write_atomic(self.path / FAILED_FILE, message.encode())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def list_array(arrays: list[np.ndarray]):
    """One Arrow list<int32> column from per-row arrays, without a Python loop over the tokens."""
    import pyarrow as pa

    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)  # a write holds a window: far below 2**31 tokens
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int32()))


def write_shard(path: Path, rows: list[tuple[str, str | None, str | None, RowExamples]]) -> None:
    """Rows as (where, shape, the row as JSON when invalid, RowExamples), into one Arrow file."""
    import pyarrow as pa

    meta, columns = [], {}
    for where, shape, row_json, r in rows:
        meta.append([where, shape, r.error, row_json, r.lengths, r.truncated, r.dropped, r.documents_split,
                     r.tokens, r.trained])
        for example in r.examples:
            for name, values in example.items():
                columns.setdefault(name, []).append(values)
    table = pa.table({name: list_array(arrays) for name, arrays in columns.items()})
    table = table.replace_schema_metadata({"keel.rows": json.dumps(meta)})
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)


def read_shard(path: Path):
    """write_shard's rows back, in order: (where, shape, row JSON or None, RowExamples)."""
    import pyarrow as pa

    with pa.OSFile(str(path), "rb") as source:  # read into memory: the arrays outlive the file handle
        table = pa.ipc.open_file(source).read_all()
    meta = json.loads(table.schema.metadata[b"keel.rows"])
    columns = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        offsets, values = col.offsets.to_numpy(), col.values.to_numpy()
        columns[name] = [values[offsets[i]:offsets[i + 1]] for i in range(len(col))]
    at = 0
    for where, shape, error, row_json, lengths, truncated, dropped, split, tokens, trained in meta:
        n = len(tokens)
        examples = [{name: arrays[k] for name, arrays in columns.items()} for k in range(at, at + n)]
        at += n
        yield where, shape, row_json, RowExamples(examples=examples, tokens=tokens, trained=trained, lengths=lengths,
                                                  truncated=truncated, dropped=dropped, documents_split=split,
                                                  error=error)

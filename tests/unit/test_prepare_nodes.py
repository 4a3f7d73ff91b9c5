"""Preparation across nodes (data/shards.py): two simulated nodes, each a process with the
operator's node environment (PET_NODE_RANK, PET_NNODES) on one shared cache directory, give the
single-node cache bit for bit; a node that dies mid-shard leaves its finished shards, and the
re-run redoes only the missing ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.formats import load_format
from data.prepare import DATA_FILE, NODES_FILE, REJECTED_FILE, STATS_FILE, PrepOptions, prepare_file
from data.shards import NodeShare, node_share_from_env
from data.synthetic import generate_conversations

REPO = Path(__file__).resolve().parents[2]
SHARD_ROWS = 32
NODE = """
import os, sys
import data.shards
from data.formats import load_format
from data.prepare import PrepOptions, prepare_file
from data.shards import node_share_from_env
data.shards.SHARD_ROWS = {shard_rows}
if os.environ.get("DIE_AT_SHARD_WRITE"):  # the node dies while tokenizing its second shard
    written, real = [], data.shards.write_shard
    def write_shard(path, rows):
        if written:
            os._exit(3)
        written.append(path)
        real(path, rows)
    data.shards.write_shard = write_shard
prepared = prepare_file(sys.argv[1], tokenizer_dir=sys.argv[2], fmt=load_format("hermes-qwen3"), seq_len=512,
                        cache_root=sys.argv[3], options=PrepOptions(packing=True, on_invalid="skip"), num_proc=1,
                        node=node_share_from_env())
print(prepared.path)
"""


@pytest.fixture()
def rows_file(tmp_path) -> Path:
    """300 long-tailed conversations (10 shards of 32 rows), two of them invalid."""
    rows = [json.dumps(r) for r in generate_conversations(300, seed=11, long_tail=True)]
    rows[7] = '{"messages": ['
    rows[100] = json.dumps({"messages": [{"role": "assistant", "content": "no user turn"}]})
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def _node(rank: int, rows: Path, model: Path, root: Path, **env) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PET_NODE_RANK": str(rank), "PET_NNODES": "2", "TOKENIZERS_PARALLELISM": "false", **env}
    return subprocess.Popen([sys.executable, "-c", NODE.format(shard_rows=SHARD_ROWS), str(rows), str(model),
                             str(root)], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def _same_cache(a: Path, b: Path) -> None:
    assert a.name == b.name  # the same fingerprint
    for name in (DATA_FILE, STATS_FILE, REJECTED_FILE):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.slow  # five preparing processes, about a minute on 2 cores
def test_two_nodes_prepare_the_single_node_cache_and_a_dead_node_is_redone_only_where_missing(
        rows_file, tiny_model, tmp_path):
    one = prepare_file(rows_file, tokenizer_dir=tiny_model, fmt=load_format("hermes-qwen3"), seq_len=512,
                       cache_root=tmp_path / "one", options=PrepOptions(packing=True, on_invalid="skip"), num_proc=1)
    assert one.stats.rejected == 2

    nodes = [_node(rank, rows_file, tiny_model, tmp_path / "two") for rank in (0, 1)]
    results = [_finish(p) for p in nodes]
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    two = Path(results[0][1].strip())
    assert Path(results[1][1].strip()) == two
    _same_cache(one.path, two)
    by = json.loads((two / NODES_FILE).read_text())
    assert [(r["node"], r["shards"]) for r in by] == [(0, [0, 2, 4, 6, 8]), (1, [1, 3, 5, 7, 9])]
    assert sum(r["rows"] for r in by) == 300
    assert "prepared by 2 nodes" in results[0][2] + results[1][2]  # the summary, by whichever node assembled
    assert not list((tmp_path / "two").glob(".*.shards"))  # the shards are removed once the cache is published

    # node 1 dies while tokenizing its second shard; its first shard stays, complete
    code, _, err = _finish(_node(1, rows_file, tiny_model, tmp_path / "three", DIE_AT_SHARD_WRITE="1"))
    assert code == 3, err[-2000:]
    [shards] = list((tmp_path / "three").glob(".*.shards"))
    assert sorted(p.name for p in shards.glob("shard-*.arrow")) == ["shard-000001.arrow"]
    results = [_finish(p) for p in [_node(rank, rows_file, tiny_model, tmp_path / "three") for rank in (0, 1)]]
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    _same_cache(one.path, Path(results[0][1].strip()))
    by = json.loads((Path(results[0][1].strip()) / NODES_FILE).read_text())
    assert [(r["node"], r["shards"]) for r in by] == [(0, [0, 2, 4, 6, 8]), (1, [3, 5, 7, 9])]  # 1 not redone


def test_the_node_share_comes_from_torchrun_or_the_operator():
    assert node_share_from_env({}) == NodeShare(0, 1)
    torchrun = {"GROUP_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "0"}
    assert node_share_from_env(torchrun) == NodeShare(1, 2)
    assert node_share_from_env({"PET_NODE_RANK": "2", "PET_NNODES": "3"}) == NodeShare(2, 3)
    assert node_share_from_env({"PET_NODE_RANK": "1", "PET_NNODES": "2:2"}) == NodeShare(1, 2)
    assert node_share_from_env({"PET_NODE_RANK": "0", "PET_NNODES": "1:4"}) == NodeShare(0, 1)  # elastic: one node
    assert [NodeShare(1, 3).owns(s) for s in range(6)] == [False, True, False, False, True, False]


def test_a_node_alone_prepares_the_shards_of_a_node_that_never_shows_up(rows_file, tiny_model, tmp_path,
                                                                         monkeypatch):
    """A cache directory the other node does not share (or a node that never starts): once the
    absent node's time is up, this node prepares its shards too, and the cache is the same."""
    import data.shards

    monkeypatch.setattr(data.shards, "SHARD_ROWS", SHARD_ROWS)
    monkeypatch.setattr(data.shards, "NODE_ABSENT_S", 0.0)
    kwargs = dict(tokenizer_dir=tiny_model, fmt=load_format("hermes-qwen3"), seq_len=512, num_proc=1,
                  options=PrepOptions(packing=True, on_invalid="skip"))
    one = prepare_file(rows_file, cache_root=tmp_path / "one", **kwargs)
    alone = prepare_file(rows_file, cache_root=tmp_path / "alone", node=NodeShare(0, 2), **kwargs)
    _same_cache(one.path, alone.path)
    [record] = json.loads((alone.path / NODES_FILE).read_text())
    assert record["node"] == 0 and record["shards"] == list(range(10))


# ----------------------------------------------------------------------------- Slurm

SRUN = r"""#!/bin/bash
# Slurm's srun (not installed here) for `srun --nodes=N --ntasks-per-node=1 [options] COMMAND`: COMMAND
# once per node, all at once, each with the variables Slurm sets in a task (SLURM_NODEID: the node's
# index in the job); exits with a failed task's status
nodes=1
while [[ $1 == --* ]]; do
    case $1 in --nodes=*) nodes=${1#--nodes=} ;; esac
    shift
done
pids=()
for ((i = 0; i < nodes; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_NNODES=$nodes SLURM_STEP_NUM_NODES=$nodes "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def _slurm_bin(where: Path) -> Path:
    """srun and scontrol standing in for Slurm's, and `keel` (this checkout's CLI, with SHARD_ROWS rows per
    shard, so that the small file has shards for both nodes)."""
    where.mkdir()
    (where / "srun").write_text(SRUN)
    (where / "scontrol").write_text("#!/bin/bash\necho node0; echo node1\n")
    (where / "keel").write_text(
        f'#!/bin/bash\nexec {sys.executable} -c "import sys, data.shards; data.shards.SHARD_ROWS = {SHARD_ROWS}; '
        'from keel.cli import main; sys.exit(main())" "$@"\n')
    for tool in where.iterdir():
        tool.chmod(0o755)
    return where


def test_the_slurm_script_prepares_on_every_node_and_gives_the_single_node_cache(rows_file, tiny_model, tmp_path,
                                                                                  capsys):
    """The rendered sbatch script's preparation step, run as Slurm runs it on a 2-node job (one task per
    node, SLURM_NODEID 0 and 1): each node tokenizes its own shards (its rank and the node count reach
    data/shards.py), the cache is published once, and it is the single-node cache bit for bit."""
    from keel.cli import main as keel

    recipe = REPO / "recipes" / "quickstart" / "sft-tool-calling.yaml"
    overrides = [f"model.path={tiny_model}", f"data.train={rows_file}", "training.seq_len=512",
                 "data.on_invalid=skip"]
    assert keel(["prepare", str(recipe), *overrides, f"data.cache_dir={tmp_path / 'one'}"]) == 0
    [one] = [p for p in (tmp_path / "one").iterdir() if not p.name.startswith(".")]
    capsys.readouterr()

    workdir = tmp_path / "shared"
    assert keel(["launch", str(recipe), "--target", "slurm", "--workdir", str(workdir), "--nodes", "2",
                 "cluster.nodes=2", *overrides]) == 0
    script = capsys.readouterr().out
    step = script.index("exec keel prepare")
    assert script.rfind("srun --nodes=2 --ntasks-per-node=1", 0, step) > script.rfind("\n\n", 0, step)
    head = script[: script.index("\n", step) + 1]  # the job up to and including its preparation step
    env = {**os.environ, "PATH": f"{_slurm_bin(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_JOB_CPUS_PER_NODE": "2(x2)",
           "TOKENIZERS_PARALLELISM": "false"}
    for name in ("PET_NODE_RANK", "PET_NNODES", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    job = subprocess.run(["bash", "-c", head], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr[-3000:]

    [two] = [p for p in (workdir / "cache" / "prepared").iterdir() if not p.name.startswith(".")]
    _same_cache(one, two)
    by = json.loads((two / NODES_FILE).read_text())
    assert [(r["node"], r["shards"]) for r in by] == [(0, [0, 2, 4, 6, 8]), (1, [1, 3, 5, 7, 9])]
    assert "node 0 of 2" in job.stderr and "node 1 of 2" in job.stderr
    assert "data.train prepared by 2 nodes" in job.stdout + job.stderr
    assert job.stdout.count("train: built cache") + job.stdout.count("train: reused cache") == 2
    assert job.stdout.count("train: built cache") == 1  # assembled and published once
    assert not list((workdir / "cache" / "prepared").glob(".*.shards"))

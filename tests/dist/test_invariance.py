"""Topology invariance on CPU, fp32: the same global batch gives the same loss curve whether it
is 1 process x grad_accum 2, 2 processes x grad_accum 1, or 2 nodes x 1 process (two torchrun
agents on loopback), for ddp, zero3 and fsdp2. A negative control (the data shifted by one
example, as a resume or sharding bug would do) must be caught by the same comparison."""

from __future__ import annotations

import subprocess

import pytest

from keel.processes import free_port
from dist_helpers import REPO, losses, max_rel_diff, run, small_data, train_cmd

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS = 6
# fp32 on CPU: reductions in a different order (gloo sums, ZeRO/FSDP shard and regather) move
# losses by a few ulps per step; 1e-5 relative leaves room for that and for nothing else.
TOLERANCE = 1e-5


def common(strategy: str) -> tuple[str, ...]:
    return (f"distributed.strategy={strategy}", f"training.max_steps={STEPS}", "training.micro_batch_size=1")


def two_nodes(tiny_model, run_dir, data, strategy, env) -> None:
    """Two torchrun agents (node ranks 0 and 1), one process each, meeting on loopback."""
    port = str(free_port())
    procs = [
        subprocess.Popen(train_cmd(tiny_model, run_dir, data, *common(strategy), "training.grad_accum=1", nproc=1,
                                   launcher=("--nnodes=2", f"--node-rank={rank}", "--master-addr=127.0.0.1",
                                             f"--master-port={port}", "--max-restarts=0")),
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]


@pytest.mark.parametrize("strategy", ["ddp", "zero3", "fsdp2"])
def test_same_loss_curve_on_every_topology(strategy, tmp_path, tiny_model, keel_env):
    data = small_data(tmp_path / "data.jsonl")
    one = run(train_cmd(tiny_model, tmp_path / "one", data, *common(strategy), "training.grad_accum=2", nproc=1),
              keel_env)
    assert one.returncode == 0, one.stdout[-4000:]
    two = run(train_cmd(tiny_model, tmp_path / "two", data, *common(strategy), "training.grad_accum=1", nproc=2),
              keel_env)
    assert two.returncode == 0, two.stdout[-4000:]
    two_nodes(tiny_model, tmp_path / "nodes", data, strategy, keel_env)

    base = losses(tmp_path / "one")
    assert sorted(base) == list(range(1, STEPS + 1))
    assert max_rel_diff(losses(tmp_path / "two"), base, range(1, STEPS + 1)) < TOLERANCE
    assert max_rel_diff(losses(tmp_path / "nodes"), base, range(1, STEPS + 1)) < TOLERANCE

    if strategy == "ddp":
        # Negative control: the same run with every example one position later. The comparison
        # above must tell the difference, or it proves nothing.
        lines = data.read_text().splitlines()
        shifted = tmp_path / "shifted.jsonl"
        shifted.write_text("\n".join(lines[1:] + lines[:1]) + "\n")
        ctrl = run(train_cmd(tiny_model, tmp_path / "ctrl", shifted, *common(strategy), "training.grad_accum=1",
                             nproc=2), keel_env)
        assert ctrl.returncode == 0, ctrl.stdout[-4000:]
        assert max_rel_diff(losses(tmp_path / "ctrl"), base, range(1, STEPS + 1)) > 100 * TOLERANCE

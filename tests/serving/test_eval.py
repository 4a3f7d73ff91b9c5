"""`keel eval` on the trained model: held-out conversations (a seed training never saw) through
vLLM's offline engine and the server's parsers, a table printed, scores logged to the training
run in MLflow."""

from __future__ import annotations

import json
import subprocess

import pytest

from data.model_dir import read_export_info
from data.synthetic import generate_conversations, write_jsonl
from serving.evaluate import METRICS
from tests.conftest import REPO, keel_cmd

pytestmark = pytest.mark.serving


def test_eval_scores_held_out_conversations_and_logs_them(session_dir, trained_run, keel_env):
    held_out = session_dir / "held-out.jsonl"
    write_jsonl(generate_conversations(6, seed=20261126), held_out)
    run_id = read_export_info(trained_run.model_dir).mlflow_run_id
    out = session_dir / "eval-cases.jsonl"
    proc = subprocess.run(keel_cmd("eval", str(trained_run.model_dir), str(held_out), "--mlflow-run", run_id,
                                   "--tracking-uri", trained_run.tracking_uri, "--out", str(out)),
                          cwd=REPO, env=keel_env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = {line.split()[0]: (float(line.split()[1]), int(line.split()[2]))
               for line in proc.stdout.splitlines() if line.split() and line.split()[0] in METRICS}
    assert set(printed) == set(METRICS)
    cases = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(cases) == printed["call_decision"][1] > 6  # every assistant turn of every conversation
    # the table is the cases' aggregate: a call counts as valid when it parses and fits its tool
    begun = sum(c["begun_calls"] for c in cases)
    assert printed["tool_call_validity"] == (pytest.approx(sum(c["valid_calls"] for c in cases) / begun, abs=1e-3),
                                             begun)
    assert printed["call_decision"][0] == pytest.approx(sum(c["call_decision"] for c in cases) / len(cases), abs=1e-3)
    # the model learned the format (the untrained base writes no reasoning and no call): every
    # turn thinks first, it calls a tool where one is needed, and most calls it writes are valid.
    # Not higher: the 0.56M-parameter quickstart model sometimes blends two tool names
    # ("get_stock_time"), 5 of 7 calls valid on the CI machine's CPU.
    assert printed["reasoning_format"][0] == 1.0 and all(c["reasoning"] for c in cases)
    assert printed["call_decision"][0] >= 0.8 and printed["tool_call_validity"][0] >= 0.5

    from mlflow.tracking import MlflowClient

    metrics = MlflowClient(tracking_uri=trained_run.tracking_uri).get_run(run_id).data.metrics
    for name, (value, n) in printed.items():
        if value == value:
            assert metrics[f"eval.{name}"] == pytest.approx(value, abs=1e-3)
        assert metrics[f"eval.{name}.n"] == n


def test_eval_refuses_bad_data_before_starting_the_engine(session_dir, trained_run, keel_env):
    bad = session_dir / "bad-held-out.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "assistant", "content": "no user turn"}]}) + "\n")
    proc = subprocess.run(keel_cmd("eval", str(trained_run.model_dir), str(bad)), cwd=REPO, env=keel_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "keel: error:" in proc.stderr and "invalid rows" in proc.stderr

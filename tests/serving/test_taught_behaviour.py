"""Behaviour the shared tiny model does not show on demand, taught and then served: parallel tool
calls written by the model itself, and small talk answered in text while tools are offered.

The quickstart model (0.56M parameters) learns the format but, asked to compare two cities,
never closes its reasoning, and for small talk it calls a tool (tests/serving/test_chat.py).
Here it is fine-tuned further by `keel train` on a few conversations until it writes exactly
these answers, then served by `keel serve` (Keel's parsers, API key) and asked the same
questions through the openai client: what the server returns must be the trained answer, parsed
(two calls with their own ids and indices, arguments whole; or content and no call), streamed
equal to non-streamed. A parser that merged, dropped or half-emitted a parallel call, or leaked
markup, fails here. One server of its own, so slow."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import API_KEY, QUICKSTART_RECIPE, REPO, free_port, keel_cmd, start_server, stop
from data.synthetic import TOOLS
from test_chat import MARKUP, as_dict, ask, ask_streaming

pytestmark = [pytest.mark.serving, pytest.mark.slow]

PARALLEL = [{"role": "user", "content": "Compare the weather in Lisbon and Denver."}]
PARALLEL_REASONING = "Two cities: I will call get_weather for Lisbon and for Denver."
PARALLEL_CALLS = [("get_weather", {"city": "Lisbon"}), ("get_weather", {"city": "Denver"})]
SMALL_TALK = [{"role": "user", "content": "Hi! Who are you?"}]
SMALL_TALK_REASONING = "Small talk: no tool is needed."
SMALL_TALK_ANSWER = "I am a small assistant."


def taught_rows() -> list[dict]:
    parallel = {"role": "assistant", "reasoning_content": PARALLEL_REASONING, "content": "",
                "tool_calls": [{"id": f"call_{n}", "type": "function",
                                "function": {"name": name, "arguments": json.dumps(args)}}
                               for n, (name, args) in enumerate(PARALLEL_CALLS)]}
    chat = {"role": "assistant", "reasoning_content": SMALL_TALK_REASONING, "content": SMALL_TALK_ANSWER}
    return [{"messages": [*PARALLEL, parallel], "tools": TOOLS}, {"messages": [*SMALL_TALK, chat], "tools": TOOLS}]


@pytest.fixture(scope="module")
def taught_server(trained_run, keel_env, tmp_path_factory):
    assert trained_run.returncode == 0, trained_run.output[-4000:]
    work = tmp_path_factory.mktemp("taught")
    data = work / "taught.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in taught_rows() * 4), encoding="utf-8")
    run_dir = work / "run"
    trained = subprocess.run(
        keel_cmd("train", str(QUICKSTART_RECIPE), "--nproc-per-node", "1", f"model.path={trained_run.model_dir}",
                 f"data.train={data}", f"data.cache_dir={work / 'cache'}", f"output.dir={run_dir}",
                 "training.max_steps=120", "training.learning_rate=2e-3", "training.warmup_ratio=0",
                 "training.log_every_steps=40", "checkpoint.every_steps=1000"),
        cwd=REPO, env=keel_env, capture_output=True, text=True, timeout=900)
    (work / "train.log").write_text(trained.stdout + trained.stderr)
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-4000:]
    port = free_port()
    proc, url = start_server(keel_cmd("serve", str(run_dir / "model"), "--host", "127.0.0.1", "--port", str(port),
                                      "--api-key", API_KEY), log=work / "server.log", env=keel_env, port=port)
    try:
        from openai import OpenAI

        client = OpenAI(base_url=url + "/v1", api_key=API_KEY)
        yield client, client.models.list().data[0].id
    finally:
        stop(proc)


def test_parallel_calls_written_by_the_model(taught_server):
    client, model = taught_server
    choice = ask(client, model, PARALLEL)
    calls = choice.message.tool_calls or []
    assert choice.finish_reason == "tool_calls", choice
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == PARALLEL_CALLS
    assert len({c.id for c in calls}) == 2 and all(c.id for c in calls)
    assert (choice.message.reasoning or "").strip() == PARALLEL_REASONING
    assert not choice.message.content or not any(m in choice.message.content for m in MARKUP)

    # Streamed: the same two calls, each sent once under its own index with whole arguments.
    stream = client.chat.completions.create(model=model, messages=PARALLEL, tools=TOOLS, seed=7, stream=True,
                                            temperature=0, max_tokens=200)
    deltas = [tc for chunk in stream for c in chunk.choices for tc in c.delta.tool_calls or []]
    assert [d.index for d in deltas] == [0, 1]
    assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == PARALLEL_CALLS
    assert len({d.id for d in deltas}) == 2
    streamed = ask_streaming(client, model, PARALLEL)
    streamed.pop("order")
    assert streamed == as_dict(choice)


def test_small_talk_answered_in_text_with_tools_offered(taught_server):
    client, model = taught_server
    for tool_choice in ("auto", None):  # explicit "auto", and the default with tools present
        kw = {"tool_choice": tool_choice} if tool_choice else {}
        choice = ask(client, model, SMALL_TALK, **kw)
        assert choice.finish_reason == "stop" and not choice.message.tool_calls, choice
        assert (choice.message.content or "").strip() == SMALL_TALK_ANSWER
        assert (choice.message.reasoning or "").strip() == SMALL_TALK_REASONING
        streamed = ask_streaming(client, model, SMALL_TALK, **kw)
        streamed.pop("order")
        assert streamed == as_dict(choice)

"""`keel quickstart`: the whole path on one machine, with the exact commands it runs.

    keel tiny-model runs/quickstart/base
    keel train recipes/quickstart/sft-tool-calling.yaml --nproc-per-node 2
    keel serve runs/quickstart/sft/model --host 127.0.0.1 --port PORT
    (ask the served model a question that needs a tool, print its reasoning and tool call)

Each step is a subprocess of the `keel` command a user would type; the server is stopped at
the end whatever happens.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from data.options import ArgumentParser
from data.errors import KeelError
from keel.processes import free_port, running_server

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart" / "sft-tool-calling.yaml"
QUESTION = "What's the weather in Paris?"


def keel(*args: str) -> list[str]:
    return [sys.executable, "-m", "keel.cli", *args]


def run_step(title: str, *args: str) -> float:
    print(f"\n== {title}\n$ keel {' '.join(args)}", flush=True)
    t0 = time.time()
    rc = subprocess.run(keel(*args)).returncode
    if rc != 0:
        raise KeelError(f"step failed ({title}): `keel {' '.join(args)}` exited with {rc}")
    took = time.time() - t0
    print(f"-- {title}: {took:.0f}s", flush=True)
    return took


def ask_for_tool_call(base_url: str, api_key: str, question: str) -> dict:
    from openai import OpenAI

    from data.synthetic import TOOLS

    client = OpenAI(base_url=base_url + "/v1", api_key=api_key)
    model = client.models.list().data[0].id
    resp = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], tools=TOOLS,
        temperature=0, max_tokens=200,
    )
    choice = resp.choices[0]
    msg = choice.message
    return {
        "finish_reason": choice.finish_reason,
        "reasoning": getattr(msg, "reasoning", None),
        "content": msg.content,
        "tool_calls": [{"name": c.function.name, "arguments": json.loads(c.function.arguments)}
                       for c in (msg.tool_calls or [])],
    }


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="keel quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/quickstart", help="where the model, run and logs go (replaced)")
    p.add_argument("--nproc-per-node", type=int, default=2)
    p.add_argument("--question", default=QUESTION)
    a = p.parse_args(argv)

    t_start = time.time()
    work = Path(a.workdir)
    if work.exists():
        print(f"removing the previous quickstart in {work}")
        shutil.rmtree(work)
    base, run = work / "base", work / "sft"
    run_step("1/4 build a tiny base model", "tiny-model", str(base))
    run_step("2/4 train (torchrun, gloo)", "train", str(RECIPE), f"--nproc-per-node={a.nproc_per_node}",
             f"model.path={base}", f"output.dir={run}")

    port, api_key = free_port(), "quickstart-key"
    url = f"http://127.0.0.1:{port}"
    log = work / "server.log"
    args = ["serve", str(run / "model"), "--host", "127.0.0.1", "--port", str(port)]
    print(f"\n== 3/4 serve with vLLM\n$ keel {' '.join(args)} --api-key ***   (log: {log})", flush=True)
    t0 = time.time()
    with running_server(keel(*args, "--api-key", api_key), log=log, port=port, timeout_s=600):
        print(f"-- server ready at {url} after {time.time() - t0:.0f}s", flush=True)
        print(f"\n== 4/4 ask: {a.question!r}", flush=True)
        answer = ask_for_tool_call(url, api_key, a.question)
    print(f"reasoning:     {answer['reasoning']!r}")
    for call in answer["tool_calls"]:
        print(f"tool call:     {call['name']}({json.dumps(call['arguments'], ensure_ascii=False)})")
    print(f"content:       {answer['content']!r}")
    print(f"finish_reason: {answer['finish_reason']}")
    print(f"\nquickstart finished in {time.time() - t_start:.0f}s. The MLflow run (recipe, loss curve, chat "
          "template) is in this directory's MLflow store: run `mlflow ui` here to see it.")
    if not answer["tool_calls"]:
        print("keel: the model answered without a tool call", file=sys.stderr)
        return 1
    return 0

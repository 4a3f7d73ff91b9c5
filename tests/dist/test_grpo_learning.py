"""GRPO under torchrun with 2 processes raises the tool-call reward on prompts it never trained
on, and the same run with the reward inverted does not (so the rise comes from the reward, not
from training on the prompts). One SFT start model and the two GRPO runs are shared by the
tests of this module (about 1.7 minutes on 2 otherwise idle CPU cores).

The task (data/synthetic.py generate_tool_prompts): one question, the tool it needs, called with
empty arguments. The start model is the tiny model after a short SFT on such conversations: it
writes the format but picks the right tool on about 15% of sampled completions (chance 25% among
four tools, fewer since it also writes names that are no tool). The measure is the mean
tool_call reward of 4 sampled completions (temperature 1) on 40 held-out prompts, scored by the
same reward code the run trains with.

The GRPO-trained export is also served by `keel serve` (one vLLM CPU server, about 40 s to start
on 2 cores): its tool calls on held-out requests must come back parsed in the API, streamed equal
to non-streamed. Greedy, the trained model writes its call and then does not end its turn (seen
2026-12-04: `<tool_call>{...}</tool_call>get_weather", ...` up to max_tokens), so those answers
are cut by max_tokens, which vLLM reports as "tool_calls" when not streamed and as "length" when
streamed (vllm/entrypoints/openai/chat_completion/serving.py, 0.32: the streamed finish becomes
"tool_calls" only after a "stop")."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.formats import load_format
from data.model_dir import read_export_info
from data.prompts import prompt_row
from data.rewards import read_completion, score
from data.synthetic import SHORT_TOOLS, generate_tool_prompts, write_jsonl
from dist_helpers import REPO, run, train_cmd
from keel.processes import free_port, running_server

pytestmark = [pytest.mark.dist, pytest.mark.slow]
API_KEY = "test-key-for-keel-grpo"

FMT = load_format("hermes-qwen3")
HELD_OUT_SEED = 12345
MAX_TOKENS = 40  # room for a whole call (about 30 tokens of the tiny tokenizer)
MARGIN = 0.15  # held-out tool_call reward the GRPO run must gain over its start (seen here: 0.125 -> 0.469)


@dataclass
class Runs:
    start: Path
    trained: Path
    inverted: Path
    held_out: list[dict]


def grpo_cmd(start: Path, run_dir: Path, data: Path, weight: float) -> list[str]:
    return train_cmd(start, run_dir, data, "technique=grpo", "peft.kind=none", "training.packing=false",
                     "training.seq_len=256", "training.max_steps=60", "training.learning_rate=1e-3",
                     "training.lr_scheduler=constant", "training.micro_batch_size=8", "checkpoint.every_steps=1000",
                     "grpo.num_generations=8", "grpo.max_completion_tokens=24", "grpo.temperature=1.0",
                     f"grpo.rewards.tool_call={weight}", "grpo.rewards.format=0.2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, keel_env) -> Runs:
    root = tmp_path_factory.mktemp("grpo")
    write_jsonl(generate_tool_prompts(400, seed=1), root / "sft.jsonl")
    write_jsonl(generate_tool_prompts(64, seed=7), root / "prompts.jsonl")
    out = run(train_cmd(tiny_model, root / "sft", root / "sft.jsonl", "training.seq_len=256", "training.max_steps=60",
                        "training.learning_rate=0.003", "training.micro_batch_size=4", "checkpoint.every_steps=1000",
                        nproc=1), keel_env)
    assert out.returncode == 0, out.stdout[-4000:]
    start = root / "sft" / "model"
    for name, weight in (("trained", 1.0), ("inverted", -1.0)):
        out = run(grpo_cmd(start, root / name, root / "prompts.jsonl", weight), keel_env)
        assert out.returncode == 0, out.stdout[-4000:]
    return Runs(start, root / "trained", root / "inverted", generate_tool_prompts(40, seed=HELD_OUT_SEED))


def held_out_reward(model_dir: Path, rows: list[dict], samples: int = 4) -> float:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(0)
    total = []
    for row in rows:
        p = prompt_row(row, "messages", tokenizer=tok, fmt=FMT, max_prompt_tokens=200, needs_reference="tool_call")
        ids = torch.tensor([p["prompt_ids"]] * samples)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=24, do_sample=True, temperature=1.0, top_k=0,
                                 eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
        for completion in out[:, ids.shape[1]:].tolist():
            scored = read_completion(completion, tokenizer=tok, fmt=FMT)
            total.append(score("tool_call", scored, reference=json.loads(p["reference"]), tools=[], fmt=FMT))
    return sum(total) / len(total)


def test_grpo_raises_the_tool_call_reward_on_held_out_prompts_and_the_inverted_reward_does_not(runs):
    before = held_out_reward(runs.start, runs.held_out)
    after = held_out_reward(runs.trained / "model", runs.held_out)
    inverted = held_out_reward(runs.inverted / "model", runs.held_out)
    print(f"held-out tool_call reward: start {before:.3f}, GRPO {after:.3f}, inverted {inverted:.3f}")
    assert after >= before + MARGIN, f"held-out tool_call reward {before:.2f} at the start, {after:.2f} after GRPO"
    assert inverted <= before + 0.05, f"inverted reward: {before:.2f} at the start, {inverted:.2f} after"


def test_grpo_logs_its_rewards_per_step_and_exports_a_grpo_model(runs):
    records = [json.loads(line) for line in (runs.trained / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    assert len({r["step"] for r in steps}) == 60
    for key in ("rewards/tool_call/mean", "rewards/format/mean", "pass_rate", "completions/mean_length",
                "clip_ratio/region_mean", "reward_std"):
        assert all(key in r for r in steps), key
    assert read_export_info(runs.trained / "model").technique == "grpo"


def chat(client, model: str, messages: list[dict]) -> dict:
    """The answer, and the served prompt and completion token ids (vLLM's return_token_ids)."""
    resp = client.chat.completions.create(model=model, messages=messages, tools=SHORT_TOOLS, temperature=0,
                                          max_tokens=MAX_TOKENS, seed=7, extra_body={"return_token_ids": True})
    choice = resp.choices[0]
    return {"content": choice.message.content or None, "finish": choice.finish_reason,
            "calls": [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []],
            "cut": resp.usage.completion_tokens >= MAX_TOKENS, "prompt_ids": resp.model_extra["prompt_token_ids"],
            "completion_ids": choice.model_extra["token_ids"]}


def chat_streamed(client, model: str, messages: list[dict]) -> dict:
    """The streamed answer reassembled: content, and each call's name and argument text by index."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model=model, messages=messages, tools=SHORT_TOOLS, temperature=0,
                                                max_tokens=MAX_TOKENS, seed=7, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for tc in choice.delta.tool_calls or []:
                call = calls.setdefault(tc.index, ["", ""])
                call[0] += tc.function.name or ""
                call[1] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    return {"content": content or None, "finish": finish, "calls": [tuple(c) for _, c in sorted(calls.items())]}


def parsed_call(calls: list[tuple[str, str]], offered: set[str]) -> bool:
    """One call, of an offered tool, whose arguments are a JSON object: what a client can run."""
    if len(calls) != 1 or calls[0][0] not in offered:
        return False
    try:
        return isinstance(json.loads(calls[0][1]), dict)
    except ValueError:
        return False


@pytest.mark.serving
def test_the_grpo_export_serves_and_its_tool_calls_parse(runs, keel_env, tmp_path):
    from openai import OpenAI

    model_dir = runs.trained / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    offered = {t["function"]["name"] for t in SHORT_TOOLS}
    port = free_port()
    with running_server([sys.executable, "-m", "keel.cli", "serve", str(model_dir), "--host", "127.0.0.1",
                         "--port", str(port), "--api-key", API_KEY],
                        log=tmp_path / "server.log", env=keel_env, port=port, cwd=REPO) as url:
        client = OpenAI(base_url=url + "/v1", api_key=API_KEY)
        model = client.models.list().data[0].id
        answers = []
        for row in runs.held_out[:16]:
            messages = row["messages"][:-1]  # the question; the reference call is what GRPO trained for
            whole, streamed = chat(client, model, messages), chat_streamed(client, model, messages)
            cut, served_prompt, completion = whole.pop("cut"), whole.pop("prompt_ids"), whole.pop("completion_ids")
            # the served prompt is the one GRPO rolled out from, and the rewards read the served
            # completion's ids as the API parsed them
            assert served_prompt == prompt_row(row, "messages", tokenizer=tokenizer, fmt=FMT, max_prompt_tokens=200,
                                               needs_reference="tool_call")["prompt_ids"]
            read = read_completion(completion, tokenizer=tokenizer, fmt=FMT).output
            assert [(c.name, json.loads(c.arguments)) for c in read.calls] == \
                [(name, json.loads(args)) for name, args in whole["calls"]], (read, whole)
            if cut and whole["calls"]:  # vLLM's finish reasons differ here (module docstring)
                assert (whole["finish"], streamed["finish"]) == ("tool_calls", "length"), (whole, streamed)
                whole["finish"] = streamed["finish"]
            assert streamed == whole, f"{messages[-1]['content']!r}: streamed {streamed}, non-streamed {whole}"
            answers.append(whole)
    parsed = [a for a in answers if parsed_call(a["calls"], offered)]
    print(f"served GRPO export: {len(parsed)} of {len(answers)} held-out requests answered with a parsed tool call")
    assert len(parsed) > len(answers) / 2, answers
    # parsed means the markup stayed out of the text a client sees
    assert not any("<tool_call>" in (a["content"] or "") for a in parsed), parsed

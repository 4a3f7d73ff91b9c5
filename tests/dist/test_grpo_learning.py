"""GRPO under torchrun with 2 processes raises the tool-call reward on prompts it never trained
on, and the same run with the reward inverted does not (so the rise comes from the reward, not
from training on the prompts). One SFT start model and the two GRPO runs are shared by the
tests of this module (about 1.7 minutes on 2 otherwise idle CPU cores).

The task (data/synthetic.py generate_tool_prompts): one question, the tool it needs, called with
empty arguments. The start model is the tiny model after a short SFT on such conversations: it
writes the format but picks the right tool on about 15% of sampled completions (chance 25% among
four tools, fewer since it also writes names that are no tool). The measure is the mean
tool_call reward of 4 sampled completions (temperature 1) on 40 held-out prompts, scored by the
same reward code the run trains with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.formats import load_format
from data.model_dir import read_export_info
from data.prompts import prompt_row
from data.rewards import read_completion, score
from data.synthetic import generate_tool_prompts, write_jsonl
from dist_helpers import run, train_cmd

pytestmark = [pytest.mark.dist, pytest.mark.slow]

FMT = load_format("hermes-qwen3")
HELD_OUT_SEED = 12345
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

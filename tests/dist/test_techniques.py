"""Each technique x {full, LoRA} trains under torchrun with 2 processes on a learnable toy task,
and accuracy on a held-out split rises well above chance and above the model it started from.
(A falling training loss alone also passes with a wrong loss mask or a broken reference model.)

Full fine-tuning starts from the random-init tiny model. LoRA starts where LoRA is used: from a
model that already knows the format (the quickstart model trained by the session's `trained_run`;
LoRA's low-rank updates on frozen random weights barely learn at all, 0/40 here). The LoRA SFT
task is a remapped tool choice the base has never seen, so its base accuracy is about zero."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.formats import load_format
from data.render import render_text
from data.synthetic import (
    CAPITALS,
    SHORT_TOOLS,
    generate_documents,
    generate_preference_pairs,
    generate_tool_choice,
    write_jsonl,
)
from dist_helpers import run, train_cmd

pytestmark = [pytest.mark.dist, pytest.mark.slow]

FMT = load_format("hermes-qwen3")
HELD_OUT_SEED = 12345


def train(tmp_path, base, keel_env, technique, peft, data, *overrides):
    run_dir = tmp_path / f"{technique}-{peft}"
    lora = ("peft.r=32", "peft.alpha=64") if peft == "lora" else ()
    out = run(train_cmd(base, run_dir, data, f"technique={technique}", f"peft.kind={peft}",
                        "training.micro_batch_size=4", "checkpoint.every_steps=1000", *lora, *overrides), keel_env)
    assert out.returncode == 0, out.stdout[-4000:]
    model_dir = run_dir / "model"
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
def base_for(tiny_model, trained_run):
    def get(peft: str):
        if peft == "none":
            return tiny_model
        assert trained_run.returncode == 0, trained_run.output[-3000:]
        return trained_run.model_dir
    return get


def load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def greedy(model, tok, prompt_ids, n=60):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False)
    return tok.decode(out[0][len(prompt_ids):])


def sequence_logp(model, prompt_ids, answer_ids):
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logps = model(ids).logits[0, :-1].log_softmax(-1)
    targets = ids[0, 1:]
    picked = logps.gather(1, targets[:, None])[:, 0]
    return picked[len(prompt_ids) - 1:].sum().item()


TOOL_NAMES = [t["function"]["name"] for t in SHORT_TOOLS]
REMAP = dict(zip(TOOL_NAMES, TOOL_NAMES[1:] + TOOL_NAMES[:1]))  # each question's tool -> the next tool


def tool_choice_rows(n, seed, remap):
    rows = generate_tool_choice(n, seed=seed)
    for row in rows:
        call = row["messages"][1]["tool_calls"][0]["function"]
        call["name"] = remap.get(call["name"], call["name"])
    return rows


def tool_choice_accuracy(model, tok, held_out) -> float:
    right = 0
    for row in held_out:
        prompt = tok(render_text({"messages": row["messages"][:1], "tools": SHORT_TOOLS}, fmt=FMT,
                                 add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        want = row["messages"][1]["tool_calls"][0]["function"]["name"]
        right += f'<tool_call>{{"name": "{want}"' in greedy(model, tok, prompt)
    return right / len(held_out)


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_sft_learns_which_tool_a_question_needs(peft, tmp_path, base_for, keel_env):
    remap = REMAP if peft == "lora" else {}
    data = tmp_path / "train.jsonl"
    write_jsonl(tool_choice_rows(400, 1, remap), data)
    held_out = tool_choice_rows(40, HELD_OUT_SEED, remap)
    before = tool_choice_accuracy(*load(base_for(peft)), held_out)
    # LoRA at 5e-3 reached 72% (80% needed) on the CI machine's CPU, where this test failed; at 1e-2
    # it reaches 90% there in the same 100 steps (so did 150 steps at 5e-3)
    steps, lr = (120, 0.003) if peft == "none" else (100, 0.01)
    after = tool_choice_accuracy(*train(tmp_path, base_for(peft), keel_env, "sft", peft, data,
                                        f"training.max_steps={steps}", f"training.learning_rate={lr}"), held_out)
    assert after >= 0.8 and after >= before + 0.5, f"held-out right tool: {before:.0%} before, {after:.0%} after " \
                                                   "(chance 25%)"


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_dpo_prefers_the_chosen_answer_on_held_out_pairs(peft, tmp_path, tiny_model, keel_env):
    # DPO learns here from the random-init model with either adapter kind: its preference pairs
    # differ in a few tokens, which low-rank updates capture
    data = tmp_path / "pairs.jsonl"
    write_jsonl(generate_preference_pairs(300, seed=1), data)
    # LoRA at 1e-2 overshot on the CI machine's CPU (31/40, 32 needed; 40 steps 26/40, 100 steps 29/40);
    # at 5e-3 it prefers the chosen answer on 39/40 there
    lr = "training.learning_rate=0.002" if peft == "none" else "training.learning_rate=0.005"
    model, tok = train(tmp_path, tiny_model, keel_env, "dpo", peft, data, "training.max_steps=60", lr)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    held_out = generate_preference_pairs(40, seed=HELD_OUT_SEED)
    wins = 0
    for row in held_out:
        conv = {"messages": row["prompt"], "tools": row["tools"]}
        prompt = tok(render_text(conv, fmt=FMT, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        margins = []
        for m in (model, ref):
            lp = {}
            for side in ("chosen", "rejected"):
                full = render_text({"messages": [*row["prompt"], *_with_dict_args(row[side])], "tools": row["tools"]},
                                   fmt=FMT)
                ids = tok(full, add_special_tokens=False)["input_ids"]
                lp[side] = sequence_logp(m, prompt, ids[len(prompt):])
            margins.append(lp["chosen"] - lp["rejected"])
        wins += margins[0] - margins[1] > 0  # DPO's implicit reward prefers the chosen answer
    assert wins / len(held_out) >= 0.8, f"implicit reward preferred chosen on {wins}/{len(held_out)} (chance 1/2)"


def _with_dict_args(turns):
    out = []
    for t in turns:
        t = dict(t)
        if t.get("tool_calls"):
            t["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in t["tool_calls"]]
        out.append(t)
    return out


def capitals_right(model, tok) -> float:
    right = 0
    for country, capital in CAPITALS:
        prompt = tok(f"The capital of {country} is", add_special_tokens=False)["input_ids"]
        right += greedy(model, tok, prompt, n=4).strip().startswith(capital)
    return right / len(CAPITALS)


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_cpt_learns_the_facts_in_its_documents(peft, tmp_path, base_for, keel_env):
    data = tmp_path / "docs.jsonl"
    write_jsonl(generate_documents(300, seed=1), data)
    before = capitals_right(*load(base_for(peft)))
    after = capitals_right(*train(tmp_path, base_for(peft), keel_env, "cpt", peft, data,
                                  f"training.max_steps={300 if peft == 'none' else 600}",
                                  "training.seq_len=128", "training.packing=true", "training.learning_rate=0.003"))
    assert after >= 0.75 and after > before, f"capitals right: {before:.0%} before, {after:.0%} after (chance ~8%)"

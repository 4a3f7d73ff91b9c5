"""GRPO pieces without a training run: rewards read completions as the server does, the recipe
section refuses what cannot work (naming the key and the fix), and prompts come out of the
conversation shapes SFT reads with the served prompt's rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from data.completion import read_output
from data.conversation import RowError
from data.formats import load_format
from data.render import render_text
from data.rewards import Scored, normalize_answer, score
from data.synthetic import generate_tool_choice, write_jsonl
from data.errors import KeelError
from trainer.recipe import parse_recipe

FMT = load_format("hermes-qwen3")
REPO = Path(__file__).resolve().parents[2]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
REF = {"content": None, "tool_calls": [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]}


def scored(text: str, ended: bool = True, tokens: int = 10) -> Scored:
    return Scored(read_output(text, FMT), ended=ended, tokens=tokens)


def reward(name, text, reference=REF, **kw):
    return score(name, scored(text, kw.pop("ended", True)), reference=reference, tools=TOOLS, fmt=FMT, **kw)


CALL = '<think>weather</think><tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def test_tool_call_reward_compares_arguments_as_json_values():
    same_value = '<think>w</think><tool_call>{"arguments": {"city":"Paris"}, "name": "get_weather"}</tool_call>'
    assert reward("tool_call", CALL) == 1.0
    assert reward("tool_call", same_value) == 1.0
    wrong_args = CALL.replace("Paris", "Rome")
    assert reward("tool_call", wrong_args) == 0.0
    assert reward("tool_call", wrong_args, name_credit=0.25) == 0.25
    assert reward("tool_call", CALL.replace("get_weather", "get_time"), name_credit=0.25) == 0.0
    # a call whose JSON does not parse is no tool_calls entry in the API: no credit
    assert reward("tool_call", '<think>w</think><tool_call>{"name": "get_weather", "arguments": }</tool_call>') == 0.0
    # no call expected, none made
    assert reward("tool_call", "<think>x</think>Hello", reference={"content": "Hello", "tool_calls": []}) == 1.0
    assert reward("tool_call", CALL, reference={"content": "Hello", "tool_calls": []}) == 0.0


def test_schema_reward_validates_arguments_against_the_offered_tool():
    assert reward("schema_valid", CALL) == 1.0
    assert reward("schema_valid", CALL.replace('"city": "Paris"', '"town": "Paris"')) == 0.0  # required city
    assert reward("schema_valid", CALL.replace("get_weather", "get_forecast")) == 0.0  # not offered
    assert reward("schema_valid", "<think>x</think>no call") == 0.0
    two = CALL + '<tool_call>{"name": "get_weather", "arguments": {"city": 3}}</tool_call>'
    assert reward("schema_valid", two) == 0.5


def test_format_reward_wants_reasoning_delimited_and_nothing_leaking():
    assert reward("format", CALL) == 1.0
    assert reward("format", CALL, ended=False) == 0.0  # cut by max tokens
    assert reward("format", CALL.replace("<think>weather</think>", "")) == 0.0  # no reasoning
    assert reward("format", "<think>a</think>answer <think>again</think>") == 0.0
    assert reward("format", "<think>a</think>text <|im_start|>user") == 0.0  # control token in content
    assert reward("format", '<think>a</think><tool_call>{"name": "get_weather"') == 0.0  # cut call
    assert reward("format", "<think>a</think>just an answer") == 1.0
    assert reward("format", "a</think>just an answer") == 0.0  # hermes-qwen3's prompt does not open it


def test_format_reward_counts_the_think_tag_a_generation_prompt_opened():
    """DeepSeek-R1's generation prompt ends in <think>: the output starts inside its reasoning,
    and opening it again is malformed (the same rule keel eval's reasoning_format uses)."""
    r1 = load_format("deepseek-r1")

    def fmt_reward(text):
        return score("format", Scored(read_output(text, r1), ended=True, tokens=10), reference=REF, tools=[], fmt=r1)

    assert fmt_reward("a\n</think>\n\njust an answer") == 1.0
    assert fmt_reward("<think>a</think>just an answer") == 0.0


def test_answer_match_exact_and_normalized():
    ref = {"content": "The answer is 42.", "tool_calls": []}
    assert reward("answer_match", "<think>x</think>the  answer is 42", reference=ref, normalized=True) == 1.0
    assert reward("answer_match", "<think>x</think>the  answer is 42", reference=ref, normalized=False) == 0.0
    assert reward("answer_match", "<think>x</think>The answer is 42.", reference=ref, normalized=False) == 1.0
    assert reward("answer_match", "<think>x</think>43", reference=ref) == 0.0
    assert normalize_answer("  A\n b!! ") == "a b"


def test_length_penalty_is_the_share_of_the_budget():
    assert score("length", scored("x", tokens=32), reference=None, tools=[], fmt=FMT, max_completion_tokens=64) == -0.5


def test_rewards_read_completion_ids_up_to_the_stop_token(tiny_model):
    from transformers import AutoTokenizer

    from data.rewards import read_completion

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok(CALL + "<|im_end|>", add_special_tokens=False)["input_ids"]
    tail = tok("<|im_start|>garbage", add_special_tokens=False)["input_ids"]
    got = read_completion(ids + tail, tokenizer=tok, fmt=FMT)
    assert got.ended and got.output.calls[0].name == "get_weather" and got.output.content is None
    assert not read_completion(ids[:-1], tokenizer=tok, fmt=FMT).ended


# --------------------------------------------------------------------------- recipe

BASE = {
    "model": {"path": "m", "format": "hermes-qwen3"}, "data": {"train": "t.jsonl"}, "technique": "grpo",
    "grpo": {"num_generations": 4, "max_completion_tokens": 64, "rewards": {"tool_call": 1.0}},
    "training": {"max_steps": 5, "learning_rate": 1e-5, "micro_batch_size": 4, "seq_len": 512},
    "output": {"dir": "o"},
}


def recipe(mutate=lambda r: None):
    raw = json.loads(json.dumps(BASE))
    mutate(raw)
    return parse_recipe(yaml.safe_dump(raw), "r.yaml")


def error(mutate) -> str:
    with pytest.raises(KeelError) as exc:
        recipe(mutate)
    return str(exc.value)


def test_grpo_recipe_validates():
    r = recipe()
    assert r.technique == "grpo" and r.grpo.rewards.used() == {"tool_call": 1.0}


def test_unknown_reward_name_is_refused_with_the_closest_one():
    msg = error(lambda r: r["grpo"]["rewards"].update(tool_calls=1.0))
    assert "grpo.rewards.tool_calls" in msg and "did you mean 'tool_call'" in msg


def test_tool_reward_with_a_format_without_tool_calls_is_refused():
    msg = error(lambda r: r["model"].update(format="gemma3"))
    assert "grpo.rewards.tool_call" in msg and "gemma3" in msg and "set grpo.rewards.tool_call: 0" in msg
    recipe(lambda r: (r["model"].update(format="gemma3"), r["grpo"].update(rewards={"answer_match": 1.0})))


def test_group_size_that_does_not_divide_the_batch_is_refused():
    def mutate(r):
        r["grpo"]["num_generations"] = 3
        r["cluster"] = {"gpus_per_node": 2, "gpu": "cpu"}
    msg = error(mutate)
    assert "grpo.num_generations: 3" in msg and "batch of 8" in msg
    from trainer.recipe import group_problem

    r = recipe()
    assert group_problem(r.grpo, r.training, 1) is None
    assert "batch of 2" in group_problem(r.grpo, r.training.model_copy(update={"micro_batch_size": 1}), 2)


def test_python_reward_needs_the_opt_in():
    msg = error(lambda r: r["grpo"].update(python_rewards={"my_rewards.exact": 1.0}))
    assert "grpo.python_rewards" in msg and "grpo.trust_python_code: true" in msg
    r = recipe(lambda r: r["grpo"].update(python_rewards={"my_rewards.exact": 1.0}, trust_python_code=True))
    assert r.grpo.python_rewards == {"my_rewards.exact": 1.0}
    assert "dotted path" in error(lambda r: r["grpo"].update(python_rewards={"exact": 1.0}, trust_python_code=True))


def test_grpo_section_rules():
    assert "grpo: technique grpo needs a grpo section" in error(lambda r: r.pop("grpo"))
    assert "every weight is 0" in error(lambda r: r["grpo"].update(rewards={}))
    assert "grpo: set, but technique is 'sft'" in error(lambda r: r.update(technique="sft"))
    assert "training.packing" in error(lambda r: r["training"].update(packing=True))
    assert "grpo.max_completion_tokens" in error(lambda r: r["grpo"].update(max_completion_tokens=512))


def test_catalogue_grpo_recipes_validate():
    from trainer.recipe import load_recipe

    paths = sorted(REPO.glob("recipes/*/*-grpo-*.yaml"))
    assert paths
    for path in paths:
        text = path.read_text()
        assert text.startswith("# keel "), f"{path} must start with its commands"
        assert load_recipe(path).technique == "grpo"


# --------------------------------------------------------------------------- prompts

def test_prompts_are_the_served_prompt_ids_with_the_last_assistant_turn_as_reference(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from data.prompts import prepare_prompts

    rows = generate_tool_choice(6, seed=3)
    rows.append({"messages": [{"role": "user", "content": "Hi"}]})  # a prompt without a reference
    write_jsonl(rows, tmp_path / "p.jsonl")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prepared = prepare_prompts(tmp_path / "p.jsonl", tokenizer_dir=tiny_model, fmt=FMT, seq_len=512,
                               max_completion_tokens=64, needs_reference=None, cache_root=tmp_path / "c")
    ds = prepared.load()
    assert prepared.stats.prompts == 7 and prepared.stats.with_reference == 6
    for row, got in zip(rows, ds):
        text = render_text({"messages": row["messages"][:1], "tools": row.get("tools")}, fmt=FMT,
                           add_generation_prompt=True)
        assert got["prompt"] == text and text.endswith("<|im_start|>assistant\n")
        assert got["prompt_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    ref = json.loads(ds[0]["reference"])
    want = rows[0]["messages"][1]["tool_calls"][0]["function"]
    assert ref["tool_calls"] == [{"name": want["name"], "arguments": want["arguments"]}]
    assert ds[6]["reference"] == ""
    # the same inputs are prepared once
    assert prepare_prompts(tmp_path / "p.jsonl", tokenizer_dir=tiny_model, fmt=FMT, seq_len=512,
                           max_completion_tokens=64, needs_reference=None, cache_root=tmp_path / "c").reused


def test_a_prompt_without_reference_is_refused_for_a_reward_that_needs_one(tiny_model, tmp_path):
    from data.prompts import prepare_prompts

    write_jsonl([*generate_tool_choice(2), {"messages": [{"role": "user", "content": "Hi"}]}], tmp_path / "p.jsonl")
    with pytest.raises(KeelError) as exc:
        prepare_prompts(tmp_path / "p.jsonl", tokenizer_dir=tiny_model, fmt=FMT, seq_len=512,
                        max_completion_tokens=64, needs_reference="tool_call", cache_root=tmp_path / "c")
    assert "p.jsonl:3: no reference" in str(exc.value), str(exc.value)
    assert "grpo.rewards.tool_call" in str(exc.value) and "no reference" in str(exc.value)


def test_a_prompt_longer_than_its_budget_is_refused(tiny_model):
    from transformers import AutoTokenizer

    from data.prompts import prompt_row

    tok = AutoTokenizer.from_pretrained(tiny_model)
    with pytest.raises(RowError, match="grpo.max_completion_tokens"):
        prompt_row(generate_tool_choice(1)[0], "messages", tokenizer=tok, fmt=FMT, max_prompt_tokens=10,
                   needs_reference=None)


def test_keel_eval_reports_the_grpo_rewards_of_a_generated_turn(tiny_model):
    from transformers import AutoTokenizer

    from serving.evaluate import Case, grpo_rewards, summarize

    tok = AutoTokenizer.from_pretrained(tiny_model)
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    case = Case(0, 1, [{"role": "user", "content": "Weather in Paris?"}], TOOLS,
                {"role": "assistant", "content": "", "tool_calls": [call]})
    right = grpo_rewards(case, tok(CALL + "<|im_end|>", add_special_tokens=False)["input_ids"], tokenizer=tok, fmt=FMT)
    assert right == {"reward_tool_call": 1.0, "reward_schema_valid": 1.0, "reward_format": 1.0}
    wrong = grpo_rewards(case, tok(CALL.replace("Paris", "Rome"), add_special_tokens=False)["input_ids"],
                         tokenizer=tok, fmt=FMT)
    assert wrong == {"reward_tool_call": 0.0, "reward_schema_valid": 1.0, "reward_format": 0.0}
    scored = [Case(0, 1, case.messages, TOOLS, case.reference, result={"begun_calls": 1, "valid_calls": 1, **r})
              for r in (right, wrong)]
    assert summarize(scored)["reward_tool_call"] == (0.5, 2)

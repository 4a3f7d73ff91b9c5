"""GRPO on verifiable rewards, with TRL's GRPOTrainer underneath.

Token in, token out: the rollouts start from the prompt ids Keel prepared (data/prompts.py,
rendered with the format's template as `keel serve` renders the same messages and tools), not
from TRL's own chat templating of the prompt, and the rewards (data/rewards.py) read the
sampled completion ids, decoded with special tokens kept and parsed by the server's own
tool-call parsing, never re-tokenized text. Generation stops at the format's stop tokens.

Generation: transformers' generate on CPU (and wherever vLLM is missing); with
`grpo.generation: vllm` (or auto on a CUDA GPU with vLLM installed) TRL's colocate mode, one
vLLM engine inside each training process sharing its GPU, fed the same prompt ids. Colocate
rather than server mode because it needs no second set of GPUs and no extra process to
launch, which fits `keel train`'s one-command runs; server mode would also need TRL's own
`trl vllm-serve` process, a second serving stack beside `keel serve`.
"""

from __future__ import annotations

import importlib
import json

from data.errors import KeelError
from data.formats import Format
from data.rewards import score, read_completion

# The reward whose value 1 counts as a pass (pass_rate), in order of preference.
PASS_REWARDS = ("tool_call", "answer_match")


class ClosedReward:
    """One named reward as TRL calls a reward function: one float per completion."""

    def __init__(self, name: str, *, tokenizer, fmt: Format, grpo):
        self.__name__ = name
        self.name, self.tokenizer, self.fmt, self.grpo = name, tokenizer, fmt, grpo
        self.logs_pass = name == next((r for r in PASS_REWARDS if r in grpo.rewards.used()), None)

    def __call__(self, *, completion_ids, reference, tools, log_metric=None, turn_starts=None, **_):
        from trainer.techniques.tool_env import last_turn

        out = []
        for k, (ids, ref, tool_list) in enumerate(zip(completion_ids, reference, tools, strict=True)):
            # a multi-turn rollout is scored on its last assistant turn
            ids = last_turn(ids, turn_starts[k] if turn_starts is not None else None)
            scored = read_completion(ids, tokenizer=self.tokenizer, fmt=self.fmt)
            out.append(score(self.name, scored, reference=json.loads(ref) if ref else None,
                             tools=json.loads(tool_list), fmt=self.fmt, name_credit=self.grpo.tool_name_credit,
                             normalized=self.grpo.answer_normalized,
                             max_completion_tokens=self.grpo.max_completion_tokens))
        if self.logs_pass and log_metric is not None:
            log_metric("pass_rate", sum(r == 1.0 for r in out) / max(1, len(out)))
        return out


def python_reward(path: str):
    """A user's reward function by dotted path (allowed by grpo.trust_python_code)."""
    module_name, _, attr = path.rpartition(".")
    try:
        func = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise KeelError(f"grpo.python_rewards: cannot import {path!r} ({exc}); put its module on PYTHONPATH") from None
    if not callable(func):
        raise KeelError(f"grpo.python_rewards: {path!r} is not a function")
    return func


def reward_functions(grpo, *, tokenizer, fmt: Format) -> tuple[list, list[float]]:
    funcs, weights = [], []
    for name, weight in grpo.rewards.used().items():
        funcs.append(ClosedReward(name, tokenizer=tokenizer, fmt=fmt, grpo=grpo))
        weights.append(weight)
    for path, weight in grpo.python_rewards.items():
        funcs.append(python_reward(path))
        weights.append(weight)
    return funcs, weights


def stop_token_ids(tokenizer, fmt: Format) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in fmt.spec.stop_tokens]
    return [i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id]


def use_vllm(generation: str) -> bool:
    import importlib.util

    import torch

    if generation == "transformers":
        return False
    available = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None
    if generation == "vllm" and not available:
        raise KeelError("grpo.generation: vllm needs a CUDA GPU and vLLM installed in the training image; "
                        "use grpo.generation: transformers (or auto) here")
    return available


def make_grpo_trainer_class():
    from trl import GRPOTrainer

    class KeelGRPOTrainer(GRPOTrainer):
        """TRL's GRPOTrainer, starting each rollout from Keel's prepared prompt ids."""

        def _generate_and_score_completions(self, inputs):
            self._keel_inputs = inputs
            self._keel_prompt_ids = [list(x["prompt_ids"]) for x in inputs]
            self._keel_prompts = [x["prompt"] for x in inputs]
            return super()._generate_and_score_completions(inputs)

        def _tokenize_prompts(self, prompts):
            # TRL would render and tokenize the prompt text again; the prepared ids are the
            # served prompt's ids (data/prompts.py). The text only identifies the row.
            if list(prompts) != self._keel_prompts:
                raise RuntimeError("keel: the prompts to generate from are not the batch's prepared prompts")
            return [list(ids) for ids in self._keel_prompt_ids], None, {}

    return KeelGRPOTrainer


def multi_turn_rollout(grpo, *, tokenizer, fmt: Format):
    """TRL's rollout_func for grpo.max_turns > 1 (trainer/techniques/tool_env.py): generation with
    transformers on the model being trained, tool results (from grpo.tools_module, or recorded in
    the row) inserted with env_mask 0."""
    from trainer.techniques.tool_env import load_tools, module_tools, recorded_results, roll_out

    module = module_tools(load_tools(grpo.tools_module)) if grpo.tool_results == "module" else None
    stops = stop_token_ids(tokenizer, fmt)

    def rollout(prompts, trainer):
        import torch
        from trl.models import unwrap_model_for_generation

        inputs = trainer._keel_inputs
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": None, "env_mask": [], "turn_starts": []}
        calls = []
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as model, torch.no_grad():
            def generate(ids, budget):
                new = model.generate(torch.tensor([ids], device=trainer.accelerator.device), max_new_tokens=budget,
                                     do_sample=True, temperature=grpo.temperature, top_k=0, eos_token_id=stops,
                                     pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
                end = next((k + 1 for k, t in enumerate(new) if t in stops), len(new))
                return new[:end]

            for row in inputs:
                call_tool = module or recorded_results(json.loads(row["recorded"]))
                r = roll_out(prompt_messages=json.loads(row["messages"]), prompt_ids=list(row["prompt_ids"]),
                             tools=json.loads(row["tools"]), generate=generate, call_tool=call_tool, fmt=fmt,
                             tokenizer=tokenizer, max_turns=grpo.max_turns, max_tokens=grpo.max_completion_tokens)
                out["prompt_ids"].append(list(row["prompt_ids"]))
                out["completion_ids"].append(r.completion_ids)
                out["env_mask"].append(r.env_mask)
                out["turn_starts"].append(r.turn_starts)
                calls.append(r.tool_calls)
        mode = "train" if trainer.model.training else "eval"
        trainer._metrics[mode]["tools/calls_per_rollout"].append(sum(calls) / max(1, len(calls)))
        return out

    return rollout


def build_grpo_trainer(*, model, tokenizer, peft_config, grpo, fmt: Format, args: dict, train_dataset,
                       eval_dataset, callbacks):
    from trl import GRPOConfig

    funcs, weights = reward_functions(grpo, tokenizer=tokenizer, fmt=fmt)
    vllm = use_vllm(grpo.generation)
    config = GRPOConfig(
        **args,
        num_generations=grpo.num_generations,
        max_completion_length=grpo.max_completion_tokens,
        temperature=grpo.temperature,
        beta=grpo.beta,
        epsilon=grpo.epsilon,
        loss_type=grpo.loss_type,
        num_iterations=grpo.iterations,
        reward_weights=weights,
        use_vllm=vllm,
        **({"vllm_mode": "colocate"} if vllm else {}),
        # the format's stop tokens end a rollout (vLLM's SamplingParams and transformers name them differently)
        generation_kwargs={"stop_token_ids" if vllm else "eos_token_id": stop_token_ids(tokenizer, fmt)},
        log_completions=False,
    )
    rollout = multi_turn_rollout(grpo, tokenizer=tokenizer, fmt=fmt) if grpo.max_turns > 1 else None
    return make_grpo_trainer_class()(
        model=model, reward_funcs=funcs, rollout_func=rollout, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks,
    )

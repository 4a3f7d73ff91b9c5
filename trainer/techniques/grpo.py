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

    def __call__(self, *, completion_ids, reference, tools, log_metric=None, **_):
        out = []
        for ids, ref, tool_list in zip(completion_ids, reference, tools, strict=True):
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
    return make_grpo_trainer_class()(
        model=model, reward_funcs=funcs, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks,
    )

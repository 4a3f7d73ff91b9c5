"""Distribution strategies: the DeepSpeed and FSDP2 configuration Keel writes from the recipe.

Users never hand-write DeepSpeed JSON or accelerate YAML: `distributed.strategy` and
`distributed.offload` are all they choose. The result is a dict of TrainingArguments fields
(`deepspeed`, `fsdp`, `fsdp_config`, `ddp_timeout`) for the Trainer underneath.
"""

from __future__ import annotations

from typing import Any

ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}


def deepspeed_config(strategy: str, offload: str) -> dict[str, Any]:
    """A DeepSpeed config for a ZeRO stage; values the Trainer knows are left as "auto"."""
    stage = ZERO_STAGES[strategy]
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": False,  # no benefit on gloo/CPU; harmless default elsewhere
        "contiguous_gradients": True,
    }
    if offload in ("optimizer", "optimizer_and_params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload == "optimizer_and_params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        # Export needs whole weights: gather them on save instead of writing empty shards
        # (peers have shipped empty or partial ZeRO-3 saves).
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": False},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
    }


def decoder_layer_classes(model) -> list[str]:
    """Class names of the repeated transformer blocks, the unit FSDP2 shards by."""
    names = getattr(model, "_no_split_modules", None) or []
    if not names:
        seen = {type(m).__name__ for m in model.modules()}
        names = [n for n in seen if n.endswith("DecoderLayer")]
    return list(names)


def strategy_args(distributed, *, model) -> dict[str, Any]:
    """TrainingArguments fields for the recipe's distributed section."""
    args: dict[str, Any] = {"ddp_timeout": distributed.timeout_s}
    strategy = distributed.strategy
    if strategy in ZERO_STAGES:
        args["deepspeed"] = deepspeed_config(strategy, distributed.offload)
    elif strategy == "fsdp2":
        args["fsdp"] = "full_shard auto_wrap"
        args["fsdp_config"] = {
            "fsdp_version": 2,
            "transformer_layer_cls_to_wrap": decoder_layer_classes(model),
            "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT",
            "cpu_ram_efficient_loading": False,
        }
    return args

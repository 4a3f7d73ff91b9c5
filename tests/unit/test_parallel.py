"""The DeepSpeed / FSDP2 configuration Keel writes from `distributed.*`."""

from __future__ import annotations

import pytest

from trainer.parallel import deepspeed_config, strategy_args


class Dist:
    def __init__(self, strategy, offload="none", timeout_s=600):
        self.strategy, self.offload, self.timeout_s = strategy, offload, timeout_s


@pytest.mark.parametrize("strategy, stage", [("zero1", 1), ("zero2", 2), ("zero3", 3)])
def test_zero_stage(strategy, stage):
    cfg = deepspeed_config(strategy, "none")
    assert cfg["zero_optimization"]["stage"] == stage
    assert "offload_optimizer" not in cfg["zero_optimization"]
    # batch sizes and clipping come from the recipe through the Trainer, never hard-coded twice
    assert cfg["train_micro_batch_size_per_gpu"] == "auto" and cfg["gradient_accumulation_steps"] == "auto"
    assert cfg["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)


def test_offload():
    z = deepspeed_config("zero3", "optimizer_and_params")["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    z = deepspeed_config("zero2", "optimizer")["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu" and "offload_param" not in z


def test_strategy_args(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert strategy_args(Dist("ddp"), model=model) == {"ddp_timeout": 600}
    fsdp = strategy_args(Dist("fsdp2"), model=model)
    assert fsdp["fsdp_config"]["fsdp_version"] == 2
    assert fsdp["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert "deepspeed" in strategy_args(Dist("zero3"), model=model)

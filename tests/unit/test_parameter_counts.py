"""`keel plan` counts parameters from config.json by arithmetic (trainer/models/parameters.py).
Here the model itself is the oracle: built on PyTorch's meta device (shapes, no memory), its
total, first decoder layer, experts and LoRA adapters must equal the arithmetic exactly, for
every kept config, the tiny models `keel tiny-model` builds, and layouts the kept configs do not
exercise (a multimodal Gemma 3, a MoE with dense layers, configs that leave fields to defaults)."""

from __future__ import annotations

import json

import pytest

from data.errors import KeelError
from trainer.models.known import ARCHITECTURES_DIR
from trainer.models.parameters import KNOWN_TYPES, parameter_counts
from trainer.plan import model_shape
from trainer.recipe import PeftSection

KEPT = {p.name: json.loads(p.read_text()) for p in sorted(ARCHITECTURES_DIR.glob("*.json"))}
TARGETS = ["all-linear", ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj", "fc1"]]
R = 8


def other_layouts() -> dict[str, dict]:
    moe = {**KEPT["qwen3-30b-a3b.json"], "num_hidden_layers": 6, "mlp_only_layers": [0], "decoder_sparse_step": 2}
    # a published multimodal Gemma 3 config leaves most of its text config to the defaults
    gemma3 = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
              "text_config": {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
                              "num_hidden_layers": 4},
              "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 896,
                                "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 3,
                                "patch_size": 14, "vision_use_head": False}}
    pooled = {**gemma3, "vision_config": {**gemma3["vision_config"], "vision_use_head": True}}
    bare = {f"{t} defaults": {"model_type": t, "num_hidden_layers": 2} for t in KNOWN_TYPES if t != "gemma3"}
    return {"qwen3_moe with dense layers": moe, "gemma3 multimodal": gemma3, "gemma3 pooled vision head": pooled,
            **bare}


def tiny_configs() -> dict[str, dict]:
    from trainer.models.tiny import build_config, gpt_oss_config

    out = {f"tiny {arch}": build_config(arch, 4096, 1, 2, hidden=128, layers=2).to_dict() for arch in ("llama", "qwen3")}
    out["tiny gpt_oss"] = gpt_oss_config(hidden=128, layers=2).to_dict()
    return out


def built_on_meta(config: dict) -> tuple[int, int, int, list[int]]:
    """Total, first decoder layer, experts, and LoRA adapters per TARGETS, counted on the model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), trust_remote_code=False)
    total = sum(p.numel() for p in model.parameters())
    decoder = next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    lora = [sum(R * (m.in_features + m.out_features) for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")
                and (targets == "all-linear" or name.rsplit(".", 1)[-1] in targets))
            for targets in TARGETS]
    return total, sum(p.numel() for p in decoder.parameters()), experts, lora


@pytest.mark.parametrize("name", [*KEPT, *other_layouts(), "tiny llama", "tiny qwen3", "tiny gpt_oss"])
def test_arithmetic_counts_equal_the_model_built_on_the_meta_device(name):
    config = KEPT.get(name) or other_layouts().get(name) or tiny_configs()[name]
    counts = parameter_counts(config)
    assert (counts.total, counts.layer, counts.experts, [counts.lora(R, t) for t in TARGETS]) == built_on_meta(config)


def test_mixture_of_experts_active_parameters_follow_the_experts_share():
    config = KEPT["qwen3-30b-a3b.json"]
    shape = model_shape(config, PeftSection(kind="lora", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    experts = parameter_counts(config).experts
    assert shape.active == shape.params - round(experts * (1 - 8 / 128))  # 8 of 128 experts per token
    assert (shape.experts, shape.experts_per_token, shape.intermediate) == (128, 8, 8 * 768)


def test_a_model_type_without_a_layout_is_refused_by_name():
    with pytest.raises(KeelError, match="model_type 'falcon'.*llama"):
        model_shape({"model_type": "falcon", "hidden_size": 64}, PeftSection())
    with pytest.raises(KeelError, match="no model_type"):
        model_shape({"hidden_size": 64}, PeftSection())

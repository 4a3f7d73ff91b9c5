"""The model a run trains: the base model (+ quantization) and its adapters.

Each takes only the sections it needs, keyword-only, so what a builder depends on is visible
in its signature.
"""

from __future__ import annotations

from typing import Any

from data.errors import KeelError
from trainer.arguments import check_device_support, compute_precision
from trainer.models.config import is_mxfp4, model_config, has_attention_sinks


def load_base_model(path: str, policy, *, dtype, config: dict | None = None, quantization_config=None):
    """The base model in `dtype`, loaded as training loads it: eager attention for a model with
    attention sinks; MXFP4 experts dequantized (transformers' Mxfp4Config(dequantize=True): the
    blocks and scales become bf16 weights on CPU and GPU alike, no kernels fetched; then cast, so
    every weight has one dtype) unless another `quantization_config` (QLoRA's 4-bit) is given.
    Used for the trained model, DPO's reference copy and export's rebuilt model."""
    from data.model_loading import load_causal_lm

    config = model_config(str(path)) if config is None else config
    kwargs: dict[str, Any] = {"dtype": dtype}
    if has_attention_sinks(config):
        kwargs["attn_implementation"] = "eager"
    dequantize = quantization_config is None and is_mxfp4(config)
    if dequantize:
        from transformers import Mxfp4Config

        quantization_config = Mxfp4Config(dequantize=True)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    model = load_causal_lm(path, policy, **kwargs)
    if dequantize:
        model = model.to(dtype)  # dequantization writes bf16 whatever `dtype` asked
    return model


def build_model(*, model_section, peft, training):
    """The base model, in the dtype it trains in; 4-bit for QLoRA.

    gpt-oss: eager attention, the implementation that honours its attention sinks; an MXFP4
    checkpoint is dequantized at load and held as the run computes: bf16 for a LoRA base on a
    bf16 run (the frozen 20B then takes ~42 GB, not ~84 GB in fp32), fp32 otherwise."""
    import torch

    config = model_config(model_section.path)
    if is_mxfp4(config) and peft.kind == "qlora":
        raise KeelError(f"peft.kind: qlora quantizes the base to 4-bit NF4, but {model_section.path} is stored "
                        "in MXFP4 (quantization_config.quant_method mxfp4), which Keel dequantizes to bf16 for "
                        "training; use peft.kind: lora (the bf16 base is frozen)")
    check_device_support(peft=peft, training=training)
    if peft.kind != "qlora":
        dtype = torch.float32
        if is_mxfp4(config) and peft.kind == "lora" and compute_precision(training) == "bf16":
            dtype = torch.bfloat16
        return load_base_model(model_section.path, model_section.load_policy, dtype=dtype, config=config)
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = load_base_model(model_section.path, model_section.load_policy, dtype=torch.bfloat16, config=config,
                            quantization_config=nf4)

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=training.gradient_checkpointing)


def build_peft_config(peft):
    """LoRA config from the recipe's peft section (None for full fine-tuning)."""
    if peft.kind == "none":
        return None
    from peft import LoraConfig

    return LoraConfig(r=peft.r, lora_alpha=peft.alpha, lora_dropout=peft.dropout,
                      target_modules=peft.target_modules, task_type="CAUSAL_LM")



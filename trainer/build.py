"""Builders, one per recipe section: model (+ quantization), adapters, training arguments.

Each takes only the sections it needs, keyword-only, so what a builder depends on is visible
in its signature.
"""

from __future__ import annotations

import sys
from typing import Any

from data.errors import KeelError


def compute_precision(training) -> str:
    """'bf16' or 'fp32': what the run computes in."""
    import torch

    if training.precision != "auto":
        return training.precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def check_device_support(*, peft, training) -> None:
    """Fail before any work when the recipe needs hardware this machine lacks."""
    import torch

    if peft.kind == "qlora" and not torch.cuda.is_available():
        raise KeelError(
            "peft.kind: qlora loads the base model in 4 bits with bitsandbytes, which needs a CUDA GPU; "
            "this machine has none. Use peft.kind=lora here, or run on a GPU machine."
        )
    if training.precision == "bf16" and not torch.cuda.is_available():
        print("[keel] warning: training.precision=bf16 on CPU runs under autocast and is usually slower than fp32",
              file=sys.stderr, flush=True)


def model_config(model_path: str) -> dict:
    """The base model's config.json as a dict: what `keel plan` reads (a local directory's, or the
    kept one of a hub id Keel knows: trainer/plan.py load_config), else the hub's (config only; no
    weights, no model code)."""
    from trainer.plan import load_config

    try:
        return load_config(model_path)
    except KeelError:
        pass
    from transformers import PretrainedConfig

    try:
        return PretrainedConfig.get_config_dict(model_path)[0]
    except (OSError, ValueError):
        return {}  # loading the model reports what is missing


def has_attention_sinks(config: dict) -> bool:
    """gpt-oss: every attention head has a learned sink logit (a softmax column no key fills).
    transformers' eager attention adds it; SDPA cannot (gpt-oss declares no SDPA), flash-attention-2
    drops it silently, and Keel's CPU packed attention (document_attention.py) has no place for it."""
    return config.get("model_type") == "gpt_oss"


PACKING_WITH_SINKS = (
    "training.packing: {what} has attention sinks (model type gpt_oss), which only eager attention adds here, "
    "and packed examples need a mask that keeps them apart: transformers' GptOss model builds its mask without "
    "the restarting position ids, so packed examples would attend to each other, while flash attention's varlen "
    "kernels and Keel's per-document SDPA (CPU) would drop the sinks; set training.packing: false")


def packing_problem(config: dict, packing: bool, what: str) -> str | None:
    """Why packed rows cannot train this model correctly (None: they can)."""
    if packing and has_attention_sinks(config):
        return PACKING_WITH_SINKS.format(what=what)
    return None


def is_mxfp4(config: dict) -> bool:
    """A checkpoint whose experts are stored in MXFP4 (*_blocks, *_scales), as gpt-oss is published."""
    quant = config.get("quantization_config") or {}
    return isinstance(quant, dict) and quant.get("quant_method") == "mxfp4"


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


def training_args(*, training, checkpoint, distributed, model, output_dir: str, has_eval: bool) -> dict[str, Any]:
    """TrainingArguments fields shared by every technique."""
    import torch

    from trainer.parallel import strategy_args

    on_gpu = torch.cuda.is_available()
    bf16 = compute_precision(training) == "bf16"
    return dict(
        output_dir=output_dir,
        max_steps=training.max_steps or -1,
        num_train_epochs=training.epochs or 1.0,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=training.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        per_device_train_batch_size=training.micro_batch_size,
        per_device_eval_batch_size=training.micro_batch_size,
        gradient_accumulation_steps=training.grad_accum,
        gradient_checkpointing=training.gradient_checkpointing,
        seed=training.seed,
        data_seed=training.seed,
        logging_steps=1,
        # Checkpoints are saved on Keel's schedule (CheckpointCompletion adds the time budget).
        save_strategy="steps" if checkpoint.every_steps or checkpoint.every_minutes else "no",
        save_steps=checkpoint.every_steps or 10**9,
        save_total_limit=None,  # Keel prunes after marking the new checkpoint complete (prune_checkpoints)
        eval_strategy="steps" if has_eval else "no",
        eval_steps=max(1, (training.max_steps or 100) // 5) if has_eval else None,
        report_to="none",
        use_cpu=not on_gpu,
        bf16=bf16,
        ddp_backend=None if on_gpu else "gloo",
        ddp_find_unused_parameters=False,
        disable_tqdm=not sys.stderr.isatty(),
        remove_unused_columns=False,
        **strategy_args(distributed, model=model),
    )

"""Export a trained model as a serving-ready directory (the contract is in data/model_dir.py).

Weights are gathered whole from every rank first (ZeRO-3 and FSDP2 shard them; peers have
shipped empty or partial ZeRO-3 saves), LoRA is merged unless the recipe keeps the adapter,
and the directory is written under a temporary name, loaded back and its logits compared with
the in-memory model's on a probe input, and only then renamed into place: a broken save fails
the run instead of reaching a server, and a model dir that exists is complete and verified.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable


from data.errors import KeelError
from data.formats import SPEC_FILE, Format
from data.model_dir import EXPORT_INFO_FILE, FORMAT_DIR, ExportInfo
from data.model_loading import LoadPolicy, load_causal_lm

PROBE_TEXT = "Keel export check: the quick brown fox jumps over the lazy dog. 12345"
VERIFY_MAX_PARAMS = 3_000_000_000  # loading the export back costs a full copy in CPU memory


def _full_state_dict(trainer) -> dict | None:
    """Whole weights on global rank 0 (a collective: every rank must call it)."""
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped, unwrap=True)
    return state if trainer.accelerator.is_main_process else None


def _materialize(trainer, state: dict, *, recipe_model_path: str, peft_config, merge: bool, dtype,
                 quantized: bool, load_policy: LoadPolicy):
    """A CPU model holding `state`, ready for save_pretrained (LoRA merged unless merge=False)."""
    import torch
    from peft import PeftModel, get_peft_model

    unwrapped = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    if not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled or quantized):
        model = unwrapped
    else:
        # The in-memory modules hold shards (or 4-bit weights): rebuild the full-precision model
        # on CPU and load the gathered state (for QLoRA, only the adapter: the base is unchanged).
        if quantized:
            state = {k: v for k, v in state.items() if "lora_" in k}
        from trainer.models.loading import load_base_model

        model = load_base_model(recipe_model_path, load_policy, dtype=torch.float32)
        if peft_config is not None:
            model = get_peft_model(model, peft_config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if "lora_" in k or peft_config is None]
        if missing or unexpected:
            raise KeelError(f"export: gathered weights do not fit the model (missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}); the run's checkpoints are kept for inspection")
    if isinstance(model, PeftModel) and merge:
        model = model.merge_and_unload()
    return model.to(dtype)


def write_model_dir(model, tokenizer, *, fmt: Format, out_dir: Path, info: ExportInfo,
                    verify: Callable[[Path], None] | None = None) -> Path:
    """Write the model dir atomically (temp dir + rename); `verify(temp dir)` runs before the
    rename, and what it raises leaves no model dir behind."""
    from transformers import GenerationConfig

    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in fmt.spec.stop_tokens]
    base = getattr(model, "base_model", model) if hasattr(model, "peft_config") else model
    base.generation_config = GenerationConfig(
        eos_token_id=stop_ids if len(stop_ids) > 1 else stop_ids[0],
        pad_token_id=tokenizer.convert_tokens_to_ids(fmt.spec.pad_token),
    )
    if not hasattr(model, "peft_config"):
        model.config.eos_token_id = stop_ids[0]
    model.save_pretrained(tmp, safe_serialization=True)
    # A harmony format (gpt-oss) has no chat template: vLLM renders its prompts with the harmony
    # encoding, so the export carries none (a stale one from the base would show a different
    # prompt than the server sends); its spec below says how it is rendered.
    tokenizer.chat_template = fmt.chat_template
    tokenizer.save_pretrained(tmp)
    if fmt.chat_template is not None:
        (tmp / fmt.spec.chat_template).write_text(fmt.chat_template, encoding="utf-8")
    fmt_dir = tmp / FORMAT_DIR
    fmt_dir.mkdir()
    # The spec as training used it, rendering options included (not the shipped file).
    (fmt_dir / SPEC_FILE).write_text(fmt.spec_yaml(), encoding="utf-8")
    if fmt.chat_template is not None:
        (fmt_dir / fmt.spec.chat_template).write_text(fmt.chat_template, encoding="utf-8")
    (tmp / EXPORT_INFO_FILE).write_text(info.to_yaml(), encoding="utf-8")
    if verify is not None:
        try:
            verify(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)
    return out_dir


def probe_logits(model, tokenizer):
    """Logits of the in-memory model on the probe text (a collective under ZeRO-3/FSDP2)."""
    import torch

    ids = tokenizer(PROBE_TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids.to(device)).logits.float().cpu()
    model.train(was_training)
    return logits


def verify_export(out_dir: Path, tokenizer, expected, *, adapter_base: str | None, tol: float,
                  load_policy: LoadPolicy = LoadPolicy()) -> float:
    """Load the export fresh and compare its probe logits with the in-memory ones."""
    import torch

    if adapter_base is not None:
        from peft import PeftModel

        # the adapter is Keel's own export: adapter_model.safetensors
        from trainer.models.loading import load_base_model

        model = PeftModel.from_pretrained(load_base_model(adapter_base, load_policy, dtype=torch.float32),
                                          str(out_dir))
    else:
        # Keel wrote these weights as safetensors: pickle is never needed to read them back
        model = load_causal_lm(out_dir, LoadPolicy(trust_remote_code=load_policy.trust_remote_code),
                               dtype=torch.float32)
    got = probe_logits(model, tokenizer)
    diff = (got - expected).abs().max().item()
    if not diff <= tol:
        raise KeelError(f"export check failed: the exported model's logits differ from the trained model's by "
                        f"{diff:.3g} (tolerance {tol}) on a probe input: what was written ({out_dir}, removed) is "
                        "not the model that was trained, so no model dir was made. Checkpoints are kept.")
    return diff


def export_trained(trainer, tokenizer, *, fmt: Format, out_dir: Path, info: ExportInfo, recipe_model_path: str,
                   peft_config, merge_lora: bool, precision: str, quantized: bool,
                   load_policy: LoadPolicy = LoadPolicy()) -> Path | None:
    """Gather, write and verify the export. Every rank calls this; rank 0 writes."""
    import torch

    in_memory = probe_logits(trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model, tokenizer)
    state = _full_state_dict(trainer)
    if not trainer.accelerator.is_main_process:
        return None
    if trainer.is_deepspeed_enabled:
        # Rank 0 alone now loads models from disk; under a live ZeRO-3 config transformers would
        # wrap that in deepspeed.zero.Init, whose collectives wait forever for the other ranks.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = _materialize(trainer, state, recipe_model_path=recipe_model_path, peft_config=peft_config,
                         merge=merge_lora, dtype=dtype, quantized=quantized, load_policy=load_policy)
    verify = None
    if sum(p.numel() for p in model.parameters()) <= VERIFY_MAX_PARAMS:
        adapter_base = None if merge_lora or peft_config is None else recipe_model_path
        tol = 1e-3 if precision == "fp32" else 0.25  # bf16 rounding of saved weights

        def verify(written: Path) -> None:
            diff = verify_export(written, tokenizer, in_memory, adapter_base=adapter_base, tol=tol,
                                 load_policy=load_policy)
            print(f"[keel] export verified: max |logit difference| {diff:.2e} on a probe input", flush=True)

    return write_model_dir(model, tokenizer, fmt=fmt, out_dir=out_dir, info=info, verify=verify)

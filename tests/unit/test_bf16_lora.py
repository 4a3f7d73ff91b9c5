"""A LoRA base held in bf16 (trainer/models/loading.py), as bf16 runs on GPUs hold it, tested
on CPU: the loader picks bf16 for a frozen LoRA base on a bf16 run (fp32 otherwise), the
adapters stay fp32 (their master weights: PEFT upcasts them), and a few training steps of the
tiny model give the same losses as the fp32 path within bf16's tolerance. The planner counts
the same bytes (tests/unit/test_plan.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data.formats import load_format
from data.prepare import PrepOptions, prepare_file
from data.synthetic import generate_conversations, write_jsonl

QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart" / "sft-tool-calling.yaml"
STEPS = 6
# bf16 keeps 8 bits of mantissa (relative error ~4e-3 per value); after a few steps of the tiny
# model the loss differs from fp32 by well under 2%. A negative control below shows the test
# would see a real difference (a different learning rate).
LOSS_RTOL = 0.02


def _recipe(model_dir, *overrides):
    from trainer.recipe import load_recipe

    return load_recipe(QUICKSTART, [f"model.path={model_dir}", "peft.kind=lora", "peft.r=8",
                                    "training.seq_len=1024", *overrides])


@pytest.mark.parametrize("precision, strategy, kind, held", [
    ("bf16", "ddp", "lora", "bf16"), ("fp32", "ddp", "lora", "fp32"),
    ("bf16", "ddp", "none", "fp32"), ("bf16", "zero3", "none", "bf16"), ("bf16", "fsdp2", "none", "fp32"),
])
def test_the_base_is_held_in_bf16_where_the_field_holds_it(tiny_model, precision, strategy, kind, held):
    from trainer.models.loading import base_dtype_name

    r = _recipe(tiny_model, f"training.precision={precision}", f"distributed.strategy={strategy}",
                f"peft.kind={kind}")
    assert base_dtype_name(peft=r.peft, training=r.training, distributed=r.distributed) == held


@pytest.fixture(scope="module")
def prepared(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16-lora")
    write_jsonl(generate_conversations(12, seed=11), root / "rows.jsonl")
    return prepare_file(root / "rows.jsonl", tokenizer_dir=tiny_model, fmt=load_format("hermes-qwen3"),
                        seq_len=1024, cache_root=root / "cache", num_proc=1, options=PrepOptions())


def _train(tiny_model, prepared, out: Path, precision: str, lr: float = 2e-3, export: bool = False):
    from data.model_loading import load_tokenizer
    from trainer.models.loading import build_model, build_peft_config
    from trainer.techniques.sft import build_sft_trainer

    r = _recipe(tiny_model, f"training.precision={precision}")
    torch.manual_seed(0)
    model = build_model(model_section=r.model, peft=r.peft, training=r.training, distributed=r.distributed)
    trainer = build_sft_trainer(
        model=model, tokenizer=load_tokenizer(r.model.path, r.model.load_policy),
        peft_config=build_peft_config(r.peft), packed=False,
        args=dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=lr,
                  report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
                  remove_unused_columns=False, disable_tqdm=True, bf16=precision == "bf16", seed=0, data_seed=0),
        train_dataset=prepared.load(), eval_dataset=None, callbacks=[])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    dtypes = {"frozen": {p.dtype for p in trainer.model.parameters() if not p.requires_grad},
              "trained": {p.dtype for p in trainer.model.parameters() if p.requires_grad}}
    if export:  # the adapters merged into the bf16 base, written and verified as keel train does
        from data.formats import load_format
        from data.model_dir import ExportInfo
        from trainer.export import export_trained

        export_trained(trainer, trainer.processing_class, fmt=load_format("hermes-qwen3"), out_dir=out / "model",
                       info=ExportInfo(base_model=str(tiny_model), format="hermes-qwen3", peft="lora", seq_len=1024,
                                       dtype="bfloat16" if precision == "bf16" else "float32"),
                       recipe_model_path=str(tiny_model), peft_config=build_peft_config(r.peft), merge_lora=True,
                       precision=precision, quantized=False)
    return dtypes, losses


def test_a_bf16_lora_base_trains_as_the_fp32_one_does(tiny_model, prepared, tmp_path, capsys):
    dtypes16, bf16 = _train(tiny_model, prepared, tmp_path / "bf16", "bf16", export=True)
    out = capsys.readouterr().out
    assert "base model weights held in bf16" in out  # the choice is logged
    assert "export verified" in out and (tmp_path / "bf16" / "model" / "keel-export.yaml").is_file()
    # the base bf16, the adapters' master weights fp32
    assert dtypes16 == {"frozen": {torch.bfloat16}, "trained": {torch.float32}}

    dtypes32, fp32 = _train(tiny_model, prepared, tmp_path / "fp32", "fp32")
    assert dtypes32 == {"frozen": {torch.float32}, "trained": {torch.float32}}
    assert len(bf16) == len(fp32) == STEPS
    np.testing.assert_allclose(bf16, fp32, rtol=LOSS_RTOL)
    diff = max(abs(a - b) / b for a, b in zip(bf16, fp32))
    print(f"\nbf16 vs fp32 LoRA losses over {STEPS} steps: largest relative difference {diff:.2e} "
          f"(bf16 {bf16[-1]:.4f}, fp32 {fp32[-1]:.4f} at the last step)")

    # negative control: training that really differs (10x the learning rate) is outside the tolerance
    _, other = _train(tiny_model, prepared, tmp_path / "other", "fp32", lr=2e-2)
    assert max(abs(a - b) / b for a, b in zip(other, fp32)) > LOSS_RTOL

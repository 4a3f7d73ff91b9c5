"""Training gpt-oss: a shrunken GptOss (sinks, sliding window on even layers, experts top-2) is
loaded the way `keel train` loads gpt-oss-20b (trainer/models/loading.py) and trained with the catalogue
recipe's LoRA targets on token ids built here (no format rendering).

- The published checkpoint stores the experts in MXFP4 (*_blocks, *_scales): a checkpoint laid
  out the same way, packed here from known values, loads dequantized, offline, to exactly those
  values, in one dtype.
- Attention is eager, the implementation that adds the sinks: changing the sinks changes the
  loss. Packing is refused (validation, trainer, per-document SDPA): transformers' GptOss builds
  no per-example mask for packed rows, and the alternatives drop the sinks.
- One training step with the recipe's targets wraps q/k/v/o (all-linear would too: the router and
  the experts are not nn.Linear) and moves the adapters.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "gpt-oss" / "gpt-oss-20b-sft-lora.yaml"
VOCAB = 512
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# e2m1 values of the 16 MXFP4 codes (sign bit, 2 exponent bits, 1 mantissa bit)
FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def tiny_config():
    from trainer.models.tiny import gpt_oss_config

    config = gpt_oss_config(hidden=64, layers=2)  # what `keel tiny-model --arch gpt_oss` builds
    config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id = VOCAB, 1, 2, 0
    return config


def save_tokenizer(out: Path):
    """A word-level tokenizer over the ids (the trainer needs one for its pad id; the ids are built directly)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")),
                                  pad_token="t0", eos_token="t2", bos_token="t1")
    tok.save_pretrained(out)
    return tok


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny-gpt-oss")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(), dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(out)
    save_tokenizer(out)
    return out


def recipe_for(model_dir, *overrides):
    from trainer.recipe import load_recipe

    return load_recipe(RECIPE, [f"model.path={model_dir}", "training.precision=fp32", *overrides])


def build(recipe):
    from trainer.models.loading import build_model

    return build_model(model_section=recipe.model, peft=recipe.peft, training=recipe.training)


def pack_mxfp4(codes, exponents):
    """MXFP4 as gpt-oss checkpoints store it: per row, blocks of 32 values share a power-of-two scale
    (uint8, biased by 127); each byte holds two 4-bit codes, the first value in the low nibble.
    codes [E, rows, cols], exponents [E, rows, cols / 32] -> (blocks [E, rows, cols / 32, 16],
    scales [E, rows, cols / 32], the values [E, rows, cols])."""
    import torch

    E, rows, cols = codes.shape
    values = torch.tensor(FP4)[codes] * torch.pow(2.0, exponents.float()).repeat_interleave(32, dim=-1)
    grouped = codes.to(torch.uint8).reshape(E, rows, cols // 32, 32)
    blocks = grouped[..., 0::2] | (grouped[..., 1::2] << 4)
    return blocks.contiguous(), (exponents + 127).to(torch.uint8).contiguous(), values


def test_an_mxfp4_checkpoint_loads_dequantized_to_the_packed_values_offline(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = tiny_config()
    torch.manual_seed(0)
    state = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).state_dict()
    expected = {}
    g = torch.Generator().manual_seed(1)
    hidden, inter, experts = config.hidden_size, config.intermediate_size, config.num_local_experts
    for layer in range(config.num_hidden_layers):
        # stored as [experts, out, in] (gate and up interleaved in out); transformers holds [experts, in, out]
        for proj, (rows, cols) in (("gate_up_proj", (2 * inter, hidden)), ("down_proj", (hidden, inter))):
            key = f"model.layers.{layer}.mlp.experts.{proj}"
            codes = torch.randint(0, 16, (experts, rows, cols), generator=g)
            exponents = torch.randint(-4, 3, (experts, rows, cols // 32), generator=g)
            blocks, scales, values = pack_mxfp4(codes, exponents)
            del state[key]
            state[f"{key}_blocks"], state[f"{key}_scales"] = blocks, scales
            expected[key] = values.transpose(1, 2)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    raw = {**config.to_dict(), "architectures": ["GptOssForCausalLM"],
           "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
               "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}
    (tmp_path / "config.json").write_text(json.dumps(raw))

    model = build(recipe_for(tmp_path))
    loaded = model.state_dict()
    for key, values in expected.items():
        assert torch.equal(loaded[key], values.float()), key  # every MXFP4 value is exact in bf16 and fp32
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # fp32 run: one dtype, experts included
    assert torch.equal(loaded["model.layers.0.self_attn.sinks"], state["model.layers.0.self_attn.sinks"].float())
    assert model.config._attn_implementation == "eager"
    assert getattr(model.config, "quantization_config", None) is None  # nothing MXFP4 left to export
    # LoRA on a bf16 run keeps the dequantized base in bf16 (half of fp32's bytes for the 20B)
    bf16 = build(recipe_for(tmp_path, "training.precision=bf16"))
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert torch.equal(bf16.state_dict()["model.layers.1.mlp.experts.down_proj"],
                       expected["model.layers.1.mlp.experts.down_proj"].to(torch.bfloat16))
    with pytest.raises(Exception, match="peft.kind: qlora .*MXFP4"):
        build(recipe_for(tmp_path, "peft.kind=qlora"))


def doc_ids(n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(4, VOCAB) for _ in range(n)]


def test_packing_is_refused_for_gpt_oss_because_packed_examples_would_see_each_other(model_dir, tmp_path):
    import torch

    from data.errors import KeelError
    from trainer.models.document_attention import use_document_attention
    from trainer.recipe import check_paths, load_recipe
    from trainer.techniques.sft import build_sft_trainer

    model = build(recipe_for(model_dir))
    assert model.config._attn_implementation == "eager"
    # why: with no attention mask and restarting position ids, transformers' GptOss still builds a
    # plain causal mask (its mask builder is not given the position ids), so the second example of
    # a packed row attends to the first, here across the sliding window (32) of layer 0 too
    a, b = doc_ids(40, 1), doc_ids(24, 2)
    model.eval()
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([ids]), use_cache=False).logits[0] for ids in (a, b)]
        packed = model(input_ids=torch.tensor([a + b]), use_cache=False,
                       position_ids=torch.tensor([list(range(40)) + list(range(24))])).logits[0]
    assert torch.allclose(packed[:40], alone[0], atol=1e-4)
    assert not torch.allclose(packed[40:], alone[1], atol=1e-2)
    # so: refused at validation (a hub id Keel keeps: at load; a local dir: with its paths, as keel train
    # checks them before starting), by the trainer, and by the per-document SDPA that would drop the sinks
    with pytest.raises(KeelError, match="training.packing: openai/gpt-oss-20b has attention sinks.*packing: false"):
        load_recipe(RECIPE, ["training.packing=true"])
    with pytest.raises(KeelError, match="training.packing: .* has attention sinks"):
        check_paths(recipe_for(model_dir, "training.packing=true", f"data.train={RECIPE}"), "r.yaml")
    with pytest.raises(KeelError, match="training.packing: .*GptOssForCausalLM has attention sinks"):
        build_sft_trainer(model=model, tokenizer=None, peft_config=None, args={}, packed=True, train_dataset=None,
                          eval_dataset=None, callbacks=[])
    with pytest.raises(KeelError, match="attention sinks, which Keel's per-document SDPA ignores"):
        use_document_attention(model)
    assert model.config._attn_implementation == "eager"


@pytest.mark.slow  # a TRL trainer and a step on 2 cores
def test_one_lora_step_with_the_recipes_targets_trains_attention_with_sinks(model_dir, tmp_path):
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    from trainer.models.loading import build_peft_config

    from trainer.arguments import training_args
    from trainer.techniques.sft import build_sft_trainer

    recipe = recipe_for(model_dir, "training.max_steps=1", "training.epochs=", "training.micro_batch_size=2",
                        "training.grad_accum=1", "training.warmup_ratio=0", "checkpoint.every_steps=",
                        "checkpoint.every_minutes=")
    assert recipe.peft.target_modules == ATTENTION and recipe.model.format == "harmony"
    model = build(recipe)
    assert model.config._attn_implementation == "eager"
    # all-linear finds the same four: the router and the experts hold bare parameters, not nn.Linear
    linear = {name.rsplit(".", 1)[-1] for name, m in model.model.layers.named_modules()
              if isinstance(m, torch.nn.Linear)}
    assert linear == set(ATTENTION)
    rows = []
    for seed in range(4):
        ids = doc_ids(48, seed)
        rows.append({"input_ids": ids, "labels": [-100] * 16 + ids[16:]})  # a prompt, then the trained part
    batch = {"input_ids": torch.tensor([r["input_ids"] for r in rows[:2]]),
             "labels": torch.tensor([r["labels"] for r in rows[:2]])}
    with torch.no_grad():
        loss = model(**batch).loss
        sinks = model.model.layers[0].self_attn.sinks
        kept = sinks.clone()
        sinks.fill_(8.0)  # a sink that takes most of each query's attention
        sunk = model(**batch).loss
        sinks.copy_(kept)
    assert not torch.isclose(loss, sunk, atol=1e-3), "the sinks do not reach the loss"
    args = training_args(training=recipe.training, checkpoint=recipe.checkpoint, distributed=recipe.distributed,
                         model=model, output_dir=str(tmp_path / "out"), has_eval=False)
    args["ddp_backend"] = None
    trainer = build_sft_trainer(model=model, tokenizer=AutoTokenizer.from_pretrained(model_dir),
                                peft_config=build_peft_config(recipe.peft), args=args, packed=False,
                                train_dataset=Dataset.from_list(rows), eval_dataset=None, callbacks=[])
    result = trainer.train()
    assert math.isfinite(result.training_loss) and result.training_loss > 0
    trained = trainer.model
    wrapped = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in trained.named_parameters() if ".lora_A" in n}
    assert wrapped == set(ATTENTION)
    moved = [n for n, p in trained.named_parameters() if ".lora_B" in n and p.abs().sum() > 0]
    assert len(moved) == 2 * len(ATTENTION)  # every wrapped projection of both layers
    assert not any(p.requires_grad for n, p in trained.named_parameters() if "lora_" not in n)
    assert trained.get_base_model().config._attn_implementation == "eager"

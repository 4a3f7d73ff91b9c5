"""The recipe catalogue (recipes/<family>/): every recipe validates and plans offline, says how
to run it, fits where it says it is sized for, and trains: per family, one step on a shrunken
config of the recipe's own architecture with its technique, LoRA targets and format. A format
the model family cannot be served with is refused at validation."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from data.errors import KeelError
from keel.cli import planned_cluster
from trainer.models.known import CHAT_FAMILIES, known_models
from trainer.plan import Cluster, model_shape, plan
from trainer.models.config import load_config
from trainer.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
CATALOGUE = sorted(p for p in (REPO / "recipes").glob("*/*.yaml") if p.parent.name != "quickstart")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


@lru_cache(maxsize=None)
def shape_of(model_path: str, peft_key: str):
    recipe_peft = json.loads(peft_key)
    from trainer.recipe import PeftSection

    return model_shape(load_config(model_path), PeftSection(**recipe_peft))


def test_the_catalogue_covers_the_families_keel_serves():
    names = {rel(p) for p in CATALOGUE}
    assert len(names) >= 15
    for family, technique in (("llama", "sft"), ("llama", "dpo"), ("llama", "cpt"), ("qwen3", "sft"),
                              ("qwen3", "dpo"), ("qwen3", "cpt"), ("gemma", "sft"), ("gemma", "cpt")):
        assert any(n.startswith(f"recipes/{family}/") and f"-{technique}-" in n for n in names), (family, technique)
    for peft in ("lora", "qlora", "full"):
        assert any(n.endswith(f"-{peft}.yaml") for n in names), peft
    for distilled in ("qwen-7b", "llama-8b"):  # DeepSeek-R1-Distill on both bases
        assert f"recipes/deepseek/deepseek-r1-distill-{distilled}-sft-lora.yaml" in names
    for mistral in ("mistral-7b-v0.3", "mistral-small-24b-2501"):
        assert f"recipes/mistral/{mistral}-sft-lora.yaml" in names


@pytest.mark.parametrize("path", CATALOGUE, ids=rel)
def test_recipe_validates_documents_itself_and_fits_where_it_is_sized_for(path):
    recipe = load_recipe(path)
    text = path.read_text()
    head = text.splitlines()[:3]
    # the name says what it is: <model>-<technique>-<peft>
    technique, peft = path.stem.rsplit("-", 2)[1:]
    assert recipe.technique == technique
    assert recipe.peft.kind == ("none" if peft == "full" else peft)
    assert head[0].startswith(f"# keel train {rel(path)} ") and head[1].startswith(f"# keel launch {rel(path)} ")
    assert recipe.model.path in known_models(), "the model's architecture must be kept offline"
    assert f"({recipe.model.path})" in text and "s3://" in text and "local directory" in text
    # the recipe carries the cluster it is sized for, and `keel plan RECIPE` (no flags) sizes it there
    assert recipe.cluster is not None, "every catalogue recipe states its cluster"
    assert f"# keel plan {rel(path)}\n" in text
    assert f"Sized for {recipe.cluster.nodes} node" in text and recipe.cluster.gpu in text
    cluster = planned_cluster(recipe.cluster)
    assert (cluster.gpu, cluster.nodes, cluster.gpus_per_node) == (
        recipe.cluster.gpu, recipe.cluster.nodes, recipe.cluster.gpus_per_node)
    if recipe.peft.kind == "qlora":  # QLoRA runs on one GPU per process, no sharding (validated)
        assert recipe.distributed.strategy in ("ddp", "zero1", "zero2")
    result = plan(recipe, cluster, load_config(recipe.model.path))
    assert result.fits, f"{rel(path)}: {result.estimate.total / 2**30:.1f} GiB; {result.suggestion}"
    assert result.step is not None and 0 < result.step.seconds < 600
    assert recipe.training.seq_len <= result.shape.max_positions


# three CLI processes; none imports torch or transformers any more (tests/unit/test_cli_imports.py)
def test_keel_plan_and_validate_run_offline_on_a_hub_id(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}
    path = rel(REPO / "recipes" / "qwen3" / "qwen3-8b-sft-lora.yaml")
    out = subprocess.run([sys.executable, "-m", "keel.cli", "plan", path, "--gpus-per-node", "8"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Qwen/Qwen3-8B: 8.19B parameters" in out.stdout and "step time" in out.stdout
    too_long = subprocess.run([sys.executable, "-m", "keel.cli", "plan", path, "training.seq_len=50000"],
                              capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert too_long.returncode == 1 and "beyond the model's 40960 positions" in too_long.stderr
    # the example: sized for 2 nodes in its cluster section, it fits with no flags
    full = subprocess.run([sys.executable, "-m", "keel.cli", "plan", "recipes/qwen3/qwen3-32b-sft-full.yaml"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert full.returncode == 0 and "fits" in full.stdout and "world size" in full.stdout, full.stdout + full.stderr
    one_node = subprocess.run([sys.executable, "-m", "keel.cli", "plan", "recipes/qwen3/qwen3-32b-sft-full.yaml",
                               "--nodes", "1"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert one_node.returncode == 1, "--nodes overrides the recipe's cluster"
    ok = subprocess.run([sys.executable, "-m", "keel.cli", "validate", *map(rel, CATALOGUE)],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr


# published total parameter counts (billions), from the model cards
PUBLISHED_B = {"meta-llama/Llama-3.2-1B": 1.24, "meta-llama/Llama-3.2-3B": 3.21, "meta-llama/Llama-3.1-8B": 8.03,
               "meta-llama/Llama-3.3-70B-Instruct": 70.6, "Qwen/Qwen3-0.6B": 0.6, "Qwen/Qwen3-1.7B": 1.7,
               "Qwen/Qwen3-4B": 4.0, "Qwen/Qwen3-8B": 8.2, "Qwen/Qwen3-14B": 14.8, "Qwen/Qwen3-32B": 32.8,
               "Qwen/Qwen3-30B-A3B": 30.5, "mistralai/Mistral-7B-Instruct-v0.3": 7.25,
               "mistralai/Mistral-Small-24B-Instruct-2501": 23.6, "google/gemma-3-1b-it": 1.0,
               # Gemma 3 27B: the text model (the report's embedding + non-embedding parameters; the
               # published checkpoint adds a 0.4B vision encoder that the kept config leaves out)
               "google/gemma-3-27b-it": 27.0,
               "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": 7.6, "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": 32.8,
               "openai/gpt-oss-20b": 20.9}


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED_B))
def test_kept_configs_have_the_published_sizes(hub_id):
    shape = shape_of(hub_id, json.dumps({}))
    assert shape.params / 1e9 == pytest.approx(PUBLISHED_B[hub_id], rel=0.02)
    if hub_id == "Qwen/Qwen3-30B-A3B":
        assert shape.active / 1e9 == pytest.approx(3.3, rel=0.05)  # "A3B": about 3B active per token


# --------------------------------------------------------------------------- format fit


def catalogue_recipe(*overrides):
    return load_recipe(REPO / "recipes" / "llama" / "llama-3.1-8b-sft-lora.yaml", list(overrides))


def test_a_format_the_model_family_cannot_hold_is_refused_at_validation():
    with pytest.raises(KeelError) as err:
        catalogue_recipe("model.format=hermes-qwen3")
    msg = str(err.value)
    assert "model.format: 'hermes-qwen3' does not fit meta-llama/Llama-3.1-8B-Instruct" in msg
    assert "<|im_start|>" in msg and "use model.format: llama3-json or native" in msg
    with pytest.raises(KeelError, match="does not fit Qwen/Qwen3-8B .*use model.format: hermes-qwen3"):
        catalogue_recipe("model.path=Qwen/Qwen3-8B", "model.format=llama3-json")
    # the same model from a local directory is checked at preparation (by its tokenizer), not here
    assert catalogue_recipe("model.path=./models/Llama-3.1-8B-Instruct", "model.format=hermes-qwen3")


def test_gpt_oss_takes_the_harmony_format_and_only_it():  # (and never packs: sinks)
    hub_id = "openai/gpt-oss-20b"
    for fmt in ("hermes-qwen3", "llama3-json", "native"):
        with pytest.raises(KeelError, match=f"model.format: '{fmt}' does not fit {re.escape(hub_id)} .*harmony.*"
                                            "use model.format: harmony"):
            catalogue_recipe(f"model.path={hub_id}", f"model.format={fmt}", "training.packing=false")
    assert catalogue_recipe(f"model.path={hub_id}", "model.format=harmony", "training.packing=false").model.format == "harmony"
    with pytest.raises(KeelError, match="does not fit meta-llama/Llama-3.1-8B-Instruct"):
        catalogue_recipe("model.format=harmony")  # and no other family speaks harmony
    assert CHAT_FAMILIES[known_models()[hub_id].chat].formats == ("harmony",)


@pytest.mark.parametrize("hub_id", ["deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"])
def test_deepseek_r1_distills_take_the_deepseek_r1_format_and_only_it(hub_id):
    """The distills keep their base's architecture (qwen2, llama) but not its chat tokens: the
    base's formats are refused with the fix, deepseek-r1 is accepted, and deepseek-r1 does not
    fit a model whose tokenizer lacks DeepSeek's tokens."""
    for fmt in ("hermes-qwen3", "llama3-json", "native"):
        with pytest.raises(KeelError, match=f"model.format: '{fmt}' does not fit {re.escape(hub_id)} .*"
                                            "use model.format: deepseek-r1"):
            catalogue_recipe(f"model.path={hub_id}", f"model.format={fmt}")
    assert catalogue_recipe(f"model.path={hub_id}", "model.format=deepseek-r1").model.format == "deepseek-r1"
    with pytest.raises(KeelError, match="'deepseek-r1' does not fit meta-llama/Llama-3.1-8B-Instruct"):
        catalogue_recipe("model.format=deepseek-r1")


def test_gemma_takes_the_gemma3_format_and_other_families_do_not():
    assert catalogue_recipe("model.path=google/gemma-3-27b-it", "model.format=gemma3").model.format == "gemma3"
    assert catalogue_recipe("model.path=google/gemma-3-1b-it", "model.format=native")
    with pytest.raises(KeelError, match=r"'llama3-json' does not fit google/gemma-3-1b-it .*<start_of_turn>.*"
                                        r"use model.format: gemma3 or native"):
        catalogue_recipe("model.path=google/gemma-3-1b-it")
    with pytest.raises(KeelError, match="'gemma3' does not fit meta-llama/Llama-3.1-8B-Instruct"):
        catalogue_recipe("model.format=gemma3")


@pytest.mark.parametrize("hub_id", ["mistralai/Mistral-7B-Instruct-v0.3", "mistralai/Mistral-Small-24B-Instruct-2501"])
def test_mistral_models_take_the_mistral_format_and_only_it(hub_id):
    """Both kept Mistral models take the mistral format; the others (native too: Keel has no
    native syntax for model type mistral) are refused with the fix, and the mistral format does
    not fit a model whose tokenizer lacks [INST]."""
    assert catalogue_recipe(f"model.path={hub_id}", "model.format=mistral").model.format == "mistral"
    for fmt in ("hermes-qwen3", "llama3-json", "gemma3", "native"):
        with pytest.raises(KeelError, match=rf"model.format: '{fmt}' does not fit {re.escape(hub_id)} .*\[INST\].*"
                                            "use model.format: mistral"):
            catalogue_recipe(f"model.path={hub_id}", f"model.format={fmt}")
    with pytest.raises(KeelError, match="'mistral' does not fit meta-llama/Llama-3.1-8B-Instruct"):
        catalogue_recipe("model.format=mistral")


def test_keel_validate_prints_the_format_error_and_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "recipes" / "qwen3" / "qwen3-8b-sft-lora.yaml").read_text()
                   .replace("format: hermes-qwen3", "format: llama3-json"))
    out = subprocess.run([sys.executable, "-m", "keel.cli", "validate", str(bad)], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 2
    assert "model.format: 'llama3-json' does not fit Qwen/Qwen3-8B" in out.stderr


# --------------------------------------------------------------------------- one step per family

# Shrunken architectures: the kept config with small widths; everything else (rope scaling,
# tied embeddings, q/k norms, expert routing) as published.
SHRINK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=32, max_position_embeddings=2048)
SHRINK_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
# Gemma 3 alternates 5 sliding-window layers with 1 global one: with two layers, one of each, and
# a window shorter than the rows, so the local mask is exercised.
SHRINK_SLIDING = dict(sliding_window=16, sliding_window_pattern=2)
STEP_RECIPES = ["llama/llama-3.1-8b-sft-lora.yaml", "llama/llama-3.1-8b-dpo-lora.yaml", "qwen3/qwen3-4b-cpt-full.yaml",
                "qwen3/qwen3-30b-a3b-sft-lora.yaml", "gemma/gemma-3-27b-sft-lora.yaml",
                "deepseek/deepseek-r1-distill-qwen-7b-sft-lora.yaml",  # qwen2 architecture, reasoning and fenced tool calls
                "mistral/mistral-small-24b-2501-sft-lora.yaml",  # mistral architecture, [INST] turns, listed tool calls
                # gpt_oss architecture (sinks, experts), harmony rendering: needs data/harmony.py (helper DATA);
                # tests/unit/test_gpt_oss_training.py trains the same targets on ids built directly
                "gpt-oss/gpt-oss-20b-sft-lora.yaml"]
# gpt-oss: its experts (num_local_experts), two layer types for two layers, no MXFP4 (random weights)
SHRINK_GPT_OSS = dict(num_local_experts=4, num_experts_per_tok=2, experts_per_token=2, sliding_window=16,
                      layer_types=["sliding_attention", "full_attention"], head_dim=64,
                      max_position_embeddings=131072)  # yarn: 32 x the original 4096, as published


@pytest.fixture(scope="module")
def shrunken_models(tmp_path_factory):
    """A shrunken random-init model dir per recipe model (tokenizer holding the format's tokens)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from data.formats import load_format
    from data.harmony_tokenizer import build_harmony_tokenizer
    from trainer.models.tiny import build_tokenizer

    built = {}

    def get(recipe):
        key = (recipe.model.path, recipe.model.format)
        if key not in built:
            fmt = load_format(recipe.model.format)
            tok = build_harmony_tokenizer() if fmt.harmony else build_tokenizer(fmt, vocab_size=512)
            config = dict(load_config(recipe.model.path))
            config.pop("quantization_config", None)
            shrink = {**SHRINK, **(SHRINK_MOE if "num_experts" in config else {}),
                      **(SHRINK_SLIDING if "sliding_window_pattern" in config else {}),
                      **(SHRINK_GPT_OSS if config["model_type"] == "gpt_oss" else {})}
            eos = tok.convert_tokens_to_ids(fmt.spec.stop_tokens[0])
            config.update(shrink, vocab_size=len(tok), eos_token_id=eos, bos_token_id=None,
                          pad_token_id=tok.convert_tokens_to_ids(fmt.spec.pad_token))
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
            out = tmp_path_factory.mktemp(recipe.model.path.replace("/", "--"))
            model.save_pretrained(out)
            tok.save_pretrained(out)
            built[key] = out
        return built[key]

    return get


def step_data(technique: str, fmt: str, path: Path) -> Path:
    from data.formats import load_format
    from data.synthetic import generate_documents, generate_preference_pairs, generate_tool_choice, write_jsonl

    rows = {"sft": generate_tool_choice, "dpo": generate_preference_pairs, "cpt": generate_documents}[technique](8)
    supports = load_format(fmt).spec.supports
    if technique == "sft" and not supports.tools:  # gemma3: the same questions, answered in text
        rows = [{"messages": [row["messages"][0], {"role": "assistant", "content": "I would ask the {} tool.".format(
            row["messages"][1]["tool_calls"][0]["function"]["name"])}]} for row in rows]
    if not supports.reasoning:  # no place for reasoning in that format (llama3-json, gemma3)
        for row in rows:
            for turn in row.get("messages", []) + row.get("chosen", []) + row.get("rejected", []):
                turn.pop("reasoning_content", None)
    write_jsonl(rows, path)
    return path


@pytest.mark.slow  # a TRL trainer per recipe: about 10 s each on 2 cores
@pytest.mark.parametrize("name", STEP_RECIPES)
def test_one_training_step_on_the_recipes_architecture_technique_targets_and_format(name, shrunken_models, tmp_path):
    import torch

    from trainer.train import build_model_parts, build_trainer, prepared_split, recipe_format

    recipe = load_recipe(REPO / "recipes" / name)
    model_dir = shrunken_models(recipe)
    recipe = load_recipe(REPO / "recipes" / name, [
        f"model.path={model_dir}", f"data.train={step_data(recipe.technique, recipe.model.format, tmp_path / 'd.jsonl')}",
        f"data.cache_dir={tmp_path / 'cache'}", "data.num_proc=1", "training.max_steps=1", "training.epochs=",
        "training.seq_len=1024", "training.warmup_ratio=0", "training.micro_batch_size=2", "training.grad_accum=1", "training.precision=fp32",
        "distributed.strategy=ddp", "checkpoint.every_steps=", "checkpoint.every_minutes="])
    fmt = recipe_format(recipe)
    assert fmt.name == recipe.model.format
    data = prepared_split(recipe, "train", 0, fmt)
    tok, model, peft_config = build_model_parts(recipe)  # what `keel train` builds, by the same seams
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = build_trainer(recipe, model=model, tokenizer=tok, peft_config=peft_config, train_data=data,
                            eval_data=None, output_dir=str(tmp_path / "out"), callbacks=[])
    assert data.packed == recipe.training.packing
    result = trainer.train()
    assert math.isfinite(result.training_loss) and result.training_loss > 0
    trained = trainer.model
    changed = {n for n, p in trained.named_parameters() if p.requires_grad}
    if recipe.peft.kind == "none":
        assert all(not torch.equal(before[n], p) for n, p in trained.named_parameters() if "norm" not in n)
    else:
        targets = recipe.peft.target_modules
        wrapped = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in changed if ".lora_A" in n}
        assert wrapped == (set(targets) if targets != "all-linear" else
                           {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
        moved = [n for n, p in trained.named_parameters() if ".lora_B" in n and p.abs().sum() > 0]
        assert moved, "the adapters did not change in the step"


def test_every_recipe_packs_where_packing_is_exact():
    """Packing is where Keel's training speed comes from (docs/training.md), and packed rows stay
    per document under every attention Keel selects (test_attention_selection.py): every recipe
    packs except DPO (pairs are never packed), GRPO (sampled completions are not packed; refused)
    and models with attention sinks (refused)."""
    from trainer.models.config import has_attention_sinks

    for path in CATALOGUE:
        r = load_recipe(path)
        exact = r.technique not in ("dpo", "grpo") and not has_attention_sinks(load_config(r.model.path))
        assert r.training.packing == exact, rel(path)

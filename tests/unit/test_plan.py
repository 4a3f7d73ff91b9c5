"""`keel plan` on real architecture configs (Llama 3.1 8B and 70B, written out here; no
weights: the planner reads config.json only). The arithmetic is checked against
published facts: parameter counts, 16 bytes per parameter for mixed-precision AdamW, and
QLoRA fitting a 65B-class model on one 48 GB GPU (Dettmers et al., 2023)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.plan import Cluster, GIB, estimate, model_shape, plan, render
from trainer.recipe import load_recipe

QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart" / "sft-tool-calling.yaml"
LLAMA_31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
               "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
               "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "rope_theta": 500000.0}
LLAMA_31_70B = {**LLAMA_31_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                "num_attention_heads": 64}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = {}
    for name, config in (("8b", LLAMA_31_8B), ("70b", LLAMA_31_70B)):
        d = tmp_path_factory.mktemp(name)
        (d / "config.json").write_text(json.dumps(config))
        dirs[name] = d
    return dirs


def recipe(model_dir, *overrides):
    return load_recipe(QUICKSTART, [f"model.path={model_dir}", "training.seq_len=2048", *overrides])


def test_parameter_counts_match_the_published_sizes(model_dirs):
    r = recipe(model_dirs["8b"])
    assert model_shape(LLAMA_31_8B, r.peft).params == pytest.approx(8.03e9, rel=0.005)
    assert model_shape(LLAMA_31_70B, r.peft).params == pytest.approx(70.55e9, rel=0.005)
    lora = recipe(model_dirs["8b"], "peft.kind=lora", "peft.r=16").peft
    # all-linear r=16 on Llama 3.1 8B: 16 x (in + out) summed over q,k,v,o,gate,up,down x 32 layers
    per_layer = 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3)
    assert model_shape(LLAMA_31_8B, lora).trainable == 32 * per_layer


def test_full_fine_tuning_states_are_16_bytes_per_parameter_and_shard_with_zero(model_dirs):
    shape = model_shape(LLAMA_31_8B, recipe(model_dirs["8b"]).peft)
    cluster = Cluster(gpu="h100-80gb", nodes=1, gpus_per_node=8)
    ddp = estimate(recipe(model_dirs["8b"]), shape, cluster)
    assert ddp.weights + ddp.gradients + ddp.optimizer == pytest.approx(16 * shape.params)
    z1, z2, z3 = (estimate(recipe(model_dirs["8b"], f"distributed.strategy={s}"), shape, cluster)
                  for s in ("zero1", "zero2", "zero3"))
    states = [e.weights + e.gradients + e.optimizer for e in (ddp, z1, z2, z3)]
    assert states == sorted(states, reverse=True) and states[3] < states[0] / 6  # each stage shards more
    offload = estimate(recipe(model_dirs["8b"], "distributed.strategy=zero3", "distributed.offload=optimizer"),
                       shape, cluster)
    assert offload.optimizer == 0


def test_checkpointing_cuts_activations_and_the_verdict_follows(model_dirs):
    r = recipe(model_dirs["8b"], "training.micro_batch_size=4")
    result = plan(r, Cluster(gpus_per_node=8), LLAMA_31_8B)
    assert not result.fits  # full fine-tuning of 8B with plain DDP: 120 GiB of states alone
    assert result.suggestion and "zero" in result.suggestion
    e = result.estimate
    assert e.activations_ckpt < e.activations_no_ckpt / 3
    fixed = recipe(model_dirs["8b"], "training.micro_batch_size=4", "distributed.strategy=zero3",
                   "training.gradient_checkpointing=true")
    assert plan(fixed, Cluster(gpus_per_node=8), LLAMA_31_8B).fits


def test_qlora_fits_a_70b_model_on_one_48gb_class_gpu(model_dirs):
    r = recipe(model_dirs["70b"], "peft.kind=qlora", "training.gradient_checkpointing=true", "training.seq_len=512")
    result = plan(r, Cluster(gpu="l40s-48gb", gpus_per_node=1), LLAMA_31_70B)
    assert result.fits, result.estimate.total / GIB
    full = plan(recipe(model_dirs["70b"]), Cluster(gpu="l40s-48gb", gpus_per_node=1), LLAMA_31_70B)
    assert not full.fits


def test_keel_plan_command(model_dirs, tmp_path):
    def keel_plan(*args):
        return subprocess.run([sys.executable, "-m", "keel.cli", "plan", str(QUICKSTART), *args],
                              capture_output=True, text=True, timeout=300)

    ok = keel_plan(f"model.path={model_dirs['8b']}", "peft.kind=lora", "training.gradient_checkpointing=true",
                   "--gpu", "h200-141gb", "--gpus-per-node", "1")
    assert ok.returncode == 0, ok.stderr
    for line in ("world size 1", "global 2 sequences", "memory per GPU", "verdict    fits", "training:"):
        assert line in ok.stdout, line
    too_big = keel_plan(f"model.path={model_dirs['70b']}", "--gpu", "h100-80gb", "--gpus-per-node", "8")
    assert too_big.returncode == 1 and "does NOT fit" in too_big.stdout and "smallest change" in too_big.stdout
    no_config = keel_plan(f"model.path={tmp_path}")
    assert no_config.returncode == 2 and "config.json" in no_config.stderr and "model.path" in no_config.stderr
    past_positions = keel_plan(f"model.path={model_dirs['8b']}", "training.seq_len=200000")
    assert past_positions.returncode == 1 and "beyond the model's 131072 positions" in past_positions.stderr



def test_cpu_plan_counts_fp32_states_ddp_buckets_and_deepspeed_partitions(tmp_path):
    """`--gpu cpu` arithmetic for the ~100M config of benchmarks/plan_calibration.py, whose measured
    peaks (benchmarks/results/plan_calibration.md) these terms were checked against."""
    from trainer.plan import CPU_DEEPSPEED_RUNTIME, CPU_HEAP_KEPT, OVERHEAD_FRACTION

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 768,
              "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
              "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 32000, "max_position_embeddings": 4096,
              "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    cpu2 = Cluster(gpu="cpu", nodes=1, gpus_per_node=2)

    def cpu_estimate(*overrides):
        r = load_recipe(QUICKSTART, [f"model.path={tmp_path}", "training.seq_len=512", "training.micro_batch_size=2",
                                     "training.precision=fp32", *overrides])
        shape = model_shape(config, r.peft)
        return estimate(r, shape, cpu2), shape

    ddp, shape = cpu_estimate()
    p = shape.params
    assert p == pytest.approx(100.09e6, rel=1e-3)
    # fp32 weights; gradients twice (DDP's buckets hold a copy); two fp32 AdamW moments
    assert (ddp.weights, ddp.gradients, ddp.optimizer) == (4 * p, 8 * p, 8 * p)
    tokens = 2 * 512
    assert ddp.activations == 12 * tokens * (8 * 768 + 4 * 2048) * 4 + tokens * 32000 * 16
    # the .grad tensors (4 bytes each) are made as backward frees the activations: only the larger counts
    assert ddp.not_together == 4 * p
    subtotal = ddp.weights + ddp.gradients + ddp.optimizer + ddp.activations - ddp.not_together
    assert ddp.overhead == pytest.approx(OVERHEAD_FRACTION * subtotal)
    # glibc's kept heap: a fitted share of what backward frees, less the gradients it makes; CPU only
    assert ddp.heap_kept == pytest.approx(CPU_HEAP_KEPT * ddp.activations - 4 * p)
    assert any("glibc" in n for n in ddp.notes)
    assert ddp.total == pytest.approx(subtotal + ddp.overhead + ddp.heap_kept)
    accumulating, _ = cpu_estimate("training.grad_accum=2")  # earlier micro-batches' gradients stay live
    assert accumulating.not_together == 0
    zero3, _ = cpu_estimate("distributed.strategy=zero3")
    # a half of each state per rank, plus the whole model gathered, the reduce bucket and
    # DeepSpeed's fp32 master partition; DeepSpeed's gradient buffers live through the step
    assert (zero3.weights, zero3.gradients, zero3.optimizer) == (4 * p / 2 + 4 * p, 4 * p / 2 + 4 * p, 12 * p / 2)
    assert zero3.not_together == 0
    subtotal = zero3.weights + zero3.gradients + zero3.optimizer + zero3.activations
    assert zero3.overhead == pytest.approx(CPU_DEEPSPEED_RUNTIME + OVERHEAD_FRACTION * subtotal)
    # ZeRO-3's gathered parameters are freed by backward too
    assert zero3.heap_kept == pytest.approx(CPU_HEAP_KEPT * (zero3.activations + 4 * p) - 4 * p)
    lora, lora_shape = cpu_estimate("peft.kind=lora")
    t = lora_shape.trainable  # r=16 on every linear layer: 2.6M
    assert t == 12 * 16 * ((768 + 768) * 2 + (768 + 256) * 2 + (768 + 2048) * 3)
    assert (lora.weights, lora.gradients, lora.optimizer) == (4 * p, 8 * t, 8 * t)
    assert lora.not_together == 4 * t
    # no malloc heap term on a GPU: tensors live in the CUDA caching allocator
    r = load_recipe(QUICKSTART, [f"model.path={tmp_path}", "training.seq_len=512", "training.micro_batch_size=2"])
    assert estimate(r, model_shape(config, r.peft), Cluster(gpu="h100-80gb", nodes=1, gpus_per_node=2)).heap_kept == 0
    # what `keel plan --gpu cpu` prints: per process, with the heap and not-together lines
    text = render(plan(load_recipe(QUICKSTART, [f"model.path={tmp_path}", "training.seq_len=512",
                                                "training.micro_batch_size=2", "training.precision=fp32"]),
                       cpu2, config))
    assert "memory per process" in text and "memory per GPU" not in text
    assert "  malloc heap " in text and "  not together " in text and "glibc" in text


def test_a_lora_base_is_held_in_bf16_on_gpus_as_peers_hold_it(model_dirs):
    """Llama 3.1 8B under LoRA: the frozen base in bf16 (2 bytes per parameter, ~15 GiB, what
    peers report), the adapters in fp32; on CPU (fp32 runs) the base stays fp32. The loader makes
    the same choice (trainer/models/loading.py, tested in test_bf16_lora.py)."""
    r = recipe(model_dirs["8b"], "peft.kind=lora", "peft.r=16")
    shape = model_shape(LLAMA_31_8B, r.peft)
    gpu = estimate(r, shape, Cluster(gpu="h100-80gb", nodes=1, gpus_per_node=8))
    frozen = shape.params - shape.trainable
    assert gpu.weights == 2 * frozen + 4 * shape.trainable
    assert 14.5 * GIB < gpu.weights < 16 * GIB
    assert any("bf16" in note for note in gpu.notes)
    cpu = estimate(r, shape, Cluster(gpu="cpu", nodes=1, gpus_per_node=1))
    assert cpu.weights == 4 * shape.params
    # under DeepSpeed the LoRA base is bf16 too (DeepSpeed casts the module), adapters' master copy fp32
    z3 = estimate(recipe(model_dirs["8b"], "peft.kind=lora", "peft.r=16", "distributed.strategy=zero3"), shape,
                  Cluster(gpu="h100-80gb", nodes=1, gpus_per_node=8))
    assert z3.weights < gpu.weights


def test_grpo_counts_its_rollouts_and_its_kl_reference(model_dirs):
    """GRPO holds more than SFT: TRL's colocated vLLM keeps 30% of each GPU, transformers'
    generate a KV cache (8B: 8 key/value heads x 128 x 32 layers x 2 x bf16 = 128 KiB a token),
    and beta > 0 a frozen copy of the model (none under LoRA, where the base is the reference)."""
    grpo = ("technique=grpo", "grpo.rewards.tool_call=1", "training.packing=false")
    shape = model_shape(LLAMA_31_8B, recipe(model_dirs["8b"]).peft)
    h100 = Cluster(gpu="h100-80gb", nodes=1, gpus_per_node=8)
    sft = estimate(recipe(model_dirs["8b"], "distributed.strategy=zero3"), shape, h100)
    vllm = estimate(recipe(model_dirs["8b"], "distributed.strategy=zero3", *grpo), shape, h100)
    assert vllm.generation == pytest.approx(0.3 * h100.memory_gib * GIB)
    assert vllm.total == pytest.approx(sft.total + vllm.generation, rel=0.01)  # the rest as for SFT
    long = recipe(model_dirs["8b"], "distributed.strategy=zero3", *grpo, "grpo.generation=transformers",
                  "training.micro_batch_size=1", "training.grad_accum=64", "training.seq_len=8192",
                  "training.gradient_checkpointing=true")
    hf = estimate(long, shape, h100)  # TRL generates micro-batch x grad_accum completions at once
    kv = 64 * 8192 * 32 * 2 * 8 * 128 * 2
    assert hf.generation == pytest.approx(kv - hf.activations) and hf.generation > 0
    assert estimate(recipe(model_dirs["8b"], "distributed.strategy=zero3", *grpo, "grpo.beta=0.04"), shape,
                    h100).reference == pytest.approx(shape.params * 2 / 8)
    lora = recipe(model_dirs["8b"], *grpo, "grpo.beta=0.04", "peft.kind=lora")
    assert estimate(lora, model_shape(LLAMA_31_8B, lora.peft), h100).reference == 0
    text = render(plan(recipe(model_dirs["8b"], "distributed.strategy=zero3", *grpo), h100, LLAMA_31_8B))
    assert "generation" in text and "colocated vLLM" in text

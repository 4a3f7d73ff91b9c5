"""Engine settings derived from a model's config, what training recorded and the target.

Real architecture configs, written out here (nothing downloaded): Llama 3.1 8B and 70B as
their config.json files hold them, and the tiny quickstart model. Serving a real-size model on a
GPU is not possible on the CPU machines these tests run on; the arithmetic is what is checked.
"""

from __future__ import annotations

import pytest

from data.errors import KeelError
from data.model_dir import ExportInfo
from serving.engine import AdapterInfo, Target, engine_settings, estimate_parameters, kv_bytes_per_token

LLAMA_31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
               "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
               "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
LLAMA_31_70B = {**LLAMA_31_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                "num_attention_heads": 64}
TINY = {"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 1319,
        "max_position_embeddings": 4096, "tie_word_embeddings": True, "dtype": "float32"}
BF16_8K = ExportInfo(seq_len=8192, dtype="bfloat16")
H100 = 79.2  # GiB torch reports for an 80 GB H100


def test_parameter_estimate_matches_the_published_sizes():
    assert estimate_parameters(LLAMA_31_8B) == pytest.approx(8.03e9, rel=0.01)
    assert estimate_parameters(LLAMA_31_70B) == pytest.approx(70.6e9, rel=0.01)


def test_kv_cache_per_token():
    # 2 (K, V) x 32 layers x 8 kv heads x 128 dims x 2 bytes = 128 KiB per token
    assert kv_bytes_per_token(LLAMA_31_8B, "bfloat16", 1) == 128 * 1024
    # over 8 GPUs each holds one kv head
    assert kv_bytes_per_token(LLAMA_31_70B, "bfloat16", 8) == 2 * 80 * 1 * 128 * 2


def test_8b_on_one_gpu():
    s = engine_settings(LLAMA_31_8B, BF16_8K, Target(gpus=1, gpu_memory_gib=H100))
    assert s.args() == ["--max-model-len", "8192", "--dtype", "bfloat16", "--gpu-memory-utilization", "0.95"]
    # 0.95 x 79.2 GiB - 15 GiB of weights leaves about 60 GiB: ~490k tokens of KV cache
    assert 450_000 < s.kv_cache_tokens < 520_000


def test_70b_on_eight_gpus():
    s = engine_settings(LLAMA_31_70B, BF16_8K, Target(gpus=8, gpu_memory_gib=H100))
    assert s.tensor_parallel_size == 8 and s.gpu_memory_utilization == 0.95
    assert "--tensor-parallel-size" in s.args() and s.args()[s.args().index("--tensor-parallel-size") + 1] == "8"


def test_70b_does_not_fit_one_gpu():
    with pytest.raises(KeelError, match="does not fit.*more GPUs"):
        engine_settings(LLAMA_31_70B, BF16_8K, Target(gpus=1, gpu_memory_gib=H100))


def test_tensor_parallel_splits_the_heads_evenly():
    # 6 GPUs do not divide 64 heads: use 4 of them rather than fail at vLLM's start
    assert engine_settings(LLAMA_31_70B, BF16_8K, Target(gpus=6, gpu_memory_gib=H100)).tensor_parallel_size == 4


def test_small_gpu_keeps_more_headroom_fraction():
    s = engine_settings(LLAMA_31_8B, BF16_8K, Target(gpus=1, gpu_memory_gib=22.0))  # an A10G's 24 GB
    assert s.gpu_memory_utilization == pytest.approx(0.86, abs=0.01)


def test_max_model_len_is_the_training_length_within_the_positions():
    assert engine_settings(LLAMA_31_8B, ExportInfo(dtype="bfloat16"), Target()).max_model_len == 131072
    with pytest.raises(KeelError, match="longer than the model's 4096 positions"):
        engine_settings(TINY, ExportInfo(seq_len=8192), Target())


def test_tiny_on_cpu():
    s = engine_settings(TINY, ExportInfo(seq_len=1024, dtype="float32"), Target())
    assert s.args() == ["--max-model-len", "1024", "--dtype", "float32"]
    assert s.cpu_kvcache_space_gib == 1 and s.tensor_parallel_size == 1


def test_dtype_from_config_when_training_did_not_record_it():
    assert engine_settings(LLAMA_31_8B, ExportInfo(), Target()).dtype == "bfloat16"


def test_lora_rank_from_the_adapters():
    adapters = [AdapterInfo("a", "/a", 16), AdapterInfo("b", "/b", 24)]
    s = engine_settings(LLAMA_31_8B, BF16_8K, Target(gpus=1, gpu_memory_gib=H100), adapters)
    args = s.args()
    assert args[args.index("--max-lora-rank") + 1] == "32"  # 24 rounded up to a rank vLLM accepts
    assert args[args.index("--max-loras") + 1] == "2" and "--enable-lora" in args
    with pytest.raises(KeelError, match="above the largest rank"):
        engine_settings(TINY, ExportInfo(), Target(), [AdapterInfo("a", "/a", 1024)])


def test_target_needs_gpu_memory():
    with pytest.raises(KeelError, match="memory"):
        Target(gpus=2)

"""`keel tiny-model OUT_DIR`: a tiny base model built locally, nothing downloaded.

A random-init Llama- or Qwen3-style causal LM and a byte-level BPE tokenizer trained on text
the repository ships (data/corpus/ and the quickstart conversations), with the format's
delimiters (<think>, <tool_call>, ...) as single tokens. It is saved with `save_pretrained`,
exactly like a real base model, so every later step takes the same code path a real model
takes. head_dim is 64, which vLLM's CPU attention supports (16 is not supported).

`--arch gpt_oss` builds a tiny GptOssForCausalLM instead (format harmony only): gpt-oss's own
o200k_harmony tokenizer (data/harmony_tokenizer.py, vocab 201,088, built offline), attention
sinks, a few experts (top-2), yarn rope as published, and sliding-window attention on the even
layers, which is where vLLM's gpt_oss model puts it whatever `layer_types` says. Hidden and
expert sizes are multiples of 32 (vLLM's CPU MoE kernel). Saved in bf16, as published models are
(vLLM's CPU path loads and generates it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import data
from data.errors import KeelError
from data.formats import load_format

DATA_DIR = Path(data.__file__).resolve().parent  # the texts the data package ships
ARCHS = ("llama", "qwen3", "gpt_oss")
HARMONY = "harmony"  # the only format gpt_oss takes, and only gpt_oss takes it
# What the published gpt-oss configs say (trainer/models/architectures/gpt-oss-20b.json)
GPT_OSS_ROPE = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "original_max_position_embeddings": 4096, "truncate": False}
# generation_config of the published model: stop at <|return|>, <|endoftext|>, <|call|>
GPT_OSS_EOS = [200002, 199999, 200012]
GPT_OSS_PAD = 199999
GPT_OSS_BOS = 199998


def _corpus_lines(fmt) -> list[str]:
    from data.conversation import validate_conversation
    from data.prepare import read_jsonl
    from data.render import render_text

    lines = []
    for path in sorted((DATA_DIR / "corpus").glob("*.txt")):
        lines += path.read_text(encoding="utf-8").splitlines()
    for path in sorted((DATA_DIR / "examples").glob("*.jsonl")):
        for _, row in read_jsonl(path):
            if isinstance(row, dict):
                if not fmt.spec.supports.tools:  # the example rows all call tools: keep their text turns
                    row = {"messages": [m for m in row["messages"] if m["role"] != "tool" and not m.get("tool_calls")]}
                lines.append(render_text(validate_conversation(row, []), fmt=fmt))
    return lines


def build_tokenizer(fmt, vocab_size: int):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Runs of newlines are pieces of their own (as in Llama 3's and Qwen's pre-tokenizers): a
    # prompt ending in "\n\n" then tokenizes the same alone as before the assistant's text,
    # which the prefix check in data/render.py requires.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # Offsets untrimmed: the loss mask maps characters to tokens through them.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(fmt.spec.control_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(fmt), trainer=trainer)
    # Delimiters are ordinary (non-special) added tokens, as in Qwen3: one token each, and
    # kept in decoded text so vLLM's reasoning and tool parsers see them.
    delimiters = [t for t in fmt.single_tokens() if t not in fmt.spec.control_tokens]
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in delimiters])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=fmt.spec.end_of_turn,
        pad_token=fmt.spec.pad_token,
        clean_up_tokenization_spaces=False,
    )
    # The model carries its format's template as its own, as real chat models do (and as
    # `model.format: native` reads it).
    fast.chat_template = fmt.chat_template
    return fast


def build_config(arch: str, vocab_size: int, eos_id: int, pad_id: int, *, hidden: int, layers: int):
    from transformers import LlamaConfig, Qwen3Config

    if arch == "gpt_oss":
        return gpt_oss_config(hidden=hidden, layers=layers)

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64 + 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 128),
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        rope_theta=10000.0,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen3":
        return Qwen3Config(**common)
    raise KeelError(f"--arch {arch!r}: use one of {', '.join(ARCHS)}")


def gpt_oss_config(*, hidden: int, layers: int, experts: int = 4):
    """A tiny GptOssConfig shaped like the published one (yarn rope, sinks, alternating sliding
    window starting on layer 0, biased attention, experts top-2) and servable by vLLM's CPU path."""
    from transformers import GptOssConfig

    from data.harmony_tokenizer import VOCAB_SIZE

    heads = max(2, hidden // 64 * 2)  # even, so the key/value heads (half) divide them
    return GptOssConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=64,
        num_local_experts=experts, num_experts_per_tok=2, sliding_window=32,
        # vLLM's GptOss model slides on layer_idx % 2 == 0 and ignores layer_types: say the same here
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        max_position_embeddings=4096, rope_parameters=dict(GPT_OSS_ROPE), tie_word_embeddings=False,
        attention_bias=True, swiglu_limit=7.0, router_aux_loss_coef=0.9, output_router_logits=False,
        bos_token_id=GPT_OSS_BOS, eos_token_id=GPT_OSS_EOS[0], pad_token_id=GPT_OSS_PAD,
    )


def check_arch_format(arch: str, fmt_name: str) -> None:
    """gpt_oss takes the harmony format and only it; harmony needs gpt_oss."""
    if arch == "gpt_oss" and fmt_name != HARMONY:
        raise KeelError(f"--format {fmt_name}: --arch gpt_oss is trained and served with the harmony format only "
                        "(vLLM renders and parses gpt-oss through the harmony encoding, whatever the template); "
                        "use --format harmony or leave --format out")
    if arch != "gpt_oss" and fmt_name == HARMONY:
        raise KeelError(f"--format harmony: only --arch gpt_oss is served through harmony (vLLM uses it for model "
                        f"type gpt_oss only), so a {arch} model cannot speak it; use --arch gpt_oss, or another "
                        "format with this arch")


def build_tiny_model(out_dir: str | Path, *, arch: str = "llama", fmt_name: str | None = None,
                     vocab_size: int = 4096, hidden: int = 128, layers: int = 2, seed: int = 0) -> Path:
    if arch not in ARCHS:
        raise KeelError(f"--arch {arch!r}: use one of {', '.join(ARCHS)}")
    fmt_name = fmt_name or (HARMONY if arch == "gpt_oss" else "hermes-qwen3")
    check_arch_format(arch, fmt_name)
    if arch == "gpt_oss" and hidden % 32:
        raise KeelError(f"--hidden {hidden}: must be a multiple of 32 for gpt_oss (vLLM's CPU MoE kernel)")
    if arch != "gpt_oss" and hidden % 64:
        raise KeelError(f"--hidden {hidden}: must be a multiple of 64 (head_dim is 64)")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise KeelError(f"{out}: already exists and is not empty; choose a new directory or delete it")
    fmt = load_format(fmt_name)
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if arch == "gpt_oss":
        from data.harmony_tokenizer import build_harmony_tokenizer

        tokenizer = build_harmony_tokenizer()  # vocab_size is o200k_harmony's own
        eos_ids, pad_id = list(GPT_OSS_EOS), GPT_OSS_PAD
        gen_extra = {"bos_token_id": GPT_OSS_BOS}
    else:
        tokenizer = build_tokenizer(fmt, vocab_size)
        eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in fmt.spec.stop_tokens]
        pad_id = tokenizer.convert_tokens_to_ids(fmt.spec.pad_token)
        gen_extra = {}
    config = build_config(arch, len(tokenizer), eos_ids[0], pad_id, hidden=hidden, layers=layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if arch == "gpt_oss":
        model = model.to(torch.bfloat16)  # as published (bf16 weights once the MXFP4 experts are dequantized)
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=pad_id, **gen_extra)

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny {arch} model: {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}, "
          f"head_dim 64, format {fmt.name} -> {out}")
    return out

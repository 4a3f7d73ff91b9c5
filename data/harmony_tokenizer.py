"""gpt-oss's tokenizer (o200k_harmony) as a transformers tokenizer, built offline.

vLLM serves gpt-oss through OpenAI's harmony library: it renders the prompt to token ids with
the harmony encoding and parses the output ids with it, never consulting the model's tokenizer.
So a model Keel trains for that path must use exactly the encoding's ids. The encoding ships
inside the `openai_harmony` package (vLLM depends on it; its vocabulary is embedded, nothing is
downloaded), and this module turns it into a `PreTrainedTokenizerFast` with the same ids: the
byte-pair ranks become a BPE model with o200k's split pattern, and the 1,090 special tokens
(<|start|>, <|channel|>, <|message|>, <|end|>, <|return|>, <|call|>, ... and the reserved ones)
are added at their harmony ids. Tiny gpt-oss models (`keel tiny-model --arch gpt_oss`) carry
it; `same_ids_as_harmony` is the check that a model's tokenizer is this one.
"""

from __future__ import annotations

import base64
import tempfile
from functools import lru_cache
from pathlib import Path

from data.errors import KeelError

# Ids below this are byte-pair ranks; from it up to VOCAB_SIZE, special tokens.
FIRST_SPECIAL = 199998
VOCAB_SIZE = 201088
# o200k's pre-tokenizer pattern (the split tiktoken applies before byte-pair merging).
O200K_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
# Strings whose ids a tokenizer must share with the encoding to pass for it: words, numbers,
# whitespace runs, JSON, code, accents, CJK and emoji (pieces where BPE tokenizers differ).
PROBES = (
    "Hello, world! It's 18°C in Paris; they'll see.",
    "  leading spaces\tand tabs\n\n\nnewlines\r\n",
    '{"city": "Zürich", "days": [1, 22, 333, 4444]}',
    "def f(x):\n    return x ** 2  # square\n",
    "日本語のテキスト, 한국어, emoji 🙂🚀 and ÅÉÎÕÜ",
    "I'M SHOUTING, we'RE not; 1234567 3.14159",
)


@lru_cache(maxsize=1)
def harmony_lib():
    """The `openai_harmony` module (vLLM depends on it; Keel needs it only for gpt-oss)."""
    try:
        import openai_harmony
    except ImportError:
        raise KeelError("the harmony format needs the openai_harmony package, which vLLM installs "
                        "(pip install 'keel[cpu]' here, or vllm on a GPU machine)") from None
    return openai_harmony


@lru_cache(maxsize=1)
def harmony_encoding():
    """The gpt-oss harmony encoding (loaded from the `openai_harmony` package, offline)."""
    h = harmony_lib()
    return h.load_harmony_encoding(h.HarmonyEncodingName.HARMONY_GPT_OSS)


@lru_cache(maxsize=1)
def special_token_names() -> tuple[str, ...]:
    """The text of every special token, in id order from FIRST_SPECIAL (<|startoftext|>, ...,
    <|start|>, ..., <|reserved_200017|>, ...)."""
    enc = harmony_encoding()
    return tuple(enc.decode([i]) for i in range(FIRST_SPECIAL, VOCAB_SIZE))


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    enc = harmony_encoding()
    with tempfile.TemporaryDirectory() as tmp:
        ranks = Path(tmp) / "o200k_harmony.tiktoken"
        with ranks.open("w", encoding="ascii") as f:
            for rank in range(FIRST_SPECIAL):
                f.write(f"{base64.b64encode(bytes(enc._inner.decode_bytes([rank]))).decode()} {rank}\n")
        tok = TikTokenConverter(vocab_file=str(ranks), pattern=O200K_PATTERN).converted()
    tok.add_special_tokens([AddedToken(name, normalized=False, special=True) for name in special_token_names()])
    return tok.to_str()


def build_harmony_tokenizer():
    """A PreTrainedTokenizerFast equal to o200k_harmony (ids, specials at their ids); about 10 s
    the first time in a process."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                  bos_token="<|startoftext|>", eos_token="<|return|>", pad_token="<|endoftext|>",
                                  clean_up_tokenization_spaces=False)
    if len(tok) != VOCAB_SIZE:
        raise KeelError(f"the harmony tokenizer built has {len(tok)} tokens, not {VOCAB_SIZE}: the installed "
                        "openai_harmony encoding is not gpt-oss's o200k_harmony")
    return tok


def same_ids_as_harmony(tokenizer) -> str | None:
    """Why `tokenizer` is not the harmony encoding (None: it gives the same ids on every special
    token and on PROBES)."""
    enc = harmony_encoding()
    for i, name in enumerate(special_token_names(), start=FIRST_SPECIAL):
        if tokenizer.convert_tokens_to_ids(name) != i:
            return f"{name!r} is id {tokenizer.convert_tokens_to_ids(name)}, harmony has it at {i}"
    for text in PROBES:
        ours = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        theirs = enc.encode(text, allowed_special=set())
        if ours != theirs:
            return f"{text!r} tokenizes to {ours[:8]}..., harmony to {theirs[:8]}..."
    return None

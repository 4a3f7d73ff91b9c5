"""The gpt-oss tokenizer Keel builds offline gives harmony's ids: vLLM renders and parses gpt-oss
prompts with the harmony encoding, so a model trained on other ids would read garbage there."""

import random

import pytest

from data.harmony_tokenizer import FIRST_SPECIAL, VOCAB_SIZE, build_harmony_tokenizer, harmony_encoding, same_ids_as_harmony

pytestmark = pytest.mark.slow  # building the 201,088-token tokenizer takes about 12 s


@pytest.fixture(scope="module")
def tok():
    return build_harmony_tokenizer()


def test_special_tokens_sit_at_harmonys_ids_and_random_text_tokenizes_the_same(tok):
    enc = harmony_encoding()
    assert len(tok) == VOCAB_SIZE
    for name, i in {"<|start|>": 200006, "<|channel|>": 200005, "<|message|>": 200008, "<|end|>": 200007,
                    "<|return|>": 200002, "<|call|>": 200012, "<|constrain|>": 200003, "<|endoftext|>": 199999}.items():
        assert tok.convert_tokens_to_ids(name) == i
    rng = random.Random(0)
    alphabet = list("abcXYZ 0123456789\n\t.,;:'\"!?-_/\\()[]{}<>|éüß日本語🙂") + ["'s", "'LL", "  ", "\r\n"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
        assert tok(text, add_special_tokens=False)["input_ids"] == enc.encode(text, allowed_special=set()), text
    # a rendered harmony prompt (special tokens as text) reads back as the encoding's ids
    ids = enc.encode("<|start|>user<|message|>Hi there<|end|><|start|>assistant", allowed_special="all")
    assert tok(enc.decode(ids), add_special_tokens=False)["input_ids"] == ids
    assert all(i >= FIRST_SPECIAL for i in (ids[0], ids[-2]))


def test_saved_and_reloaded_it_still_passes_for_harmony_and_a_different_tokenizer_does_not(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "tok")
    assert same_ids_as_harmony(AutoTokenizer.from_pretrained(tmp_path / "tok")) is None
    tok.add_tokens(["<|start|>x"])  # an extra token is harmless while every id above still matches
    assert same_ids_as_harmony(tok) is None
    from data.formats import load_format
    from trainer.models.tiny import build_tokenizer

    other = build_tokenizer(load_format("hermes-qwen3"), vocab_size=512)
    assert "harmony has it at" in same_ids_as_harmony(other)

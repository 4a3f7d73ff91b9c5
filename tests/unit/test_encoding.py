"""Tokenizing rendered text piece by piece between added tokens (data/encoding.py) gives the
whole text's ids and token starts, and falls back to whole texts where that cannot be assumed."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from data.encoding import PieceEncoder
from data.formats import load_format
from data.model_loading import LoadPolicy, load_tokenizer
from data.render import render_text
from data.synthetic import generate_conversations


def _texts(fmt_name: str, seed: int) -> list[str]:
    """Rendered conversations, and strings that put added tokens against whitespace, newlines,
    other added tokens, partial markup and non-ASCII text."""
    fmt = load_format(fmt_name)
    texts = [render_text(c, fmt=fmt) for c in generate_conversations(40, seed=seed, long_tail=True)]
    rng = random.Random(seed)
    parts = [*fmt.single_tokens(), *fmt.spec.control_tokens, " ", "  ", "\n", "\n\n", "\t", "<", "|", ">", "<|",
             "think", "tool", "é", "日本", "🙂", "a", "word", " word", "{\"k\": 1}", "1234", "<|im", "_end|>"]
    texts += ["".join(rng.choice(parts) for _ in range(rng.randint(1, 30))) for _ in range(300)]
    return texts + ["", " ", "\n"]


@pytest.mark.parametrize("fmt_name", ["hermes-qwen3", "deepseek-r1"])
def test_pieces_give_the_whole_texts_ids_and_starts(fmt_name, tiny_model_for):
    tokenizer = load_tokenizer(tiny_model_for(fmt_name), LoadPolicy())
    pieces = PieceEncoder(tokenizer)
    assert pieces.split is not None  # the fast path is the one under test
    for text in _texts(fmt_name, seed=5):
        got, whole = pieces.encode(text), pieces._whole(text)
        assert np.array_equal(got[0], whole[0]) and np.array_equal(got[1], whole[1]), text
    assert pieces.split is not None  # no self-check found a difference
    assert pieces.cache  # repeated pieces were kept


def test_an_encoder_that_would_split_wrongly_falls_back_to_whole_texts(tiny_model):
    """Negative control of the self-check: split where the tokenizer does not (inside words)."""
    tokenizer = load_tokenizer(tiny_model, LoadPolicy())
    pieces = PieceEncoder(tokenizer)
    pieces.split = re.compile("o")
    pieces.anchors["o"] = pieces._whole("o")
    text = "hello world, how are you doing today"
    ids, starts = pieces.encode(text)
    assert pieces.split is None
    whole = pieces._whole(text)
    assert np.array_equal(ids, whole[0]) and np.array_equal(starts, whole[1])


def test_a_pre_tokenizer_that_looks_at_the_piece_position_keeps_whole_texts():
    """Metaspace with prepend_scheme 'first' marks only the text's first piece, so a piece alone
    would be tokenized differently: such a tokenizer is never split."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "▁a": 1, "a": 2, "▁": 3, "<x>": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.add_tokens(["<x>"], special_tokens=True)
    pieces = PieceEncoder(tokenizer)
    assert pieces.split is None
    ids, _ = pieces.encode("a<x>a")
    assert ids.tolist() == tokenizer("a<x>a", add_special_tokens=False)["input_ids"]

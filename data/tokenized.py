"""One source row -> its training examples as token-id arrays (or the reason it is invalid).

This is the per-row work of preparation: shape conversion, validation, rendering, truncation.
It runs in the preparing process or in worker processes (data/workers.py), on chunks of rows,
and returns plain arrays and counts, so the result is the same whichever process ran it.

    conversation   {input_ids, labels}       labels IGNORE_INDEX where not trained
    preference     {prompt_ids, chosen_ids, rejected_ids}   TRL's DPO columns
    document       {input_ids, labels}       every token trained; long documents split in order
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data.conversation import RowError, validate_conversation, validate_document, validate_preference
from data.formats import Format
from data.shapes import KINDS, to_canonical

IGNORE_INDEX = -100
COLUMNS = {"conversation": ("input_ids", "labels"), "document": ("input_ids", "labels"),
           "preference": ("prompt_ids", "chosen_ids", "rejected_ids")}


def _ids(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


@dataclass
class RowExamples:
    """What one source row became."""

    examples: list[dict[str, np.ndarray]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # per example kept
    trained: list[int] = field(default_factory=list)  # per example kept
    lengths: list[int] = field(default_factory=list)  # rendered length of each example, before truncation
    truncated: int = 0
    dropped: int = 0  # no trained token left after truncation
    documents_split: int = 0
    error: str | None = None

    def add(self, columns: dict[str, np.ndarray], tokens: int, trained: int) -> None:
        self.examples.append(columns)
        self.tokens.append(tokens)
        self.trained.append(trained)


def _conversation(out: RowExamples, conv: dict, tokenizer, fmt: Format, seq_len: int) -> None:
    from data.render import render_conversation_arrays

    rendered = render_conversation_arrays(validate_conversation(conv, fmt.row_rules()), tokenizer=tokenizer, fmt=fmt)
    if any(not (labels != IGNORE_INDEX).any() for _ids, labels in rendered):
        raise RowError("no token is trained (the loss mask is empty); the chat template marks no assistant text")
    for ids, labels in rendered:
        n = len(ids)
        out.lengths.append(n)
        if n > seq_len:
            out.truncated += 1
            ids, labels = ids[:seq_len], labels[:seq_len]
            if not (labels[1:] != IGNORE_INDEX).any():
                out.dropped += 1
                continue
        out.add({"input_ids": ids, "labels": labels}, len(ids), int((labels != IGNORE_INDEX).sum()))


def _preference(out: RowExamples, row: dict, tokenizer, fmt: Format, seq_len: int) -> None:
    from data.render import render_preference

    pair = render_preference(validate_preference(row, fmt.row_rules()), tokenizer=tokenizer, fmt=fmt)
    prompt, chosen, rejected = pair.prompt_ids, pair.chosen_ids, pair.rejected_ids
    longest = len(prompt) + max(len(chosen), len(rejected))
    out.lengths.append(longest)
    if longest > seq_len:  # keep the whole prompt, cut the answers
        out.truncated += 1
        room = seq_len - len(prompt)
        if room <= 0:
            out.dropped += 1
            return
        chosen, rejected = chosen[:room], rejected[:room]
    out.add({"prompt_ids": _ids(prompt), "chosen_ids": _ids(chosen), "rejected_ids": _ids(rejected)},
            len(prompt) + len(chosen) + len(rejected), len(chosen) + len(rejected))


def _document(out: RowExamples, row: dict, tokenizer, fmt: Format, seq_len: int) -> None:
    from data.render import render_document

    control = tuple(dict.fromkeys([*fmt.spec.control_tokens, *tokenizer.all_special_tokens]))
    ids = _ids(render_document(validate_document(row, control), tokenizer=tokenizer))
    out.lengths.append(len(ids))
    if len(ids) > seq_len:  # a long document becomes several examples, in order; none is cut away
        out.documents_split += 1
    for start in range(0, len(ids), seq_len):
        chunk = ids[start:start + seq_len]
        out.add({"input_ids": chunk, "labels": chunk.copy()}, len(chunk), len(chunk))


TOKENIZERS = {"conversation": _conversation, "preference": _preference, "document": _document}


def tokenize_row(raw, shape: str, *, tokenizer, fmt: Format, seq_len: int) -> RowExamples:
    """The examples of one row of `shape`; a row that is invalid comes back with `error` set and
    no examples (a row is kept whole or not at all)."""
    out = RowExamples()
    try:
        TOKENIZERS[KINDS[shape]](out, to_canonical(shape, raw), tokenizer, fmt, seq_len)
    except RowError as exc:
        return RowExamples(error=str(exc))
    return out

"""Packing: examples bin-packed into rows of at most seq_len tokens, attention kept per example.

Each packed row stores the lengths of the examples in it (`seq_lengths`, TRL's column name).
TRL's DataCollatorForLanguageModeling(padding_free=True) turns them into position ids that
restart at 0 for every example, and sets the first label of each example to IGNORE_INDEX.
From those position ids transformers gives each example its own attention: flash attention's
variable-length kernels where the model runs on them, and otherwise (SDPA, eager) a
block-diagonal causal mask built by masking_utils.find_packed_sequence_indices when no
attention_mask is passed. tests/unit/test_packing.py proves an example's logits inside a
packed row equal its logits alone.

Rows are filled best-fit decreasing (the longest example first, each into the fullest row it
still fits), one window of examples at a time so memory does not grow with the input; with
windows of millions of tokens the unused room is only in each window's last rows. Preference
pairs are never packed (DPO compares a pair's two answers after the same prompt).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence

import numpy as np

SEQ_LENGTHS = "seq_lengths"


def pack_examples(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: the indices of the examples in each row (in input order within a
    row); each row's lengths sum to at most seq_len. Deterministic for given lengths."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep input order
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, row index), sorted; full rows leave it
    for i in order:
        n = lengths[i]
        if not 0 < n <= seq_len:
            raise ValueError(f"example {i} has {n} tokens; packing needs 1..{seq_len}")
        k = bisect_left(room, (n, -1))  # the row with the least room that still fits n
        if k == len(room):
            rows.append([i])
            left, r = seq_len - n, len(rows) - 1
        else:
            left, r = room.pop(k)
            rows[r].append(i)
            left -= n
        if left > 0:
            insort(room, (left, r))
    return [sorted(row) for row in rows]


def pack_window(examples: list[dict[str, np.ndarray]], seq_len: int) -> dict[str, list[np.ndarray]]:
    """Columns of the packed rows of a window of examples, with `seq_lengths`."""
    lengths = [len(ex["input_ids"]) for ex in examples]
    columns: dict[str, list[np.ndarray]] = {name: [] for name in examples[0]} if examples else {}
    columns[SEQ_LENGTHS] = []
    for row in pack_examples(lengths, seq_len):
        for name in examples[0]:
            columns[name].append(np.concatenate([examples[i][name] for i in row]))
        columns[SEQ_LENGTHS].append(np.asarray([lengths[i] for i in row], dtype=np.int32))
    return columns

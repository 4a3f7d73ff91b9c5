"""Token ids of rendered text, and the character where each token starts, tokenized piece by
piece between added tokens, with repeated pieces tokenized once.

Rendered training text repeats itself: the system turn with its tool schemas, the turn
headers, the tool-call wrappers. On the long-tailed synthetic conversations about 70% of the
characters are in pieces seen before, and tokenizing was half of preparation time.

Why a piece can be tokenized alone: a `tokenizers` fast tokenizer first splits the text at the
added tokens it matches before normalizing (leftmost-longest, without overlap), and normalizes,
pre-tokenizes and runs the model on each piece between them on its own. So the text between
two such tokens gets the same ids in the whole text as alone, and the whole text's ids are the
pieces' ids with the added tokens' ids between them. This module splits where the tokenizer
would (every added token matched before normalization, longest first), and only at added
tokens whose match depends on nothing around them (no lstrip, rstrip or single_word rule).

Where that reasoning does not hold, the whole text is tokenized as before:
- a tokenizer that is not a `tokenizers` fast tokenizer, or that splits special tokens;
- a tokenizer with a single_word added token, or with a pre-tokenizer that looks at where a
  piece sits in the text (Metaspace with prepend_scheme "first": it adds its prefix only to
  the text's first piece);
- and, as a check of all the above on real data, each encoder compares its first
  SELF_CHECKS texts with the whole text's tokenization, and falls back for good on a
  difference (tests/unit/test_encoding.py holds both paths equal on varied text).
"""

from __future__ import annotations

import json
import re
import weakref

import numpy as np

SELF_CHECKS = 8  # texts per encoder compared with whole-text tokenization before trusting the pieces
CACHE_PIECES = 16384  # pieces kept; the cache is emptied when full (tool schemas come back at once)
CACHE_PIECE_CHARS = 65536  # longer pieces are tokenized each time, not kept
ORDER_SAFE = {"ByteLevel", "Split", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit", "BertPreTokenizer",
              "UnicodeScripts", "CharDelimiterSplit", "FixedLength", "Sequence"}


def backend_of(tokenizer):
    """The tokenizers backend of a fast tokenizer, set up as `tokenizer(text,
    add_special_tokens=False)` sets it up (no truncation, no padding, special tokens matched
    unless the tokenizer splits them), or None: then the tokenizer itself is called.

    Calling the backend straight skips transformers' per-call wrapping (argument checks, a
    BatchEncoding per text), which cost about a tenth of preparation; the ids and offsets are
    the backend's own either way."""
    backend = getattr(tokenizer, "_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or not hasattr(backend, "encode"):
        return None
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    split = bool(getattr(tokenizer, "split_special_tokens", False))
    if backend.encode_special_tokens != split:
        backend.encode_special_tokens = split
    return backend


def _pre_tokenizers_order_safe(node) -> bool:
    """Every pre-tokenizer in the backend's JSON treats each piece the same wherever it sits."""
    if node is None:
        return True
    if isinstance(node, list):
        return all(_pre_tokenizers_order_safe(n) for n in node)
    kind = node.get("type")
    if kind not in ORDER_SAFE:
        return False
    return _pre_tokenizers_order_safe(node.get("pretokenizers"))


class PieceEncoder:
    """encode(text) -> (ids int32, starts int64), equal to the backend's whole-text encoding."""

    def __init__(self, tokenizer):
        self.tokenizer = weakref.proxy(tokenizer)  # held in _ENCODERS under the tokenizer: no cycle keeping it
        self.backend = backend_of(tokenizer)
        self.split, self.anchors = None, {}
        self._capture_of, self._capture = None, None  # self.split as re.split's pattern with the match kept
        self.cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.checks_left = SELF_CHECKS
        if self.backend is not None and not self.backend.encode_special_tokens:
            self._plan()

    def _plan(self) -> None:
        spec = json.loads(self.backend.to_str())
        if not _pre_tokenizers_order_safe(spec.get("pre_tokenizer")):
            return
        decoder = getattr(self.tokenizer, "added_tokens_decoder", None) or {}
        first_pass = [t for t in decoder.values() if not t.normalized]
        if not first_pass or any(t.single_word for t in decoder.values()):
            return
        contents = sorted({t.content for t in first_pass if t.content}, key=len, reverse=True)
        # longest first: at one position, a regex alternation takes the first that matches
        self.split = re.compile("|".join(map(re.escape, contents)))
        for i, t in decoder.items():
            if not (t.normalized or t.lstrip or t.rstrip) and t.content and not t.content.isspace():
                self.anchors[t.content] = (np.asarray([i], dtype=np.int32), np.zeros(1, dtype=np.int64))

    def _whole(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        if self.backend is None:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
        else:
            enc = self.backend.encode(text, add_special_tokens=False)
            ids, offsets = enc.ids, enc.offsets
        starts = np.fromiter((start for start, _end in offsets), dtype=np.int64, count=len(ids))
        return np.asarray(ids, dtype=np.int32), starts

    def _piece(self, piece: str) -> tuple[np.ndarray, np.ndarray]:
        held = self.cache.get(piece)
        if held is None:
            held = self._whole(piece)
            if len(piece) <= CACHE_PIECE_CHARS:
                if len(self.cache) >= CACHE_PIECES:
                    self.cache.clear()
                self.cache[piece] = held
        return held

    def _pieces(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """The pieces and the added tokens between them from re.split (in C), which alternates them,
        instead of a Python step per match; a match that is not an anchor (its whitespace rules look
        around it) stays inside its piece, which _pieces_by_match does."""
        if self._capture_of is not self.split:
            self._capture_of, self._capture = self.split, re.compile(f"({self.split.pattern})")
        if self._capture.groups != 1:
            return self._pieces_by_match(text)
        ids, starts, bases = [], [], []
        cache, anchors, at = self.cache, self.anchors, 0
        for i, part in enumerate(self._capture.split(text)):
            if i & 1:
                held = anchors.get(part)
                if held is None:
                    return self._pieces_by_match(text)
            elif not part:
                continue
            else:
                held = cache.get(part)
                if held is None:
                    held = self._piece(part)
            ids.append(held[0]), starts.append(held[1]), bases.append(at)
            at += len(part)
        return self._join(ids, starts, bases)

    @staticmethod
    def _join(ids: list, starts: list, bases: list) -> tuple[np.ndarray, np.ndarray]:
        if not ids:
            return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
        counts = [len(a) for a in ids]
        return np.concatenate(ids), np.concatenate(starts) + np.repeat(np.asarray(bases, dtype=np.int64), counts)

    def _pieces_by_match(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids, starts, bases = [], [], []
        at = 0
        for m in self.split.finditer(text):
            anchor = self.anchors.get(m.group())
            if anchor is None:  # matched, but its whitespace rules look around it: stays inside a piece
                continue
            if m.start() > at:
                part = self._piece(text[at:m.start()])
                ids.append(part[0]), starts.append(part[1]), bases.append(at)
            ids.append(anchor[0]), starts.append(anchor[1]), bases.append(m.start())
            at = m.end()
        if at < len(text):
            part = self._piece(text[at:])
            ids.append(part[0]), starts.append(part[1]), bases.append(at)
        return self._join(ids, starts, bases)

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        if self.split is None:
            return self._whole(text)
        ids, starts = self._pieces(text)
        if self.checks_left > 0:
            self.checks_left -= 1
            whole = self._whole(text)
            if not (np.array_equal(ids, whole[0]) and np.array_equal(starts, whole[1])):
                self.split = None  # this tokenizer does not split as assumed: whole texts from now on
                return whole
        return ids, starts


# tokenizer -> its encoder, for as long as the tokenizer lives (each preparation loads its own)
_ENCODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def piece_encoder(tokenizer) -> PieceEncoder:
    held = _ENCODERS.get(tokenizer)
    if held is None:
        held = _ENCODERS[tokenizer] = PieceEncoder(tokenizer)
    return held

"""Render validated rows into token ids and a loss mask, with the format's template.

The chat template is the one definition of the prompt format. Its `{% generation %}` blocks
mark what the assistant writes (reasoning, content, tool calls and the end-of-turn token);
those characters are trained, everything else (system, user, tool results, turn headers) is
not. The text is rendered by transformers' own Jinja renderer, the one vLLM calls at serving
time (with the tokenizer's special tokens as template variables, as apply_chat_template
passes them), and tokenized whole, as the server tokenizes a prompt.

A template without generation markers (a model's own, see data/formats/native.py) gets its
mask another way: each assistant turn is what rendering the conversation up to that turn
adds to the prompt rendered for it with add_generation_prompt, up to the end-of-turn token.
That needs the template to be prefix-stable there; where it is not, the row is refused.

Which turns are trained (the format's train_on and history_reasoning, set from the recipe):
    train_on all, history kept      one example per conversation, every assistant turn
    train_on all, history dropped   one example per stretch between user messages, its turns
    train_on last                   one example per conversation, its last assistant turn
A tool list written before the last user message (mistral's tool_list_at: last_user_turn) splits
a conversation with tools the way dropped history does, for the same reason.

The harmony format (gpt-oss) has no chat template: vLLM renders its prompts to token ids with
OpenAI's harmony encoding, and data/harmony.py renders training examples the same way; the
functions below hand such a format to it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from transformers.utils.chat_template_utils import render_jinja_template

from data.conversation import RowError
from data.encoding import backend_of, piece_encoder
from data.errors import KeelError
from data.formats import Format

IGNORE_INDEX = -100


@dataclass(frozen=True)
class RenderedExample:
    input_ids: list[int]
    labels: list[int]  # the token id where trained, IGNORE_INDEX elsewhere

    @property
    def trained_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass(frozen=True)
class RenderedPair:
    """A preference pair as TRL's DPO trainer takes it pre-tokenized."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def check_tokenizer(tokenizer, fmt: Format, where: str) -> None:
    """Each delimiter and control token of the format must be one token of the tokenizer; for
    harmony, the tokenizer must give the harmony encoding's ids (vLLM renders and parses gpt-oss
    by those ids, whatever the model's tokenizer says)."""
    if fmt.harmony:
        from data.harmony_tokenizer import same_ids_as_harmony

        problem = same_ids_as_harmony(tokenizer)
        if problem:
            raise KeelError(
                f"{where}: format {fmt.name!r} needs gpt-oss's o200k_harmony tokenizer (vLLM renders the prompt and "
                f"parses the output with the harmony encoding's ids), and this one differs: {problem}. Use the "
                "published gpt-oss tokenizer, or build a tiny model with it: keel tiny-model --arch gpt_oss"
            )
        return
    missing = [
        tok for tok in fmt.single_tokens() if len(tokenizer.encode(tok, add_special_tokens=False)) != 1
    ]
    if missing:
        raise KeelError(
            f"{where}: the tokenizer does not hold {', '.join(map(repr, missing))} as single tokens, "
            f"which format {fmt.name!r} needs (vLLM's parsers match them by token id). Add them to the "
            "tokenizer (tokenizer.add_tokens) and resize the model's embeddings, or pick a format "
            "that matches the model."
        )


def _special_tokens(tokenizer) -> dict:
    return dict(getattr(tokenizer, "special_tokens_map", None) or {})


def _render(messages: list[dict], tools, fmt: Format, special: dict, *, add_generation_prompt=False,
            with_spans=False):
    rendered, spans = render_jinja_template(
        conversations=[messages], tools=tools or None, chat_template=fmt.chat_template,
        return_assistant_tokens_mask=with_spans, add_generation_prompt=add_generation_prompt, **special,
    )
    return rendered[0], (spans[0] if with_spans else None)


def assistant_spans(messages: list[dict], tools, fmt: Format, special: dict, indices: list[int]):
    """The rendered text and the character span of each assistant message in `indices`."""
    if fmt.has_generation_markers:
        text, spans = _render(messages, tools, fmt, special, with_spans=True)
        order = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if len(spans) != len(order):
            raise KeelError(
                f"format {fmt.name!r}: the chat template marked {len(spans)} generation blocks for "
                f"{len(order)} assistant turns; each assistant turn needs one {{% generation %}} block"
            )
        return text, [spans[order.index(i)] for i in indices]
    text, _ = _render(messages, tools, fmt, special)
    out = []
    for i in indices:
        before, _ = _render(messages[:i], tools, fmt, special, add_generation_prompt=True)
        upto, _ = _render(messages[: i + 1], tools, fmt, special)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise RowError(
                f"messages[{i}]: the chat template has no {{% generation %}} markers and does not render the "
                "prompt for this turn as a prefix of the conversation, so the loss mask cannot be found; "
                "use a template with generation markers"
            )
        end = upto.find(fmt.spec.end_of_turn, len(before))
        if end < 0:
            raise RowError(f"messages[{i}]: the rendered turn does not end with {fmt.spec.end_of_turn!r}")
        out.append((len(before), end + len(fmt.spec.end_of_turn)))
    return text, out


def split_examples(messages: list[dict], fmt: Format, tools=None) -> list[tuple[int, list[int]]]:
    """(end, trained assistant indices) of each example of a conversation with these tools."""
    spec = fmt.spec
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if spec.train_on == "last":
        return [(len(messages), assistants[-1:])]
    moving_tools = bool(tools) and spec.tool_list_at == "last_user_turn"
    if (spec.history_reasoning == "keep" or not spec.supports.reasoning) and not moving_tools:
        return [(len(messages), assistants)]
    # History reasoning dropped: the template renders an assistant turn differently once a later
    # user message exists. Training every turn inside the full conversation would teach the
    # model to answer without reasoning, so each stretch of assistant turns between two user
    # messages becomes its own example, rendered the way the server will see it then. The same
    # holds for a tool list written before the last user message (mistral): in the whole
    # conversation the earlier turns would be trained without the tools their prompt has.
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    out = []
    for start, end in zip(users, users[1:] + [len(messages)]):
        trained = [i for i in assistants if start < i < end]
        if trained:
            out.append((end, trained))
    return out


def _encode(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `text` (no special tokens added) and the character where each token starts,
    as int32 and int64 arrays (data/encoding.py: the tokenizer's own ids, repeated pieces
    tokenized once)."""
    return piece_encoder(tokenizer).encode(text)


_ANCHORS: dict[int, tuple[object, dict[int, str]]] = {}  # id(tokenizer) -> (tokenizer, its anchors)


def _anchors(tokenizer) -> dict[int, str]:
    """Added tokens the tokenizer matches in the text before anything else (no lstrip, rstrip or
    single_word rule, not normalized), by id: the text on either side of one is tokenized
    independently of the other side."""
    held = _ANCHORS.get(id(tokenizer))
    if held is None or held[0] is not tokenizer:
        decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
        held = (tokenizer, {i: t.content for i, t in decoder.items()
                            if not (t.lstrip or t.rstrip or t.single_word or t.normalized)})
        _ANCHORS[id(tokenizer)] = held
    return held[1]


def _prompt_tokens_fast(tokenizer, text: str, ids: np.ndarray, starts: np.ndarray, start: int) -> int | None:
    """How many tokens the prompt text[:start] has when they begin `ids`, found by tokenizing only
    text[p:start], where p is the last added token of the prompt (see _anchors): tokenizers
    split the text at added tokens first, so tokenizing text[:start] gives ids[:k] (the text
    before p, tokenized as in the whole text) followed by the tokens of text[p:start]. None when
    there is no such token, or when text[p:start] does not tokenize as `ids` does there (then the
    whole prompt is tokenized, which says precisely whether and how it differs)."""
    backend = backend_of(tokenizer)
    if backend is None or backend.encode_special_tokens:
        return None
    anchors = _anchors(tokenizer)
    k = int(np.searchsorted(starts, start, side="left")) - 1
    while k >= 0:
        content = anchors.get(int(ids[k]))
        p = int(starts[k])
        if content is not None and text.startswith(content, p) and p + len(content) <= start:
            break
        k -= 1
    if k < 0:
        return None
    tail = piece_encoder(tokenizer).encode(text[p:start])[0]
    if not np.array_equal(ids[k:k + len(tail)], tail):
        return None
    return k + len(tail)


def _check_boundary(tokenizer, text: str, ids: np.ndarray, start: int, index: int,
                    starts: np.ndarray | None = None) -> int:
    """Tokens of the prompt the server builds for this turn; they must begin the training ids."""
    if starts is not None and bool((starts[1:] >= starts[:-1]).all()):
        n = _prompt_tokens_fast(tokenizer, text, ids, starts, start)
        if n is not None:
            return n
    prompt_ids = tokenizer(text[:start], add_special_tokens=False)["input_ids"]
    if not np.array_equal(ids[: len(prompt_ids)], prompt_ids):
        around = text[max(0, start - 12): start + 12]
        raise RowError(
            f"messages[{index}]: the prompt the server renders for this turn ends inside a token of the "
            f"training text (around {around!r}), so the model would learn to continue from tokens it never "
            "sees at serving; this happens when the turn begins with whitespace; strip it"
        )
    return len(prompt_ids)


def render_conversation(conversation: dict, *, tokenizer, fmt: Format) -> list[RenderedExample]:
    """Token ids and labels of a validated conversation, one example per stretch of trained turns."""
    return [RenderedExample(ids.tolist(), labels.tolist())
            for ids, labels in render_conversation_arrays(conversation, tokenizer=tokenizer, fmt=fmt)]


def render_conversation_arrays(conversation: dict, *, tokenizer, fmt: Format) -> list[tuple[np.ndarray, np.ndarray]]:
    """render_conversation's examples as (input_ids, labels) int32 arrays, as the cache stores them."""
    if fmt.harmony:  # token ids straight from the harmony encoding (check_tokenizer holds the tokenizer to it)
        from data import harmony

        out = []
        for ids, mask in harmony.render_conversation(conversation, fmt):
            ids = np.asarray(ids, dtype=np.int32)
            out.append((ids, np.where(np.asarray(mask, dtype=bool), ids, IGNORE_INDEX).astype(np.int32)))
        return out
    messages, tools = conversation["messages"], conversation.get("tools") or None
    special = _special_tokens(tokenizer)
    examples = []
    for end, trained in split_examples(messages, fmt, tools):
        text, spans = assistant_spans(messages[:end], tools, fmt, special, trained)
        ids, starts = _encode(tokenizer, text)
        for index, (start, _) in zip(trained, spans):
            _check_boundary(tokenizer, text, ids, start, index, starts)
        # a token is trained when it starts inside an assistant span (vectorized: this loop over
        # every token was a sixth of preparation time)
        trained_mask = np.zeros(len(ids), dtype=bool)
        for s, e in spans:
            trained_mask |= (starts >= s) & (starts < e)
        ids = np.asarray(ids, dtype=np.int32)
        examples.append((ids, np.where(trained_mask, ids, np.int32(IGNORE_INDEX)).astype(np.int32)))
    return examples


def _answer_ids(tokenizer, fmt: Format, special: dict, prompt: list[dict], answer: dict, tools):
    messages = [*prompt, answer]
    text, [(start, end)] = assistant_spans(messages, tools, fmt, special, [len(prompt)])
    ids, starts = _encode(tokenizer, text)
    n = _check_boundary(tokenizer, text, ids, start, len(prompt), starts)
    answer_ids = [t for t, s in zip(ids[n:].tolist(), starts[n:].tolist()) if s < end]
    return ids[:n].tolist(), answer_ids


def render_preference(pair: dict, *, tokenizer, fmt: Format) -> RenderedPair:
    """Prompt, chosen and rejected token ids of a validated preference pair."""
    if fmt.harmony:
        from data import harmony

        return RenderedPair(*harmony.render_preference(pair, fmt))
    special = _special_tokens(tokenizer)
    prompt_ids, chosen = _answer_ids(tokenizer, fmt, special, pair["prompt"], pair["chosen"], pair["tools"])
    prompt_again, rejected = _answer_ids(tokenizer, fmt, special, pair["prompt"], pair["rejected"], pair["tools"])
    if prompt_again != prompt_ids:
        raise RowError("the prompt renders differently before the chosen and the rejected answer")
    return RenderedPair(prompt_ids, chosen, rejected)


def render_document(text: str, *, tokenizer) -> list[int]:
    """A document's token ids for continued pretraining: as the tokenizer encodes plain text
    (with BOS if it adds one), then EOS, so documents stay apart."""
    if tokenizer.eos_token_id is None:
        raise KeelError("the tokenizer has no eos_token; continued pretraining ends each document with it")
    return list(tokenizer(text, add_special_tokens=True)["input_ids"]) + [tokenizer.eos_token_id]


def render_text(conversation: dict, *, fmt: Format, add_generation_prompt: bool = False,
                special_tokens: dict | None = None, tokenizer=None) -> str:
    """The rendered prompt text, as the server would build it (with `tokenizer`, its special
    tokens as template variables, as apply_chat_template passes them)."""
    if fmt.harmony:
        from data import harmony

        return harmony.render_text(conversation, fmt, add_generation_prompt=add_generation_prompt)
    if special_tokens is None and tokenizer is not None:
        special_tokens = _special_tokens(tokenizer)
    text, _ = _render(conversation["messages"], conversation.get("tools"), fmt, special_tokens or {},
                      add_generation_prompt=add_generation_prompt)
    return text


_OPENS_REASONING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Format -> bool, rendered once


def generation_prompt_opens_reasoning(fmt: Format) -> bool:
    """Whether the format's generation prompt already opens the think block (DeepSeek-R1's ends
    in `<think>\n`): the model's output then starts inside its reasoning, with no opening tag."""
    if fmt.harmony or fmt.spec.think is None:
        return False
    if fmt not in _OPENS_REASONING:
        text = render_text({"messages": [{"role": "user", "content": "x"}]}, fmt=fmt, add_generation_prompt=True)
        _OPENS_REASONING[fmt] = text.rstrip().endswith(fmt.spec.think.open)
    return _OPENS_REASONING[fmt]


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of rendered text, no special tokens added, as the server tokenizes a prompt:
    plain ints (the arrays _encode gives are for the preparation's own columns)."""
    return _encode(tokenizer, text)[0].tolist()

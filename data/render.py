"""Render a validated conversation into token ids and a loss mask, with the format's template.

The chat template is the one definition of the prompt format. Its `{% generation %}` blocks
mark what the assistant writes (reasoning, content, tool calls and the end-of-turn token);
those characters are trained, everything else (system, user, tool results, turn headers) is
not. The text is rendered by transformers' own Jinja renderer, the one vLLM calls at serving
time, and tokenized whole, as the server tokenizes a prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers.utils.chat_template_utils import render_jinja_template

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


def check_tokenizer(tokenizer, fmt: Format, where: str) -> None:
    """Each delimiter and control token of the format must be one token of the tokenizer."""
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


def _example_ends(messages: list[dict], history_reasoning: str) -> list[int]:
    """Where each training example ends (exclusive message index).

    With history reasoning dropped, the template renders an assistant turn differently once a
    later user message exists. Training every turn inside the full conversation would teach
    the model to answer without reasoning, so each stretch of assistant turns between two
    user messages becomes its own example, rendered the way the server will see it then.
    """
    if history_reasoning == "keep":
        return [len(messages)]
    user_idx = [i for i, m in enumerate(messages) if m["role"] == "user"]
    ends = user_idx[1:] + [len(messages)]
    return [e for e in ends if any(m["role"] == "assistant" for m in messages[:e])]


def render_conversation(conversation: dict, *, tokenizer, fmt: Format) -> list[RenderedExample]:
    """Token ids and labels of a validated conversation: one example per stretch of trained turns."""
    messages, tools = conversation["messages"], conversation.get("tools") or None
    examples = []
    for end in _example_ends(messages, fmt.spec.history_reasoning):
        part = messages[:end]
        # Trained: the assistant turns after the last user message (all of them when the
        # format keeps history reasoning, as then one example holds the whole conversation).
        first = 0
        if fmt.spec.history_reasoning == "drop":
            first = max((i for i, m in enumerate(part) if m["role"] == "user"), default=-1) + 1
        n_trained = sum(1 for m in part[first:] if m["role"] == "assistant")
        rendered, spans = render_jinja_template(
            conversations=[part],
            tools=tools,
            chat_template=fmt.chat_template,
            return_assistant_tokens_mask=True,
        )
        text, spans = rendered[0], spans[0]
        n_assistant = sum(1 for m in part if m["role"] == "assistant")
        if len(spans) != n_assistant:
            raise KeelError(
                f"format {fmt.name!r}: the chat template marked {len(spans)} generation blocks for "
                f"{n_assistant} assistant turns; each assistant turn needs one {{% generation %}} block"
            )
        trained_spans = spans[len(spans) - n_trained :] if n_trained else []
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        labels = [IGNORE_INDEX] * len(enc["input_ids"])
        for k, (tok, (start, _end)) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
            if any(s <= start < e for s, e in trained_spans):
                labels[k] = tok
        examples.append(RenderedExample(list(enc["input_ids"]), labels))
    return examples


def render_text(conversation: dict, *, fmt: Format, add_generation_prompt: bool = False) -> str:
    """The rendered prompt text, as the server would build it."""
    rendered, _ = render_jinja_template(
        conversations=[conversation["messages"]],
        tools=conversation.get("tools") or None,
        chat_template=fmt.chat_template,
        return_assistant_tokens_mask=True,
        add_generation_prompt=add_generation_prompt,
    )
    return rendered[0]

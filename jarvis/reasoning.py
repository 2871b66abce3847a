"""Thinking models: split each streamed delta into its reasoning and its content, whatever the shape.

Upstreams stream a model's thinking in one of three shapes:

    delta.reasoning_content          llama.cpp (default --reasoning-format), DeepSeek's API
    delta.reasoning                  vLLM >= 0.11, Ollama's /v1
    <think>...</think> in content    llama.cpp with --reasoning-format none, raw models

In the third shape the tags may be split across chunks at any character, so a
suffix that could still become a tag is held back until the next chunk
decides. Many chat templates open `<think>` in the prompt, so the output
starts mid-thought and only `</think>` arrives: the content seen until then
turns out to have been reasoning, which `Split.content_was_reasoning` reports.
A `<think>` is recognised only at the very start of the answer (after
whitespace), and no tag at all once the upstream has used a reasoning field,
so an answer that merely talks about the tags is left alone.

Model output is untrusted: nothing here raises on any input.
"""

from __future__ import annotations

from typing import NamedTuple

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"
_MAX_LEADING = 256  # whitespace held while waiting for <think>; past it the answer has begun


class Split(NamedTuple):
    """What one delta adds: reasoning text, content text, and whether the content so far was reasoning."""

    reasoning: str = ""
    content: str = ""
    content_was_reasoning: bool = False


def reasoning_field(delta: dict) -> str:
    """The reasoning text a delta carries in either field name ('' when none)."""
    for name in ("reasoning_content", "reasoning"):
        value = delta.get(name)
        if isinstance(value, str) and value:
            return value
    return ""


class ThinkingSplitter:
    """Feeds on one choice's deltas in order; `split(delta)` per chunk, `finish()` at the end."""

    # States: where the next content character belongs.
    START = "start"  # nothing but whitespace yet: it may still open with <think>
    THINKING = "thinking"  # inside <think>: content is reasoning until </think>
    UNSURE = "unsure"  # plain content, unless a </think> shows it was reasoning all along
    ANSWER = "answer"  # plain content, no tags any more

    def __init__(self) -> None:
        self.state = self.START
        self.held = ""  # text that may still be part of a tag
        self.strip_leading = False  # drop whitespace right after a tag

    def split(self, delta: dict) -> Split:
        reasoning = reasoning_field(delta)
        content = delta.get("content")
        content = content if isinstance(content, str) else ""
        if reasoning:
            # The upstream separates reasoning itself: its content is plain content from now on.
            flushed = self.finish()
            self.state = self.ANSWER
            return Split(flushed.reasoning + reasoning, flushed.content + content)
        if not content:
            return Split()
        return self._content(self.held + content)

    def finish(self) -> Split:
        """At the end of the stream: whatever was held back, where it belongs (a thought never
        closed stays reasoning)."""
        held, self.held = self.held, ""
        if self.state == self.THINKING:
            return Split(reasoning=held)
        return Split(content=held)

    # -- content in each state ---------------------------------------------------------

    def _content(self, text: str) -> Split:
        self.held = ""
        if self.state == self.START:
            return self._start(text)
        if self.state == self.THINKING:
            return self._thinking(text)
        if self.state == self.UNSURE:
            return self._unsure(text)
        return Split(content=self._strip_leading(text))

    def _start(self, text: str) -> Split:
        stripped = text.lstrip()
        if stripped.startswith(OPEN_TAG):
            self.state, self.strip_leading = self.THINKING, True
            return self._thinking(stripped[len(OPEN_TAG):])
        if OPEN_TAG.startswith(stripped) and len(text) <= _MAX_LEADING:  # whitespace, or a tag arriving
            self.held = text
            return Split()
        self.state = self.UNSURE
        return self._unsure(text)

    def _thinking(self, text: str) -> Split:
        end = text.find(CLOSE_TAG)
        if end < 0:
            text, self.held = _hold_partial_tag(text, CLOSE_TAG)
            return Split(reasoning=self._strip_leading(text))
        reasoning = self._strip_leading(text[:end])
        self.state, self.strip_leading = self.ANSWER, True
        return Split(reasoning, self._strip_leading(text[end + len(CLOSE_TAG):]))

    def _unsure(self, text: str) -> Split:
        end = text.find(CLOSE_TAG)
        if end < 0:
            text, self.held = _hold_partial_tag(text, CLOSE_TAG)
            return Split(content=text)
        self.state, self.strip_leading = self.ANSWER, True
        return Split(text[:end], self._strip_leading(text[end + len(CLOSE_TAG):]), content_was_reasoning=True)

    def _strip_leading(self, text: str) -> str:
        if not self.strip_leading:
            return text
        stripped = text.lstrip()
        if stripped:
            self.strip_leading = False
        return stripped


def _hold_partial_tag(text: str, tag: str) -> tuple[str, str]:
    """Split `text` into what is certain and a suffix that could be the start of `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return text[:-length], text[-length:]
    return text, ""

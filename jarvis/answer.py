"""One answer on its way to the page: its reasoning, its content, and its numbers.

`Answer.add(chunk)` takes one parsed upstream chunk and returns the chunk the
page receives: only the fields the page uses, each of the expected type (model
output is untrusted), with the model's thinking in `delta.reasoning_content`
whatever shape the upstream used (jarvis.reasoning) and never as raw tags.
When a lone `</think>` shows that the content so far was thinking, the delta
says so with `content_was_reasoning: true`. `Answer.finish()` returns the last
page chunks: text held back while a tag could still arrive, and the stats.

An answer that used tools (jarvis.tool_loop) also keeps its steps, `tools`: per step the calls the model
asked for, where in its content and reasoning they came (UTF-16 offsets, as the page counts), and each
call's result as it arrived. The model's `delta.tool_calls` go on to the page as they stream.

Stats use Jarvis's own clock from the moment the request arrived. Token counts
come from the upstream's `usage` (or llama.cpp's `timings`) when it sends
them, else from the stream: one chunk with text is one token, which is how
llama.cpp, vLLM, Ollama and the embedded model stream.
"""

from __future__ import annotations

import time

from jarvis.reasoning import Split, ThinkingSplitter, reasoning_field


class Answer:
    def __init__(self, started: float | None = None, *, content: str = "", reasoning: str = ""):
        """A new answer, or one continued from the `content` and `reasoning` it already has (its new text
        is plain content: no <think> can open it any more)."""
        self.started = time.monotonic() if started is None else started
        self.splitter = ThinkingSplitter()
        if content:
            self.splitter.state = ThinkingSplitter.ANSWER
        self.reasoning_parts: list[str] = [reasoning] if reasoning else []
        self.content_parts: list[str] = [content] if content else []
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.thinking_started_at: float | None = None
        self.answer_started_at: float | None = None
        self.chunks_with_text = 0
        self.reasoning_moved = False  # its first content turned out to be reasoning (a lone </think>)
        self.length = len(content) + len(reasoning)  # characters of reasoning and content together
        self.finish_reason: str | None = None  # the upstream's: "stop", "length" (max_tokens), ...
        self.usage: dict | None = None
        self.timings: dict | None = None
        self.upstream: str | None = None  # which of several upstreams answered (None: the only one)
        self.tools: list[dict] = []  # the tool loop's steps: {"at", "reasoning_at", "calls": [...]}
        self.earlier_tokens = [0, 0]  # prompt and completion tokens of the tool loop's earlier steps

    @property
    def reasoning(self) -> str:
        return "".join(self.reasoning_parts)

    @property
    def content(self) -> str:
        return "".join(self.content_parts)

    # -- while it streams ----------------------------------------------------------

    def add(self, chunk, now: float | None = None) -> dict:
        """Take one upstream chunk; return the page's chunk."""
        now = time.monotonic() if now is None else now
        chunk = chunk if isinstance(chunk, dict) else {}
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        if isinstance(chunk.get("timings"), dict):
            self.timings = chunk["timings"]
        page = {"object": "chat.completion.chunk"}
        for name, kind in (("id", str), ("created", int), ("model", str)):
            if isinstance(chunk.get(name), kind):
                page[name] = chunk[name]
        choices = chunk.get("choices") if isinstance(chunk.get("choices"), list) else []
        page["choices"] = [self._choice(choice, now) for choice in choices[:1] if isinstance(choice, dict)]
        for name in TOOL_EVENTS:
            if isinstance(chunk.get(name), dict):
                page.update(TOOL_EVENTS[name](self, chunk[name], now, page))
        return page

    # -- the tool loop's events (jarvis.tool_loop): they come from Jarvis, their texts from tools and models --

    def _tool_step(self, step: dict, now: float, page: dict) -> dict:
        """A step's calls are about to run: the text held back goes out first, the next step's stream is a new
        answer to the splitter, and its usage is counted on top of this one's."""
        held = self.end(now)
        if held:
            page["choices"] = [{"index": 0, "delta": held, "finish_reason": None}]
        self.splitter = ThinkingSplitter()
        for index, (name, fallback) in enumerate((("prompt_tokens", "prompt_n"), ("completion_tokens", "predicted_n"))):
            self.earlier_tokens[index] += _count(self.usage, name) or _count(self.timings, fallback) or 0
        self.usage = self.timings = None
        calls = [{"id": _text(call.get("id"), 100), "name": _text(call.get("name"), 200),
                  "server": _text(call.get("server"), 200) or None, "arguments": _text(call.get("arguments"), 65536),
                  "result": None, "is_error": False}
                 for call in step.get("calls", ()) if isinstance(call, dict)]
        saved = {"at": utf16_length(self.content), "reasoning_at": utf16_length(self.reasoning), "calls": calls}
        self.tools.append(saved)
        return {"tool_step": saved}

    def _tool_result(self, result: dict, now: float, page: dict) -> dict:
        call = self._call(result.get("id"))
        if call is None:
            return {}
        call["result"] = _text(result.get("content"), 16 * 1024 * 1024)
        call["is_error"] = result.get("is_error") is True
        if isinstance(result.get("duration_ms"), (int, float)):
            call["duration_ms"] = result["duration_ms"]
        call.pop("progress", None)
        return {"tool_result": {"id": call["id"], "content": call["result"], "is_error": call["is_error"],
                                "duration_ms": call.get("duration_ms")}}

    def _tool_progress(self, progress: dict, now: float, page: dict) -> dict:
        call = self._call(progress.get("id"))
        if call is None:
            return {}
        value = {name: progress[name] for name in ("progress", "total")
                 if isinstance(progress.get(name), (int, float)) and not isinstance(progress.get(name), bool)}
        value["message"] = _text(progress.get("message"), 300) or None
        call["progress"] = value
        return {"tool_progress": {"id": call["id"], **value}}

    def _call(self, call_id) -> dict | None:
        calls = self.tools[-1]["calls"] if self.tools else []
        return next((call for call in calls if call["id"] == call_id), None)

    def _choice(self, choice: dict, now: float) -> dict:
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        content = delta.get("content")
        if reasoning_field(delta) or (isinstance(content, str) and content):
            self.chunks_with_text += 1
            self.first_token_at = self.first_token_at or now
            self.last_token_at = now
        page_delta = {"role": delta["role"]} if isinstance(delta.get("role"), str) else {}
        page_delta.update(self._apply(self.splitter.split(delta), now))
        if isinstance(delta.get("tool_calls"), list):
            page_delta["tool_calls"] = [_tool_call_delta(piece) for piece in delta["tool_calls"][:16]
                                        if isinstance(piece, dict)]
        finish_reason = choice.get("finish_reason")
        if isinstance(finish_reason, str) and finish_reason:
            self.finish_reason = finish_reason[:32]
        return {"index": 0, "delta": page_delta,
                "finish_reason": finish_reason if isinstance(finish_reason, str) else None}

    def _apply(self, split: Split, now: float) -> dict:
        """Add a split to the answer; return the page's delta fields for it."""
        fields = {}
        if split.content_was_reasoning and self.tools:
            split = split._replace(content_was_reasoning=False)  # (only a first step's text may turn out so)
        if split.content_was_reasoning:
            self.reasoning_moved = True
            self.reasoning_parts = [*self.reasoning_parts, *self.content_parts]
            self.content_parts = []
            self.thinking_started_at = self.answer_started_at
            self.answer_started_at = None
            fields["content_was_reasoning"] = True
        self.length += len(split.reasoning) + len(split.content)
        if split.reasoning:
            self.reasoning_parts.append(split.reasoning)
            self.thinking_started_at = self.thinking_started_at or now
            fields["reasoning_content"] = split.reasoning
        if split.content:
            self.content_parts.append(split.content)
            self.answer_started_at = self.answer_started_at or now
            fields["content"] = split.content
        return fields

    # -- at the end ------------------------------------------------------------------

    def end(self, now: float | None = None) -> dict:
        """Add the text held back while a tag could still arrive; return its page delta ({} if none).
        Safe to call again: there is nothing left to add."""
        return self._apply(self.splitter.finish(), time.monotonic() if now is None else now)

    def finish(self, now: float | None = None) -> list[dict]:
        """The page's last chunks: any text held back, then the stats."""
        now = time.monotonic() if now is None else now
        held = self.end(now)
        chunks = [{"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": held,
                                                                   "finish_reason": None}]}] if held else []
        return [*chunks, {"object": "chat.completion.chunk", "choices": [], "stats": self.stats(now)}]

    def stats(self, now: float | None = None) -> dict:
        """Time to first token, thinking time, tokens and tokens per second, as the page shows them, and
        which upstream answered when there are several."""
        now = time.monotonic() if now is None else now
        tokens, source = self._tokens()
        thinking_ms = None
        if self.thinking_started_at is not None:
            thinking_ms = _ms((self.answer_started_at or self.last_token_at or now) - self.thinking_started_at)
        return {"ttft_ms": _ms(self.first_token_at - self.started) if self.first_token_at else None,
                "thinking_ms": thinking_ms,
                "duration_ms": _ms(now - self.started),
                "completion_tokens": tokens, "tokens_source": source,
                "prompt_tokens": self._prompt_tokens(),
                "tokens_per_second": self._tokens_per_second(tokens),
                **({"finish_reason": self.finish_reason} if self.finish_reason else {}),
                **({"upstream": self.upstream} if self.upstream else {})}

    def _tokens(self) -> tuple[int | None, str | None]:
        for source, value in (("usage", _count(self.usage, "completion_tokens")),
                              ("timings", _count(self.timings, "predicted_n"))):
            if value is not None:
                return value + self.earlier_tokens[1], source
        return (self.chunks_with_text, "stream") if self.chunks_with_text else (None, None)

    def _prompt_tokens(self) -> int | None:
        last = _count(self.usage, "prompt_tokens") or _count(self.timings, "prompt_n")
        return last + self.earlier_tokens[0] if last is not None else self.earlier_tokens[0] or None

    def _tokens_per_second(self, tokens: int | None) -> float | None:
        reported = self.timings.get("predicted_per_second") if self.timings else None
        if isinstance(reported, (int, float)) and not isinstance(reported, bool) and 0 < reported < 1e7:
            return round(float(reported), 1)
        if not tokens or tokens < 2 or self.first_token_at is None or self.last_token_at is None:
            return None
        generating = self.last_token_at - self.first_token_at
        # A burst that arrived within a millisecond says nothing about the model's speed.
        return round((tokens - 1) / generating, 1) if generating >= 0.001 else None


TOOL_EVENTS = {"tool_step": Answer._tool_step, "tool_result": Answer._tool_result,
               "tool_progress": Answer._tool_progress}


def _text(value, limit: int) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _tool_call_delta(piece: dict) -> dict:
    """A model's tool-call delta as the page gets it: OpenAI's fields, each of its type."""
    out = {"index": piece["index"]} if isinstance(piece.get("index"), int) else {}
    if isinstance(piece.get("id"), str):
        out["id"] = piece["id"][:100]
    function = piece.get("function") if isinstance(piece.get("function"), dict) else {}
    fields = {name: function[name][:65536] for name in ("name", "arguments") if isinstance(function.get(name), str)}
    if fields:
        out["type"] = "function"
        out["function"] = fields
    return out


def utf16_length(text: str) -> int:
    """Length as the page counts it: JavaScript strings count UTF-16 units (an emoji is 2)."""
    return len(text) if text.isascii() else len(text.encode("utf-16-le", "surrogatepass")) // 2


def _count(source: dict | None, name: str) -> int | None:
    value = source.get(name) if source else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)

"""The tool loop: a page answer that uses MCP tools is one run — model, tools, model, ... — read by the relay as
one generation, so that everything a run has (saving as it goes, re-attach, Stop at the source, the detached
limit) holds in every step of it.

    open     The conversation's enabled tools (its switches over the servers' defaults) are offered to the
             model as OpenAI `tools`, under their own names (prefixed with their server's name only where two
             servers share one). Reading the servers' tool lists starts them if they are not running.
    step     The model's stream is relayed as it comes; its `delta.tool_calls` are gathered on the way. When
             it ends ([DONE]) having asked for tools, a `tool_step` event names the calls; every call runs at
             once, each in its own greenlet (the MCP call itself on the tool servers' thread: jarvis.mcp_client);
             `tool_progress` events pass on a server's progress notifications and a `tool_result` event each
             result, as it comes. Then the model is asked again with the assistant's `tool_calls` and a `tool`
             message per call, up to JARVIS_MAX_TOOL_STEPS times; a model still asking after that ends the
             run with an error that says so (what it wrote is kept).
    stop     abort() cancels whatever runs: the model's stream (FIN), the tool calls (their greenlets are
             killed: the SDK sends `notifications/cancelled`), the opening of the next step.

While tools run, the relay's reading greenlet waits here and is interrupted by its ticks as it is inside an
upstream's read (heartbeats, limits, a Stop); `tools_running` tells it that the backend is not silent but
waiting for tools, each bounded by its server's timeout_seconds.

A tool's result is untrusted input: at most JARVIS_TOOL_RESULT_MAX_BYTES (cut with a note), text only. The
loop's own events are the page's, not OpenAI's (`choices: []` plus one of tool_step, tool_progress,
tool_result); jarvis.answer keeps them with the answer, and `history_messages` turns a saved answer back
into the assistant and tool messages a later turn re-sends.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from dataclasses import dataclass

import gevent
import gevent.queue

from jarvis.backends import INTERRUPTED, Backend, ChatRequest, Generation, Interrupted
from jarvis.errors import StreamError, ToolError
from jarvis.reasoning import ThinkingSplitter
from jarvis.settings import Settings

log = logging.getLogger(__name__)

MAX_CALLS_PER_STEP = 16  # a step asking for more: the rest are answered with an error the model sees
MAX_ARGUMENTS_CHARS = 64 * 1024  # of one call's arguments, as the model wrote them
_NAME_OK = re.compile(r"[^A-Za-z0-9_-]")  # OpenAI's function names: ^[a-zA-Z0-9_-]{1,64}$
CANCELLED_RESULT = "The tool call was cancelled before it returned a result"


@dataclass(frozen=True)
class OfferedTool:
    name: str  # as the model knows it
    server: str
    tool: str  # as its server knows it
    description: str
    parameters: dict

    def as_openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description[:4000],
                                                 "parameters": self.parameters}}


def tool_key(server: str, tool: str) -> str:
    """How a conversation's switches name a tool."""
    return f"{server}/{tool}"


def offered_tools(servers: list[dict], switches: dict) -> dict[str, OfferedTool]:
    """The tools a conversation offers the model, by the name the model knows: each available server's
    tools, on where the conversation's switches say so and otherwise as their server's `enabled` says."""
    chosen = [(server["name"], tool) for server in servers if server.get("available")
              for tool in server.get("tools", ())
              if switches.get(tool_key(server["name"], tool["name"]), server.get("enabled", True))]
    counts: dict[str, int] = {}
    for _, tool in chosen:
        counts[tool["name"]] = counts.get(tool["name"], 0) + 1
    offered: dict[str, OfferedTool] = {}
    for server, tool in chosen:
        name = tool["name"] if counts[tool["name"]] == 1 else f"{server}__{tool['name']}"
        name = _NAME_OK.sub("_", name)[:64] or "tool"
        while name in offered:
            name = name[:60] + "_" + secrets.token_hex(1)
        parameters = tool.get("parameters") if isinstance(tool.get("parameters"), dict) else {"type": "object"}
        offered[name] = OfferedTool(name, server, tool["name"], tool.get("description") or "", parameters)
    return offered


def wanted_servers(servers: dict, switches: dict) -> list[str]:
    """The servers whose tools a conversation may use (only these are started for it)."""
    return [name for name, server in servers.items()
            if server.config.enabled or any(on and key.startswith(name + "/") for key, on in switches.items())]


class ToolLoop:
    """A backend over a backend: runs the tool loop for requests that carry a conversation's tool switches."""

    def __init__(self, backend: Backend, servers, settings: Settings):
        self.backend = backend
        self.name = backend.name
        self.servers = servers  # jarvis.mcp_client.ToolServers
        self.settings = settings

    def models(self) -> dict:
        return self.backend.models()

    def status(self) -> dict | None:
        return self.backend.status()

    def open(self, request: ChatRequest) -> Generation:
        if request.tools is None or not self.servers.servers:
            return self.backend.open(request)
        switches = request.tools
        names = wanted_servers(self.servers.servers, switches)
        offered = offered_tools(self.servers.status(names), switches) if names else {}
        if not offered:
            return self.backend.open(request)
        body = {**request.body, "tools": [tool.as_openai() for tool in offered.values()]}
        first = _request_like(request, body)
        return LoopGeneration(self, first, offered, self.backend.open(first))


def _request_like(request: ChatRequest, body: dict) -> ChatRequest:
    return ChatRequest(body=body, raw=json.dumps(body).encode(), stream=request.stream, trace_id=request.trace_id,
                       endpoint=request.endpoint, account=request.account)


def event(**fields) -> bytes:
    """One of the loop's own events for the page."""
    return json.dumps({"object": "chat.completion.chunk", "choices": [], **fields}).encode()


class LoopGeneration:
    """Steps of model output and tool calls, as one generation (see the module's docstring)."""

    def __init__(self, loop: ToolLoop, request: ChatRequest, offered: dict[str, OfferedTool], first: Generation):
        self.loop = loop
        self.request = request
        self.offered = offered
        self.inner = first
        self.interruptible = first.interruptible
        self.finished = False
        self.tools_running = False
        self.aborted = False
        self.steps = 0
        self.helpers: set[gevent.Greenlet] = set()  # tool calls and the next step's opening, while they run
        self.messages = list(request.body.get("messages") or [])

    @property
    def upstream(self) -> str | None:
        return self.inner.upstream

    def batches(self):
        while True:
            step = _StepReader()
            for batch in self.inner.batches():
                if batch is not INTERRUPTED:
                    step.feed(batch)
                yield batch
            calls = step.calls()
            if not calls or self.aborted:
                self.finished = True
                return
            limit = self.loop.settings.max_tool_steps
            if self.steps >= limit:
                raise StreamError("too_many_tool_steps", f"The model asked for tools {limit} times in a row "
                                  "(JARVIS_MAX_TOOL_STEPS): it was stopped there, and what it wrote is kept",
                                  "server_error")
            self.steps += 1
            yield from self._wait(self._helper(self._close_inner))  # (its drain is not to be interrupted)
            yield [event(tool_step={"calls": [self._public(call) for call in calls]})]
            results = yield from self._run_tools(calls)
            self.messages.append({"role": "assistant", "content": step.content(),
                                  "tool_calls": [{"id": call["id"], "type": "function",
                                                  "function": {"name": call["name"], "arguments": call["arguments"]}}
                                                 for call in calls]})
            self.messages.extend({"role": "tool", "tool_call_id": call["id"], "content": results[call["id"]]}
                                 for call in calls)
            following = _request_like(self.request, {**self.request.body, "messages": self.messages})
            self.inner = yield from self._wait(self._helper(self.loop.backend.open, following))

    def _public(self, call: dict) -> dict:
        tool = self.offered.get(call["name"])
        return {"id": call["id"], "name": call["name"], "arguments": call["arguments"],
                "server": tool.server if tool else None}

    def _run_tools(self, calls: list[dict]):
        """Every call at once; a tool_result event for each as it ends. Returns the results' texts by call id."""
        done: gevent.queue.Queue = gevent.queue.Queue()
        for call in calls:
            self._helper(self._call, call, done)
        results: dict[str, str] = {}
        self.tools_running = True
        try:
            while len(results) < len(calls):
                kind, call_id, value = yield from self._wait_for(done)
                if kind == "progress":
                    yield [event(tool_progress={"id": call_id, **value})]
                    continue
                results[call_id] = value["content"]
                yield [event(tool_result={"id": call_id, **value})]
        finally:
            self.tools_running = False
        return results

    def _call(self, call: dict, done: gevent.queue.Queue) -> None:
        started = time.monotonic()
        tool = self.offered.get(call["name"])
        try:
            if call.get("problem"):
                raise ToolError(call["problem"])
            if tool is None:
                raise ToolError(f"There is no tool named {call['name']!r}")
            try:
                arguments = json.loads(call["arguments"] or "{}")
            except (ValueError, RecursionError):
                raise ToolError("The arguments are not valid JSON") from None
            if not isinstance(arguments, dict):
                raise ToolError("The arguments must be a JSON object")

            def progress(value, total, message):
                done.put(("progress", call["id"], {"progress": value, "total": total,
                                                   "message": str(message)[:300] if message else None}))

            result = self.loop.servers.call(tool.server, tool.tool, arguments, on_progress=progress)
            text, is_error = result["text"], result["is_error"]
        except ToolError as error:
            text, is_error = str(error), True
        except Exception as error:  # a bug: the model is told, the run goes on
            log.exception("calling the tool %s failed", call["name"])
            text, is_error = f"Jarvis failed while calling the tool ({type(error).__name__})", True
        text = capped(text, self.loop.settings.tool_result_max_bytes)
        took = time.monotonic() - started
        log.info("tool %s (%s) %s in %.0f ms, %d characters", call["name"], tool.server if tool else "-",
                 "failed" if is_error else "answered", took * 1000, len(text))
        done.put(("result", call["id"], {"content": text, "is_error": is_error, "duration_ms": round(took * 1000, 1)}))

    def _helper(self, function, *args) -> gevent.Greenlet:
        greenlet = gevent.Greenlet(function, *args)
        self.helpers.add(greenlet)
        greenlet.link(self.helpers.discard)
        greenlet.start()
        return greenlet

    def _wait(self, greenlet: gevent.Greenlet):
        """A helper's result, interrupted by the relay's ticks as a read would be (yield INTERRUPTED, go on)."""
        while True:
            try:
                return greenlet.get()
            except Interrupted:
                yield INTERRUPTED

    def _wait_for(self, queue: gevent.queue.Queue):
        while True:
            try:
                return queue.get()
            except Interrupted:
                yield INTERRUPTED

    def _close_inner(self) -> None:
        try:
            self.inner.close()
        except Exception:
            log.warning("closing a step's generation failed", exc_info=True)

    def result(self) -> tuple[int, bytes]:
        raise NotImplementedError("the tool loop streams")  # only page runs use it, and they stream

    def abort(self) -> None:
        self.aborted = True
        self.inner.abort()
        for greenlet in list(self.helpers):
            greenlet.kill(block=False)

    def close(self) -> None:
        for greenlet in list(self.helpers):
            greenlet.kill(block=False)
        self.inner.close()


class _StepReader:
    """What one step's stream asked for: its tool calls (gathered from their deltas) and its text."""

    def __init__(self):
        self.parts: dict[int, dict] = {}
        self.splitter = ThinkingSplitter()
        self.text: list[str] = []

    def feed(self, batch: list[bytes]) -> None:
        for payload in batch:
            try:
                chunk = json.loads(payload)
                delta = chunk["choices"][0]["delta"]
            except (ValueError, RecursionError, KeyError, IndexError, TypeError):
                continue
            if not isinstance(delta, dict):
                continue
            self.text.append(self.splitter.split(delta).content)
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                for piece in calls:
                    if isinstance(piece, dict):
                        self._add(piece)

    def _add(self, piece: dict) -> None:
        index = piece.get("index", len(self.parts))
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 1000:
            return
        call = self.parts.setdefault(index, {"id": "", "name": "", "arguments": ""})
        if isinstance(piece.get("id"), str) and not call["id"]:
            call["id"] = piece["id"][:100]
        function = piece.get("function") if isinstance(piece.get("function"), dict) else {}
        if isinstance(function.get("name"), str):
            call["name"] = (call["name"] + function["name"])[:200]
        if isinstance(function.get("arguments"), str):
            if len(call["arguments"]) + len(function["arguments"]) > MAX_ARGUMENTS_CHARS:
                call["problem"] = f"The arguments are longer than {MAX_ARGUMENTS_CHARS} characters"
            else:
                call["arguments"] += function["arguments"]

    def calls(self) -> list[dict]:
        """The step's calls in order, each with an id (the model's, or one made here) and at most
        MAX_CALLS_PER_STEP of them answered (the rest get an error)."""
        calls, seen = [], set()
        for number, index in enumerate(sorted(self.parts)):
            call = self.parts[index]
            if not call["id"] or call["id"] in seen:
                call["id"] = "call_" + secrets.token_hex(8)
            seen.add(call["id"])
            if number >= MAX_CALLS_PER_STEP:
                call["problem"] = f"At most {MAX_CALLS_PER_STEP} tools are called in one step"
            calls.append(call)
        return calls

    def content(self) -> str:
        return "".join(self.text) + self.splitter.finish().content


def capped(text: str, limit: int) -> str:
    """A tool's result, at most `limit` bytes of UTF-8, cut on a character boundary with a note saying so."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    kept = data[:limit].decode("utf-8", "ignore")
    return f"{kept}\n[cut: the result was {len(data)} bytes, more than JARVIS_TOOL_RESULT_MAX_BYTES ({limit})]"


# -- history: a saved answer with tool steps, as the messages a later turn re-sends ----------------------------

def history_messages(message: dict) -> list[dict]:
    """One saved message as chat messages: a user's as it is; an answer that used tools as, per step, the text
    before its calls with the calls, a `tool` message per call, and the text after the last step."""
    steps = message.get("tools") or []
    if message["role"] != "assistant" or not steps:
        return [{"role": message["role"], "content": message["content"]}] \
            if message["role"] == "user" or message["content"] else []
    content, messages, before = message["content"], [], 0
    for step in steps:
        at = max(before, step.get("at", 0))
        calls = step.get("calls") or []
        messages.append({"role": "assistant", "content": utf16_slice(content, before, at),
                         "tool_calls": [{"id": call["id"], "type": "function",
                                         "function": {"name": call["name"], "arguments": call.get("arguments", "")}}
                                        for call in calls]})
        messages.extend({"role": "tool", "tool_call_id": call["id"],
                         "content": call["result"] if isinstance(call.get("result"), str) else CANCELLED_RESULT}
                        for call in calls)
        before = at
    rest = utf16_slice(content, before, None)
    if rest:
        messages.append({"role": "assistant", "content": rest})
    return messages


def utf16_slice(text: str, start: int, end: int | None) -> str:
    """`text` between two offsets counted in UTF-16 units, as the page and the saved tool steps count them."""
    if text.isascii():
        return text[start:end]
    data = text.encode("utf-16-le", "surrogatepass")
    return data[2 * start:None if end is None else 2 * end].decode("utf-16-le", "replace")

"""Whether a model's server can continue an answer: asked once per model, remembered for an hour.

Continuing an answer cut short asks the model with the history ending in that answer's text, as a
prefix to complete. Servers differ (../shared/DESIGN.md §6, and measured in tests/test_llama_server.py):

- llama.cpp's server continues a trailing assistant message by default;
- vLLM (and llama.cpp since May 2026) continue it when asked: `continue_final_message: true,
  add_generation_prompt: false`; a server that does not know those fields ignores or refuses them;
- llama-cpp-python's own server formats every message as complete, so it closes the answer's turn and
  answers the question afresh (measured: SmolLM2 wrote the sentence again from its first word);
- Jarvis's embedded model continues the raw prompt (jarvis.backends.local).

A fresh answer glued on as if it were the rest of the old one is the failure to avoid, and it cannot be
told from the continuation itself: a fresh answer may start with any words. So the server is asked,
once, a question whose continuation cannot be mistaken: repeat a sentence, with the answer's prefix
ending inside a word ("The quick brown fox jum"). A server that continues goes on inside that word
("ps over the lazy dog."); one that opens a new turn starts a sentence. Asked plainly first, then with
vLLM's fields; neither continued: the page is told this model's server cannot continue (400
`cannot_continue`, before anything is claimed or changed). The run still holds back a continuation's
first characters and drops a fresh answer that starts as the old one did (jarvis.runs.answered_afresh),
should a server answer differently from its probe; from then on that model's server is taken as one that
cannot continue.
"""

from __future__ import annotations

import json
import logging
import re
import time

from jarvis.backends import Backend, ChatRequest
from jarvis.errors import ApiError
from jarvis.relay import Relay
from jarvis.settings import Settings

log = logging.getLogger("jarvis.continuation")

PROBE_SENTENCE = "The quick brown fox jumps over the lazy dog."
PROBE_PREFIX = "The quick brown fox jum"
PROBE_QUESTION = f"Repeat this sentence exactly, and nothing else: {PROBE_SENTENCE}"
VLLM_FIELDS = {"continue_final_message": True, "add_generation_prompt": False}
REMEMBER_SECONDS = 3600.0
CANNOT = ("This model's server cannot continue an answer (asked to complete a sentence, it answered afresh): "
          "the answer is kept as it was; ask again, or use a server that continues a final assistant message "
          "(llama.cpp's server, vLLM)")


class Continuation:
    """Per worker: which request fields each model's server needs to continue an answer, or that it cannot."""

    def __init__(self, backend: Backend, settings: Settings):
        self.backend = backend
        self.settings = settings
        self.known: dict[str, tuple[float, dict | None]] = {}  # model ("" the default) -> (when, fields or None)

    def fields(self, model: str | None, trace_id: str) -> dict:
        """The fields to add to a continuation's request for `model`; ApiError 400 `cannot_continue` when
        its server cannot continue, or the upstream's own error when it could not be asked."""
        key = model or ""
        known = self.known.get(key)
        if known is None or time.monotonic() - known[0] > REMEMBER_SECONDS:
            known = (time.monotonic(), self._probe(model, trace_id))
            self.known[key] = known
        if known[1] is None:
            raise ApiError(400, CANNOT, param="continue", code="cannot_continue")
        return known[1]

    def answered_afresh(self, model: str | None) -> None:
        """A continuation on `model` was answered afresh after all: its server cannot continue, from now."""
        self.known[model or ""] = (time.monotonic(), None)

    def _probe(self, model: str | None, trace_id: str) -> dict | None:
        for fields in ({}, VLLM_FIELDS):
            try:
                reply = self._ask(model, trace_id, fields)
            except ApiError as error:
                if fields and 400 <= error.status < 500:  # the fields refused: it cannot be asked this way
                    log.info("continuation probe: the server refused %s (%s)", ", ".join(fields), error.code)
                    continue
                raise  # the server cannot be reached or failed: the continuation would too; nothing remembered
            if continued(reply):
                log.info("continuation probe: model %s continues%s", model or "(default)",
                         " with " + ", ".join(fields) if fields else "")
                return fields
            log.info("continuation probe: model %s answered afresh%s: %r", model or "(default)",
                     " with " + ", ".join(fields) if fields else "", reply[:40])
        return None

    def _ask(self, model: str | None, trace_id: str, fields: dict) -> str:
        body = {"messages": [{"role": "user", "content": PROBE_QUESTION},
                             {"role": "assistant", "content": PROBE_PREFIX}],
                "max_tokens": 8, "temperature": 0, "stream": False, **fields, **({"model": model} if model else {})}
        request = ChatRequest(body=body, raw=json.dumps(body).encode(), stream=False, trace_id=trace_id)
        relay = Relay(self.backend, request, self.settings, {})
        relay.open()
        response = relay.result_response()
        try:
            message = json.loads(response.get_data())["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            return ""
        return message.get("content") if isinstance(message, dict) and isinstance(message.get("content"), str) else ""


def continued(reply: str) -> bool:
    """Whether a probe's reply goes on inside the word its prefix ended in: a small letter, no space before
    it ("ps over the lazy dog."; SmolLM2-135M wrote "bled over the lazy dog."). A fresh answer starts a
    sentence: "The quick brown fox…", "Sure! …"."""
    reply = re.sub(r"<think>.*?(</think>|$)", "", reply, flags=re.S)
    return re.match(r"[a-z]", reply) is not None

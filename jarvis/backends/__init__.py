"""The backend seam: where chat completions come from.

A backend turns an OpenAI chat request into a `Generation`. Nothing outside
this package knows which backend is running.

    backend.models()            -> OpenAI's model list object
    backend.status()            -> a little state for /healthz, or None
    backend.context_window(m)   -> the model's context, in tokens, when the backend can tell (else None;
                                   optional: a backend without it cannot)
    backend.open(request)       -> Generation; raises ApiError before any output
    generation.batches()        -> iterator of lists of `data:` payloads (JSON bytes),
                                   ends after [DONE]; raises StreamError on an abnormal end
    generation.result()         -> the whole non-streaming response (status, JSON bytes)
    generation.abort()          -> from any greenlet, at once: tell the source nobody is listening
    generation.close()          -> cancel at the source and release it; safe to call twice
    generation.interruptible    -> True: batches() may be read by the response's own greenlet,
                                   which throws `Interrupted` into it while it waits; it then
                                   yields INTERRUPTED and carries on where it was. False: the
                                   relay reads it through a pump (jarvis.pump)
    generation.upstream         -> the configured name of the upstream that answers (several
                                   upstreams: the one the router chose), or None
    generation.finished         -> an interruptible generation's last event ([DONE], a terminal
                                   Responses event) has been read: nothing is left to cancel

`open` may block (connecting, waiting for headers); the relay cancels it by
throwing `Interrupted` (or a gevent.Timeout) into the greenlet waiting in it, so
every blocking call in a backend must be a gevent-cooperative one, and every
resource it holds released on any BaseException.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from jarvis.logs import upstream_request_id
from jarvis.settings import Settings


class Interrupted(BaseException):
    """Thrown into a greenlet waiting inside an interruptible generation's batches(): the relay wants
    to send a heartbeat, check its time limits or stop. A BaseException, like gevent.Timeout, so that
    no `except Exception` on the way swallows it."""


INTERRUPTED = object()  # what batches() yields after an Interrupted, instead of a batch


@dataclass
class ChatRequest:
    """A validated chat completion request, as the client sent it."""

    body: dict
    raw: bytes  # the client's bytes, forwarded unchanged when `body` was not modified
    stream: bool
    trace_id: str
    endpoint: str = "chat/completions"  # or completions, embeddings, responses (below /v1)
    account: tuple[int, str] | None = None  # whose usage it is: (account id, key id); None: Jarvis's own
    # A page conversation's tool switches ({"server/tool": on}; {}: the servers' defaults): the tools it
    # offers the model (jarvis.tool_loop). None: no tools (every /v1 request; a client sends its own).
    tools: dict | None = None
    # What the upstream gets as X-Request-Id: a UUID, which validating servers accept.
    upstream_request_id: str = field(init=False)

    def __post_init__(self):
        self.upstream_request_id = upstream_request_id(self.trace_id)


class Generation(Protocol):
    interruptible: bool
    upstream: str | None
    finished: bool

    def batches(self) -> Iterator[list[bytes]]: ...

    def result(self) -> tuple[int, bytes]: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


class Backend(Protocol):
    name: str

    def models(self) -> dict: ...

    def status(self) -> dict | None: ...

    def open(self, request: ChatRequest) -> Generation: ...


def create_backend(settings: Settings) -> Backend:
    """Several upstreams (JARVIS_UPSTREAMS_FILE): a router over them. One (JARVIS_UPSTREAM_URL): that
    upstream itself, forwarding every model name as it is. None: the embedded model."""
    if settings.upstreams_file is not None:
        from jarvis.backends.router import RouterBackend

        return RouterBackend(settings)
    upstream = settings.upstreams[0] if settings.upstreams else None
    if upstream is not None and not upstream.embedded:
        from jarvis.backends.upstream import UpstreamBackend

        return UpstreamBackend(settings, upstream)
    from jarvis.backends.local import LocalBackend

    return LocalBackend(settings)

"""Several upstreams behind one URL: merged model lists, routing by model, failover before the first byte.

    models()  every upstream's list, fetched concurrently (each within JARVIS_UPSTREAM_MODELS_SECONDS),
              kept for LIST_SECONDS and refreshed in the background after that, so a dead upstream never
              slows a request; an upstream that cannot be reached is left out (logged once, and once
              more when it is back); an id two upstreams list is listed once, owned_by the first
    open()    to the first upstream that lists the model (an unknown model: 404 model_not_found; none
              named: JARVIS_MODEL, else the first upstream's first model). If it refuses the connection,
              says nothing before its headers within JARVIS_UPSTREAM_HEADERS_SECONDS, or answers 5xx or
              429, the next upstream that lists the model is tried, unseen by the client; the failed one
              rests for COOL_DOWN_SECONDS. Once a byte has gone to the client there is no failover.

Nothing here is ever called by /healthz except `status()`, which answers from memory.
"""

from __future__ import annotations

import json
import logging
import time

import gevent

from jarvis import metrics
from jarvis.backends import Backend, ChatRequest, Generation
from jarvis.errors import ApiError
from jarvis.settings import Settings
from jarvis.upstreams import UpstreamConfig

log = logging.getLogger(__name__)

LIST_SECONDS = 5.0  # how long a worker trusts the model lists it fetched
COOL_DOWN_SECONDS = 10.0  # an upstream that failed is passed over this long (unless nothing else lists the model)
_RETRYABLE_CODES = {"upstream_unreachable", "upstream_timeout", "upstream_closed", "upstream_malformed"}


class Upstream:
    """One configured upstream, its backend, and what this worker knows of its health."""

    def __init__(self, config: UpstreamConfig, backend: Backend):
        self.config = config
        self.name = config.name
        self.backend = backend
        if config.models is not None:
            self.models: tuple[str, ...] = config.models
        elif config.embedded:
            self.models = _model_ids(backend.models()) or ()  # in memory: no need to ask
        else:
            self.models = ()
        self.listed = config.models is not None or config.embedded  # its models are known without asking
        self.reachable = True
        self.refusing = False  # its last attempt could not even connect, and none has worked since
        self.failed_at: float | None = None
        self.last_error: str | None = None

    @property
    def cooling_down(self) -> bool:
        return self.failed_at is not None and time.monotonic() - self.failed_at < COOL_DOWN_SECONDS

    def failed(self, error: ApiError) -> None:
        if error.code in metrics.DOWN_KINDS:
            metrics.UPSTREAM_UP.labels(self.name).set(0)  # (the one that answered instead is counted by its stream)
        self.failed_at = time.monotonic()
        self.last_error = error.code or str(error.status)
        # An upstream whose models are listed in the file is never asked for /models: its requests are
        # the only news of it, and one that could not connect stays unreachable until one does.
        self.refusing = self.config.models is not None and error.code == "upstream_unreachable"

    def answered(self) -> None:
        self.failed_at = None  # it answers: no more resting
        self.refusing = False

    def status(self) -> dict:
        if not self.reachable or self.refusing:
            state = "unreachable"
        else:
            state = "cooling_down" if self.cooling_down else "up"
        status = {"name": self.name, "state": state, "models": list(self.models), "last_error": self.last_error}
        embedded = self.backend.status()
        if embedded is not None:
            status["model"] = embedded
        return status


class RouterBackend:
    name = "router"

    def __init__(self, settings: Settings):
        self.default_model = settings.model
        self.headers_seconds = settings.upstream_headers_seconds
        self.models_seconds = settings.upstream_models_seconds
        self.upstreams = [Upstream(config, _backend(settings, config)) for config in settings.upstreams]
        self.fetched_at: float | None = None
        self.refresh: gevent.Greenlet | None = None

    # -- models ------------------------------------------------------------------------------------

    def context_window(self, model: str | None) -> int | None:
        """The context of the upstream that would answer `model` (the first that lists it)."""
        model = model or self.default_model
        for upstream in self.upstreams:
            if model is None or model in upstream.models:
                window = getattr(upstream.backend, "context_window", None)
                return window(model) if window is not None else None
        return None

    def models(self) -> dict:
        """Every upstream's models, merged (an id listed once, owned_by the upstream that answers it)."""
        self._fresh_lists()
        seen, data = set(), []
        for upstream in self.upstreams:
            if not upstream.reachable:
                continue
            for model in upstream.models:
                if model not in seen:
                    seen.add(model)
                    data.append({"id": model, "object": "model", "created": 0, "owned_by": upstream.name})
        return {"object": "list", "data": data}

    def _fresh_lists(self) -> None:
        """Fetch the lists the first time (waiting at most one model-list timeout); later, refresh in the
        background once they are LIST_SECONDS old, and answer from what is known meanwhile."""
        if self.fetched_at is None:
            if self.refresh is None or self.refresh.dead:  # requests arriving together share one fetch
                self.refresh = gevent.spawn(self._fetch_lists)
            self.refresh.join()
        elif time.monotonic() - self.fetched_at > LIST_SECONDS and (self.refresh is None or self.refresh.dead):
            self.refresh = gevent.spawn(self._fetch_lists)

    def _fetch_lists(self) -> None:
        asking = [upstream for upstream in self.upstreams if not upstream.listed]
        jobs = [gevent.spawn(_ask_models, upstream.backend) for upstream in asking]
        gevent.joinall(jobs, timeout=self.models_seconds)
        for upstream, job in zip(asking, jobs, strict=True):
            answer = job.value if job.ready() else "no answer in time"
            job.kill(block=False)
            models = _model_ids(answer)
            if models is None:
                if upstream.reachable:
                    log.warning("upstream %s left out of /v1/models: %s", upstream.name, _reason(answer))
                upstream.reachable = False
                continue
            if not upstream.reachable:
                log.info("upstream %s answers /models again", upstream.name)
            upstream.models, upstream.reachable = models, True
        self.fetched_at = time.monotonic()

    # -- routing and failover ----------------------------------------------------------------------

    def open(self, request: ChatRequest) -> Generation:
        """Open the request on the first upstream that lists its model and answers before its first byte."""
        candidates = self._candidates(request)
        last_error = None
        for index, upstream in enumerate(candidates):
            more_to_try = index + 1 < len(candidates)
            try:
                generation = self._open(upstream, request, deadline=more_to_try)
                upstream.answered()
                return _Routed(generation, upstream.name)
            except ApiError as error:
                if not _fail_over(error):
                    raise  # the request's own fault (4xx): another upstream would say the same
                upstream.failed(error)
                if not more_to_try:
                    raise
                last_error = error
                log.warning("upstream %s failed before answering (%s): trying %s", upstream.name,
                            error.code or error.status, candidates[index + 1].name)
        raise last_error or ApiError(502, "No upstream could take the request", type_="upstream_error")

    def _open(self, upstream: Upstream, request: ChatRequest, *, deadline: bool) -> Generation:
        if not deadline:
            return upstream.backend.open(request)
        try:
            with gevent.Timeout(self.headers_seconds):
                return upstream.backend.open(request)
        except gevent.Timeout:
            raise ApiError(504, f"Upstream {upstream.name} did not answer within {self.headers_seconds:g} s "
                                "(JARVIS_UPSTREAM_HEADERS_SECONDS)", type_="upstream_error", code="upstream_timeout")

    def _candidates(self, request: ChatRequest) -> list[Upstream]:
        model = request.body.get("model")
        if not isinstance(model, str) or not model:
            model = self.default_model or self._first_model()
            if model is None:
                raise ApiError(503, "No upstream lists a model yet; name one in the request", code="no_model")
            request.body["model"] = model
            request.raw = _json_bytes(request.body)
        self._fresh_lists()
        listing = [upstream for upstream in self.upstreams if model in upstream.models]
        if request.endpoint != "chat/completions" and any(not upstream.config.embedded for upstream in listing):
            # The embedded model answers chat only; alone, it says so itself (404 unsupported_endpoint).
            listing = [upstream for upstream in listing if not upstream.config.embedded]
        if not listing:
            down = [upstream.name for upstream in self.upstreams if not upstream.reachable]
            unreachable = f" (unreachable now: {', '.join(down)})" if down else ""
            raise ApiError(404, f"The model {model!r} does not exist on any upstream{unreachable}: GET /v1/models "
                                "lists them", type_="invalid_request_error", code="model_not_found", param="model")
        resting = [upstream for upstream in listing if upstream.cooling_down]
        return [upstream for upstream in listing if upstream not in resting] + resting

    def _first_model(self) -> str | None:
        self._fresh_lists()
        return next((model for upstream in self.upstreams for model in upstream.models), None)

    def status(self) -> dict:
        """Each upstream's state, from memory (never by calling it)."""
        return {"upstreams": [upstream.status() for upstream in self.upstreams]}


class _Routed:
    """An upstream's generation, labelled with the upstream that answers it."""

    def __init__(self, generation: Generation, upstream: str):
        self.generation = generation
        self.upstream = upstream

    @property
    def interruptible(self) -> bool:
        return self.generation.interruptible

    @property
    def finished(self) -> bool:
        return self.generation.finished

    def batches(self):
        return self.generation.batches()

    def result(self):
        return self.generation.result()

    def abort(self) -> None:
        self.generation.abort()

    def close(self) -> None:
        self.generation.close()


def _fail_over(error: ApiError) -> bool:
    """Errors before the first byte that another upstream may not have: down, silent, overloaded, broken."""
    return error.code in _RETRYABLE_CODES or error.status >= 500 or error.status == 429


def _backend(settings: Settings, config: UpstreamConfig) -> Backend:
    if config.embedded:
        from jarvis.backends.local import LocalBackend

        return LocalBackend(settings)
    from jarvis.backends.upstream import UpstreamBackend

    return UpstreamBackend(settings, config)


def _ask_models(backend: Backend):
    """An upstream's model list, or why there is none (an error, never raised: nobody waits to catch it)."""
    try:
        return backend.models()
    except ApiError as error:
        return error
    except Exception as error:  # a bug, or something requests did not wrap
        log.warning("asking an upstream for its models failed", exc_info=True)
        return error


def _model_ids(answer) -> tuple[str, ...] | None:
    if not isinstance(answer, dict) or not isinstance(answer.get("data"), list):
        return None
    return tuple(item["id"] for item in answer["data"] if isinstance(item, dict) and isinstance(item.get("id"), str))


def _reason(answer) -> str:
    if isinstance(answer, (str, Exception)):
        return getattr(answer, "message", None) or str(answer)
    return "its answer is not a model list"


def _json_bytes(body: dict) -> bytes:
    return json.dumps(body).encode()

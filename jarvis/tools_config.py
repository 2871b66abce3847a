"""Which MCP tool servers Jarvis may start or reach: `JARVIS_TOOLS_FILE`, read once at start-up.

One `[[mcp]]` table per server, started as a child process speaking MCP over stdio, or reached over
Streamable HTTP:

    [[mcp]]
    name = "time"
    command = ["uvx", "mcp-server-time"]      # stdio; optional env = {...}, cwd = "..."

    [[mcp]]
    name = "search"
    url = "https://tools.example.org/mcp"     # Streamable HTTP; optional headers = {...}
    headers_env = { Authorization = "SEARCH_TOOL_AUTH" }   # a header's value from the environment
    # headers_file = { Authorization = "/etc/jarvis/search-auth" }   # ...or from a file
    enabled = false                           # its tools start off in new conversations (default: on)
    tools = ["web_search"]                    # only these of its tools (default: all it lists)
    timeout_seconds = 30                      # per call (default 60)

No tool server is configured by default. A bad file stops start-up with a message naming the file,
the table and the key; secrets are read once, here, and never logged. A tool runs with the rights of
the user Jarvis runs as (see the README on running a stdio server as another user). Standard library
only: gunicorn's master reads this before it forks.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
import urllib.parse
from dataclasses import dataclass, field

from jarvis.upstreams import names_in, read_secret

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")  # a prefix of tool names: OpenAI allows [A-Za-z0-9_-]
_KEYS = {"name", "command", "env", "cwd", "url", "headers", "headers_env", "headers_file", "enabled", "tools",
         "timeout_seconds"}
_STDIO_ONLY, _HTTP_ONLY = {"command", "env", "cwd"}, {"url", "headers", "headers_env", "headers_file"}


class ToolsError(ValueError):
    """The tools file cannot be used; the message names the file, the table and the key."""


@dataclass(frozen=True)
class ToolServer:
    name: str
    command: tuple[str, ...] | None = None  # stdio: the program and its arguments
    env: dict[str, str] = field(default_factory=dict, repr=False)
    cwd: str | None = None
    url: str | None = None  # Streamable HTTP
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    enabled: bool = True  # its tools are on in new conversations
    tools: tuple[str, ...] | None = None  # None: every tool it lists
    timeout_seconds: float = 60.0

    @property
    def transport(self) -> str:
        return "stdio" if self.command is not None else "http"


def load(path: str, environ=os.environ) -> tuple[ToolServer, ...]:
    """The tool servers a file declares, validated; ToolsError otherwise."""
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as error:
        raise ToolsError(f"JARVIS_TOOLS_FILE names {path!r}, which cannot be read ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise ToolsError(f"{path} is not valid TOML: {error}") from None
    unknown = set(document) - {"mcp"}
    if unknown:
        raise ToolsError(f"{path}: unknown top-level key {sorted(unknown)[0]!r}; write one [[mcp]] table per server")
    tables = document.get("mcp", [])
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        raise ToolsError(f"{path}: write one [[mcp]] table per server")
    servers, names = [], set()
    for number, table in enumerate(tables, start=1):
        server = _server(f"{path}, [[mcp]] #{number}", table, environ)
        if server.name in names:
            raise ToolsError(f"{path}, [[mcp]] #{number}: the name {server.name!r} is used twice")
        names.add(server.name)
        servers.append(server)
    return tuple(servers)


def _server(where: str, table: dict, environ) -> ToolServer:
    name = table.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ToolsError(f"{where}: 'name' must be up to 32 letters, digits, '_' or '-' (got {name!r})")
    where = f"{where} {name!r}"
    unknown = set(table) - _KEYS
    if unknown:
        raise ToolsError(f"{where}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(_KEYS))})")
    command, url = table.get("command"), table.get("url")
    if (command is None) == (url is None):
        raise ToolsError(f"{where}: set 'command' (a server started over stdio) or 'url' (Streamable HTTP), "
                         "one of them")
    common = {"enabled": _boolean(where, table), "tools": _tools(where, table),
              "timeout_seconds": _timeout(where, table)}
    if command is not None:
        extra = sorted(set(table) & _HTTP_ONLY)
        if extra:
            raise ToolsError(f"{where}: {extra[0]!r} is for a server reached by 'url', not one started by 'command'")
        if not isinstance(command, list) or not command or not all(isinstance(part, str) and part for part in command):
            raise ToolsError(f"{where}: 'command' must be a list like [\"uvx\", \"mcp-server-time\"]")
        cwd = table.get("cwd")
        if cwd is not None and not isinstance(cwd, str):
            raise ToolsError(f"{where}: 'cwd' must be a directory")
        return ToolServer(name, command=tuple(command), env=_strings(where, table, "env"), cwd=cwd, **common)
    extra = sorted(set(table) & _STDIO_ONLY)
    if extra:
        raise ToolsError(f"{where}: {extra[0]!r} is for a server started by 'command', not one reached by 'url'")
    parsed = urllib.parse.urlsplit(url) if isinstance(url, str) else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ToolsError(f"{where}: 'url' must be an http:// or https:// URL (got {url!r})")
    return ToolServer(name, url=url, headers=_headers(where, table, environ), **common)


def _boolean(where: str, table: dict) -> bool:
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ToolsError(f"{where}: 'enabled' must be true or false")
    return enabled


def _tools(where: str, table: dict) -> tuple[str, ...] | None:
    try:
        return names_in(table, "tools")
    except ValueError:
        raise ToolsError(f"{where}: 'tools' must be a list of tool names, like [\"get_current_time\"]") from None


def _timeout(where: str, table: dict) -> float:
    timeout = table.get("timeout_seconds", 60.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or not 0 < timeout <= 3600:
        raise ToolsError(f"{where}: 'timeout_seconds' must be a number of seconds from 0 to 3600")
    return float(timeout)


def _strings(where: str, table: dict, key: str) -> dict[str, str]:
    value = table.get(key, {})
    if not isinstance(value, dict) or not all(isinstance(name, str) and isinstance(text, str)
                                              for name, text in value.items()):
        raise ToolsError(f"{where}: '{key}' must be a table of strings, like {{ NAME = \"value\" }}")
    return dict(value)


def _headers(where: str, table: dict, environ) -> dict[str, str]:
    headers = _strings(where, table, "headers")
    for name, variable in _strings(where, table, "headers_env").items():
        if not environ.get(variable, "").strip():
            raise ToolsError(f"{where}: 'headers_env' takes {name!r} from {variable!r}, which is not set in the "
                             "environment")
        headers[name] = environ[variable].strip()
    for name, secret_file in _strings(where, table, "headers_file").items():
        try:
            headers[name] = read_secret(secret_file)
        except OSError as error:
            raise ToolsError(f"{where}: 'headers_file' takes {name!r} from {secret_file!r}, which cannot be read "
                             f"({error.strerror})") from None
        except ValueError:
            raise ToolsError(f"{where}: the file for {name!r} in 'headers_file' is empty") from None
    return headers

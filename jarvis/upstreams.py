"""Which upstreams Jarvis talks to: one OpenAI-compatible server, several, and the embedded model.

`JARVIS_UPSTREAMS_FILE` names a TOML file with one `[[upstream]]` table per upstream, in order of
preference (the first that lists a model answers it; the next one takes over if it fails before its
first byte):

    [[upstream]]
    name = "gpu-box"
    url = "http://10.0.0.5:11434/v1"

    [[upstream]]
    name = "cloud"
    url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_API_KEY"       # or api_key_file = "/etc/jarvis/openai-key"
    models = ["gpt-4.1-mini"]            # optional: only these; default: whatever its /models lists

    [[upstream]]
    name = "local"
    embedded = true                      # the embedded model (SmolLM2, or JARVIS_LOCAL_MODEL)

`JARVIS_UPSTREAM_URL` (with `JARVIS_UPSTREAM_API_KEY`) stays a one-upstream shorthand. A bad file
stops start-up with a message naming the file, the table and the key. Keys are read once, here, and
never logged. Standard library only: gunicorn's master reads this before it forks.
"""

from __future__ import annotations

import os
import re
import tomllib
import urllib.parse
from dataclasses import dataclass, field

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KEYS = {"name", "url", "api_key_env", "api_key_file", "models", "embedded"}


class UpstreamsError(ValueError):
    """The upstreams file cannot be used; the message names the file, the table and the key."""


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    url: str | None = None  # None: the embedded model
    api_key: str | None = field(default=None, repr=False)
    models: tuple[str, ...] | None = None  # None: whatever the upstream's /models lists

    @property
    def embedded(self) -> bool:
        return self.url is None


def check_url(url: str) -> str | None:
    """Why `url` cannot be an upstream's base URL, or None when it can."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return "must be an http:// or https:// base URL including /v1, for example http://127.0.0.1:11434/v1"
    if parsed.query or parsed.fragment:
        return "must not carry a query string or fragment"
    return None


def load(path: str, environ=os.environ) -> tuple[UpstreamConfig, ...]:
    """The upstreams a file declares, validated; UpstreamsError otherwise."""
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as error:
        raise UpstreamsError(f"JARVIS_UPSTREAMS_FILE names {path!r}, which cannot be read ({error.strerror})") \
            from None
    except tomllib.TOMLDecodeError as error:
        raise UpstreamsError(f"{path} is not valid TOML: {error}") from None
    unknown = set(document) - {"upstream"}
    if unknown:
        raise UpstreamsError(f"{path}: unknown top-level key {sorted(unknown)[0]!r}; write one [[upstream]] table "
                             "per upstream")
    tables = document.get("upstream")
    if not isinstance(tables, list) or not tables or not all(isinstance(table, dict) for table in tables):
        raise UpstreamsError(f"{path} declares no upstream: write one [[upstream]] table per upstream")
    upstreams, names = [], set()
    for number, table in enumerate(tables, start=1):
        upstream = _upstream(path, number, table, environ)
        if upstream.name in names:
            raise UpstreamsError(f"{path}, [[upstream]] #{number}: the name {upstream.name!r} is used twice")
        names.add(upstream.name)
        upstreams.append(upstream)
    if sum(1 for upstream in upstreams if upstream.embedded) > 1:
        raise UpstreamsError(f"{path}: only one upstream may be the embedded model")
    return tuple(upstreams)


def _upstream(path: str, number: int, table: dict, environ) -> UpstreamConfig:
    where = f"{path}, [[upstream]] #{number}"
    name = table.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UpstreamsError(f"{where}: 'name' must be a short name of letters, digits, '.', '_' or '-' "
                             f"(got {name!r})")
    where = f"{path}, [[upstream]] #{number} {name!r}"
    unknown = set(table) - _KEYS
    if unknown:
        raise UpstreamsError(f"{where}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(_KEYS))})")
    embedded = table.get("embedded", False)
    if not isinstance(embedded, bool):
        raise UpstreamsError(f"{where}: 'embedded' must be true or false")
    if embedded:
        extra = sorted(set(table) & {"url", "api_key_env", "api_key_file"})
        if extra:
            raise UpstreamsError(f"{where}: the embedded model takes no {extra[0]!r}")
        return UpstreamConfig(name, models=_models(where, table))
    url = table.get("url")
    if not isinstance(url, str):
        raise UpstreamsError(f"{where}: 'url' is required (or 'embedded = true')")
    problem = check_url(url)
    if problem:
        raise UpstreamsError(f"{where}: 'url' {problem} (got {url!r})")
    return UpstreamConfig(name, url.rstrip("/"), _api_key(where, table, environ), _models(where, table))


def _models(where: str, table: dict) -> tuple[str, ...] | None:
    try:
        return names_in(table, "models")
    except ValueError:
        raise UpstreamsError(f"{where}: 'models' must be a list of model names, like [\"gpt-4.1-mini\"]") from None


def names_in(table: dict, key: str) -> tuple[str, ...] | None:
    """A TOML table's non-empty list of non-empty strings under `key` (None when absent); ValueError else."""
    names = table.get(key)
    if names is None:
        return None
    if not isinstance(names, list) or not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(key)
    return tuple(names)


def _api_key(where: str, table: dict, environ) -> str | None:
    variable, key_file = table.get("api_key_env"), table.get("api_key_file")
    if variable is not None and key_file is not None:
        raise UpstreamsError(f"{where}: set 'api_key_env' or 'api_key_file', not both")
    if variable is not None:
        if not isinstance(variable, str) or not environ.get(variable, "").strip():
            raise UpstreamsError(f"{where}: 'api_key_env' names {variable!r}, which is not set in the environment")
        return environ[variable].strip()
    if key_file is not None:
        try:
            return read_secret(key_file)
        except OSError as error:
            raise UpstreamsError(f"{where}: 'api_key_file' names {key_file!r}, which cannot be read "
                                 f"({error.strerror})") from None
        except ValueError:
            raise UpstreamsError(f"{where}: the file in 'api_key_file' is empty") from None
    return None


def read_secret(path) -> str:
    """A secret kept in a file: its content, stripped. OSError when it cannot be read, ValueError when empty."""
    with open(os.path.expanduser(str(path))) as file:
        secret = file.read().strip()
    if not secret:
        raise ValueError(path)
    return secret

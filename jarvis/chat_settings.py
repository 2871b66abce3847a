"""A conversation's own settings: its system prompt and the sampling parameters every backend honours.

Stored with the conversation (JSON), edited from the page, sent with every request of that conversation;
a new conversation starts from the server's defaults (JARVIS_SYSTEM_PROMPT, JARVIS_TEMPERATURE,
JARVIS_TOP_P, JARVIS_MAX_TOKENS). A parameter left unset (None) is not sent: the upstream's own default.
Its `tools` are switches over the tool servers' defaults, {"server/tool": true | false}: a tool not named
is on when its server is `enabled` (jarvis.tool_loop).
"""

from __future__ import annotations

from jarvis.errors import ApiError
from jarvis.settings import Settings

_NUMBERS = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0)}
MAX_TOKENS_LIMIT = 1_000_000
MAX_TOOL_SWITCHES = 1000


def defaults(settings: Settings) -> dict:
    return {"system_prompt": settings.system_prompt, "temperature": settings.temperature, "top_p": settings.top_p,
            "max_tokens": settings.max_tokens}


def effective(stored: dict | None, settings: Settings) -> dict:
    """What a conversation uses: its own values, the server's defaults for those it never set."""
    return {**defaults(settings), **(stored or {})}


def checked(value, settings: Settings) -> dict:
    """A page's settings object, validated (400 naming the field otherwise); missing fields are unset."""
    if not isinstance(value, dict):
        raise ApiError(400, "'settings' must be an object", param="settings", code="invalid_type")
    unknown = sorted(set(value) - {"system_prompt", "temperature", "top_p", "max_tokens", "tools"})
    if unknown:
        raise ApiError(400, f"'settings' has an unknown field {unknown[0]!r}", param="settings", code="invalid_value")
    prompt = value.get("system_prompt", "")
    if not isinstance(prompt, str) or len(prompt) > settings.max_message_chars:
        raise ApiError(400, f"'system_prompt' must be text of at most {settings.max_message_chars} characters",
                       param="system_prompt", code="invalid_value")
    result = {"system_prompt": prompt}
    for name, (low, high) in _NUMBERS.items():
        number = value.get(name)
        if number is not None and (isinstance(number, bool) or not isinstance(number, (int, float))
                                   or not low <= number <= high):
            raise ApiError(400, f"'{name}' must be a number from {low:g} to {high:g}, or null", param=name,
                           code="invalid_value")
        result[name] = None if number is None else float(number)
    tokens = value.get("max_tokens")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int)
                               or not 1 <= tokens <= MAX_TOKENS_LIMIT):
        raise ApiError(400, f"'max_tokens' must be a whole number from 1 to {MAX_TOKENS_LIMIT}, or null",
                       param="max_tokens", code="invalid_value")
    result["max_tokens"] = tokens
    switches = value.get("tools", {})
    if not isinstance(switches, dict) or len(switches) > MAX_TOOL_SWITCHES or not all(
            isinstance(key, str) and "/" in key and len(key) <= 400 and isinstance(on, bool)
            for key, on in switches.items()):
        raise ApiError(400, f"'tools' must be an object of at most {MAX_TOOL_SWITCHES} switches, "
                            '{"server/tool": true or false}', param="tools", code="invalid_value")
    if switches:
        result["tools"] = switches
    return result


def request_fields(conversation_settings: dict) -> tuple[list[dict], dict]:
    """The system message to put first (if any) and the parameters to add to a chat request."""
    system = [{"role": "system", "content": conversation_settings["system_prompt"]}] \
        if conversation_settings.get("system_prompt") else []
    parameters = {name: conversation_settings[name] for name in ("temperature", "top_p", "max_tokens")
                  if conversation_settings.get(name) is not None}
    return system, parameters

"""The exact chunk shapes real OpenAI-compatible servers stream, for the fake upstream to replay.

Each shape builds the JSON of one streamed chunk, as read from the servers' source or
documentation (field names, which fields are null rather than absent, where usage goes):

    plain          the 2023 minimum: {"content"} deltas (reasoning, if any, as reasoning_content)
    llamacpp       llama.cpp server: role chunk with content null, delta.reasoning_content,
                   `timings` on the final chunk (tools/server, chat.completion.chunk)
    vllm           vLLM >= 0.11: delta.reasoning (DeltaMessage), logprobs null, usage chunk with choices []
    ollama         Ollama /v1 (openai/openai.go ToChunk): every delta has role and content, reasoning
                   in delta.reasoning, system_fingerprint "fp_ollama"
    deepseek       DeepSeek's API: content null beside reasoning_content and the reverse, usage with
                   completion_tokens_details.reasoning_tokens
    openai         OpenAI: refusal null, obfuscation, "usage": null on every chunk when usage was asked
                   for and a last chunk with choices [] and the usage; tool-call fragments
    think          <think>...</think> inside delta.content (llama.cpp --reasoning-format none)
    think_close    the same with <think> already in the prompt: only </think> arrives
"""

from __future__ import annotations

CREATED = 1700000000


def answer_chunks(shape: str, *, reasoning_tokens: int = 0, tokens: int = 3, asked_usage: bool = False,
                  model: str = "fake-model", tool_calls: list | None = None, text_of=None):
    """A whole streamed answer in `shape`, as (token index or None, chunk) pairs: index None for the
    chunks around the tokens. `text_of(index, thinking, number)` may choose each token's text."""
    opening = role_chunk(shape, model, asked_usage)
    if opening is not None:
        yield None, opening
    for index in range(reasoning_tokens + tokens):
        thinking = index < reasoning_tokens
        number = index if thinking else index - reasoning_tokens
        text = text_of(index, thinking, number) if text_of else f"{'r' if thinking else 'w'}{number} "
        yield index, token_chunk(shape, model, text, reasoning=thinking, first=index == 0,
                                 first_content=not thinking and number == 0 and reasoning_tokens > 0,
                                 asked_usage=asked_usage)
    for number, call in enumerate(tool_calls or ()):
        for chunk in tool_call_chunks(model, call["name"], call["arguments"], asked_usage, number):
            yield None, chunk
    for chunk in final_chunks(shape, model, "tool_calls" if tool_calls else "stop", asked_usage,
                              reasoning_tokens, tokens):
        yield None, chunk


def token_chunk(shape: str, model: str, text: str, *, reasoning: bool, first: bool, first_content: bool,
                asked_usage: bool) -> dict:
    """One streamed token: a reasoning token or a content token, in `shape`."""
    delta = _delta(shape, text, reasoning=reasoning, first=first, first_content=first_content)
    choice = {"index": 0, "delta": delta, "finish_reason": None}
    if shape in ("vllm", "deepseek", "openai"):
        choice["logprobs"] = None
    return _envelope(shape, model, [choice], asked_usage)


def _delta(shape: str, text: str, *, reasoning: bool, first: bool, first_content: bool) -> dict:
    if shape in ("think", "think_close"):
        if reasoning and first and shape == "think":
            text = "<think>\n" + text
        if first_content:
            text = "</think>\n\n" + text
        return {**({"role": "assistant"} if first else {}), "content": text}
    if shape == "ollama":
        return {"role": "assistant", "content": "", "reasoning": text} if reasoning else \
            {"role": "assistant", "content": text}
    if shape == "deepseek":
        delta = {"content": None, "reasoning_content": text} if reasoning else \
            {"content": text, "reasoning_content": None}
        return {"role": "assistant", **delta} if first else delta
    field = {"vllm": "reasoning"}.get(shape, "reasoning_content")
    delta = {field: text} if reasoning else {"content": text}
    return {"role": "assistant", **delta} if first and shape not in ("llamacpp", "openai") else delta


def role_chunk(shape: str, model: str, asked_usage: bool) -> dict | None:
    """The chunk some servers send before the first token: llama.cpp's role with content null,
    OpenAI's role with an empty content and a null refusal."""
    if shape == "llamacpp":
        return _envelope(shape, model, [{"finish_reason": None, "index": 0,
                                         "delta": {"role": "assistant", "content": None}}], asked_usage)
    if shape == "openai":
        return _envelope(shape, model, [{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None},
                                         "logprobs": None, "finish_reason": None}], asked_usage)
    return None


def tool_call_chunks(model: str, name: str, arguments: str, asked_usage: bool, number: int = 0) -> list[dict]:
    """OpenAI's tool-call stream: id, type and name first, then the arguments in fragments (the `number`th call
    of its step: its index)."""
    opening = {"tool_calls": [{"index": number, "id": f"call_fake_{number + 1:04d}", "type": "function",
                               "function": {"name": name, "arguments": ""}}]}
    chunks = [_envelope("openai", model, [{"index": 0, "delta": opening, "logprobs": None,
                                           "finish_reason": None}], asked_usage)]
    size = max(1, len(arguments) // 4)
    for start in range(0, len(arguments), size):
        fragment = {"tool_calls": [{"index": number, "function": {"arguments": arguments[start:start + size]}}]}
        chunks.append(_envelope("openai", model, [{"index": 0, "delta": fragment, "logprobs": None,
                                                   "finish_reason": None}], asked_usage))
    return chunks


def final_chunks(shape: str, model: str, finish_reason: str, asked_usage: bool, reasoning_tokens: int,
                 content_tokens: int) -> list[dict]:
    """The finish_reason chunk, then the usage where the shape puts it."""
    usage = _usage(shape, reasoning_tokens, content_tokens)
    finish = {"index": 0, "delta": {}, "finish_reason": finish_reason}
    if shape in ("vllm", "deepseek", "openai"):
        finish["logprobs"] = None
    last = _envelope(shape, model, [finish], asked_usage)
    if shape == "llamacpp":
        tokens = reasoning_tokens + content_tokens
        last["timings"] = {"prompt_n": 3, "prompt_ms": 12.5, "prompt_per_token_ms": 4.2, "prompt_per_second": 240.0,
                           "predicted_n": tokens, "predicted_ms": 40.0 * tokens, "predicted_per_token_ms": 40.0,
                           "predicted_per_second": 25.0}
        if asked_usage:
            last["usage"] = usage
        return [last]
    if not asked_usage:
        return [last]
    return [last, {**_envelope(shape, model, [], asked_usage), "usage": usage}]


def _usage(shape: str, reasoning_tokens: int, content_tokens: int) -> dict:
    completion = reasoning_tokens + content_tokens
    usage = {"prompt_tokens": 3, "completion_tokens": completion, "total_tokens": completion + 3}
    if shape in ("deepseek", "openai"):
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


def _envelope(shape: str, model: str, choices: list, asked_usage: bool) -> dict:
    if shape == "llamacpp":
        return {"choices": choices, "created": CREATED, "id": "chatcmpl-fakeLlamaCpp", "model": model,
                "system_fingerprint": "b7000-fake", "object": "chat.completion.chunk"}
    chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": CREATED, "model": model}
    if shape in ("ollama", "deepseek", "openai"):
        chunk["system_fingerprint"] = {"ollama": "fp_ollama", "deepseek": "fp_7e73fd9a08"}.get(shape, "fp_fake")
    chunk["choices"] = choices
    if shape == "openai":
        chunk["service_tier"] = "default"
        chunk["obfuscation"] = "x1y2"
        if asked_usage:
            chunk["usage"] = None
    return chunk


_REPEAT = "Repeat this sentence exactly, and nothing else: "


def repeated(body: dict, continues: str) -> str | None:
    """What a server's model says when asked to repeat a sentence with the answer begun (a user message
    "Repeat this sentence exactly, and nothing else: S", then an assistant message holding S's start P):
    the rest of S when the server continues a final assistant message, all of S when it opens a new turn
    (as a model at temperature 0 does). None for any other request. `continues`: "yes" (llama.cpp's
    server), "no" (llama-cpp-python's server), "with_fields" (vLLM: only with continue_final_message and
    add_generation_prompt false), "refuses_fields" (OpenAI: a new turn, and 400 for those fields — the
    caller answers that)."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or len(messages) < 2 or not all(isinstance(m, dict) for m in messages[-2:]):
        return None
    question, begun = messages[-2], messages[-1]
    if question.get("role") != "user" or begun.get("role") != "assistant" or \
            not str(question.get("content", "")).startswith(_REPEAT):
        return None
    sentence, prefix = question["content"][len(_REPEAT):], str(begun.get("content", ""))
    continuing = continues == "yes" or (continues == "with_fields" and body.get("continue_final_message") is True
                                        and body.get("add_generation_prompt") is False)
    return sentence[len(prefix):] if continuing and sentence.startswith(prefix) else sentence

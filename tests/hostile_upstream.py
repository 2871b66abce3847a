"""Named ways an upstream can attack Jarvis, for the fake upstream to play (bounded, loopback only).

A chat request picks one with `x_fault: {"hostile": NAME, ...}`; `/models` with the fake's default
scenario's `models` field. Each mode writes raw bytes to the socket itself:

    huge_events    back-to-back events of `event_bytes` each (just under Jarvis's 4 MiB cap), for
                   `seconds` or until the peer leaves
    drip           a normal answer, one byte every `drip_seconds`
    drip_json      a whole JSON answer (for a request that did not stream: chat, completions,
                   embeddings), its head at once and its body one byte every `drip_seconds`
    nested         an event whose JSON nests 100,000 deep under "error"
    surrogates     an emoji sent as two events, one UTF-16 half each ("\\ud83d", then "\\ude00")
    invalid_utf8   an event whose content holds bytes that are not UTF-8
    html           200 with an HTML page instead of an event stream
    gzip           200 with Content-Encoding: gzip (Jarvis asked for identity)
    json           200 with a whole JSON answer although the request said stream
    silent         reads the request, then says nothing at all
    close          reads the request, then closes without a byte (FIN)

`/models` modes: huge (`models_bytes` of JSON), drip (one byte every `drip_seconds`), silent.
"""

from __future__ import annotations

import gzip
import json
import time

CHUNK = "{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0," \
        "\"delta\":{\"content\":%s},\"finish_reason\":null}]}"


def content_event(content_json: str) -> bytes:
    """One `data:` event carrying a content delta whose JSON text is given as is."""
    return b"data: " + (CHUNK % content_json).encode("utf-8", "surrogatepass") + b"\n\n"


def chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def head(status: str, content_type: str, *extra: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Type: {content_type}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


SSE_HEAD = head("200 OK", "text/event-stream", "Transfer-Encoding: chunked")
DONE = chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n"


def play(mode: str, sock, scenario, send, pause) -> None:
    """Play `mode` on `sock` with the fake's own send and pause (which notices the peer leaving)."""
    if mode == "huge_events":
        event = content_event(json.dumps("x" * max(0, scenario.event_bytes - 200)))
        send(sock, SSE_HEAD)
        deadline = time.monotonic() + scenario.seconds
        while time.monotonic() < deadline:
            send(sock, chunked(event))
        send(sock, DONE)
    elif mode == "drip":
        body = SSE_HEAD + b"".join(chunked(content_event(json.dumps(f"w{i} "))) for i in range(scenario.tokens)) + DONE
        for index in range(len(body)):
            send(sock, body[index:index + 1])
            pause(sock, scenario.drip_seconds)
    elif mode == "drip_json":
        body = json.dumps({"id": "c", "object": "list", "data": [{"object": "embedding", "index": 0,
                                                                   "embedding": [0.5] * 50}]}).encode()
        send(sock, head("200 OK", "application/json", f"Content-Length: {len(body)}"))
        for index in range(len(body)):
            send(sock, body[index:index + 1])
            pause(sock, scenario.drip_seconds)
    elif mode == "nested":
        deep = "[" * 100_000 + "]" * 100_000
        send(sock, SSE_HEAD + chunked(content_event(json.dumps("w0 "))) +
             chunked(b'data: {"error": ' + deep.encode() + b"}\n\n") + DONE)
    elif mode == "surrogates":
        send(sock, SSE_HEAD + chunked(content_event(json.dumps("smile "))) + chunked(content_event('"\\ud83d"')) +
             chunked(content_event('"\\ude00"')) + chunked(content_event(json.dumps(" done"))) + DONE)
    elif mode == "invalid_utf8":
        bad = b"data: " + (CHUNK % '"caf@ "').encode().replace(b"@", b"\xe9\xff") + b"\n\n"  # Latin-1, a 0xff
        send(sock, SSE_HEAD + chunked(bad) + DONE)
    elif mode == "html":
        page = b"<html><body><h1>Welcome to nginx!</h1></body></html>"
        send(sock, head("200 OK", "text/html", f"Content-Length: {len(page)}") + page)
    elif mode == "gzip":
        body = gzip.compress(b"data: " + (CHUNK % '"w0 "').encode() + b"\n\ndata: [DONE]\n\n")
        send(sock, head("200 OK", "text/event-stream", "Content-Encoding: gzip", f"Content-Length: {len(body)}") + body)
    elif mode == "json":
        body = json.dumps({"id": "c", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "whole"}, "finish_reason": "stop"}]}).encode()
        send(sock, head("200 OK", "application/json", f"Content-Length: {len(body)}") + body)
    elif mode == "silent":
        pause(sock, 120)
    elif mode == "close":
        return
    else:
        raise ValueError(f"no hostile mode {mode!r}")


def play_models(mode: str, sock, scenario, send, pause) -> None:
    if mode == "huge":
        entry = b'{"id": "model-%08d", "object": "model", "owned_by": "tests"}'
        count = max(1, scenario.models_bytes // len(entry % 0))
        send(sock, head("200 OK", "application/json", "Transfer-Encoding: chunked") +
             chunked(b'{"object": "list", "data": ['))
        batch = 1000
        for start in range(0, count, batch):
            items = b",".join(entry % index for index in range(start, min(count, start + batch)))
            send(sock, chunked((b"," if start else b"") + items))
        send(sock, chunked(b"]}") + b"0\r\n\r\n")
    elif mode == "drip":
        body = json.dumps({"object": "list", "data": [{"id": "fake-model", "object": "model"}]}).encode()
        send(sock, head("200 OK", "application/json", f"Content-Length: {len(body)}"))
        for index in range(len(body)):
            send(sock, body[index:index + 1])
            pause(sock, scenario.drip_seconds)
    elif mode == "silent":
        pause(sock, 120)
    else:
        raise ValueError(f"no /models mode {mode!r}")

"""The streaming doctor, for operators: does an answer's stream reach this machine as Jarvis sends it?

    python -m jarvis.doctor https://chat.example.org [--key KEY]

Reads /debug/stream-check (ten events sent 200 ms apart) through whatever is in between — nginx, a
corporate proxy, a CDN — and prints when each arrived, the verdict, and the response headers that
tell who buffered: Content-Encoding, Cache-Control, X-Accel-Buffering, Via. When the events arrived
bunched it names the hop it can see buffering — from `Server`, `Via`, `CF-Ray`, `X-Cache`, and compression
on a stream Jarvis never compresses — and prints the fix for it (nginx, Caddy, Apache, Traefik, Cloudflare;
all of them when no hop says who it is). `--direct URL` times Jarvis's own address too, beside the proxied
one, to show the hop in between is the one that buffers. Exit status 0 when the events arrived as sent, 1
when bunched or cut, 2 when the check could not run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import requests

from jarvis.debug import verdict

HEADERS = ("Content-Type", "Content-Encoding", "Cache-Control", "X-Accel-Buffering", "Via", "Server", "CF-Ray",
           "X-Cache")

# What to change, for each hop the doctor can name.
FIXES = {
    "nginx": "in the location that proxies Jarvis: `proxy_buffering off;` (or drop `proxy_ignore_headers "
             "X-Accel-Buffering`, so that Jarvis's `X-Accel-Buffering: no` is obeyed), `gzip off;`, "
             "`proxy_http_version 1.1;`",
    "Caddy": "in the `reverse_proxy` block: `flush_interval -1`, and no `encode` for text/event-stream",
    "Apache": "on the ProxyPass line: `flushpackets=on`; and `SetEnvIf Request_URI . no-gzip` (mod_deflate "
              "must not compress text/event-stream)",
    "Traefik": "no `buffering` middleware on Jarvis's router, and `compress` with `excludedContentTypes: "
               "[text/event-stream]`",
    "Cloudflare": "a Cache Rule that bypasses the cache for Jarvis's host, and no Rocket Loader or compression "
                  "rules on text/event-stream (Cloudflare passes an uncompressed event stream on as it comes)",
}


# How each hop names itself in `Server` or `Via`.
MARKS = {"Cloudflare": ("cloudflare",), "nginx": ("nginx", "openresty"), "Caddy": ("caddy",),
         "Apache": ("apache",), "Traefik": ("traefik",)}


def culprits(seen: dict) -> list[str]:
    """The hops whose own headers say they were on the way, each with the header that says so."""
    found = []
    for name, marks in MARKS.items():
        for header in ("Server", "Via"):
            value = seen.get(header, "")
            if any(mark in value.lower() for mark in marks):
                found.append(f"{name} ({header}: {value})")
                break
        else:
            if name == "Cloudflare" and "CF-Ray" in seen:
                found.append(f"Cloudflare (CF-Ray: {seen['CF-Ray']})")
    return found


def advice(seen: dict) -> list[str]:
    """What to change, for a stream that arrived bunched: the fix for each hop seen, else for every one."""
    lines = []
    if "Content-Encoding" in seen:
        lines.append(f"the stream arrived compressed ({seen['Content-Encoding']}), which Jarvis never does: "
                     "whatever compressed it held the events to do so")
    named = culprits(seen)
    for hop in named:
        name = hop.split(" (")[0]
        lines.append(f"{hop} is buffering this response; fix: {FIXES[name]}")
    if not named:
        lines.append("no hop on the way says who it is; the fix for each of the usual ones:")
        lines += [f"  {name}: {fix}" for name, fix in FIXES.items()]
    return lines


def check(url: str, key: str | None = None) -> tuple[bool, str, dict, list[float]]:
    """(as sent, sentence, the headers that arrived, each event's arrival in ms after the request)."""
    headers = {"Accept": "text/event-stream"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    started = time.monotonic()
    with requests.get(url.rstrip("/") + "/debug/stream-check", headers=headers, stream=True, timeout=30) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code} from {response.url}: {response.text[:300]}")
        seen = {name: response.headers[name] for name in HEADERS if name in response.headers}
        arrivals, buffer = [], b""
        for chunk in response.iter_content(chunk_size=None):  # decoded (gzip) as it arrives
            buffer += chunk
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                for line in block.split(b"\n"):
                    if line.startswith(b"data: {") and b"jarvis.stream_check" in line:
                        json.loads(line[6:])
                        arrivals.append((time.monotonic() - started) * 1000)
    as_sent, sentence = verdict(arrivals)
    if "Content-Encoding" in seen:
        sentence += f"; the response came with Content-Encoding: {seen['Content-Encoding']}, which Jarvis never sends"
    return as_sent, sentence, seen, arrivals


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="Jarvis's address as clients reach it, e.g. https://chat.example.org")
    parser.add_argument("--key", help="JARVIS_API_KEY, when one is set")
    parser.add_argument("--direct", help="Jarvis's own address (http://127.0.0.1:8000), timed beside the url")
    args = parser.parse_args(argv)
    try:
        as_sent, sentence, seen, arrivals = check(args.url, args.key)
        direct = check(args.direct, args.key) if args.direct else None
    except (requests.RequestException, RuntimeError) as error:
        print(f"the check could not run: {error}", file=sys.stderr)
        return 2
    print("arrived (ms after the request): " + ", ".join(f"{arrival:.0f}" for arrival in arrivals))
    if direct is not None:
        print("straight from Jarvis:           " + ", ".join(f"{arrival:.0f}" for arrival in direct[3]) +
              (" (as sent: the hop in between buffers)" if direct[0] and not as_sent else ""))
    for name in HEADERS:
        print(f"{name}: {seen.get(name, '(none)')}")
    print(("OK: " if as_sent else "PROBLEM: ") + sentence)
    if not as_sent:
        for line in advice(seen):
            print(line)
    return 0 if as_sent else 1


if __name__ == "__main__":
    sys.exit(main())

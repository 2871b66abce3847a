"""The streaming doctor, for operators: does an answer's stream reach this machine as Jarvis sends it?

    python -m jarvis.doctor https://chat.example.org [--key KEY]

Reads /debug/stream-check (ten events sent 200 ms apart) through whatever is in between — nginx, a
corporate proxy, a CDN — and prints when each arrived, the verdict, and the response headers that
tell who buffered: Content-Encoding, Cache-Control, X-Accel-Buffering, Via. Exit status 0 when the
events arrived as sent, 1 when bunched or cut, 2 when the check could not run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import requests

from jarvis.debug import verdict

HEADERS = ("Content-Type", "Content-Encoding", "Cache-Control", "X-Accel-Buffering", "Via", "Server")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="Jarvis's address as clients reach it, e.g. https://chat.example.org")
    parser.add_argument("--key", help="JARVIS_API_KEY, when one is set")
    args = parser.parse_args(argv)
    try:
        as_sent, sentence, seen, arrivals = check(args.url, args.key)
    except (requests.RequestException, RuntimeError) as error:
        print(f"the check could not run: {error}", file=sys.stderr)
        return 2
    print("arrived (ms after the request): " + ", ".join(f"{arrival:.0f}" for arrival in arrivals))
    for name in HEADERS:
        print(f"{name}: {seen.get(name, '(none)')}")
    print(("OK: " if as_sent else "PROBLEM: ") + sentence)
    return 0 if as_sent else 1


if __name__ == "__main__":
    sys.exit(main())

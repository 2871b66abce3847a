"""Where a Jarvis worker's time goes: py-spy raw profiles (bench/run.py --profile out.txt) side by side.

Each sample is given to the first group its stack meets, walking from the innermost frame out;
gevent's socket and wait frames are skipped on the way, so a `recv` counts for whoever called it
(the upstream client, gunicorn's writer, the client watcher). A sample with nothing but the hub's
loop on its stack is the loop itself: libev, and the callbacks and switches it runs in C.

    python bench/profile_summary.py before.txt after.txt [--cpu-us 81 66]
"""

import argparse
import collections

# (group, substrings of a frame "function (file:line)"), in the order a frame is tested.
GROUPS = [
    ("greenlet spawn and exit", ["spawn (jarvis/logs.py", "gevent/greenlet.py", "gevent/baseserver.py",
                                 "gevent/pool.py", "gevent/_config.py"]),
    ("logging (the end line)", ["logging/__init__.py", "jarvis/logs.py"]),
    ("upstream HTTP client", ["jarvis/http1.py", "urllib3/", "http/client.py", "requests/", "socket.py:"]),
    ("SSE parsing and checks", ["jarvis/sse.py", "jarvis/backends/upstream.py", "jarvis/reasoning.py",
                                "jarvis/answer.py"]),
    ("relay: pump, response loop", ["jarvis/relay.py", "jarvis/pump.py", "jarvis/runs.py", "gevent/queue.py",
                                    "gevent/event.py"]),
    ("writing the response (gunicorn, worker.py)", ["gunicorn/http/wsgi.py", "gunicorn/util.py",
                                                    "jarvis/worker.py"]),
    ("gunicorn: reading the request", ["gunicorn/http/"]),
    ("Jarvis: routes, checks, metrics", ["jarvis/", "prometheus_client/"]),
    ("Flask and werkzeug", ["flask/", "werkzeug/"]),
    ("gunicorn: the worker's loop", ["gunicorn/", "email/utils.py"]),  # email.utils: its Date header
]
SKIPPED = ("gevent/_socketcommon.py", "gevent/_socket3.py", "gevent/_hub_primitives", "gevent/_abstract_linkable",
           "gevent/_waiter", "gevent/timeout.py", "gevent/hub.py")
HUB = "the hub's loop (libev, callbacks, switches)"


def group_of(stack: list[str]) -> str:
    for frame in reversed(stack):  # innermost first
        if any(part in frame for part in SKIPPED):
            continue
        for name, parts in GROUPS:
            if any(part in frame for part in parts):
                return name
        return "other"
    return HUB


def shares(path: str) -> tuple[collections.Counter, int]:
    counts, total = collections.Counter(), 0
    with open(path) as file:
        for line in file:
            stack, _, number = line.rstrip("\n").rpartition(" ")
            if not stack or not number.isdigit():
                continue
            frames = [frame for frame in stack.split(";") if frame]
            if frames and frames[0].startswith("process ") or frames and frames[0].startswith("thread "):
                frames = frames[1:]
            counts[group_of(frames)] += int(number)
            total += int(number)
    return counts, total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profiles", nargs="+", help="py-spy --format raw outputs, one column each")
    parser.add_argument("--cpu-us", type=float, nargs="+", help="the worker's CPU per unit (µs) in each run, "
                                                                "to turn shares into µs")
    args = parser.parse_args()
    columns = [shares(path) for path in args.profiles]
    names = [name for name, _ in GROUPS] + [HUB, "other"]
    header = ["", *[f"{path} %" for path in args.profiles]]
    if args.cpu_us:
        header += [f"{path} µs" for path in args.profiles]
    rows = []
    for name in sorted(names, key=lambda n: -sum(c[n] / t for c, t in columns if t)):
        row = [name] + [f"{counts[name] / total:.1%}" if total else "-" for counts, total in columns]
        if args.cpu_us:
            row += [f"{counts[name] / total * cpu:.1f}" if total else "-"
                    for (counts, total), cpu in zip(columns, args.cpu_us, strict=True)]
        rows.append(row)
    rows.append(["samples", *[str(total) for _, total in columns]] + ([""] * len(columns) if args.cpu_us else []))
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        print("  ".join(str(cell).rjust(width) if index else str(cell).ljust(width)
                        for index, (cell, width) in enumerate(zip(row, widths, strict=True))))


if __name__ == "__main__":
    main()

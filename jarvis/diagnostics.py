"""Stack dumps for a worker that seems stuck: `kill -USR1 <pid>` prints every greenlet and thread.

Two dumps, because each sees what the other cannot. The Python handler prints
every greenlet (`gevent.util.print_run_info`), but it runs only when the hub
gets to run. faulthandler prints from the signal itself, so it works even when
the hub is blocked, but it sees only the greenlet that is running. gunicorn's
own USR1 handler (reopen the log files) still runs after ours.

gevent's monitor thread reports a hub blocked for more than GEVENT_MAX_BLOCKING_TIME
(0.1 s) with every thread's stack, about 20 KB each time: `rate_limit_blocking_reports`
prints the first in full, then at most one every REPORT_EVERY_SECONDS, saying how many
were left out since. A check that finds the hub "blocked" while its thread was waiting for a
CPU (Linux's schedstat: it ran less than the limit and spent most of the rest runnable, not run)
is a busy machine, not a block: one line says so, without stacks. A report left out is not built
either: building one formats every thread's stack in the monitor's thread, which holds the GIL the
blocked worker needs. (A worker starting on a starved machine — a quarter of a core, importing
the MCP SDK — was reported 62 times in 28 s, 1.6 MB, and did not answer within 30 s.)
"""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import io
import os
import re
import signal
import sys
import time
import traceback

import gevent.util
from gevent import monkey

from jarvis import logs

REPORT_EVERY_SECONDS = 10.0


def install_stack_dump() -> None:
    """Chain a greenlet dump and faulthandler in front of the current SIGUSR1 handler."""
    previous = signal.getsignal(signal.SIGUSR1)

    def dump_then_chain(signum, frame):
        dump_greenlets("SIGUSR1")
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGUSR1, dump_then_chain)
    # After signal.signal, which would otherwise replace faulthandler's C-level handler.
    faulthandler.register(signal.SIGUSR1, file=_faulthandler_file(), all_threads=True, chain=True)


def _faulthandler_file():
    """Where faulthandler writes: stderr, or in JSON mode a pipe whose reader (a native thread: it runs
    while the hub is blocked, which is when this dump matters) makes each dump one JSON object."""
    if not logs.json_mode():
        return sys.stderr
    read_fd, write_fd = os.pipe()
    # The signal handler writes while holding the GIL the reader needs: a full pipe would deadlock it. So the
    # pipe holds far more than a dump (1 MiB; 32 threads of 100 frames are ~300 KB), and a write that finds
    # it full is dropped (non-blocking; faulthandler ignores the error) rather than waited on.
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    os.set_blocking(write_fd, False)
    wait_readable = monkey.get_original("select", "select")

    def pump():
        while True:
            chunks = [os.read(read_fd, 65536)]
            while wait_readable([read_fd], [], [], 0.2)[0]:  # a dump is written in many pieces, at once
                chunks.append(os.read(read_fd, 65536))
            stacks = b"".join(chunks).decode(errors="replace")
            logs.write_line(logs.json_line("INFO", "jarvis.diagnostics", "faulthandler stack dump (from the signal)",
                                           event="faulthandler_dump", stacks=stacks))

    monkey.get_original("_thread", "start_new_thread")(pump, ())
    return os.fdopen(write_fd, "w")


def json_greenlet_errors() -> None:
    """In JSON mode, gevent's report of a greenlet that died (printed by the hub: a traceback, then
    "<context> failed with <error>") is one JSON object, the traceback one field."""
    if not logs.json_mode():
        return
    import gevent.hub

    def print_exception(hub, context, kind, value, tb):
        kind, value, tb = hub._normalize_exception(kind, value, tb)
        try:
            where = context if isinstance(context, str) else repr(context)
        except Exception:  # a context whose repr fails must not hide the error
            where = type(context).__name__
        logs.write_line(logs.json_line("ERROR", "gevent.hub", f"{where} failed with {kind.__name__}",
                                       event="greenlet_error",
                                       exception="".join(traceback.format_exception(kind, value, tb))))

    gevent.hub.Hub.print_exception = print_exception


def _summary() -> list[str]:
    try:  # the open streams, one line each, so the dump names a stuck one before its stack
        from jarvis.streams import OPEN, summary_lines

        return summary_lines(OPEN)
    except Exception as error:  # a dump must never fail for want of a summary
        return [f"unknown ({type(error).__name__})"]


def dump_greenlets(reason: str) -> None:
    """Print every thread's and greenlet's stack to stderr (the error log); in JSON mode as one object,
    the open streams a list and the stacks one field."""
    lines = _summary()
    if logs.json_mode():
        stacks = io.StringIO()
        gevent.util.print_run_info(file=stacks)
        logs.write_line(logs.json_line("INFO", "jarvis.diagnostics", f"stack dump ({reason}): greenlets and threads",
                                       event="stack_dump", reason=reason, open_streams=lines,
                                       stacks=stacks.getvalue()))
        return
    stream = sys.stderr
    stream.write(f"==== jarvis stack dump ({reason}) pid {os.getpid()}: greenlets and threads ====\n")
    stream.write(f"open streams: {len(lines)}\n" + "".join(f"  {line}\n" for line in lines))
    gevent.util.print_run_info(file=stream)
    stream.write(f"==== end of jarvis stack dump pid {os.getpid()} ====\n")
    stream.flush()


def dump_blocked_worker() -> None:
    """For gunicorn's worker_abort: the hub was blocked; show what blocked it."""
    if logs.json_mode():  # the process exits next: no time for the pipe's reader, so formatted here
        threads = "".join(f"Thread {ident:#x}:\n{''.join(traceback.format_stack(frame))}"
                          for ident, frame in sys._current_frames().items())
        logs.write_line(logs.json_line("ERROR", "jarvis.diagnostics", "worker timeout: every thread's stack",
                                       event="thread_dump", stacks=threads))
    else:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    dump_greenlets("worker timeout")


# Where a worker still starting is blocked: gunicorn's load_wsgi (the app's imports; Werkzeug compiling its
# routes) and post_worker_init, and its run() creating and starting the listening server. On a busy
# machine these take over GEVENT_MAX_BLOCKING_TIME and are reported: printed, but not counted against the
# next report, which is about the worker serving. (Counted, the report of a start-up printed just after
# the worker began serving — the monitor builds a report after the fact — held back the first real one.)
_STARTING = ("in load_wsgi", "in post_worker_init", "server = StreamServer(", "server.start()")


def is_start_up_report(report: str) -> bool:
    """Does a blocked-hub report show the worker still starting? Its blocked stack (before "Info:") says;
    or, when that stack is a lone frame without its callers (seen: a generator's, `ast.iter_child_nodes`,
    while pydantic read a model's source during the app's imports — so a start-up counted as serving),
    the hub thread's own stack, which the report's "Info:" lists a moment later with every caller."""
    blocked, _, info = report.partition("Info:")
    if any(step in blocked for step in _STARTING):
        return True
    thread = re.search(r"Blocked Stack \(for thread id (0x[0-9a-f]+)\)", blocked)
    if thread is None:
        return False
    own = re.search(rf"^Thread {thread.group(1)} .*?(?=^\*{{80}}$|\Z)", info, flags=re.M | re.S)
    return own is not None and any(step in own.group(0) for step in _STARTING)


_worker_starting = [False]  # a gunicorn worker between its fork and its first wait for connections
_now = time.monotonic


def hub_thread_times(hub) -> tuple[float, float] | None:
    """The seconds the main hub's thread has spent on a CPU and waiting for one (runnable, not run), from
    Linux's /proc schedstat; None for another hub, or where the kernel does not keep them."""
    if not getattr(hub, "main_hub", False):
        return None
    try:
        with open(f"/proc/self/task/{os.getpid()}/schedstat", "rb") as stats:
            ran, waited = stats.read().split()[:2]
        return int(ran) / 1e9, int(waited) / 1e9
    except (OSError, ValueError):
        return None


def starved(before: tuple[float, tuple[float, float] | None] | None, now: float,
            times: tuple[float, float] | None, max_blocking: float) -> tuple[float, float, float] | None:
    """Was a hub found blocked since the monitor's last check (`before`: its time and the thread's times)
    in fact not run? It ran for less than the blocking limit, and spent most of the time it did not run
    waiting for a CPU (a thread blocked in a system call sleeps instead, which is a block). Returns the
    window's seconds (wall, ran, waited) when so."""
    if before is None or before[1] is None or times is None:
        return None
    wall, ran, waited = now - before[0], times[0] - before[1][0], times[1] - before[1][1]
    if wall > 0 and ran < max_blocking and waited >= (wall - ran) / 2:
        return wall, ran, waited
    return None


def _new_limits() -> dict:
    """When the last report of a serving worker and of a starting one was printed, and how many of each
    were left out since."""
    return {"last": float("-inf"), "left_out": 0, "last_start": float("-inf"), "left_out_starting": 0,
            "last_starved": float("-inf"), "starved": 0}


_LIMITS = _new_limits()


def worker_starting() -> None:
    """The worker is loading the app: its blocked-hub reports are start-up reports (see below)."""
    _worker_starting[0] = True


def worker_serving() -> None:
    """The worker waits for connections: from now on its reports are about serving."""
    _worker_starting[0] = False


def rate_limit_blocking_reports() -> None:
    """Let gevent's monitor print a blocked-hub report at most every REPORT_EVERY_SECONDS (each one
    naming how many were left out before it), and build only those it prints. A worker's start-up is
    limited on its own (at most one report every REPORT_EVERY_SECONDS while it starts) and does not hold
    back the first report of it serving; a start-up report built after the worker began serving (the
    monitor reports after the fact) is printed and not counted. gevent keeps the printing in
    `_show_blocking_report` so that it "can be overridden at runtime" (gevent/_monitor.py); the check
    itself, `monitor_blocking`, is replaced by one that asks before it builds, where gevent has the
    members it uses (gevent 26: `_greenlet_tracer.did_block_hub`, `did_block_hub_report`)."""
    from gevent import _monitor

    monitor_class = _monitor.PeriodicMonitoringThread
    if getattr(monitor_class, "_jarvis_rate_limited", False):
        return
    show = monitor_class._show_blocking_report
    # The OS's own lock: the monitor is a native thread, and waiting on gevent's patched Lock there would
    # give that thread a hub of its own, which gevent then monitors too.
    lock = monkey.get_original("_thread", "allocate_lock")()

    def worth_building() -> bool:
        """Would a report be printed now? Counted as left out when not."""
        with lock:
            now, limits = _now(), _LIMITS
            if _worker_starting[0]:
                if now - limits["last_start"] < REPORT_EVERY_SECONDS:
                    limits["left_out_starting"] += 1
                    return False
                limits["last_start"] = now
            elif now - limits["last"] < REPORT_EVERY_SECONDS:
                limits["left_out"] += 1
                return False
            return True

    def note_starved(hub, window: tuple[float, float, float]) -> None:
        """A check that found the hub "blocked" while its thread waited for a CPU: one line at most every
        REPORT_EVERY_SECONDS, counting those in between; no stacks (nothing here held the hub)."""
        with lock:
            now, limits = _now(), _LIMITS
            limits["starved"] += 1
            if now - limits["last_starved"] < REPORT_EVERY_SECONDS:
                return
            count, limits["starved"], limits["last_starved"] = limits["starved"], 0, now
        wall, ran, waited = (round(seconds * 1000) for seconds in window)
        line = (f"the hub's thread waited {waited} ms of {wall} ms for a CPU (it ran {ran} ms): the machine is "
                f"busy, nothing in this worker blocked the hub ({count} such check(s) since the last line)")
        if logs.json_mode():
            logs.write_line(logs.json_line("WARNING", "gevent.monitor", line, event="hub_starved", waited_ms=waited,
                                           wall_ms=wall, ran_ms=ran, checks=count))
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S %z")  # as gunicorn's lines (no logging in this thread)
            print(f"[{stamp}] [{os.getpid()}] [WARNING] gevent.monitor {line}", file=hub.exception_stream)

    def monitor_blocking(self, hub):
        now, times = _now(), hub_thread_times(hub)
        before, self._jarvis_last_check = getattr(self, "_jarvis_last_check", None), (now, times)
        did_block = self._greenlet_tracer.did_block_hub(hub)
        if not did_block:
            return None
        window = starved(before, now, times, _monitor.GEVENT_CONFIG.max_blocking_time)
        if window is not None:
            note_starved(hub, window)
            return None
        if not worth_building():
            return None
        active_greenlet = did_block[1]
        report = self._greenlet_tracer.did_block_hub_report(
            hub, active_greenlet, {"greenlet_stacks": False, "current_thread_ident": self.monitor_thread_ident})
        _monitor.notify(_monitor.EventLoopBlocked(active_greenlet, _monitor.GEVENT_CONFIG.max_blocking_time,
                                                  report, hub=hub))
        return self._show_blocking_report(hub, report, active_greenlet)

    def show_rate_limited(self, hub, report, active_greenlet):
        starting = _worker_starting[0] or is_start_up_report("\n".join(report))
        with lock:
            now, limits = _now(), _LIMITS
            if starting:
                skipped = 0
            elif now - limits["last"] < REPORT_EVERY_SECONDS:
                limits["left_out"] += 1
                return active_greenlet, report
            else:
                skipped, limits["left_out"], limits["last"] = limits["left_out"], 0, now
            started, limits["left_out_starting"] = limits["left_out_starting"], 0
        if started:
            report = [f"({started} more blocked-hub reports while the worker started were left out)", *report]
        if skipped:
            report = [f"({skipped} more blocked-hub reports in the last {REPORT_EVERY_SECONDS:g} s were left out)",
                      *report]
        if logs.json_mode():  # one object (this runs in the monitor's native thread: no logging here)
            first = next((line for line in report if "appears to be blocked" in line), "the hub was blocked")
            logs.write_line(logs.json_line("WARNING", "gevent.monitor", first.strip(), event="hub_blocked",
                                           report="\n".join(report)))
            return active_greenlet, report
        return show(self, hub, report, active_greenlet)

    monitor_class._show_blocking_report = show_rate_limited
    tracer = getattr(_monitor, "GreenletTracer", None)
    if all(hasattr(tracer, name) for name in ("did_block_hub", "did_block_hub_report")) and \
            all(hasattr(_monitor, name) for name in ("notify", "EventLoopBlocked", "GEVENT_CONFIG")):
        monitor_class.monitor_blocking = monitor_blocking
    monitor_class._jarvis_rate_limited = True

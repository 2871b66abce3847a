"""Stack dumps for a worker that seems stuck: `kill -USR1 <pid>` prints every greenlet and thread.

Two dumps, because each sees what the other cannot. The Python handler prints
every greenlet (`gevent.util.print_run_info`), but it runs only when the hub
gets to run. faulthandler prints from the signal itself, so it works even when
the hub is blocked, but it sees only the greenlet that is running. gunicorn's
own USR1 handler (reopen the log files) still runs after ours.

gevent's monitor thread reports a hub blocked for more than GEVENT_MAX_BLOCKING_TIME
(0.1 s) with every thread's stack, about 20 KB each time: `rate_limit_blocking_reports`
prints the first in full, then at most one every REPORT_EVERY_SECONDS, saying how many
were left out since.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time

import gevent.util
from gevent import monkey

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
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True, chain=True)


def dump_greenlets(reason: str) -> None:
    """Print every thread's and greenlet's stack to stderr (the error log)."""
    stream = sys.stderr
    stream.write(f"==== jarvis stack dump ({reason}) pid {os.getpid()}: greenlets and threads ====\n")
    try:  # first the open streams, one line each, so the dump names a stuck one before its stack
        from jarvis.streams import OPEN, summary_lines

        lines = summary_lines(OPEN)
        stream.write(f"open streams: {len(lines)}\n" + "".join(f"  {line}\n" for line in lines))
    except Exception as error:  # a dump must never fail for want of a summary
        stream.write(f"open streams: unknown ({type(error).__name__})\n")
    gevent.util.print_run_info(file=stream)
    stream.write(f"==== end of jarvis stack dump pid {os.getpid()} ====\n")
    stream.flush()


def dump_blocked_worker() -> None:
    """For gunicorn's worker_abort: the hub was blocked; show what blocked it."""
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    dump_greenlets("worker timeout")


def rate_limit_blocking_reports() -> None:
    """Let gevent's monitor print a blocked-hub report at most every REPORT_EVERY_SECONDS (each one
    naming how many were left out before it); the monitor keeps looking as before. gevent keeps the
    printing in `_show_blocking_report` so that it "can be overridden at runtime" (gevent/_monitor.py)."""
    from gevent import _monitor

    monitor_class = _monitor.PeriodicMonitoringThread
    if getattr(monitor_class, "_jarvis_rate_limited", False):
        return
    show = monitor_class._show_blocking_report
    # The OS's own lock: the monitor is a native thread, and waiting on gevent's patched Lock there would
    # give that thread a hub of its own, which gevent then monitors too.
    lock = monkey.get_original("_thread", "allocate_lock")()
    last, left_out = [float("-inf")], [0]

    def show_rate_limited(self, hub, report, active_greenlet):
        with lock:
            now = time.monotonic()
            if now - last[0] < REPORT_EVERY_SECONDS:
                left_out[0] += 1
                return active_greenlet, report
            skipped, left_out[0], last[0] = left_out[0], 0, now
        if skipped:
            report = [f"({skipped} more blocked-hub reports in the last {REPORT_EVERY_SECONDS:g} s were left out)",
                      *report]
        return show(self, hub, report, active_greenlet)

    monitor_class._show_blocking_report = show_rate_limited
    monitor_class._jarvis_rate_limited = True

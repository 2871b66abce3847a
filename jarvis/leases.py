"""Who owns a running answer, and whether that owner still lives.

A run's owner is a process named by host, pid and the process's start time (a pid
alone may be reused). The owner renews the run's lease every RENEW_SECONDS. A run
is alive while its lease holds and, on this host, while its owner process is the
same process that took it — so a worker killed with `kill -9` is seen dead at
once here, and after LEASE_SECONDS from anywhere else.

Standard library only: gunicorn's master uses it before any worker exists.
"""

from __future__ import annotations

import os
import secrets
import socket

LEASE_SECONDS = 6.0
RENEW_SECONDS = 2.0

_HOST = socket.gethostname()


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()  # field 22 of the whole line: starttime
    except (OSError, IndexError):
        return None


def this_process() -> str:
    """An owner in this process: 'host pid start nonce' (the nonce tells apart two apps in one process,
    as tests build them)."""
    pid = os.getpid()
    return f"{_HOST} {pid} {process_start(pid) or '-'} {secrets.token_hex(4)}"


def alive(owner: str, lease_expires_at: float, now: float) -> bool:
    """Whether a run with this owner and lease may still be running."""
    if lease_expires_at <= now:
        return False
    host, pid, started = (owner.split(" ") + ["", "", ""])[:3]
    if host != _HOST or started == "-":
        return True  # another machine (or no /proc): the lease alone decides
    return pid.isdigit() and process_start(int(pid)) == started

"""A stream's clock: when it started, when the backend last sent something and when the client was
last written to, and the limits those are held to — JARVIS_STREAM_MAX_SECONDS from the start,
JARVIS_STREAM_INACTIVITY_SECONDS since the backend's last event, a `: ping` heartbeat every
JARVIS_HEARTBEAT_SECONDS of silence towards the client. The relay's ticker asks it every `tick_seconds`
(a quarter of the smallest of the three: a heartbeat goes out at most a quarter late)."""

from __future__ import annotations

import time

from jarvis.errors import StreamError
from jarvis.settings import Settings


class Clock:
    __slots__ = ("heartbeat", "inactivity", "max_seconds", "tick_seconds", "started", "last_event", "last_write")

    def __init__(self, settings: Settings):
        self.heartbeat = settings.heartbeat_seconds
        self.inactivity = settings.stream_inactivity_seconds
        self.max_seconds = settings.stream_max_seconds
        self.tick_seconds = min(self.heartbeat, self.inactivity, self.max_seconds) / 4
        self.started = time.monotonic()
        self.last_event = self.started  # the backend's last event (or its word that it has nothing yet)
        self.last_write = self.started  # the last bytes written to the client, a heartbeat included

    def limit_reached(self, now: float) -> StreamError | None:
        """The error the stream ends with when it has run too long or the backend went silent too long."""
        if now - self.started >= self.max_seconds:
            return StreamError("stream_max_duration", f"The stream reached JARVIS_STREAM_MAX_SECONDS "
                                                      f"({self.max_seconds:g} s) and was ended", "timeout_error")
        if now - self.last_event >= self.inactivity:
            return StreamError("stream_inactivity", f"The backend sent nothing for {self.inactivity:g} s "
                                                    "(JARVIS_STREAM_INACTIVITY_SECONDS); the stream was ended",
                               "timeout_error")
        return None

    def heartbeat_due(self, now: float) -> bool:
        """Whether the client has heard nothing for a heartbeat; if so, the heartbeat counts as written."""
        if now - self.last_write >= self.heartbeat:
            self.last_write = now
            return True
        return False

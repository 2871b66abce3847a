"""Thousands of slow connections cannot take a worker: /healthz answers, streams complete, the attack's
connections end within their deadlines (live gunicorn, -w 1, attackers on their own loopback addresses)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
import requests

from tests.clients import chat_body, content_of
from tests.live import sse_events, wait_until
from tests.slow_clients import SlowClients

pytestmark = [pytest.mark.live, pytest.mark.serial]

KEY = "limits-key-0123456789abcdef"
ATTACK = 2000
SHORT = {"JARVIS_BODY_SECONDS": "2", "JARVIS_MAX_CLIENT_CONNECTIONS": "100"}
KEEP_ALIVE = ["-w", "1", "--keep-alive", "3"]  # gunicorn's deadline for a request head (and an idle connection)
# Once the worker has taken the attack's connections in, /healthz answers in 5-12 ms on a slow machine
# (one core kept busy); a worker the attack had filled would not answer within the checker's 5 s at all.
HEALTH_LIMIT = 2.0
BURST_LIMIT = 3.0  # /healthz while 2100 slow bodies expire together: see that test
# Taking the connections in is the kernel's accept backlog, thousands deep, drained by the worker: a
# health check queued behind it waited 2.9-4.4 s on a slow machine. That is the storm's own figure
# (printed); the test asks only that the worker drain it, within this bound.
STORM_LIMIT = 30.0
WAVE = 10  # attacks (of 100 connections each) set up together in the six-thousand test: below the listen queue


def hold_off(jarvis, attacks: list[SlowClients], deadline: float, key: str | None = None) -> list[float]:
    """While the attacks run: /healthz from 127.0.0.1 every 0.1 s (its latencies returned), a stream that
    completes, and every attacking connection ended within `deadline` of opening."""
    for attack in attacks:
        attack.start()
    try:
        wait_until(lambda: all(opened is not None for attack in attacks for opened in attack.opened_at), 30,
                   lambda: "the attack could not open its connections")
        latencies = []
        with requests.Session() as session:
            # Queued behind every attacking connection (all opened before it): once it is answered, the
            # worker has accepted or refused them all, and the attack is held rather than arriving.
            started = time.monotonic()
            assert session.get(jarvis.url + "/healthz", timeout=STORM_LIMIT).ok
            print(f"connection storm: /healthz queued behind {ATTACK * len(attacks)} new connections answered "
                  f"in {(time.monotonic() - started) * 1000:.0f} ms")
            while any(attack.open_count for attack in attacks) and len(latencies) < (deadline + 3) * 10:
                started = time.monotonic()
                assert session.get(jarvis.url + "/healthz", timeout=5).ok
                latencies.append(time.monotonic() - started)
                time.sleep(0.1)  # a health checker's pace
        stream = requests.post(jarvis.url + "/v1/chat/completions", json=chat_body({"tokens": 3}), stream=True,
                               headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=10)
        assert content_of(sse_events(stream)) == "w0 w1 w2 "
        for attack in attacks:
            assert None not in attack.closed_at, f"{attack.mode}: {attack.open_count} connections still open"
            held = [closed - opened for opened, closed in zip(attack.opened_at, attack.closed_at, strict=True)]
            assert max(held) < deadline, f"{attack.mode}: held {max(held):.1f} s"
            refused = sum(1 for seconds in held if seconds < 0.5)
            print(f"{attack.mode} from {attack.source}: {ATTACK} connections, {refused} closed at once, the rest "
                  f"ended within {max(held):.1f} s")
        return latencies
    finally:
        for attack in attacks:
            attack.stop()


def test_slow_bodies_slowloris_and_idle_connections_cannot_fill_the_worker(start_jarvis):
    jarvis = start_jarvis(SHORT, args=KEEP_ALIVE)
    attacks = [SlowClients(jarvis.port, ATTACK, "slow_body", source="127.0.0.2"),
               SlowClients(jarvis.port, ATTACK, "slowloris", source="127.0.0.3"),
               SlowClients(jarvis.port, ATTACK, "idle", source="127.0.0.4")]
    latencies = hold_off(jarvis, attacks, deadline=2 + 10000 / 16384 + 3)
    print(f"/healthz during the attack: max {max(latencies) * 1000:.0f} ms over {len(latencies)} checks")
    assert max(latencies) < HEALTH_LIMIT
    log = jarvis.log()
    for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):  # each offender named, whichever came first
        assert f"closed a connection from {source}" in log, source
    jarvis.assert_log_clean()


def test_slow_bodies_against_the_sign_in_route_and_a_keyed_api_cannot_fill_the_worker(start_jarvis):
    jarvis = start_jarvis({**SHORT, "JARVIS_API_KEY": KEY}, args=KEEP_ALIVE)
    attacks = [SlowClients(jarvis.port, ATTACK, "slow_body", source="127.0.0.2", path="/api/session",
                           body_bytes=1000),
               SlowClients(jarvis.port, ATTACK, "slow_body", source="127.0.0.3", path="/v1/chat/completions")]
    latencies = hold_off(jarvis, attacks, deadline=2 + 10000 / 16384 + 3, key=KEY)
    assert max(latencies) < HEALTH_LIMIT
    jarvis.assert_log_clean()


def test_a_slow_body_gets_408_and_its_connection_closed(start_jarvis):
    jarvis = start_jarvis({**SHORT, "JARVIS_BODY_SECONDS": "1"})  # one connection: no storm to wait out
    attack = SlowClients(jarvis.port, 1, "slow_body", source="127.0.0.2", trickle=0.2)
    # What the client is told, read raw from a second slow body at the same time (one deadline's wait).
    told = socket.create_connection(("127.0.0.1", jarvis.port))
    attack.start()
    try:
        told.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 5000\r\n\r\n{")
        told.settimeout(10)
        answer = b""
        while chunk := told.recv(65536):
            answer += chunk
        wait_until(lambda: attack.closed_at[0], 10, lambda: "the slow body was never cut")
        assert 1.0 <= attack.closed_at[0] - attack.opened_at[0] < 3.0
    finally:
        attack.stop()
        told.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"JARVIS_BODY_SECONDS" in answer  # then closed


def poll_health(jarvis, seconds: float) -> list[float]:
    """/healthz from 127.0.0.1 every 0.1 s for `seconds`, each on a new connection (a load balancer's check
    opens one): its latencies. Fails at the first that is not answered within 5 s."""
    latencies = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        started = time.monotonic()
        assert requests.get(jarvis.url + "/healthz", timeout=5).ok
        latencies.append(time.monotonic() - started)
        time.sleep(0.1)  # a health checker's pace
    return latencies


class HealthProbe:
    """GET /healthz every 50 ms from a process of its own (a health checker's view), until the block ends;
    then `latencies`, in seconds."""

    SCRIPT = """
import json, select, sys, time, urllib.request
latencies = []
while not select.select([sys.stdin], [], [], 0)[0] and len(latencies) < 1000:
    started = time.monotonic()
    with urllib.request.urlopen(sys.argv[1] + "/healthz", timeout=5) as answer:
        answer.read()
    latencies.append(time.monotonic() - started)
    time.sleep(0.05)
print(json.dumps(latencies))
"""

    def __init__(self, url: str):
        self.url = url
        self.latencies: list[float] = []

    def __enter__(self) -> HealthProbe:
        self.process = subprocess.Popen([sys.executable, "-c", self.SCRIPT, self.url], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc) -> None:
        out, _ = self.process.communicate("", timeout=30)  # its stdin closes: it stops and says what it saw
        assert self.process.returncode == 0, out
        self.latencies = json.loads(out)


def test_six_thousand_slow_bodies_from_sixty_addresses_are_shed_oldest_first_and_the_worker_keeps_serving(
        start_jarvis):
    # 60 addresses x 100 connections (each under the per-address cap), every one a body of 1 MB arriving a
    # byte a second: its own deadline is 10 s + 1 MB / 16 KiB/s = 74 s. 6,000 of them would fill the
    # worker's 5,000 slots for that long; shedding keeps the worker under 4,500 by closing the oldest.
    jarvis = start_jarvis({"JARVIS_MAX_STREAMS": "10"}, args=["-w", "1"])
    attacks = [SlowClients(jarvis.port, 100, "slow_body", source=f"127.0.0.{10 + index}", body_bytes=1_000_000)
               for index in range(60)]
    waves = [attacks[start:start + WAVE] for start in range(0, len(attacks), WAVE)]
    storm = []
    try:
        # In waves of 1,000 connections, each once the worker has taken the last in (a /healthz queued behind
        # it is answered), so that the waves' order is the worker's. All at once, 6,000 connects overflowed
        # the listen queue (2,048) and the kernel's retries let some in seconds late: at half speed the
        # second attack's connections were all younger than 1,500 others.
        for wave in waves:
            for attack in wave:
                attack.start()
            wait_until(lambda wave=wave: all(opened is not None for attack in wave for opened in attack.opened_at),
                       60, lambda: "the attack could not open its connections")
            started = time.monotonic()
            assert requests.get(jarvis.url + "/healthz", timeout=STORM_LIMIT).ok
            storm.append(time.monotonic() - started)
        print(f"connection storm: /healthz behind each 1000 new connections answered in "
              f"{', '.join(f'{seconds * 1000:.0f}' for seconds in storm)} ms")
        wait_until(lambda: sum(attack.open_count for attack in attacks) <= 4500, 30,
                   lambda: f"{sum(attack.open_count for attack in attacks)} attacking connections still open")
        latencies = poll_health(jarvis, 3)
        stream = requests.post(jarvis.url + "/v1/chat/completions", json=chat_body({"tokens": 3}), stream=True,
                               timeout=10)
        assert content_of(sse_events(stream)) == "w0 w1 w2 "
        held = sum(attack.open_count for attack in attacks)
        ended = [sum(closed is not None for attack in wave for closed in attack.closed_at) for wave in waves]
    finally:
        for attack in attacks:
            attack.stop()
    # Once the attack is held, /healthz answers in 5-40 ms on a slow machine; a full worker would not
    # answer within the 5 s at all (without shedding: every poll timed out).
    print(f"/healthz while 6000 slow bodies were held: max {max(latencies) * 1000:.0f} ms over {len(latencies)} "
          f"checks; {held} attacking connections still held; ended by wave: {ended}")
    assert max(latencies) < HEALTH_LIMIT
    assert 4000 <= held <= 4500
    # Oldest first: 1,500 shed, from the first waves, and none of the 2,000 newest. Not "the first wave
    # whole": the shedder counts a connection's age from when its route began to read the body, in an order
    # the test does not see (measured: 512-520 of the first wave shed and 981-989 of the second). Shed at
    # random, every wave lost 100-320 (measured); newest first, this test's own /healthz went first.
    assert ended[0] > 0 and ended[-2:] == [0, 0], f"not the oldest shed: ended by wave {ended}"
    log = jarvis.log()
    assert "shed a connection still waiting for its request body" in log
    jarvis.assert_log_clean()


def test_two_thousand_slow_bodies_that_expire_together_answer_408_spread_out(start_jarvis):
    jarvis = start_jarvis({**SHORT, "JARVIS_MAX_CLIENT_CONNECTIONS": "2100"}, args=["-w", "1"])
    attack = SlowClients(jarvis.port, 2100, "slow_body", source="127.0.0.2")
    attack.start()
    try:
        wait_until(lambda: None not in attack.opened_at, 30, lambda: "the attack could not open its connections")
        assert requests.get(jarvis.url + "/healthz", timeout=STORM_LIMIT).ok  # the storm is over
        # Polled from a process of its own: the attack's thread, handling 2100 closes at once in this process,
        # held this one's GIL for up to 0.9 s, which a poll from here counted as the server's (measured).
        with HealthProbe(jarvis.url) as probe:
            wait_until(lambda: not attack.open_count, 30, lambda: f"{attack.open_count} slow bodies still open")
        latencies = probe.latencies
    finally:
        attack.stop()
    # Measured from its own process on this 2-core machine: max 130-900 ms over eight runs on one day (an earlier
    # day: 50 ms). The 2100 deadlines (2 s, jittered by up to 0.2 s) expire within a window shorter than the work
    # of answering them all, and a /healthz arriving then waits behind the 408s already due: a burst of CPU, not a
    # blocked worker (a worker that could not serve would not answer within the probe's 5 s at all). The limit is
    # 3x the worst seen; the jitter's own effect is shown in-process, tests/test_shedding.py.
    print(f"2100 slow bodies answered 408; /healthz meanwhile: max {max(latencies) * 1000:.0f} ms over "
          f"{len(latencies)} checks")
    assert max(latencies) < BURST_LIMIT

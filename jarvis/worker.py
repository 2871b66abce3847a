"""gunicorn's gevent worker, with a cap on the connections one client address may hold open.

Without it, one client holding connections open — request heads or bodies sent a byte at a time, idle
keep-alives — fills the worker's `worker_connections`, and every other client, health checks
included, waits. Connections beyond JARVIS_MAX_CLIENT_CONNECTIONS from one address are closed as soon
as they are accepted. Addresses gunicorn trusts as proxies (`forwarded_allow_ips`, loopback by
default) are exempt: every client of a reverse proxy shares its address, so the proxy must apply its
own per-client limits (see the README).

The worker also raises its own limit on open files to what `worker_connections` needs.

gunicorn's master imports this module to find the worker class: it must import nothing but gunicorn,
gevent and jarvis.settings (which is standard library only) at module level.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import resource

from gunicorn.workers.ggevent import GeventWorker

log = logging.getLogger(__name__)

_FILES_BESIDES_CONNECTIONS = 256  # the listener, the database, the upstream pool, logs, metrics
_NAMED_ADDRESSES = 10000  # addresses a refusal is logged for by name; past that, every 1000th refusal


class JarvisWorker(GeventWorker):
    def init_process(self):
        from jarvis.settings import Settings

        self.max_per_client = Settings.from_env().max_client_connections
        self.open_by_address: collections.Counter[str] = collections.Counter()
        self.refused = 0
        self.refused_addresses: set[str] = set()
        _raise_open_files_limit(self.cfg.worker_connections + _FILES_BESIDES_CONNECTIONS)
        super().init_process()

    def handle(self, listener, client, addr):
        address = addr[0] if isinstance(addr, tuple) else None
        if address is None or self._exempt(address):
            return super().handle(listener, client, addr)
        if self.open_by_address[address] >= self.max_per_client:
            self.refused += 1
            first = address not in self.refused_addresses and len(self.refused_addresses) < _NAMED_ADDRESSES
            if first:
                self.refused_addresses.add(address)
            if first or self.refused % 1000 == 0:  # each offender named once, then a count now and then
                log.warning("closed a connection from %s: it already has %d open (JARVIS_MAX_CLIENT_CONNECTIONS); "
                            "%d refused so far", address, self.max_per_client, self.refused)
            client.close()
            return None
        self.open_by_address[address] += 1
        try:
            return super().handle(listener, client, addr)
        finally:
            self.open_by_address[address] -= 1
            if not self.open_by_address[address]:
                del self.open_by_address[address]

    def _exempt(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if "*" in self.cfg.forwarded_allow_ips:
            return True
        return any(ip in network for network in self.cfg.forwarded_allow_networks())


def _raise_open_files_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if hard != resource.RLIM_INFINITY and hard < wanted:
        log.warning("the open-files limit (%d) is below what worker_connections needs (%d): raise it (ulimit -n, "
                    "LimitNOFILE= in systemd)", hard, wanted)

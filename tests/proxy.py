"""A loopback TCP proxy whose connections a test can cut, as a lost network would.

Every byte passes unchanged both ways. `cut()` drops every connection open at that moment (both
sides, mid-body); new connections are forwarded as before, as when the network comes back.
"""

from __future__ import annotations

import socket
import struct
import threading

from tests.net import close_now


class CuttableProxy:
    def __init__(self, target_port: int):
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._lock = threading.Lock()
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            pair = (client, server)
            with self._lock:
                self._pairs.add(pair)
            ended = threading.Barrier(2, action=lambda pair=pair: self._close(pair))
            threading.Thread(target=self._pipe, args=(client, server, ended), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, ended), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, ended: threading.Barrier) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        ended.wait()  # the second direction to end closes both sockets

    def _close(self, pair) -> None:
        with self._lock:
            self._pairs.discard(pair)
        for sock in pair:
            sock.close()

    def cut(self) -> int:
        """Reset every open connection; return how many there were."""
        with self._lock:
            pairs, self._pairs = list(self._pairs), set()
        for pair in pairs:
            for sock in pair:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    # A close alone would wait for the pipe thread blocked in recv on it; shutdown wakes it.
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
                except OSError:
                    pass
        self.cuts += 1
        return len(pairs)

    def stop(self) -> None:
        close_now(self._listener)
        self.cut()

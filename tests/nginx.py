"""A real nginx (Debian's package) in front of a Jarvis, on a free loopback port, with a config of the test's
own: `Nginx(upstream_port, location_lines).start()`. Runs in the foreground (`daemon off`) from a temporary
prefix, so it leaves nothing behind; `.ci/run` installs the package."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.live import wait_until
from tests.net import free_port

README_LOCATION = """
    proxy_pass http://127.0.0.1:{port};
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $host;
    proxy_set_header X-Request-Id $request_id;
    proxy_read_timeout 1h;
    gzip off;
"""

# What makes nginx hold a whole answer: it ignores Jarvis's `X-Accel-Buffering: no`, buffers, and compresses
# event streams. (Measured with nginx 1.22: buffering alone still passed each event on to a client that reads
# as fast as it comes; compressing them held all ten to the end.)
BUFFERING_LOCATION = README_LOCATION.replace("gzip off;", "") + """
    proxy_buffering on;
    proxy_ignore_headers X-Accel-Buffering;
    gzip on;
    gzip_min_length 1;
    gzip_types text/event-stream;
"""


class Nginx:
    def __init__(self, upstream_port: int, location: str):
        self.binary = shutil.which("nginx") or "/usr/sbin/nginx"
        assert Path(self.binary).exists(), "nginx is required (apt-get install nginx)"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.prefix = Path(tempfile.mkdtemp(prefix="jarvis-nginx-"))
        (self.prefix / "logs").mkdir()
        (self.prefix / "nginx.conf").write_text(f"""
daemon off;
worker_processes 1;
pid {self.prefix}/nginx.pid;
error_log {self.prefix}/logs/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {self.prefix}/body;
    proxy_temp_path {self.prefix}/proxy;
    fastcgi_temp_path {self.prefix}/fastcgi;
    uwsgi_temp_path {self.prefix}/uwsgi;
    scgi_temp_path {self.prefix}/scgi;
    server {{
        listen 127.0.0.1:{self.port};
        location / {{ {location.format(port=upstream_port)} }}
    }}
}}
""")
        self.process: subprocess.Popen | None = None

    def start(self) -> Nginx:
        self.process = subprocess.Popen([self.binary, "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._listening, 10, lambda: f"nginx did not start: {self._errors()}")
        return self

    def _listening(self) -> bool:
        import socket

        if self.process.poll() is not None:
            raise RuntimeError(f"nginx exited: {self._errors()}")
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def _errors(self) -> str:
        log = self.prefix / "logs" / "error.log"
        return log.read_text()[-2000:] if log.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        shutil.rmtree(self.prefix, ignore_errors=True)

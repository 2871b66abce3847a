"""A throw-away PostgreSQL cluster for the tests: Debian's server binaries, a temporary directory, a free
loopback port, fsync off; stopped by its PID at the end. initdb refuses to run as root, so as root the
cluster runs as the `postgres` user that Debian's package creates."""

from __future__ import annotations

import glob
import os
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import uuid

from tests.net import free_port


def _bindir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda path: int(path.split("/")[-2]))
    if found:
        return found[-1]
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        return os.path.dirname(pg_ctl)
    raise RuntimeError("PostgreSQL's server is required for these tests: apt-get install -y postgresql "
                       "(.ci/run does it)")


class PostgresCluster:
    def __init__(self):
        self.bindir = _bindir()
        parent = tempfile.gettempdir()
        if os.geteuid() == 0 and not os.stat(parent).st_mode & stat.S_IXOTH:
            parent = "/tmp"  # a private TMPDIR (mktemp -d makes it 0700): the postgres user could not reach the data
        self.base = tempfile.mkdtemp(prefix="jarvis-pg-", dir=parent)
        self.data = os.path.join(self.base, "data")
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.pid: int | None = None
        self._emptied: list[str] = []  # databases given back by their tests, emptied: see recycle()

    def _run(self, *command: str) -> None:
        result = subprocess.run([*self.as_user, *command], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")

    def start(self) -> PostgresCluster:
        try:
            self._run(os.path.join(self.bindir, "initdb"), "-D", self.data, "-A", "trust", "-U", "postgres",
                      "-E", "UTF8", "--locale=C", "--no-sync")
            return self.resume()
        except BaseException:
            self.stop()  # a cluster that never started leaves no folder behind either
            raise

    def resume(self) -> PostgresCluster:
        """Start the server (again, after pause(): the same port, the same data)."""
        options = (f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-l", os.path.join(self.base, "log"),
                  "-o", options, "-w", "-t", "60", "start")
        with open(os.path.join(self.data, "postmaster.pid")) as pid_file:
            self.pid = int(pid_file.readline())
        return self

    def pause(self) -> None:
        """Stop the server as an outage would, every client's connection cut; resume() brings it back.
        A fast shutdown, not an immediate one: with synchronous_commit off (above), a crash would also
        lose the last commits, which is not what the tests of an outage are about."""
        self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop")
        self.pid = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database on the cluster (one a test gave back, emptied, if there is one); its URL."""
        import psycopg

        if self._emptied:
            return self.url(self._emptied.pop())
        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def recycle(self, url: str) -> None:
        """Take back a test's database for the next new_database(), as empty as a new one: its sessions ended
        (a killed server's included) and every schema the test made dropped, `public` made again as initdb
        makes it; checked empty. CREATE DATABASE copies template1 through the WAL: 0.19 CPU-s of the
        server's each (20 measured: 3.7 CPU-s), about 9 CPU-s of a parallel phase; this takes 0.025 (0.5).
        A database that cannot be emptied (the cluster paused, say) is left alone."""
        import psycopg

        name = url.rsplit("/", 1)[1]
        if not name.startswith("t_") or self.pid is None:
            return
        try:
            with psycopg.connect(self.url(), autocommit=True) as connection:
                connection.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                   " WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            with psycopg.connect(url, autocommit=True, connect_timeout=5) as connection:
                # A terminated session lets go of its locks as it exits: the DROP waits for that, no longer.
                connection.execute("SET lock_timeout = '10s'")
                schemas = [row[0] for row in connection.execute(
                    "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' "
                    "AND nspname <> 'information_schema'")]
                for schema in schemas:
                    connection.execute(f'DROP SCHEMA "{schema}" CASCADE')
                connection.execute("CREATE SCHEMA public AUTHORIZATION pg_database_owner")
                connection.execute("GRANT USAGE ON SCHEMA public TO PUBLIC")
                left = connection.execute(
                    "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'").fetchone()[0]
        except psycopg.Error:
            return
        if left == 0:
            self._emptied.append(name)

    def stop(self) -> None:
        """Immediate shutdown by PID (SIGQUIT): the directory goes next, so nothing a fast shutdown would
        write first is kept. Its exit is waited for on a pidfd, readable once the server has exited: the
        server, started by pg_ctl, is reaped by init, 1.6-1.8 s after it exited in 7 ms here, and until
        then `kill(pid, 0)` finds its zombie, which a poll of it had waited out."""
        if self.pid is not None:
            try:
                exited = os.pidfd_open(self.pid)
            except ProcessLookupError:
                exited = None
            if exited is not None:
                try:
                    os.kill(self.pid, signal.SIGQUIT)
                    if not select.select([exited], [], [], 30)[0]:
                        os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                finally:
                    os.close(exited)
        shutil.rmtree(self.base, ignore_errors=True)

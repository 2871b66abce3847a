"""gunicorn settings for Jarvis: plain settings under headers, then hooks.

`jarvis serve` passes this module to gunicorn as `--config python:jarvis.server_config`; a checkout's
`gunicorn.conf.py` imports everything from it, so `gunicorn app:app` run from the checkout does the same.

Of jarvis, only `jarvis.settings` is imported here, and it uses the standard
library alone: the gevent worker must monkey-patch before the app (and requests)
are imported, and the master must stay free of application state. Jarvis's
settings are validated here, once, in the master; a bad value stops start-up
with a message naming the variable. Command-line flags (-b, -w, ...) still win.
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile


def _jarvis_settings():
    """Every JARVIS_* setting, read and validated before anything starts."""
    from jarvis.settings import Settings, SettingsError

    try:
        return Settings.from_env()
    except SettingsError as error:
        sys.exit(f"jarvis: {error}")


_SETTINGS = _jarvis_settings()

# -- Server socket -------------------------------------------------------------
bind = [_SETTINGS.bind]

# -- Workers ---------------------------------------------------------------------
workers = _SETTINGS.workers
worker_class = "jarvis.worker.JarvisWorker"  # gunicorn's gevent worker, with a per-client connection cap
# Counts idle keep-alive connections too. Measured on one worker: 5,000 held connections cost 75 MB idle
# and 156 MB as bodies trickling in, and /healthz still answered in 26-344 ms (10,000: 150-316 MB,
# 0.55-1.1 s). The worker raises its open-files limit to match.
worker_connections = 5000
preload_app = False  # the gevent worker must patch before the app is imported
timeout = 30  # fires only when the hub is blocked: streams themselves never time out here
graceful_timeout = 30  # open streams end with server_shutdown a few seconds before this
keepalive = 15  # above the 5 s that httpx-based clients (openai SDK) reuse idle connections for
# Each worker's heartbeat is an os.utime of a temp file, every second, on the hub: on a disk-backed /tmp it
# blocked a worker for over 20 ms while PostgreSQL wrote its WAL to the same disk (gevent's monitor showed
# the stack). Where /dev/shm exists it stays in memory.
worker_tmp_dir = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None

# gunicorn's control socket lives at one path per user: two Jarvis instances would fight over it.
control_socket_disable = True

# -- Logging -----------------------------------------------------------------------
loglevel = "info"
errorlog = "-"
capture_output = True  # stack dumps on stderr land in the error log when it is a file

# JARVIS_LOG_FORMAT=json: gunicorn's own lines (start, workers, signals, access) are JSON objects too, and
# so is anything else written to stderr (see jarvis.logs).
if _SETTINGS.log_format == "json":
    from gunicorn.glogging import Logger as _GunicornLogger

    class JsonLogger(_GunicornLogger):
        """gunicorn's logger, its handlers formatted by Jarvis's JsonFormatter."""

        def setup(self, cfg):
            super().setup(cfg)
            from jarvis import logs

            logs.json_stderr()  # before any worker forks: they inherit it
            for log in (self.error_log, self.access_log):
                for handler in log.handlers:
                    handler.setFormatter(logs.JsonFormatter())

    logger_class = JsonLogger

# Prometheus metrics are summed across workers from files in PROMETHEUS_MULTIPROC_DIR (on_starting
# makes one when it is not set).
_OWN_METRICS_DIR = []

# A blocked hub is reported with its stack by gevent's monitor thread.
os.environ.setdefault("GEVENT_MONITOR_THREAD_ENABLE", "true")
os.environ.setdefault("GEVENT_MAX_BLOCKING_TIME", "0.1")


# -- Hooks ---------------------------------------------------------------------------
def on_starting(server):
    """In the master, once: refuse an unauthenticated exposed bind, prepare the metrics directory,
    and mark answers that a crashed run left streaming as interrupted."""
    settings = _refuse_unauthenticated_exposure(server)
    _prepare_metrics_directory()
    if settings.database_url:
        _recover_postgres(server)
        return
    from jarvis.stores import StoreError
    from jarvis.stores.sqlite import recover_interrupted

    try:
        recovered = recover_interrupted(settings.data_dir)  # also brings the database's schema up to date
    except StoreError as error:
        sys.exit(f"jarvis: {error}")
    if recovered:
        server.log.info("marked %d answers left streaming by the last run as interrupted", recovered)


def _recover_postgres(server):
    """The same for PostgreSQL, in a child process: psycopg must first be imported after gevent's patch
    (it picks its wait function then), so the master never imports it. Only answers whose lease has
    expired are marked: other nodes' answers are still running."""
    imports_from = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder holding `jarvis`
    result = subprocess.run([sys.executable, "-m", "jarvis.stores.postgres", "migrate"], capture_output=True, text=True,
                            timeout=60, cwd=imports_from)
    if result.returncode != 0:
        sys.exit(result.stderr.strip() or f"jarvis: migrating the PostgreSQL store failed ({result.returncode})")
    recovered = int(result.stdout.strip() or 0)
    if recovered:
        server.log.info("marked %d answers whose node stopped as interrupted", recovered)


def _refuse_unauthenticated_exposure(server):
    from jarvis.settings import is_loopback_bind

    settings = _SETTINGS
    exposed = [address for address in server.cfg.bind if not is_loopback_bind(address)]
    if exposed and settings.api_key is None and not settings.allow_no_auth:
        sys.exit(f"jarvis: refusing to listen on {', '.join(exposed)} without authentication: set JARVIS_API_KEY "
                 "(or JARVIS_API_KEY_FILE), or JARVIS_ALLOW_NO_AUTH=1 if that is really what you mean")
    return settings


def _prepare_metrics_directory():
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _remove_stale_metrics_directories()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=f"jarvis-metrics-{os.getpid()}-")
        _OWN_METRICS_DIR.append(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    for stale in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
        os.remove(stale)  # counts from an earlier run


def _remove_stale_metrics_directories():
    """The metrics directories of masters that are gone without their on_exit (kill -9, a crash, the
    machine's power): each is named after its master's PID, and one whose PID runs no process is removed,
    or runs this master, which has not made its own yet (a container's master is PID 1 at every start). A
    PID used again by another process keeps its directory: a leak, never a loss. Without this, each such
    stop left a directory in the temporary folder for good."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), "jarvis-metrics-*-*")):
        try:
            pid = int(os.path.basename(path).split("-")[2])
            ours = os.stat(path).st_uid == os.getuid()
        except (ValueError, OSError):  # not named after a PID, or gone meanwhile
            continue
        if ours and (pid == os.getpid() or not _process_exists(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (PermissionError): it exists
        return True
    return True


def when_ready(server):
    """Say where to point a browser once the master is listening."""
    for listener in server.LISTENERS:
        server.log.info("Jarvis is ready: open %s/ in a browser", listener)


def post_worker_init(worker):
    """After gunicorn set its own signal handlers: add stack dumps and the shutdown watch."""
    from jarvis import diagnostics, lifecycle, security

    if hasattr(worker, "_trusted"):  # (jarvis.worker.JarvisWorker) the proxies gunicorn trusts, Jarvis trusts
        security.trust_proxies(worker._trusted)
    diagnostics.install_stack_dump()
    diagnostics.json_greenlet_errors()
    diagnostics.rate_limit_blocking_reports()
    lifecycle.watch_worker(worker)


def child_exit(server, worker):
    """A worker is gone: its live gauges (active streams, model queue) no longer count."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove the metrics directory this master created."""
    for directory in _OWN_METRICS_DIR:
        shutil.rmtree(directory, ignore_errors=True)


def worker_abort(worker):
    """The master aborts this worker for blocking its hub: show where it was stuck, then exit.

    gunicorn's own exit after this hook raises SystemExit inside whichever greenlet the signal
    interrupted, so the worker would sit out graceful_timeout serving nobody, then be SIGKILLed.
    """
    from jarvis import diagnostics

    diagnostics.dump_blocked_worker()
    os._exit(1)

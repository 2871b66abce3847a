"""Fixtures for both tiers.

In-process (milliseconds, no server): `app` and `client` are Jarvis built from a Settings object
and `backend`, a FakeBackend; `make_client(**settings)` builds one with other settings. A test of
a route is a few lines:

    def test_models_lists_the_backends_models(client):
        assert client.get("/v1/models").json["data"][0]["id"] == "fake-model"

Live (real gunicorn, real sockets, marked `live`): `upstream`, the fault-injecting fake upstream;
`start_jarvis(env)` and `jarvis`, gunicorn in front of it.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import pytest

from jarvis import create_app, state
from jarvis.settings import Settings
from tests import live
from tests.browser import _tabs, browser, context  # noqa: F401 (fixtures for the browser tests)
from tests.fake_backend import FakeBackend
from tests.fake_upstream import FakeUpstream
from tests.live import LiveServer
from tests.phases import (  # noqa: F401 (the hooks of the README's two phases)
    PARALLEL,
    SERIAL,
    pytest_collection_finish,
    pytest_configure,
    pytest_itemcollected,
    pytest_runtest_setup,
    pytest_xdist_make_scheduler,
    second_phase,
    serial_ids_cleanup,
)

# -- bytecode -------------------------------------------------------------------------------

# With PYTHONDONTWRITEBYTECODE set (some shells and sandboxes set it), pytest cannot cache its rewritten
# test modules: every process of every run recompiled them, 3.6 s of CPU out of 3.8 s to collect, four
# times per parallel phase. Tests write their bytecode (into __pycache__, which git ignores), and the
# servers they start (LiveServer) theirs.
sys.dont_write_bytecode = False


# -- sockets found by the garbage collector ----------------------------------------------

_WARN_ONLY = ("always", None, ResourceWarning, None, 0)


def _resource_warnings_shown_during_collection(phase, info):
    """A socket that a test leaves unclosed is a ResourceWarning, an error here (pyproject's
    filterwarnings), failing the test that dropped it. One held in a reference cycle is found only when
    the garbage collector runs, inside whichever test is running then, on whichever machine is slow
    enough: an error there blames a test that did nothing (seen once in eight runs with a core busy).
    During a collection the warning is shown in the summary instead, naming the socket's addresses."""
    if phase == "start":
        warnings.filters.insert(0, _WARN_ONLY)
    elif _WARN_ONLY in warnings.filters:
        warnings.filters.remove(_WARN_ONLY)
    warnings._filters_mutated()


gc.callbacks.append(_resource_warnings_shown_during_collection)


def pytest_unconfigure(config):
    serial_ids_cleanup(config)
    _close_llama_cpp_devnull()


def _close_llama_cpp_devnull():
    """llama-cpp-python opens /dev/null twice when imported and never closes it: every run that loaded the
    model ended with four lines of "Exception ignored ... ResourceWarning: unclosed file", as if a test had
    leaked something. The run is over here: they are closed."""
    utils = sys.modules.get("llama_cpp._utils")
    for name in ("outnull_file", "errnull_file"):
        if (devnull := getattr(utils, name, None)) is not None:
            devnull.close()


# -- order ------------------------------------------------------------------------------------


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected: the blocks are cut from what runs
def pytest_collection_modifyitems(config, items):
    """Tests marked `long` start first, spread over the workers: a 40 s test started last would end the
    parallel phase alone, 40 s after the rest.

    xdist's worksteal hands each worker a contiguous block of this order at the start (the first quarter of
    the tests to the first of four workers, and so on) and later moves tests from the end of one block to
    another worker. Sorted longest-first, every long test fell in the first worker's block, which ran them
    one after another (about 200 s of them), while the others stole them late and ended the phase with
    them. So each block starts with its share of the long tests (the longest to the block with the fewest
    seconds so far) and goes on with the others in the order collected."""
    def seconds(item) -> float:  # @pytest.mark.long(40): about 40 s
        marker = item.get_closest_marker("long")
        return -1.0 if marker is None else float(marker.args[0]) if marker.args else 10.0

    if second_phase(config):
        return  # each kind is handed whole to one test process, in the order collected
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    long = sorted((item for item in items if seconds(item) >= 0), key=seconds, reverse=True)
    rest = [item for item in items if seconds(item) < 0]
    # The blocks' sizes as worksteal cuts them: each worker in turn gets an equal share of what is left.
    sizes, left = [], len(items)
    for index in range(workers):
        sizes.append(left // (workers - index))
        left -= sizes[-1]
    blocks: list[list] = [[] for _ in range(workers)]
    loads = [0.0] * workers
    for item in long:
        open_blocks = [index for index in range(workers) if len(blocks[index]) < sizes[index]]
        index = min(open_blocks, key=lambda index: loads[index])
        blocks[index].append(item)
        loads[index] += seconds(item)
    for index in range(workers):
        while len(blocks[index]) < sizes[index]:
            blocks[index].append(rest.pop(0))
    items[:] = [item for block in blocks for item in block]


# -- phase times ----------------------------------------------------------------------------

PHASES_FILE = Path(__file__).resolve().parent.parent / ".pytest_cache" / "phases.txt"
_STARTED = pytest.StashKey[float]()


def pytest_sessionstart(session):
    session.config.stash[_STARTED] = time.monotonic()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """What each phase of the README's test command took, printed above the serial phase's last line:
    the parallel phase (PARALLEL) starts .pytest_cache/phases.txt, every run adds its line."""
    markers = config.option.markexpr
    if hasattr(config, "workerinput") or markers not in (PARALLEL, SERIAL):
        return  # an xdist worker (the controller reports the whole phase), or not one of the two phases
    stats = terminalreporter.stats
    counts = ", ".join(f"{len(stats[key])} {key}" for key in ("passed", "failed", "error", "skipped") if stats.get(key))
    line = (f"-m {markers!r}: {counts or 'nothing ran'}, exit {int(exitstatus)}, "
            f"{time.monotonic() - config.stash[_STARTED]:.0f} s on {os.cpu_count()} cores")
    PHASES_FILE.parent.mkdir(exist_ok=True)
    with open(PHASES_FILE, "w" if markers == PARALLEL else "a") as phases:
        phases.write(line + "\n")
    terminalreporter.write_sep("-", "test phases")
    terminalreporter.write(PHASES_FILE.read_text())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Each phase's outcome on the test's item (`outcome_setup`, `outcome_call`): the browser context's
    teardown hands a failed test's tabs to no one (tests/browser.py)."""
    report = (yield).get_result()
    setattr(item, f"outcome_{report.when}", report.outcome)


# -- CPU per test (JARVIS_TEST_CPU=FILE) -----------------------------------------------------
# The parallel phase is bound by CPU, so what shortens it is found by measuring CPU, not wall time:
# each test's CPU seconds (this process, every process below it, and those it reaped), setup to
# teardown, appended to FILE as "seconds<TAB>node id". Servers shared by a module are charged to the
# tests that use them.


def _tree_cpu() -> float:
    import resource

    import psutil

    me = psutil.Process()
    times = me.cpu_times()
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = times.user + times.system + reaped.ru_utime + reaped.ru_stime + live.KILLED_CPU[0]
    for process in me.children(recursive=True):
        try:
            child = process.cpu_times()
        except Exception:  # gone meanwhile: counted once reaped
            continue
        total += child.user + child.system + child.children_user + child.children_system
    return total


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    path = os.environ.get("JARVIS_TEST_CPU")
    before = _tree_cpu() if path else 0.0
    yield
    if path:
        with open(path, "a") as record:
            record.write(f"{_tree_cpu() - before:.3f}\t{item.nodeid}\n")


# -- in-process ---------------------------------------------------------------------------


@pytest.fixture
def backend():
    return FakeBackend()


@pytest.fixture
def make_app(tmp_path, backend):
    """Build Jarvis in this process from settings (defaults plus overrides), around `backend`."""
    apps = []

    def make(tool_servers=None, **overrides):
        overrides.setdefault("titles", False)  # (tests/test_titles.py turns it on: see tests/live.py)
        app = create_app(Settings(data_dir=str(tmp_path / "data"), **overrides), backend=backend,
                         tool_servers=tool_servers)
        apps.append(app)
        return app

    yield make
    for app in apps:
        with app.app_context():
            state.runs().close()
            state.meter().close()
            state.store().close()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def make_client(make_app):
    return lambda **overrides: make_app(**overrides).test_client()


@pytest.fixture
def jarvis_log():
    """Jarvis's log records during the test; `jarvis_log.assert_clean()` fails on any ERROR."""
    recorder = _Recorder()
    logger = logging.getLogger("jarvis")
    logger.addHandler(recorder)
    yield recorder
    logger.removeHandler(recorder)


class _Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def messages(self) -> list[str]:
        return [record.getMessage() for record in self.records]

    def assert_clean(self):
        errors = [self.format(record) for record in self.records if record.levelno >= logging.ERROR]
        assert errors == [], errors


# -- PostgreSQL ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_cluster():
    """One throw-away PostgreSQL cluster per test process, started on first use."""
    from tests.postgres import PostgresCluster

    cluster = PostgresCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture
def database_url(postgres_cluster):
    """A fresh, empty database for this test (given back emptied afterwards: PostgresCluster.recycle)."""
    url = postgres_cluster.new_database()
    yield url
    postgres_cluster.recycle(url)


# -- live ---------------------------------------------------------------------------------


def _shares_servers(request) -> bool:
    return request.node.get_closest_marker("shared_servers") is not None


@pytest.fixture
def upstream(request):
    """The fault-injecting fake upstream: the test's own, or the shared one (marker shared_servers)."""
    if _shares_servers(request):
        yield request.getfixturevalue("shared_upstream").reset()
        return
    server = FakeUpstream()
    yield server
    server.stop()


@pytest.fixture
def start_jarvis(tmp_path, upstream):
    """Start gunicorn with the project's config in front of `upstream`; stopped after the test."""
    servers = []

    def start(env: dict | None = None, args: list[str] | None = None, app: str = "app:app",
              upstream_url: str | None = None) -> LiveServer:
        several = "JARVIS_UPSTREAMS_FILE" in (env or {})
        settings = {} if several else {"JARVIS_UPSTREAM_URL": upstream_url or upstream.url}
        settings.update(env or {})
        server = LiveServer(tmp_path, settings, args, app)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def jarvis(request, start_jarvis):
    """Jarvis with default settings (heartbeat 5 s) in front of the fake upstream: the test's own, or
    the shared one (marker shared_servers)."""
    if _shares_servers(request):
        return request.getfixturevalue("shared_jarvis").for_next_test()
    return start_jarvis()


# A module whose tests leave nothing behind that the next could see (no settings of their own, no
# conversations listed, no counters read) is marked `shared_servers`: its tests, and those of every other
# such module that run in the same test process, share one upstream and one Jarvis, which saves a
# gunicorn start (about 0.5 s of CPU, a second on a slow machine) per test. Shared by the process, not
# the module: pytest-xdist hands a module's tests to all four processes, so one server per module was
# started up to four times (twelve modules share). Each test gets the upstream reset and Jarvis's log
# from its own start (for_next_test: no stream open, no conversation kept, started again if the last
# test left it dead); start_jarvis still starts a Jarvis of the test's own, in front of the shared upstream.


@pytest.fixture(scope="session")
def shared_upstream():
    server = FakeUpstream()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shared_jarvis(tmp_path_factory, shared_upstream):
    server = LiveServer(tmp_path_factory.mktemp("jarvis"), {"JARVIS_UPSTREAM_URL": shared_upstream.url})
    yield server.start()
    server.stop()

"""The README's test command runs two phases (pytest -m with the expressions below).

The parallel phase: the live and browser tests, four test processes at once (`-n 4 --dist worksteal`).
Then the serial tests, one at a time in one test process, and beside them, in a second process, the
in-process tier: every test neither live, browser nor serial, marked `in_process` here (`-n 2`). The
serial tests judge timing, so they never share the machine with each other or with a live test; beside
the in-process tests (one test process, mostly one core) they passed as alone, and that tier's CPU (about
45 of the parallel phase's 230 CPU-s on an idle hour) goes to the core the serial tests leave idle:
measured on an idle hour of this 2-core machine, 135 s + 90 s before, 108 s + 92 s after. Where
no core is spare (scripts/slow-check --half-cores), the second phase is bound by CPU instead and the total
is what it was (317 s before, 323 s after, in one hour).

A conftest imports the hooks below (tests/conftest.py does; tests/test_phases.py's project too).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PARALLEL = "not serial and not in_process"
SERIAL = "serial or in_process"
_SERIAL_IDS = "JARVIS_TEST_SERIAL_IDS"  # where the second phase's test processes list its serial tests


def pytest_itemcollected(item):
    """`in_process` on every test that is not live, browser or serial (before -m deselects)."""
    if not any(item.get_closest_marker(name) for name in ("live", "browser", "serial")):
        item.add_marker(pytest.mark.in_process)


def second_phase(config) -> bool:
    """The second phase on several test processes: in the controller (-n) or in one of its processes."""
    return config.option.markexpr == SERIAL and bool(getattr(config.option, "numprocesses", None)
                                                     or hasattr(config, "workerinput"))


def pytest_xdist_make_scheduler(config, log):
    """The second phase's two test processes: every serial test to one, in the order collected, every
    in-process test to the other. (xdist's own `--dist loadgroup` does this by marker, but it names the
    groups by rewriting a private attribute that pytest 9 no longer reads: it ran both kinds in both.) The
    scheduler overrides `_split_scope`, as xdist's own LoadFileScheduling does; tests/test_phases.py fails if
    a later xdist stops calling it."""
    if not second_phase(config):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SerialBesideInProcess(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if not hasattr(self, "serial_ids"):  # listed by the test processes as they collected
                listed = Path(os.environ[_SERIAL_IDS])
                self.serial_ids = set(next(listed.glob("*.txt")).read_text().splitlines())
            return "serial" if nodeid in self.serial_ids else "in_process"

    return SerialBesideInProcess(config, log)


def pytest_configure(config):
    if second_phase(config) and not hasattr(config, "workerinput"):
        import tempfile

        os.environ[_SERIAL_IDS] = tempfile.mkdtemp(prefix="jarvis-serial-ids-")  # the test processes inherit it


@pytest.hookimpl(tryfirst=True)  # before xdist tells the controller the collection is done
def pytest_collection_finish(session):
    """In the second phase's test processes: the serial tests' ids, for the scheduler."""
    config = session.config
    if second_phase(config) and hasattr(config, "workerinput") and _SERIAL_IDS in os.environ:
        folder = Path(os.environ[_SERIAL_IDS])
        worker = config.workerinput["workerid"]
        (folder / f"{worker}.part").write_text("\n".join(item.nodeid for item in session.items
                                                          if item.get_closest_marker("serial")))
        (folder / f"{worker}.part").rename(folder / f"{worker}.txt")


def serial_ids_cleanup(config) -> None:
    """At the controller's end: the folder the test processes listed the serial tests in."""
    if not hasattr(config, "workerinput") and _SERIAL_IDS in os.environ:
        import shutil

        shutil.rmtree(os.environ.pop(_SERIAL_IDS), ignore_errors=True)


NICE = 10  # the in-process tests' share of a core the serial tests also want: about a tenth (CFS weights)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """The in-process tests' process yields the CPU to the serial tests' (nice, once: its children
    inherit it). They use what the serial tests leave idle; none of them judges time against a limit a
    slower process would miss (they ran in the parallel phase, four test processes on two cores)."""
    config = item.config
    if (second_phase(config) and hasattr(config, "workerinput") and item.get_closest_marker("in_process")
            and not getattr(config, "_jarvis_niced", False)):
        os.nice(NICE)
        config._jarvis_niced = True

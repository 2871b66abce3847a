"""The README's second phase on a project of its own: its serial tests all run in one test process, one
after another in the order written, and its other tests in the other process (tests/phases.py)."""

import json
import os
import subprocess
import sys
import textwrap

from tests.live import ROOT

PROJECT = {
    "pytest.ini": """
        [pytest]
        markers =
            live: a server
            browser: a browser
            serial: alone
            in_process: set by tests.phases
    """,
    "conftest.py": """
        from tests.phases import (  # noqa: F401
            pytest_collection_finish, pytest_configure, pytest_itemcollected, pytest_runtest_setup,
            pytest_xdist_make_scheduler, serial_ids_cleanup)

        def pytest_unconfigure(config):
            serial_ids_cleanup(config)
    """,
    # Serial tests spread through the modules among the others, as in Jarvis's suite.
    "test_a.py": """
        import pytest
        from record import record

        @pytest.mark.parametrize("n", range(6))
        def test_quick(n):
            record("quick", n)

        @pytest.mark.serial
        def test_first_serial():
            record("serial", 1)

        @pytest.mark.live
        def test_live_is_the_parallel_phases():
            record("live", 0)
    """,
    "test_b.py": """
        import pytest
        from record import record

        pytestmark = pytest.mark.serial

        def test_second_serial():
            record("serial", 2)

        def test_third_serial():
            record("serial", 3)
    """,
    "test_c.py": """
        import pytest
        from record import record

        @pytest.mark.parametrize("n", range(6, 12))
        def test_more(n):
            record("quick", n)

        @pytest.mark.serial
        def test_fourth_serial():
            record("serial", 4)
    """,
    "record.py": """
        import json, os

        def record(kind, n):
            with open(os.environ["RECORD"], "a") as out:
                out.write(json.dumps([kind, n, os.environ.get("PYTEST_XDIST_WORKER"), os.nice(0)]) + "\\n")
    """,
}


def test_the_second_phase_runs_every_serial_test_in_one_process_and_the_rest_in_the_other(tmp_path):
    for name, text in PROJECT.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    record = tmp_path / "record.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-m", "serial or in_process", "-p", "no:cacheprovider", "-q"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", "RECORD": str(record),
             "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    serial = [row for row in rows if row[0] == "serial"]
    quick = [row for row in rows if row[0] == "quick"]
    assert [row[1] for row in serial] == [1, 2, 3, 4]  # every one, in the order written
    assert len({row[2] for row in serial}) == 1  # in one process: never two at once
    assert sorted(row[1] for row in quick) == list(range(12))
    assert {row[2] for row in quick} == {"gw0", "gw1"} - {serial[0][2]}  # the other process, and only it
    base = os.nice(0)
    assert {row[3] for row in serial} == {base} and {row[3] for row in quick} == {min(base + 10, 19)}  # yields
    assert not [row for row in rows if row[0] == "live"]  # the parallel phase's
    assert not list(tmp_path.glob("jarvis-serial-ids-*"))  # the list of serial tests, removed at the end

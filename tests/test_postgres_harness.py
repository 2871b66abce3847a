"""The tests' throw-away PostgreSQL cluster (tests/postgres.py) where the README's test command may run: a
private TMPDIR, and a cluster that fails to start. Nothing is started here."""

import os
import tempfile

import pytest

from tests.postgres import PostgresCluster


def test_a_private_tmpdir_still_gives_the_postgres_user_a_folder_it_can_reach(tmp_path, monkeypatch):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)  # as `mktemp -d` makes it: initdb, run as postgres, was refused its data folder
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    cluster = PostgresCluster()
    try:
        if os.geteuid() == 0:  # the folder is handed to the postgres user, who must be able to reach it
            assert not cluster.base.startswith(str(private))
            reachable = os.path.dirname(cluster.base)
            assert os.stat(reachable).st_mode & 0o001, f"{reachable} is not traversable by the postgres user"
        else:  # the cluster runs as this user, who reaches its own private folder
            assert os.path.dirname(cluster.base) == str(private)
    finally:
        cluster.stop()
    assert not os.path.exists(cluster.base)

    private.chmod(0o755)  # a TMPDIR others can traverse is used as it is
    cluster = PostgresCluster()
    try:
        assert os.path.dirname(cluster.base) == str(private)
    finally:
        cluster.stop()


def test_a_cluster_that_fails_to_start_leaves_no_folder_behind(monkeypatch):
    cluster = PostgresCluster()
    cluster.bindir = "/nonexistent/postgresql/bin"  # initdb cannot be run
    with pytest.raises((OSError, RuntimeError)):  # not found, or (as root, through runuser) exit status 127
        cluster.start()
    assert not os.path.exists(cluster.base)

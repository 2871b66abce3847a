"""Settings are read once and a bad value stops start-up with a message naming the variable."""

import dataclasses
import re
import subprocess
import sys

import pytest

from jarvis.settings import Settings, SettingsError, declared_names, is_loopback_bind, markdown_table
from tests.live import ROOT
from tests.net import free_port


def test_defaults():
    settings = Settings.from_env({})
    assert settings.upstream_url is None
    assert settings.heartbeat_seconds == 5
    assert settings.stream_inactivity_seconds == 120
    assert settings.stream_max_seconds == 1800


def test_upstream_url_loses_trailing_slash():
    assert Settings.from_env({"JARVIS_UPSTREAM_URL": "http://127.0.0.1:11434/v1/"}).upstream_url == \
        "http://127.0.0.1:11434/v1"


@pytest.mark.parametrize("name, value", [
    ("JARVIS_UPSTREAM_URL", "ftp://example/v1"),
    ("JARVIS_UPSTREAM_URL", "localhost:11434"),
    ("JARVIS_HEARTBEAT_SECONDS", "0"),
    ("JARVIS_HEARTBEAT_SECONDS", "soon"),
    ("JARVIS_STREAM_INACTIVITY_SECONDS", "-1"),
    ("JARVIS_STREAM_MAX_SECONDS", "inf"),
    ("JARVIS_MAX_BODY_BYTES", "12"),
    ("JARVIS_LOG_LEVEL", "LOUD"),
])
def test_bad_value_names_the_variable(name, value):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_api_key_is_not_in_the_repr():
    settings = Settings.from_env({"JARVIS_UPSTREAM_API_KEY": "sk-canary-123"})
    assert "sk-canary-123" not in repr(settings)


@pytest.mark.live
@pytest.mark.parametrize("name, value", [("JARVIS_HEARTBEAT_SECONDS", "never"), ("JARVIS_WORKERS", "two")])
def test_gunicorn_refuses_to_start_with_a_bad_value(name, value):
    env = {"PATH": "/usr/bin:/bin", name: value, "JARVIS_UPSTREAM_URL": "http://127.0.0.1:9/v1"}
    result = subprocess.run([sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py",
                             "--bind", f"127.0.0.1:{free_port()}", "app:app"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert name in result.stderr
    assert "Traceback" not in result.stderr


def test_the_readme_table_is_the_declared_settings():
    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme, "README.md's configuration table differs: paste `python -m jarvis.settings`"


def test_every_jarvis_variable_the_code_reads_is_declared_and_documented():
    """Like datasette's check_actions_are_documented: a JARVIS_* name in the code must be a declared setting."""
    readme = (ROOT / "README.md").read_text()
    sources = [*ROOT.joinpath("jarvis").rglob("*.py"), ROOT / "gunicorn.conf.py", ROOT / "app.py"]
    used = {name for source in sources for name in re.findall(r"\bJARVIS_[A-Z0-9_]*[A-Z0-9]\b", source.read_text())}
    assert used - declared_names() == set(), "read in the code but not declared in jarvis/settings.py"
    assert {name for name in declared_names() if f"`{name}`" not in readme} == set()


def test_settings_are_frozen_and_replaced_with_dataclasses():
    settings = Settings(data_dir="/tmp")
    assert dataclasses.replace(settings, heartbeat_seconds=1.0).heartbeat_seconds == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.heartbeat_seconds = 2.0


@pytest.mark.parametrize("address, loopback", [("127.0.0.1:8000", True), ("[::1]:8000", True),
                                               ("localhost:8000", True), ("unix:/run/jarvis.sock", True),
                                               ("0.0.0.0:8000", False), ("192.168.1.5:80", False),
                                               ("[::]:8000", False), ("example.org:80", False)])
def test_loopback_detection(address, loopback):
    assert is_loopback_bind(address) is loopback


@pytest.mark.parametrize("raw, hosts", [("chat.example.org", ("chat.example.org",)),
                                        ("A.example, [::1] ,10.0.0.5", ("a.example", "::1", "10.0.0.5")),
                                        ("*", ("*",))])
def test_allowed_hosts_are_read_as_a_list(raw, hosts):
    assert Settings.from_env({"JARVIS_UPSTREAM_URL": "http://x/v1", "JARVIS_ALLOWED_HOSTS": raw}).allowed_hosts == hosts


@pytest.mark.parametrize("raw", [",", "http://a.example/", "a b"])
def test_bad_allowed_hosts_name_the_variable(raw):
    with pytest.raises(SettingsError, match="JARVIS_ALLOWED_HOSTS"):
        Settings.from_env({"JARVIS_UPSTREAM_URL": "http://x/v1", "JARVIS_ALLOWED_HOSTS": raw})

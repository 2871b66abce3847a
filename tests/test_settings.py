"""Settings are read once and a bad value stops start-up with a message naming the variable."""

import subprocess
import sys

import pytest

from jarvis.settings import Settings, SettingsError
from tests.live import ROOT, free_port


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

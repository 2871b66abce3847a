"""Jarvis installed as a package: `pip install .` (no -e) gives a `jarvis` command that serves from any folder.

The live test installs the working tree's files (tracked and new, as a clean clone would have them) into a
fresh virtual environment with pip, without `-e`, and runs the installed command from another folder. The
environment borrows the test environment's dependencies through a .pth file (pip's `--no-deps`, offline),
so what is tested is this project's packaging: its modules, page files, templates and entry point. How long
the full install takes with and without the embedded model is measured in the closing note of issue 28, not
here: it depends on pip's cache and the network.
"""

import io
import os
import re
import subprocess
import sys
import sysconfig
import tarfile

import pytest
import requests

from jarvis import cli, settings
from tests.clients import content_of, sse
from tests.live import ROOT, wait_until
from tests.net import free_port

SUBCOMMANDS = ("serve", "doctor", "users", "settings", "version")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh virtualenv with this tree installed by pip (not editable); its bin directory."""
    base = tmp_path_factory.mktemp("package")
    source, venv = base / "source", base / "venv"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name in files:
            if name and not name.startswith(("tests/", "bench/")) and (ROOT / name).is_file():
                tar.add(ROOT / name, arcname=name)
    archive.seek(0)
    with tarfile.open(fileobj=archive) as tar:
        tar.extractall(source, filter="data")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # The test environment's packages, after the new environment's own: its dependencies without a download.
    # (.pth files inside a directory added this way are not run, so this project's editable install there
    # stays invisible.)
    (base / "venv" / purelib.split(str(venv) + "/", 1)[1] / "test-dependencies.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n")
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                             "--no-deps", "--no-build-isolation", "--no-input", str(source)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return venv / "bin", purelib


def test_the_installed_command_lists_its_subcommands_and_imports_the_installed_copy(installed, tmp_path):
    bin_dir, purelib = installed
    helped = subprocess.run([bin_dir / "jarvis", "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert helped.returncode == 0, helped.stderr
    assert all(f"    {name}" in helped.stdout for name in SUBCOMMANDS), helped.stdout
    located = subprocess.run([bin_dir / "python", "-c", "import jarvis; print(jarvis.__file__)"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=30)
    assert located.stdout.startswith(purelib), located.stdout + located.stderr  # not the checkout's
    version = subprocess.run([bin_dir / "jarvis", "version"], capture_output=True, text=True, timeout=30)
    assert version.stdout.startswith("jarvis 0.") and "gunicorn 27." in version.stdout, version.stdout
    packaged = {path.relative_to(purelib).as_posix() for path in (ROOT.parent / purelib).glob("jarvis/**/*")}
    assert {"jarvis/templates/index.html", "jarvis/static/page/main.js", "jarvis/static/vendor/marked.esm.js",
            "jarvis/stores/postgres.py", "jarvis/backends/local.py"} <= packaged
    assert not any(path.startswith("tests") for path in packaged)


@pytest.mark.live
@pytest.mark.model
def test_jarvis_serve_from_another_folder_keeps_its_data_in_the_users_data_directory(installed, tmp_path):
    bin_dir, _ = installed
    port, elsewhere, xdg = free_port(), tmp_path / "elsewhere", tmp_path / "xdg"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("JARVIS_", "PROMETHEUS_"))}
    env.update({"XDG_DATA_HOME": str(xdg), "PYTHONUNBUFFERED": "1"})
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen([bin_dir / "jarvis", "serve", "--bind", f"127.0.0.1:{port}", "--titles", "0"],
                                  cwd=elsewhere, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    # No keep-alive: an idle connection left open would hold the worker's graceful exit for gunicorn's
    # keepalive (15 s), as it would for any client.
    http = requests.Session()
    http.headers["Connection"] = "close"
    try:
        def healthy():
            try:
                with http.get(f"{url}/healthz", timeout=5) as response:
                    return response.json()
            except requests.RequestException:
                assert server.poll() is None, log_path.read_text()
                return None

        health = wait_until(healthy, 60, lambda: f"jarvis serve did not answer:\n{log_path.read_text()}")
        assert health["backend"] == "local" and health["status"] == "ok"
        with http.post(f"{url}/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": "Say hello."}], "stream": True, "max_tokens": 8,
                "temperature": 0}) as reply:
            assert reply.status_code == 200 and reply.headers["Content-Type"].startswith("text/event-stream")
            assert content_of(sse(reply.content)).strip(), reply.text
        with http.get(f"{url}/", timeout=10) as page:
            assert page.status_code == 200
            main = re.search(r'src="(/static/v/[0-9a-f]+/page/main\.js)"', page.text).group(1)  # the installed files'
        with http.get(f"{url}{main}", timeout=10) as script:
            assert script.status_code == 200 and "import" in script.text
        assert (xdg / "jarvis" / "jarvis.sqlite3").is_file()  # the per-user data directory, not the folder
        assert not any(elsewhere.iterdir())
    finally:
        server.terminate()
        server.wait(timeout=40)
    assert server.returncode == 0, log_path.read_text()


# -- in-process: what the command does with its arguments ---------------------------------------------------

def test_serve_turns_options_into_settings_and_passes_the_rest_to_gunicorn(monkeypatch):
    seen = {}
    import gunicorn.app.wsgiapp

    monkeypatch.setattr(gunicorn.app.wsgiapp, "run", lambda prog: seen.update(argv=list(sys.argv), prog=prog) or 0)
    monkeypatch.setattr(sys, "argv", ["jarvis"])
    for variable in ("JARVIS_DATA_DIR", "JARVIS_LOG_FORMAT"):
        monkeypatch.delenv(variable, raising=False)
    assert cli.main(["serve", "--data-dir", "/srv/jarvis", "-w", "2", "--log-format", "json",
                     "--error-logfile", "/var/log/jarvis.log"]) == 0
    assert os.environ["JARVIS_DATA_DIR"] == "/srv/jarvis" and os.environ["JARVIS_LOG_FORMAT"] == "json"
    assert seen["argv"] == ["jarvis serve", "--config", "python:jarvis.server_config", "-w", "2",
                            "--error-logfile", "/var/log/jarvis.log", "jarvis.wsgi:app"]


def test_secrets_are_never_command_line_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    helped = capsys.readouterr().out
    assert "--data-dir" in helped and "--upstream-url" in helped
    for secret in ("--api-key ", "--database-url", "--upstream-api-key", "--secret-key"):
        assert secret not in helped


def test_settings_shows_what_the_environment_gives_and_hides_secrets(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("JARVIS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("JARVIS_UPSTREAM_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("JARVIS_UPSTREAM_API_KEY", "sk-do-not-print-me")
    assert cli.main(["settings"]) == 0
    shown = capsys.readouterr().out
    assert f"JARVIS_DATA_DIR={tmp_path}  [environment]" in shown
    assert "JARVIS_UPSTREAM_API_KEY=(set, not shown)" in shown and "sk-do-not-print-me" not in shown
    monkeypatch.setenv("JARVIS_WORKERS", "many")
    assert cli.main(["settings"]) == 1
    assert "JARVIS_WORKERS" in capsys.readouterr().err
    assert cli.main(["settings", "--markdown"]) == 0
    assert capsys.readouterr().out.strip() == settings.markdown_table()


def test_an_unknown_subcommand_is_refused_with_the_list_and_version_prints_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["srve"])
    assert exit_.value.code == 2 and "serve" in capsys.readouterr().err
    assert cli.main(["version"]) == 0
    assert capsys.readouterr().out.startswith(f"jarvis {__import__('jarvis').__version__} (Python ")


def test_the_data_directory_is_the_checkouts_in_a_checkout_else_the_users(tmp_path):
    package = tmp_path / "site-packages" / "jarvis" / "settings.py"
    assert settings.default_data_dir({"XDG_DATA_HOME": "/x"}, str(package)) == "/x/jarvis"
    home_default = os.path.join(os.path.expanduser("~"), ".local", "share", "jarvis")
    assert settings.default_data_dir({}, str(package)) == home_default
    assert settings.default_data_dir({"XDG_DATA_HOME": "relative"}, str(package)) == home_default  # as the spec says
    assert settings.default_data_dir({"XDG_DATA_HOME": "/x"}) == str(ROOT / "data")  # this checkout


def test_a_core_install_with_no_upstream_refuses_to_start_with_the_fix(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(settings.SettingsError, match=r"jarvis-server\[local\]"):
        settings.resolve_local_model(None)

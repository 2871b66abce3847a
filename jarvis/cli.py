"""The `jarvis` command an installed Jarvis gives (`pip install .`, or `pip install '.[local]'` with the
embedded model):

    jarvis serve [--data-dir DIR] [--bind ADDR] ... [gunicorn options]   the server (gunicorn, gevent workers)
    jarvis doctor URL [--key KEY] [--direct URL]   is a stream reaching clients as Jarvis sends it?
    jarvis users COMMAND ...                       accounts: add, passwd, remove, list, key, keys, revoke, ...
    jarvis settings [--markdown]                   every setting, as this environment gives it (validated)
    jarvis version                                 Jarvis's version and the versions it runs on

`jarvis serve` takes each setting either from its JARVIS_* variable or as an option (`JARVIS_DATA_DIR` is
`--data-dir`); an option wins. Secrets (keys, the database URL) are not options: a command line is visible
to every user of the machine in `ps`, so they come from the environment or their `_FILE` variables. Any
other option goes to gunicorn as it is (`-w 2`, `--error-logfile FILE`). Run from a checkout, `python app.py`
is `jarvis serve`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys

import jarvis

_SERVER_CONFIG = "python:jarvis.server_config"
_APP = "jarvis.wsgi:app"


def _setting_options():
    """(option, variable, help) for every setting that may be given on a command line."""
    from jarvis.settings import _declared

    for declared in _declared():
        variable = declared.metadata["env"]
        if not declared.repr:  # a secret (see settings.setting): environment or file only
            continue
        option = "--" + variable.removeprefix("JARVIS_").lower().replace("_", "-")
        yield option, variable, declared.metadata["doc"].replace("`", "")


def _serve_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Start Jarvis under gunicorn (gevent workers) with its settings and hooks. "
        "Each option sets its JARVIS_* variable; options not listed here go to gunicorn.",
        epilog="Secrets (JARVIS_API_KEY, JARVIS_DATABASE_URL, ...) come from the environment or their _FILE "
        "variables, never the command line. `jarvis settings` shows what the environment gives.")
    for option, variable, help_text in _setting_options():
        parser.add_argument(option, dest=variable, metavar="VALUE", help=f"{help_text} ({variable})")
    return parser


def serve(argv: list[str], prog: str = "jarvis serve") -> int:
    """Run gunicorn in this process, as `gunicorn -c python:jarvis.server_config jarvis.wsgi:app` would."""
    options, passthrough = _serve_parser(prog).parse_known_args(argv)
    for variable, value in vars(options).items():
        if value is not None:
            os.environ[variable] = value
    from gunicorn.app.wsgiapp import run

    sys.argv = [prog, "--config", _SERVER_CONFIG, *passthrough, _APP]
    return run(prog=prog)


def settings_command(argv: list[str]) -> int:
    from jarvis.settings import Settings, SettingsError, _declared, markdown_table

    parser = argparse.ArgumentParser(prog="jarvis settings", description="Every setting, with the value this "
                                     "environment gives it (validated as the server would), or the docs' table.")
    parser.add_argument("--markdown", action="store_true", help="the README's table of settings and defaults")
    if parser.parse_args(argv).markdown:
        print(markdown_table())
        return 0
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"jarvis: {error}", file=sys.stderr)
        return 1
    for declared in _declared():
        value = getattr(settings, declared.name)
        if not declared.repr:
            shown = "(unset)" if value is None else "(set, not shown)"
        else:
            shown = "(unset)" if value is None else value if isinstance(value, str) else repr(value)
        source = "environment" if declared.metadata["env"] in os.environ else "default"
        print(f"{declared.metadata['env']}={shown}  [{source}]")
    return 0


def version() -> str:
    parts = [f"Python {platform.python_version()}"]
    for distribution in ("gunicorn", "gevent", "flask", "llama-cpp-python"):
        try:
            parts.append(f"{distribution} {importlib.metadata.version(distribution)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{distribution} not installed")
    return f"jarvis {jarvis.__version__} ({', '.join(parts)})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="jarvis", description="Jarvis, a self-hosted chat server that streams "
                                     "OpenAI-compatible completions and never hangs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Each subcommand parses its own arguments (serve passes unknown ones on to gunicorn).
    commands.add_parser("serve", help="start the server (gunicorn with gevent workers)", add_help=False)
    commands.add_parser("doctor", help="check that streams reach clients as sent, through proxies", add_help=False)
    commands.add_parser("users", help="manage accounts and personal API keys", add_help=False)
    commands.add_parser("settings", help="show every setting as this environment gives it", add_help=False)
    commands.add_parser("version", help="print the version of Jarvis and what it runs on")
    if not argv or argv[0] not in commands.choices:
        parser.parse_args(argv)  # prints the usage and exits 2, or --help and exits 0
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return serve(rest)
    if command == "doctor":
        from jarvis import doctor

        return doctor.main(rest, prog="jarvis doctor")
    if command == "users":
        from jarvis import users

        return users.main(rest, prog="jarvis users")
    if command == "settings":
        return settings_command(rest)
    parser.parse_args(argv)  # version: refuses extra arguments
    print(version())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The operator's command for accounts, with the server's own settings (JARVIS_DATA_DIR or
JARVIS_DATABASE_URL): it works while the server runs, and before its first start (it creates or
migrates the database). The first account turns accounts mode on, on every worker within a second.

    python -m jarvis.users add NAME [--admin]     the password from stdin (one line; asked for on a terminal)
    python -m jarvis.users passwd NAME            a new password the same way; the account's sessions end
    python -m jarvis.users remove NAME            the account, its sessions and keys, at once everywhere
    python -m jarvis.users list                   names, admin, limits, created and last seen
    python -m jarvis.users key NAME [--label TEXT]  a new personal API key: the last line of stdout, shown once
    python -m jarvis.users keys NAME              the account's keys (ids and labels, never the keys)
    python -m jarvis.users revoke KEY_ID          a key stops working at its next request
    python -m jarvis.users limit NAME [--tokens-per-day N] [--max-streams N]
                                                  limits, from the next request on ('none' lifts one)
    python -m jarvis.users usage [NAME] [--since YYYY-MM-DD]
                                                  requests and tokens by day (this month by default)

Exit status 0 when done, 1 with a message on stderr when it could not be (no such account, a name
taken, a password too short), 2 for a command line that is not one of the above.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import sys

from jarvis import passwords
from jarvis.accounts import NAME
from jarvis.settings import Settings, SettingsError
from jarvis.stores import StoreError, StoreUnavailable, UserExists, open_store

_UNCHANGED = object()  # a limit the command line leaves as it is


class Refused(Exception):
    """What the operator asked for cannot be done; the message says why."""


def main(argv: list[str] | None = None, environ: dict[str, str] | None = None, prog: str = "python -m jarvis.users"
         ) -> int:
    """The command (`jarvis users`); `environ`: the settings' environment (by default this process's)."""
    arguments = _parser(prog).parse_args(argv)
    try:
        settings = Settings.from_env(environ)
        store = open_store(settings)
    except (SettingsError, StoreError, StoreUnavailable) as error:
        print(f"jarvis.users: {error}", file=sys.stderr)
        return 1
    try:
        arguments.run(store, arguments)
        return 0
    except Refused as error:
        print(f"jarvis.users: {error}", file=sys.stderr)
        return 1
    finally:
        store.close()


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Manage Jarvis's accounts.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, run, help_text: str, *arguments):
        sub = commands.add_parser(name, help=help_text)
        for args, options in arguments:
            sub.add_argument(*args, **options)
        sub.set_defaults(run=run)

    name = (("name",), {"metavar": "NAME"})
    command("add", _add, "add an account (the password from stdin)", name,
            (("--admin",), {"action": "store_true", "help": "may manage accounts and read /metrics, /debug"}))
    command("passwd", _passwd, "set an account's password (from stdin); its sessions end", name)
    command("remove", _remove, "remove an account, its sessions and its keys", name)
    command("list", _list, "list the accounts")
    command("key", _key, "make a personal API key (printed once, as the last line)", name,
            (("--label",), {"default": "", "help": "what the key is for (shown in listings)"}))
    command("keys", _keys, "list an account's keys", name)
    command("revoke", _revoke, "revoke a key by its id", (("key_id",), {"metavar": "KEY_ID"}))
    limit = {"type": _limit_value, "default": _UNCHANGED, "metavar": "N"}
    command("limit", _limit, "set an account's limits ('none' lifts one; an option left out stays)", name,
            (("--tokens-per-day",), {**limit, "help": "prompt + completion tokens a day (UTC)"}),
            (("--max-streams",), {**limit, "help": "answers and API streams at once"}))
    command("usage", _usage, "requests and tokens by day", (("name",), {"metavar": "NAME", "nargs": "?"}),
            (("--since",), {"type": datetime.date.fromisoformat, "metavar": "YYYY-MM-DD",
                            "help": "from this day on (UTC; default: the first of this month)"}))
    return parser



def _limit_value(text: str):
    if text.lower() == "none":
        return None
    value = int(text)
    if not 1 <= value <= 10**12:
        raise ValueError(text)
    return value


def _password(prompt: str) -> str:
    if sys.stdin.isatty():
        password = getpass.getpass(prompt)
        if getpass.getpass("Again: ") != password:
            raise Refused("the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    try:
        return passwords.hash_password(password)
    except passwords.BadPassword as error:
        raise Refused(str(error)) from None


def _add(store, arguments) -> None:
    if not NAME.fullmatch(arguments.name):
        raise Refused("a name is 1 to 64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit")
    if store.user(arguments.name) is not None:
        raise Refused(f"an account named {arguments.name!r} exists already")
    password_hash = _password(f"Password for {arguments.name}: ")
    try:
        user = store.add_user(arguments.name, password_hash, admin=arguments.admin)
    except UserExists:
        raise Refused(f"an account named {arguments.name!r} exists already") from None
    print(f"added {user['name']}{' (admin)' if user['admin'] else ''}")


def _existing(store, name: str) -> dict:
    user = store.user(name)
    if user is None:
        raise Refused(f"no account named {name!r}")
    return user


def _passwd(store, arguments) -> None:
    user = _existing(store, arguments.name)
    if not store.set_password(user["name"], _password(f"New password for {user['name']}: ")):
        raise Refused(f"no account named {arguments.name!r}")
    print(f"new password for {user['name']}; its sessions ended")


def _remove(store, arguments) -> None:
    if not store.remove_user(arguments.name):
        raise Refused(f"no account named {arguments.name!r}")
    print(f"removed {arguments.name}, its sessions and its keys")


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _list(store, arguments) -> None:
    for user in store.users():
        limits = ", ".join(part for part in (
            f"{user['tokens_per_day']} tokens/day" if user["tokens_per_day"] else "",
            f"{user['max_streams']} streams" if user["max_streams"] else "") if part) or "no limits"
        print(f"{user['name']}\t{'admin' if user['admin'] else 'user'}\t{limits}\tcreated {_when(user['created_at'])}"
              f"\tlast seen {_when(user['last_seen_at'])}")


def _key(store, arguments) -> None:
    user = _existing(store, arguments.name)
    key_id, key, kept = passwords.new_key()
    if not store.add_key(user["name"], key_id, kept, arguments.label[:100]):
        raise Refused(f"no account named {arguments.name!r}")
    print(f"a new key for {user['name']} ({key_id}); it is shown only now:")
    print(key)


def _keys(store, arguments) -> None:
    keys = store.keys(arguments.name)
    if keys is None:
        raise Refused(f"no account named {arguments.name!r}")
    for key in keys:
        print(f"{key['id']}\t{key['label'] or '-'}\tcreated {_when(key['created_at'])}"
              f"\tlast used {_when(key['last_used_at'])}")


def _limit(store, arguments) -> None:
    user = _existing(store, arguments.name)
    tokens = user["tokens_per_day"] if arguments.tokens_per_day is _UNCHANGED else arguments.tokens_per_day
    streams = user["max_streams"] if arguments.max_streams is _UNCHANGED else arguments.max_streams
    store.set_limits(user["name"], tokens, streams)
    print(f"{user['name']}: {tokens if tokens is not None else 'no limit of'} tokens a day, "
          f"{streams if streams is not None else 'no limit of'} streams at once")


def _usage(store, arguments) -> None:
    from jarvis.usage import month_start, summary

    since = arguments.since.isoformat() if arguments.since else month_start()
    users = [_existing(store, arguments.name)] if arguments.name else store.users()
    rows = store.usage(None, since)
    print("account\tday\trequests\tprompt_tokens\tcompletion_tokens")
    for user in users:
        result = summary([row for row in rows if row["user_id"] == user["id"]])
        for day in result["days"]:
            print(f"{user['name']}\t{day['day']}\t{day['requests']}\t{day['prompt_tokens']}\t"
                  f"{day['completion_tokens']}")
        total = result["total"]
        print(f"{user['name']}\ttotal\t{total['requests']}\t{total['prompt_tokens']}\t{total['completion_tokens']}")


def _revoke(store, arguments) -> None:
    if not store.revoke_key(arguments.key_id):
        raise Refused(f"no key {arguments.key_id!r}")
    print(f"revoked {arguments.key_id}")


if __name__ == "__main__":
    sys.exit(main())

"""Shared fixtures for the accounts tests: a vmailctl environment over SQLite or PostgreSQL.

`acct` is parametrised over both stores: every test that uses it runs twice, once
on an SQLite file and once on a fresh database of the private PostgreSQL cluster
(tests/pg.py).  Commands run in-process through vdeliver.accounts.vmailctl.main(), which is
what the console script calls; passwords are hashed with cheap argon2 parameters
(the documented [accounts] argon2_* knobs) to keep the suite fast.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import MailRoot, world_tmpdir
from tests.pg import pg_cluster, pg_schema_conninfo  # noqa: F401  (fixtures)

CHEAP_ARGON2 = {"argon2_time_cost": 1, "argon2_memory_cost": 8, "argon2_parallelism": 1}


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class Acct:
    """One vmailctl set-up: a mail root, a database, a maps directory, a config file."""

    def __init__(self, backend: str, root: MailRoot, dsn: str = "") -> None:
        self.backend = backend
        self.root = root
        self.maps = root.base / "maps"
        self.maps.mkdir(exist_ok=True)
        self.maps.chmod(0o755)
        self.accounts: dict[str, object] = {"vmail_user": root.owner.name, "vmail_group": root.owner.name,
                                            "busy_timeout": 2, "connect_timeout": 3, **CHEAP_ARGON2}
        if dsn:
            self.accounts["dsn"] = dsn
        else:
            self.accounts["database"] = str(root.base / "accounts.sqlite")
        self.maps_table: dict[str, object] = {"directory": str(self.maps),
                                              "local_host_names": "mail.vdeliver.test localhost"}
        self.write()

    @property
    def config(self) -> Path:
        return self.root.config

    def write(self, **top: object) -> Path:
        self.root.write_config(**top)
        text = self.root.config.read_text()
        text += "\n[accounts]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in self.accounts.items())
        text += "\n[maps]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in self.maps_table.items())
        self.root.config.write_text(text)
        return self.root.config

    def run(self, *args: str, stdin: str = "") -> Result:
        from vdeliver.accounts import vmailctl

        out, err = io.StringIO(), io.StringIO()
        old_stdin = sys.stdin
        sys.stdin = io.StringIO(stdin)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = vmailctl.main(["-c", str(self.config), *args])
        finally:
            sys.stdin = old_stdin
        return Result(rc, out.getvalue(), err.getvalue())

    def ok(self, *args: str, stdin: str = "") -> Result:
        r = self.run(*args, stdin=stdin)
        assert r.rc == 0, f"vmailctl {' '.join(args)} -> {r.rc}: {r.err}{r.out}"
        return r

    def settings(self) -> Any:
        from vdeliver import config
        from vdeliver.accounts import settings

        return settings.load(config.load(str(self.config)))

    def store(self) -> Any:
        from vdeliver.accounts.engines import open_store

        return open_store(self.settings())

    def dump(self) -> Any:
        """Every row of every table: to prove a refused command changed nothing."""
        with contextlib.closing(self.store()) as s, s.transaction(write=False):
            return {
                "meta": sorted((r["key"], r["value"]) for r in s.rows("SELECT key, value FROM meta")),
                "domains": s.rows("SELECT * FROM domains ORDER BY name"),
                "mailboxes": s.rows("SELECT * FROM mailboxes ORDER BY domain, username"),
                "aliases": s.rows("SELECT * FROM aliases ORDER BY domain, username, target"),
                "forwards": s.rows("SELECT * FROM forwards ORDER BY domain, username, target"),
            }

    def user_row(self, address: str) -> dict[str, Any]:
        user, dom = address.split("@")
        with contextlib.closing(self.store()) as s, s.transaction(write=False):
            row: dict[str, Any] = s.user(user, dom)
            return row


@pytest.fixture(params=["sqlite", "postgresql"])
def acct(request: pytest.FixtureRequest, vmail: Any) -> Iterator[Acct]:
    base = world_tmpdir("vdeliver-acct-")
    try:
        root = MailRoot(base, vmail)
        dsn = request.getfixturevalue("pg_schema_conninfo") if request.param == "postgresql" else ""
        yield Acct(request.param, root, dsn)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def sqlite_acct(vmail: Any) -> Iterator[Acct]:
    base = world_tmpdir("vdeliver-acct-")
    try:
        yield Acct("sqlite", MailRoot(base, vmail))
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_acct(vmail: Any, pg_schema_conninfo: str) -> Iterator[Acct]:  # noqa: F811
    base = world_tmpdir("vdeliver-acct-")
    try:
        yield Acct("postgresql", MailRoot(base, vmail), pg_schema_conninfo)
    finally:
        shutil.rmtree(base, ignore_errors=True)

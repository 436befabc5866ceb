"""The Dovecot configuration generator on its own: templates, quoting, settings, files.

No Dovecot runs here (test_dovecot.py and test_dovecot_sql.py run the output in a
real one); these pin what the files say and how bad settings are refused.
"""

from __future__ import annotations

import argparse
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import ROOT
from vdeliver.accounts import dovecot
from vdeliver.accounts.errors import ConfigurationError
from vdeliver.config import Config
from vdeliver.deliver import expand
from vdeliver.recipient import Recipient


def cfg(**tables: dict[str, object]) -> Config:
    return Config("/etc/vdeliver.toml", dict(tables))


def test_examples_are_the_generated_defaults() -> None:
    """examples/dovecot is exactly what the generator prints for the default configuration."""
    shipped = ROOT / "examples" / "dovecot"
    expected = dovecot.example_files()
    for name, text in expected.items():
        assert (shipped / name).read_text() == text, (
            f"examples/dovecot/{name} is stale: run `python -m vdeliver.accounts.dovecot examples/dovecot`"
        )
    on_disk = {str(p.relative_to(shipped)) for p in shipped.rglob("*") if p.is_file()}
    assert on_disk == set(expected)


def test_default_files() -> None:
    files = dovecot.render_files(cfg(), lookup_uid=False)
    mail = files["conf.d/90-vdeliver.conf"]
    assert "mail_location = mbox:~/mail:INBOX=/var/spool/vbox/%d/%n\n" in mail
    assert "mail_home = /home/vmail-users/%d/%n\n" in mail
    assert "mbox_write_locks = dotlock fcntl\n" in mail  # vdeliver's order
    assert "mail_uid = vmail\n" in mail
    sql = files["dovecot-sql.conf.ext"]
    assert "driver = sqlite\nconnect = /var/lib/vdeliver/accounts.sqlite\n" in sql
    for key in ("password_query", "user_query", "iterate_query"):
        assert f"\n{key} = SELECT " in sql
    assert "args = /etc/dovecot/dovecot-sql.conf.ext" in files["conf.d/auth-vdeliver-sql.conf.ext"]


def test_maildir_default_and_postgres() -> None:
    c = cfg(accounts={"dsn": "postgresql://dove:s3cret@db.example:5433/vmail?sslmode=require"})
    c.format = "maildir"
    files = dovecot.render_files(c, lookup_uid=False)
    assert "mail_location = maildir:/home/vmail-users/%d/%n/Maildir\n" in files["conf.d/90-vdeliver.conf"]
    assert ("driver = pgsql\nconnect = host=db.example port=5433 dbname=vmail user=dove password=s3cret "
            "sslmode=require\n") in files["dovecot-sql.conf.ext"]


def test_vmail_user_and_reason_from_configuration() -> None:
    c = cfg(accounts={"vmail_user": "mailer", "vmail_group": "mail"},
            dovecot={"suspended_reason": "Ask 100% nicely, it's fine", "quota": False,
                     "config_dir": "/usr/local/etc/dovecot"})
    files = dovecot.render_files(c, lookup_uid=False)
    assert "mail_uid = mailer\nmail_gid = mail\n" in files["conf.d/90-vdeliver.conf"]
    assert "quota" not in files["conf.d/90-vdeliver.conf"]
    sql = files["dovecot-sql.conf.ext"]
    assert "'Ask 100%% nicely, it''s fine'" in sql  # SQL-quoted and %-escaped for Dovecot
    assert "quota_rule" not in sql
    assert "args = /usr/local/etc/dovecot/dovecot-sql.conf.ext" in files["conf.d/auth-vdeliver-sql.conf.ext"]


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ({"dovecot": {"colour": "blue"}}, "[dovecot] colour: unknown key"),
        ({"dovecot": {"quota": "yes"}}, "[dovecot] quota: must be true or false"),
        ({"dovecot": {"home": "relative/{user}"}}, "[dovecot] home: must be an absolute path"),
        ({"dovecot": {"home": "/home/{domain}"}}, "[dovecot] home: must be an absolute path containing {user}"),
        ({"dovecot": {"mbox_folders": "../escape"}}, "[dovecot] mbox_folders"),
        ({"dovecot": {"suspended_reason": "two\nlines"}}, "[dovecot] suspended_reason"),
        ({"dovecot": {"driver": "mysql"}}, "[dovecot] driver: must be sqlite or pgsql"),
        ({"dovecot": {"config_dir": "etc/dovecot"}}, "[dovecot] config_dir: must be an absolute path"),
        ({"dovecot": {"driver": "pgsql"}}, "[dovecot] connect: needed with driver = pgsql"),
        ({"dovecot": {"driver": "pgsql"}, "accounts": {"dsn": "dbname=vmail"}}, ""),  # connect from [accounts]
    ],
)
def test_bad_settings_are_refused_with_the_key(tables: dict[str, dict[str, object]], message: str) -> None:
    if not message:
        dovecot.render_files(cfg(**tables))
        return
    with pytest.raises(ConfigurationError) as info:
        dovecot.render_files(cfg(**tables))
    assert message in str(info.value) and "/etc/vdeliver.toml" in str(info.value)


_piece = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12).filter(
    lambda s: "{" not in s and "}" not in s
)


@given(st.lists(st.one_of(_piece, st.sampled_from(["{domain}", "{user}"])), min_size=1, max_size=6),
       st.from_regex(r"[a-z0-9.-]{1,10}", fullmatch=True), st.from_regex(r"[a-z0-9._-]{1,10}", fullmatch=True))
def test_sql_template_expands_like_vdeliver(parts: list[str], domain: str, user: str) -> None:
    """The SQL expression, evaluated by SQLite for one row, is vdeliver's expansion of the same
    template (after Dovecot turns %% back into %)."""
    import sqlite3

    template = "/" + "".join(parts)
    expr = dovecot.sql_template(template, "domain", "username").replace("%%", "%")
    with sqlite3.connect(":memory:") as db:
        (got,) = db.execute(f"SELECT {expr} FROM (SELECT ? AS domain, ? AS username)", (domain, user)).fetchone()
    assert got == expand(template, Recipient(domain, user))


def test_dovecot_template() -> None:
    assert dovecot.dovecot_template("/var/spool/vbox/{domain}/{user}") == "/var/spool/vbox/%d/%n"
    assert dovecot.dovecot_template("/m/100%/{user}") == "/m/100%%/%n"


def test_render_for_vmailctl(tmp_path: Path) -> None:
    c = cfg()
    everything = dovecot.render(c, [])
    assert isinstance(everything, str)
    assert everything.count("# ==> ") == 4  # the mail, Sieve, auth and SQL files
    assert dovecot.render(c, ["--file", "dovecot-sql.conf.ext"]) == dovecot.render_files(c)["dovecot-sql.conf.ext"]
    with pytest.raises(ConfigurationError, match="no generated file"):
        dovecot.render(c, ["--file", "nope"])
    with pytest.raises(ConfigurationError, match="unexpected argument"):
        dovecot.render(c, ["extra"])
    with pytest.raises(ConfigurationError, match="--driver"):
        dovecot.render(c, ["--driver", "mysql"])
    out = tmp_path / "etc"
    ns = argparse.Namespace(output=str(out), file=None, driver="pgsql", connect="host=/run/pg dbname=vmail")
    first = dovecot.render(c, ns)
    assert isinstance(first, str) and first.count("wrote ") == 4
    assert dovecot.render(c, ns) == f"{out}: up to date\n"
    sql = out / "dovecot-sql.conf.ext"
    assert "connect = host=/run/pg dbname=vmail\n" in sql.read_text()
    assert stat.S_IMODE(sql.stat().st_mode) == 0o600  # may hold a database password
    assert stat.S_IMODE((out / "conf.d" / "90-vdeliver.conf").stat().st_mode) == 0o644
    assert not list(out.rglob("*.tmp.*"))

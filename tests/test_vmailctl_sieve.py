"""`vmailctl sieve ...`: a mailbox's scripts in managesieved's layout (<home>/sieve/NAME.sieve and
the <home>/.dovecot.sieve link), written with the vmail user's ids, refused when they do not
compile, the active one protected."""

# ruff: noqa: F811  (pytest fixtures imported from tests.test_accounts_env are redefined as arguments)

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from tests.test_accounts_env import Acct, sqlite_acct  # noqa: F401  (fixtures)

SCRIPT = b'require "fileinto";\r\nif header :contains "subject" "report" {\r\n  fileinto "Reports";\r\n}\r\n'


def _setup(acct: Acct, tmp_path: Path) -> tuple[Path, Path]:
    """fred@away.com with a Maildir; returns his home (the Maildir's parent: Dovecot's home)
    and a file holding SCRIPT."""
    acct.ok("domain", "add", "away.com")
    acct.ok("user", "add", "fred@away.com", "--format", "maildir", "--no-password")
    src = tmp_path / "script.sieve"
    src.write_bytes(SCRIPT)
    return acct.root.home / "away.com" / "fred", src


def test_put_list_activate_get_delete(sqlite_acct: Acct, tmp_path: Path) -> None:
    acct = sqlite_acct
    home, src = _setup(acct, tmp_path)
    acct.ok("sieve", "put", "fred@away.com", "rules", str(src))
    acct.ok("sieve", "put", "fred@away.com", "spare", str(src))
    stored = home / "sieve" / "rules.sieve"
    assert stored.read_bytes() == SCRIPT
    st, dst = os.stat(stored), os.stat(home / "sieve")
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == acct.root.owner.uid
    assert stat.S_IMODE(dst.st_mode) == 0o700 and dst.st_uid == acct.root.owner.uid
    assert json.loads(acct.ok("sieve", "list", "fred@away.com", "--json").out) == [
        {"name": "rules", "active": False}, {"name": "spare", "active": False}]

    acct.ok("sieve", "activate", "fred@away.com", "rules")
    link = home / ".dovecot.sieve"
    assert os.readlink(link) == "sieve/rules.sieve"  # relative, as managesieved makes it
    assert os.lstat(link).st_uid == acct.root.owner.uid
    assert "rules  (active)" in acct.ok("sieve", "list", "fred@away.com").out
    assert acct.ok("sieve", "get", "fred@away.com", "rules").out == SCRIPT.decode()

    refused = acct.run("sieve", "delete", "fred@away.com", "rules")
    assert refused.rc == 1 and "is active" in refused.err
    acct.ok("sieve", "activate", "fred@away.com", "spare")
    acct.ok("sieve", "delete", "fred@away.com", "rules")
    assert not stored.exists()
    assert "deactivated" in acct.ok("sieve", "deactivate", "fred@away.com").out
    assert not os.path.lexists(link)
    assert "no script was active" in acct.ok("sieve", "deactivate", "fred@away.com").out


def test_put_refuses_a_script_that_does_not_compile(sqlite_acct: Acct, tmp_path: Path) -> None:
    acct = sqlite_acct
    home, _src = _setup(acct, tmp_path)
    bad = tmp_path / "bad.sieve"
    bad.write_bytes(b"keep;\nfileinto \"x\";\n")
    r = acct.run("sieve", "put", "fred@away.com", "bad", str(bad))
    assert r.rc == 1 and "line 2" in r.err and "fileinto" in r.err
    assert not (home / "sieve" / "bad.sieve").exists()


def test_check_reports_every_error_with_its_line(sqlite_acct: Acct, tmp_path: Path) -> None:
    acct = sqlite_acct
    home, src = _setup(acct, tmp_path)
    acct.ok("sieve", "put", "fred@away.com", "ok", str(src))
    acct.ok("sieve", "activate", "fred@away.com", "ok")
    assert acct.ok("sieve", "check", "fred@away.com").out.strip() == "ok"
    # A script another tool wrote (managesieved checks with Pigeonhole's own extensions).
    (home / "sieve" / "other.sieve").write_bytes(b"foo;\nkeep;\nbar;\n")
    r = acct.run("sieve", "check", "fred@away.com", "other", "--json")
    assert r.rc == 1 and [e["line"] for e in json.loads(r.out)["errors"]] == [1, 3]


HIDDEN = (b'require ["fileinto", "mailbox", "variables"];\r\nfileinto :create "Foo.lock";\r\n'
          b'if true {\r\n  fileinto "~Tilde";\r\n}\r\nset "x" "lock";\r\nfileinto :create "Foo.${x}";\r\n'
          b'fileinto "Lists.dev.lock";\r\n')


def test_check_reports_a_constant_folder_name_dovecot_hides(sqlite_acct: Acct, tmp_path: Path) -> None:
    """A constant `fileinto` folder this mailbox's format cannot hold (Dovecot would hide it; at
    delivery the message stays in the INBOX): `check` reports it with its line (exit 1), `put`
    stores the script (it compiles, as managesieved would) and warns.  "Foo.lock" is an mbox
    user's problem only; "~Tilde" everyone's; a name made with variables is judged at delivery."""
    acct = sqlite_acct
    acct.ok("domain", "add", "away.com")
    acct.ok("user", "add", "fred@away.com", "--format", "maildir", "--no-password")
    acct.ok("user", "add", "wilma@away.com", "--format", "mbox", "--no-password")
    src = tmp_path / "hidden.sieve"
    src.write_bytes(HIDDEN)
    expected = {"wilma@away.com": [2, 4, 8], "fred@away.com": [4]}
    for address, lines in expected.items():
        stored = acct.run("sieve", "put", address, "rules", str(src))
        assert stored.rc == 0 and [int(w.split()[3].rstrip(":")) for w in stored.err.splitlines()] == lines, (
            address, stored.err)
        assert all("invalid folder name" in w and "kept in the INBOX" in w for w in stored.err.splitlines())
        r = acct.run("sieve", "check", address, "rules", "--json")
        errors = json.loads(r.out)["errors"]
        assert r.rc == 1 and [e["line"] for e in errors] == lines, (address, r.out)
    mbox_errors = json.loads(acct.run("sieve", "check", "wilma@away.com", "rules", "--json").out)["errors"]
    assert "'.lock'" in mbox_errors[0]["message"] and "'~'" in mbox_errors[1]["message"]
    # The same names are fine where they can be held: the check passes.
    src.write_bytes(SCRIPT.replace(b"Reports", b"Reports.lock"))
    acct.ok("sieve", "put", "fred@away.com", "ok", str(src))
    assert acct.ok("sieve", "check", "fred@away.com", "ok").out.strip() == "ok"


def test_bad_names_and_unknown_mailboxes(sqlite_acct: Acct, tmp_path: Path) -> None:
    acct = sqlite_acct
    _home, src = _setup(acct, tmp_path)
    for name in ("../escape", ".hidden", "a/b", "tab\there", ""):
        r = acct.run("sieve", "put", "fred@away.com", name, str(src))
        assert r.rc == 1 and "script name" in r.err, (name, r.err)
    r = acct.run("sieve", "list", "nobody@away.com")
    assert r.rc == 1 and "does not exist" in r.err
    r = acct.run("sieve", "activate", "fred@away.com", "missing")
    assert r.rc == 1 and "no script" in r.err

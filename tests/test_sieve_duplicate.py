"""duplicate (RFC 7352): verdicts as Pigeonhole gives them; at delivery, the second copy of a
message within the period is seen (and dropped by a script that says so), the ID recorded only
once a copy was stored, a broken tracking store never stopping a delivery."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.sieve_oracle import Pigeonhole
from tests.test_sieve_delivery import RAW, maildir_folder, messages, script
from tests.unit_helpers import RecordingLog
from vdeliver import config
from vdeliver.deliver import deliver
from vdeliver.recipient import Recipient
from vdeliver.sieve.errors import SieveError
from vdeliver.sieve.interpreter import Envelope, Message, run
from vdeliver.sieve.validator import compile_script

MSG = b"From: alice@example.org\r\nTo: fred@example.org\r\nSubject: hi\r\nMessage-ID: <d1@x>\r\n\r\nbody\r\n"
SCRIPTS = [
    b'require ["duplicate", "fileinto"];\nif duplicate { fileinto "Dup"; }',
    b'require "duplicate";\nif duplicate :header "subject" :seconds 60 :last { discard; }',
    b'require "duplicate";\nif duplicate :uniqueid "x" :header "subject" { discard; }',
    b'require "duplicate";\nif duplicate :handle "h" :uniqueid "abc" { discard; }',
    b'if duplicate { discard; }',
    b'require "duplicate";\nif duplicate :seconds "10" { discard; }',
    b'require "duplicate";\nif duplicate "x" { discard; }',
]


@pytest.mark.peers
@pytest.mark.parametrize("text", SCRIPTS, ids=[f"s{i}" for i in range(len(SCRIPTS))])
def test_same_verdict_as_pigeonhole(pigeonhole: Pigeonhole, text: bytes) -> None:
    """sieve-test keeps no state: the first sight of a message is never a duplicate."""
    theirs = pigeonhole.run(text, MSG, sender="alice@example.org", recipient="fred@example.org")
    try:
        ours = run(compile_script(text), Message.from_bytes(MSG), Envelope("alice@example.org", "fred@example.org"))
    except SieveError as exc:
        assert not theirs.ok and exc.line in [n for n, _ in theirs.errors], theirs.output
        return
    assert theirs.ok, theirs.output
    assert ours.stores() == theirs.stores()


def test_the_id_and_the_period_the_test_asks_about() -> None:
    asked: list[tuple[object, ...]] = []

    def seen(key: str, seconds: int | None, last: bool) -> bool:
        asked.append((key, seconds, last))
        return True

    def check(text: bytes, message: bytes = MSG) -> bool:
        r = run(compile_script(b'require ["duplicate", "variables"];\n' + text + b" { discard; }"),
                Message.from_bytes(message), Envelope("a@b.c", "fred@example.org"), duplicate=seen)
        return not r.implicit_keep

    def last() -> tuple[object, ...]:
        return asked[-1]

    assert check(b"if duplicate") and last() == ("\x1f<d1@x>", None, False)
    assert check(b'if duplicate :header "subject" :handle "h" :seconds 60 :last') and last() == ("h\x1fhi", 60, True)
    assert check(b'set "v" "abc";\nif duplicate :uniqueid "${v}"') and last() == ("\x1fabc", None, False)
    count = len(asked)
    assert not check(b"if duplicate", MSG.replace(b"Message-ID: <d1@x>\r\n", b""))  # no ID: never a duplicate
    assert len(asked) == count


def make_config(tmp_path: Path, **sieve: object) -> config.Config:
    return config.build({
        "format": "maildir", "maildir_path": f"{tmp_path}/home/{{domain}}/{{user}}/Maildir",
        "spool_dir": str(tmp_path), "log": "none", "create_mailbox": True,
        "sieve": dict(sieve), "tracking": {"database": str(tmp_path / "tracking.sqlite")},
    })


def deliver_raw(tmp_path: Path, cfg: config.Config, raw: bytes, log: RecordingLog | None = None) -> None:
    src = tmp_path / "in.eml"
    src.write_bytes(raw)
    fd = os.open(src, os.O_RDONLY)
    try:
        deliver(cfg, Recipient("example.org", "fred"), fd, "alice@example.org", log=log)
    finally:
        os.close(fd)


def test_the_second_copy_is_a_duplicate(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    script(tmp_path, b'require ["duplicate", "fileinto", "mailbox"];\nif duplicate { fileinto :create "Dups"; }')
    raw = RAW.replace(b"\n\n", b"\nMessage-ID: <once@example.org>\n\n", 1)
    deliver_raw(tmp_path, cfg, raw)
    deliver_raw(tmp_path, cfg, raw)
    deliver_raw(tmp_path, cfg, raw.replace(b"<once@", b"<other@"))
    assert len(messages(maildir_folder(tmp_path))) == 2
    assert len(messages(maildir_folder(tmp_path, "Dups"))) == 1


def test_the_period_ends(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    script(tmp_path, b'require "duplicate";\nif duplicate :seconds 0 { discard; }')
    raw = RAW.replace(b"\n\n", b"\nMessage-ID: <p@example.org>\n\n", 1)
    deliver_raw(tmp_path, cfg, raw)
    deliver_raw(tmp_path, cfg, raw)  # a period of 0 seconds: already over
    assert len(messages(maildir_folder(tmp_path))) == 2


def test_a_broken_tracking_store_never_stops_a_delivery(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    cfg.tables["tracking"] = {"database": str(tmp_path / "missing-dir" / "t.sqlite")}
    h = script(tmp_path, b'require "duplicate";\nif duplicate { discard; }')
    raw = RAW.replace(b"\n\n", b"\nMessage-ID: <b@example.org>\n\n", 1)
    log = RecordingLog()
    deliver_raw(tmp_path, cfg, raw, log)
    deliver_raw(tmp_path, cfg, raw, log)
    assert len(messages(maildir_folder(tmp_path))) == 2  # not seen: both kept
    assert "cannot read the tracking store" in (h / ".dovecot.sieve.log").read_text()

"""vacation at delivery: one reply per sender and handle per period, from <>, with RFC 3834's
headers; never to a list, a bounce, an automatic message, or a message not addressed to one of
the user's addresses (the accounts database's aliases and alias domains count); the message is
stored whatever happens to the reply; of processes delivering the same sender's mail at once,
exactly one answers."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from tests.helpers import MailRoot
from tests.pg import pg_cluster, pg_schema_conninfo  # noqa: F401 - fixtures
from tests.test_sieve_delivery import fake_sendmail, maildir_folder, messages, script, sent
from tests.unit_helpers import RecordingLog
from vdeliver import config
from vdeliver.deliver import deliver
from vdeliver.recipient import Recipient

SCRIPT = b'require "vacation";\nvacation :days 7 :subject "Away" "I am away until Monday.";'
MSG = (b"From: Alice <alice@example.org>\nTo: Fred <fred@example.org>\nSubject: lunch?\n"
       b"Message-ID: <q1@example.org>\n\nAre you free?\n")


def make_config(tmp_path: Path, **extra: object) -> config.Config:
    tables: dict[str, object] = {
        "format": "maildir", "maildir_path": f"{tmp_path}/home/{{domain}}/{{user}}/Maildir",
        "spool_dir": str(tmp_path), "log": "none", "create_mailbox": True, "hostname": "mx.example.org",
        "sieve": {"sendmail": str(fake_sendmail(tmp_path))},
        "tracking": {"database": str(tmp_path / "tracking.sqlite")},
        "accounts": {"database": str(tmp_path / "accounts.sqlite")},
    }
    tables.update(extra)
    return config.build(tables)


def send(tmp_path: Path, cfg: config.Config, raw: bytes = MSG, sender: str = "alice@example.org",
         log: RecordingLog | None = None) -> None:
    src = tmp_path / f"in-{os.getpid()}.eml"
    src.write_bytes(raw)
    fd = os.open(src, os.O_RDONLY)
    try:
        deliver(cfg, Recipient("example.org", "fred"), fd, sender, log=log)
    finally:
        os.close(fd)


def replies(tmp_path: Path) -> list[tuple[list[str], bytes]]:
    return [(args, data) for args, data in sent(tmp_path) if b"Auto-Submitted: auto-replied" in data]


def test_one_reply_per_sender_per_period(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    script(tmp_path, SCRIPT)
    log = RecordingLog()
    send(tmp_path, cfg, log=log)
    send(tmp_path, cfg, MSG.replace(b"q1@", b"q2@"), log=log)
    send(tmp_path, cfg, MSG.replace(b"alice@", b"bob@"), sender="bob@example.org", log=log)
    assert len(messages(maildir_folder(tmp_path))) == 3  # every message stored
    got = replies(tmp_path)
    assert [args for args, _ in got] == [["-oi", "-f", "<>", "alice@example.org"],
                                        ["-oi", "-f", "<>", "bob@example.org"]]
    first = got[0][1]
    assert b"\nSubject: Away\n" in b"\n" + first and b"In-Reply-To: <q1@example.org>" in first
    assert b"I am away until Monday." in first
    assert any("was answered within" in text for _level, text in log.lines)


@pytest.mark.parametrize(("why", "raw", "sender"), [
    ("a list", MSG.replace(b"Subject:", b"List-Id: <dev.example.org>\nSubject:"), "alice@example.org"),
    ("a bounce", MSG, ""),
    ("an automatic message", MSG.replace(b"Subject:", b"Auto-Submitted: auto-generated\nSubject:"),
     "alice@example.org"),
    ("a noreply sender", MSG, "noreply@example.org"),
    ("not addressed to fred", MSG.replace(b"To: Fred <fred@example.org>", b"To: all@example.org"),
     "alice@example.org"),
])
def test_no_reply(tmp_path: Path, why: str, raw: bytes, sender: str) -> None:
    cfg = make_config(tmp_path)
    script(tmp_path, SCRIPT)
    send(tmp_path, cfg, raw, sender=sender)
    assert replies(tmp_path) == [], why
    assert len(messages(maildir_folder(tmp_path))) == 1


def test_an_alias_from_the_accounts_database_is_fred_too(tmp_path: Path) -> None:
    from vdeliver.accounts.engines import open_store
    from vdeliver.accounts.settings import Settings

    with open_store(Settings(database=str(tmp_path / "accounts.sqlite"))) as store:
        store.domain_add("example.org")
        store.domain_add("example.net", alias_of="example.org")
        store.user_add("fred", "example.org", "", "maildir")
        store.alias_add("info", "example.org", ["fred@example.org"])
        store.domain_add("catch.example")
        store.catchall_set("catch.example", "fred@example.org")
    cfg = make_config(tmp_path)
    script(tmp_path, SCRIPT)
    send(tmp_path, cfg, MSG.replace(b"To: Fred <fred@example.org>", b"To: info@example.org"))
    send(tmp_path, cfg, MSG.replace(b"To: Fred <fred@example.org>", b"To: fred@example.net"),
         sender="carol@example.org")
    send(tmp_path, cfg, MSG.replace(b"To: Fred <fred@example.org>", b"To: anything@catch.example"),
         sender="dave@example.org")
    send(tmp_path, cfg, MSG.replace(b"To: Fred <fred@example.org>", b"To: someone@example.com"),
         sender="erin@example.org")  # not routed here: no reply
    assert len(replies(tmp_path)) == 3


def test_a_tracking_store_that_cannot_answer_means_no_reply(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, tracking={"database": str(tmp_path / "missing" / "t.sqlite")})
    script(tmp_path, SCRIPT)
    log = RecordingLog()
    send(tmp_path, cfg, log=log)
    assert replies(tmp_path) == [] and len(messages(maildir_folder(tmp_path))) == 1
    assert any("vacation: not sent (tracking store" in text for _level, text in log.lines)


def test_a_reply_that_cannot_be_sent_is_tried_again_next_time(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    script(tmp_path, SCRIPT)
    fake_sendmail(tmp_path, status=75)
    send(tmp_path, cfg)
    fake_sendmail(tmp_path, status=0)
    send(tmp_path, cfg, MSG.replace(b"q1@", b"q2@"))
    assert len(sent(tmp_path)) == 2  # tried twice: the failed one gave its claim back
    assert len(messages(maildir_folder(tmp_path))) == 2


def _deliver_in_child(args: tuple[str, str]) -> None:
    tmp_path, dsn = args
    path = Path(tmp_path)
    send(path, make_config_no_sendmail_reset(path, dsn), MSG)


def make_config_no_sendmail_reset(tmp_path: Path, dsn: str = "") -> config.Config:
    return config.build({
        "format": "maildir", "maildir_path": f"{tmp_path}/home/{{domain}}/{{user}}/Maildir",
        "spool_dir": str(tmp_path), "log": "none", "create_mailbox": True, "hostname": "mx.example.org",
        "sieve": {"sendmail": str(tmp_path / "sendmail")},
        "tracking": {"dsn": dsn} if dsn else {"database": str(tmp_path / "tracking.sqlite")},
    })


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_processes_delivering_at_once_send_one_reply(tmp_path: Path, engine: str,
                                                     request: pytest.FixtureRequest) -> None:
    """Six deliveries of the same sender's mail at once, on one tracking store (a SQLite file,
    or one PostgreSQL as two hubs share it): exactly one reply."""
    dsn = ""
    if engine == "postgresql":
        import psycopg

        from vdeliver.tracking import TABLE

        dsn = request.getfixturevalue("pg_schema_conninfo")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(TABLE)
    make_config(tmp_path)  # the fake sendmail
    script(tmp_path, SCRIPT)
    (tmp_path / "home" / "example.org" / "fred" / "Maildir").mkdir(parents=True, exist_ok=True)
    for sub in ("cur", "new", "tmp"):
        (tmp_path / "home" / "example.org" / "fred" / "Maildir" / sub).mkdir(exist_ok=True)
    with multiprocessing.get_context("fork").Pool(6) as pool:
        pool.map(_deliver_in_child, [(str(tmp_path), dsn)] * 6)
    assert len(messages(maildir_folder(tmp_path))) == 6
    assert len(replies(tmp_path)) == 1


def test_fcc_keeps_a_copy_of_the_reply(tmp_path: Path) -> None:
    """RFC 8580: `:fcc "Sent" :create` stores what was sent, \\Seen, in that folder (created);
    no reply, no copy."""
    cfg = make_config(tmp_path)
    script(tmp_path, b'require ["vacation", "fcc", "mailbox", "imap4flags"];\n'
                     b'vacation :fcc "Sent" :create :flags "Auto" :subject "Away" "I am away.";')
    send(tmp_path, cfg)
    send(tmp_path, cfg, MSG.replace(b"q1@", b"q2@"))  # answered already: no second copy
    sent_dir = maildir_folder(tmp_path, "Sent")
    [name] = os.listdir(sent_dir / "cur")
    assert name.endswith(":2,Sa")  # \Seen, and the keyword "Auto" (dovecot-keywords slot a)
    copy = (sent_dir / "cur" / name).read_bytes()
    assert b"Auto-Submitted: auto-replied" in copy and b"Subject: Away" in copy and b"I am away." in copy
    assert (sent_dir / "dovecot-keywords").read_text() == "0 Auto\n"


def test_fcc_into_a_missing_folder_without_create_keeps_no_copy(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    script(tmp_path, b'require ["enotify", "fcc"];\nnotify :fcc "Notes" "mailto:fred@phone.example";')
    log = RecordingLog()
    send(tmp_path, cfg, log=log)
    assert len(sent(tmp_path)) == 1 and not maildir_folder(tmp_path, "Notes").exists()
    assert any("the :fcc folder does not exist" in text for _level, text in log.lines)


def test_fcc_into_a_folder_name_dovecot_hides_keeps_no_copy_and_says_why(tmp_path: Path) -> None:
    """A `:fcc` folder named as Dovecot refuses ("~Sent": it never opens it) gets no copy, even
    with :create, and the log says the name is invalid rather than missing."""
    cfg = make_config(tmp_path)
    script(tmp_path, b'require ["enotify", "fcc", "mailbox"];\n'
                     b'notify :fcc "~Sent" :create "mailto:fred@phone.example";')
    log = RecordingLog()
    send(tmp_path, cfg, log=log)
    assert len(sent(tmp_path)) == 1 and not maildir_folder(tmp_path, "~Sent").exists()
    assert any("the :fcc folder name is invalid (Dovecot refuses names that begin with '~')" in text
               for _level, text in log.lines)


def test_fcc_tags_need_fcc() -> None:
    from vdeliver.sieve.errors import SieveError
    from vdeliver.sieve.validator import compile_script

    with pytest.raises(SieveError, match=":create tag of the vacation command needs :fcc"):
        compile_script(b'require ["vacation", "mailbox"];\nvacation :create "x";')


@pytest.mark.peers
def test_two_lmtp_servers_on_one_postgresql_send_one_reply(mailroot: MailRoot, pg_schema_conninfo: str) -> None:  # noqa: F811
    """Two hubs: two vdeliver-lmtpd processes, each with its own socket, one PostgreSQL tracking
    store.  The same sender's messages delivered through both at once get exactly one reply."""
    import threading

    import psycopg

    from tests.helpers import IS_ROOT, world_tmpdir
    from tests.test_lmtp_server import Lmtpd, transaction
    from vdeliver.tracking import TABLE

    if not IS_ROOT:
        pytest.skip("vdeliver-lmtpd is started as root serving as vmail")
    with psycopg.connect(pg_schema_conninfo, autocommit=True) as conn:
        conn.execute(TABLE)
    outbox = world_tmpdir("vdeliver-outbox-")
    outbox.chmod(0o777)
    fake_sendmail(outbox)
    md = mailroot.add_maildir("example.org", "fred")
    (md.parent / "sieve").mkdir()
    (md.parent / "sieve" / "main.sieve").write_bytes(SCRIPT)
    (md.parent / ".dovecot.sieve").symlink_to("sieve/main.sieve")
    for path in (md.parent / "sieve", md.parent / "sieve" / "main.sieve"):
        os.chown(path, mailroot.owner.uid, mailroot.owner.gid)
    os.lchown(md.parent / ".dovecot.sieve", mailroot.owner.uid, mailroot.owner.gid)
    extra = (f'\n[sieve]\nsendmail = "{outbox}/sendmail"\n\n[tracking]\ndsn = "{pg_schema_conninfo}"\n')
    servers: list[Lmtpd] = []
    try:
        for name in ("hub1", "hub2"):
            rundir = mailroot.base / name
            server = Lmtpd(mailroot, rundir)
            mailroot.config.write_text(mailroot.config.read_text() + extra)
            servers.append(server.start())
        replies: list[dict[str, tuple[int, bytes]]] = []

        def deliver_through(server: Lmtpd, n: int) -> None:
            with server.client() as c:
                replies.append(transaction(c, "alice@example.org", ["fred@example.org"],
                                           MSG.replace(b"q1@", b"q%d@" % n)))

        threads = [threading.Thread(target=deliver_through, args=(servers[i % 2], i)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(r["fred@example.org"][0] == 250 for r in replies) and len(replies) == 6
        assert len(os.listdir(md / "new")) == 6
        assert len(replies_in(outbox)) == 1, "\n".join(s.log()[-2000:] for s in servers)
    finally:
        for server in servers:
            server.stop()


def replies_in(outbox: Path) -> list[bytes]:
    return [data for _args, data in sent(outbox) if b"Auto-Submitted: auto-replied" in data]

"""reject and ereject (RFC 5429): the script's verdicts and conflicts as Pigeonhole gives them;
at delivery, refused in the protocol (LMTP's 550 for that recipient only, the CLI's exit 77 with
the reason for sendmail's DSN), or after acceptance by [sieve] reject_mode (an MDN to the
sender, or the message kept)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import MailRoot, run_vdeliver
from tests.sieve_oracle import Pigeonhole
from tests.test_lmtp_server import StartLmtpd, start, transaction  # noqa: F401 - start is a fixture
from tests.test_sieve_delivery import FRED, RAW, fake_sendmail, maildir_folder, make_config, messages, script, sent
from vdeliver.errors import DeliveryError
from vdeliver.sieve.errors import SieveError
from vdeliver.sieve.interpreter import Envelope, Message, run
from vdeliver.sieve.validator import compile_script

MSG = b"From: alice@example.org\r\nTo: fred@example.org\r\nSubject: hi\r\nMessage-ID: <r1@example.org>\r\n\r\nbody\r\n"
ENVELOPE = Envelope("alice@example.org", "fred@example.org")

SCRIPTS: list[bytes] = [
    b'require "reject";\nreject "go away";',
    b'require "ereject";\nereject "go away";',
    b'require ["reject", "fileinto"];\nfileinto "A";\nreject "no";',
    b'require "reject";\nreject "no";\nkeep;',
    b'require "reject";\nreject "no";\nreject "again";',
    b'require ["reject", "ereject"];\nreject "no";\nereject "again";',
    b'require "reject";\nreject "no";\nredirect "x@example.net";',
    b'require ["reject", "copy"];\nredirect :copy "x@example.net";\nreject "no";',
    b'require "reject";\ndiscard;\nreject "no";',
    b'require "reject";\nreject text:\nmulti\nline\n.\n;',
    b'require "reject";\nif header :contains "subject" "hi" { reject "subject"; stop; }\nkeep;',
    b'reject "not required";',
    b'require "reject";\nreject ["a", "b"];',
]


@pytest.mark.peers
@pytest.mark.parametrize("text", SCRIPTS, ids=[f"s{i}" for i in range(len(SCRIPTS))])
def test_same_verdict_as_pigeonhole(text: bytes) -> None:
    """Debian's Pigeonhole (0.5.19) has no ereject: it is compared as reject, which RFC 5429 gives
    the same rules after acceptance."""
    oracle = Pigeonhole.start()
    try:
        theirs = oracle.run(text.replace(b"ereject", b"reject"), MSG, sender=ENVELOPE.sender,
                            recipient=ENVELOPE.recipient)
        try:
            ours = run(compile_script(text), Message.from_bytes(MSG), ENVELOPE)
        except SieveError as exc:
            assert not theirs.ok, theirs.output
            assert exc.line in [n for n, _ in theirs.errors], (exc, theirs.output)
            return
        assert theirs.ok, theirs.output
        rejects = [line for line in theirs.output.splitlines() if "reject message with reason" in line]
        assert [a.reason.replace("\n", "??").replace("\r", "") for a in ours.actions if a.type.endswith("reject")] \
            == [line.split("reason: ", 1)[1] for line in rejects]
        assert ours.implicit_keep == theirs.implicit_keep
    finally:
        oracle.close()


def run_cli_deliver(tmp_path: Path, mode: str, sender: str = "alice@example.org",
                    raw: bytes = RAW, sendmail_status: int = 0) -> object:
    from vdeliver.deliver import deliver

    cfg = make_config(tmp_path, reject_mode=mode)
    fake_sendmail(tmp_path, status=sendmail_status)
    script(tmp_path, b'require "reject";\nreject text:\nI do not want\r\nthis, \xc3\xa9\n.\n;')
    src = tmp_path / "in.eml"
    src.write_bytes(raw)
    fd = os.open(src, os.O_RDONLY)
    try:
        return deliver(cfg, FRED, fd, sender)
    finally:
        os.close(fd)


def test_cli_refuse_is_a_permanent_failure_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(DeliveryError) as info:
        run_cli_deliver(tmp_path, "refuse")
    status = info.value.status
    assert status.dsn == "5.7.1" and status.exit_code() == 77
    assert status.text() == "5.7.1 rejected by the recipient's filter: I do not want this, ?"  # one ASCII line
    assert messages(maildir_folder(tmp_path)) == []


def test_mdn_mode_answers_the_sender_and_stores_nothing(tmp_path: Path) -> None:
    result = run_cli_deliver(tmp_path, "mdn", raw=RAW.replace(b"\n\n", b"\nMessage-ID: <m1@example.org>\n\n", 1))
    [(args, mdn)] = sent(tmp_path)
    assert args == ["-oi", "-f", "<>", "alice@example.org"]
    assert b"Auto-Submitted: auto-replied (rejected)" in mdn and b"report-type=disposition-notification" in mdn
    assert b"Disposition: automatic-action/MDN-sent-automatically; deleted" in mdn
    assert b"Original-Message-ID: <m1@example.org>" in mdn and b"Subject: weekly report" in mdn
    assert messages(maildir_folder(tmp_path)) == []
    assert "discarded" in result.where()  # type: ignore[attr-defined]


@pytest.mark.parametrize(("sender", "extra"), [("", b""), ("alice@example.org", b"Auto-Submitted: auto-replied\n")])
def test_no_mdn_to_a_bounce_or_an_automatic_message(tmp_path: Path, sender: str, extra: bytes) -> None:
    run_cli_deliver(tmp_path, "mdn", sender=sender, raw=extra + RAW)
    assert sent(tmp_path) == []
    assert len(messages(maildir_folder(tmp_path))) == 1  # never answered: kept


def test_mdn_that_cannot_be_sent_keeps_the_message(tmp_path: Path) -> None:
    run_cli_deliver(tmp_path, "mdn", sendmail_status=75)
    assert len(sent(tmp_path)) == 1  # tried
    assert len(messages(maildir_folder(tmp_path))) == 1


def test_keep_mode_keeps_and_logs(tmp_path: Path) -> None:
    run_cli_deliver(tmp_path, "keep")
    assert len(messages(maildir_folder(tmp_path))) == 1


def test_reject_mode_is_checked(tmp_path: Path) -> None:
    from vdeliver import config
    from vdeliver.sieve.delivery import settings

    cfg = make_config(tmp_path)
    cfg.tables["sieve"]["reject_mode"] = "bounce"
    with pytest.raises(config.ConfigError, match="must be one of refuse, mdn, keep"):
        settings(cfg)


def test_the_vdeliver_command_exits_77_with_the_reason(mailroot: MailRoot) -> None:
    cfg = mailroot.write_config(log="stderr")
    md = mailroot.add_maildir("example.org", "fred")
    (md.parent / "sieve").mkdir()
    (md.parent / "sieve" / "main.sieve").write_bytes(b'require "ereject";\nereject "No thanks.";')
    (md.parent / ".dovecot.sieve").symlink_to("sieve/main.sieve")
    for path in (md.parent / "sieve", md.parent / "sieve" / "main.sieve"):
        os.chown(path, mailroot.owner.uid, mailroot.owner.gid)
    os.lchown(md.parent / ".dovecot.sieve", mailroot.owner.uid, mailroot.owner.gid)
    done = run_vdeliver(["-f", "alice@example.org", "-a", "example.org", "-a", "fred"], RAW, config=cfg,
                        as_user=mailroot.owner)
    assert done.returncode == 77, done.stderr
    assert b"5.7.1 rejected by the recipient's filter: No thanks." in done.stderr
    assert os.listdir(md / "new") == [] and os.listdir(md / "cur") == []


def test_lmtp_refuses_only_the_rejecting_recipient(start: StartLmtpd, mailroot: MailRoot) -> None:  # noqa: F811
    """One transaction, three recipients: the one whose script rejects gets 550 5.7.1 with the
    reason, the others 250, and nothing of the first is stored."""
    boxes = {user: mailroot.add_maildir("home.com", user) for user in ("fred", "wilma", "barney")}
    home = boxes["wilma"].parent
    (home / "sieve").mkdir()
    (home / "sieve" / "main.sieve").write_bytes(b'require "reject";\nreject "Wilma is away.";')
    (home / ".dovecot.sieve").symlink_to("sieve/main.sieve")
    for path in (home / "sieve", home / "sieve" / "main.sieve"):
        os.chown(path, mailroot.owner.uid, mailroot.owner.gid)
    os.lchown(home / ".dovecot.sieve", mailroot.owner.uid, mailroot.owner.gid)
    server = start()
    with server.client() as c:
        replies = transaction(c, "s@example.org", ["fred@home.com", "wilma@home.com", "barney@home.com"])
    assert replies["wilma@home.com"][0] == 550
    assert replies["wilma@home.com"][1].startswith(b"5.7.1") and b"Wilma is away." in replies["wilma@home.com"][1]
    assert replies["fred@home.com"][0] == 250 and replies["barney@home.com"][0] == 250
    assert os.listdir(boxes["wilma"] / "new") == []
    assert len(os.listdir(boxes["fred"] / "new")) == 1 and len(os.listdir(boxes["barney"] / "new")) == 1

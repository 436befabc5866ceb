"""enotify (RFC 5435) with mailto (RFC 5436): verdicts and actions as Pigeonhole gives them;
at delivery, a notification from <> after the message is stored, never for an automatic
message, at most notify_per_hour per mailbox."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.sieve_oracle import Pigeonhole
from tests.test_sieve_delivery import fake_sendmail, maildir_folder, messages, script, sent
from tests.unit_helpers import RecordingLog
from vdeliver import config
from vdeliver.deliver import deliver
from vdeliver.recipient import Recipient
from vdeliver.sieve import notify
from vdeliver.sieve.errors import SieveError
from vdeliver.sieve.interpreter import Envelope, Message, run
from vdeliver.sieve.validator import compile_script

MSG = b"From: Alice <alice@example.org>\r\nTo: fred@example.org\r\nSubject: hello\r\nMessage-ID: <m1@x>\r\n\r\nbody\r\n"
ENVELOPE = Envelope("alice@example.org", "fred@example.org")
SCRIPTS = [
    b'require "enotify";\nnotify "mailto:fred@example.net";',
    (b'require ["enotify", "variables"];\nnotify :from "x@example.org" :importance "1" :message "New: ${1}" '
    b':options ["a"] "mailto:fred@example.net?subject=hi";'),
    b'require "enotify";\nnotify :options ["k=v"] "mailto:fred@example.net?subject=hi";',
    b'require "enotify";\nnotify "xmpp:fred@example.net";',
    b'require "enotify";\nnotify :importance "4" "mailto:a@b.c";',
    b'require "enotify";\nif valid_notify_method "mailto:a@b.c" { keep; }',
    b'require "enotify";\nif valid_notify_method ["mailto:a@b.c", "xmpp:b@c.d"] { keep; }',
    b'require "enotify";\nif notify_method_capability "mailto:a@b.c" "online" "maybe" { keep; }',
    b'require "enotify";\nif notify_method_capability "mailto:a@b.c" "online" "yes" { keep; }',
    b'require ["enotify", "variables"];\nset :encodeurl "x" "a b&c";\nnotify "mailto:a@b.c?subject=${x}";',
    b'require "enotify";\nnotify "mailto:a@b.c";\nnotify "mailto:a@b.c";',
    b'require "enotify";\nnotify "mailto:a@b.c?from=x@y.z";',
    b'notify "mailto:a@b.c";',
]


@pytest.mark.peers
@pytest.mark.parametrize("text", SCRIPTS, ids=[f"s{i}" for i in range(len(SCRIPTS))])
def test_same_as_pigeonhole(pigeonhole: Pigeonhole, text: bytes) -> None:
    theirs = pigeonhole.run(text, MSG, sender=ENVELOPE.sender, recipient=ENVELOPE.recipient)
    try:
        ours = run(compile_script(text), Message.from_bytes(MSG), ENVELOPE)
    except SieveError as exc:
        assert not theirs.ok and exc.line in [n for n, _ in theirs.errors], (exc, theirs.output)
        return
    assert theirs.ok, theirs.output
    assert ours.stores() == theirs.stores(), theirs.output
    theirs_to = [line.strip()[len("+ To: "):] for line in theirs.output.splitlines()
                 if line.strip().startswith("+ To: ")]
    ours_to = [to for a in ours.actions if a.type == "notify" for to in notify.parse(a.address).to]
    assert ours_to == theirs_to, theirs.output


def test_encodeurl_and_the_json_action() -> None:
    r = run(compile_script(b'require ["enotify", "variables"];\nset :encodeurl "x" "a b&c";\n'
                           b'notify :importance "1" :message "m" "mailto:a@b.c?subject=${x}";'),
            Message.from_bytes(MSG), ENVELOPE)
    [action] = r.actions
    assert action.address == "mailto:a@b.c?subject=a%20b%26c"
    assert notify.parse(action.address).subject == "a b&c"
    assert action.to_json() == {"type": "notify", "method": "mailto:a@b.c?subject=a%20b%26c", "from": "",
                                "importance": 1, "message": "m", "options": []}


def make_config(tmp_path: Path, **sieve: object) -> config.Config:
    return config.build({
        "format": "maildir", "maildir_path": f"{tmp_path}/home/{{domain}}/{{user}}/Maildir",
        "spool_dir": str(tmp_path), "log": "none", "create_mailbox": True, "hostname": "mx.example.org",
        "sieve": {"sendmail": str(fake_sendmail(tmp_path)), **sieve},
        "tracking": {"database": str(tmp_path / "tracking.sqlite")},
    })


def send(tmp_path: Path, cfg: config.Config, raw: bytes, log: RecordingLog | None = None) -> None:
    src = tmp_path / "in.eml"
    src.write_bytes(raw)
    fd = os.open(src, os.O_RDONLY)
    try:
        deliver(cfg, Recipient("example.org", "fred"), fd, "alice@example.org", log=log)
    finally:
        os.close(fd)


def test_a_notification_after_the_message_is_stored(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, notify_per_hour=2)
    script(tmp_path, b'require "enotify";\nnotify :importance "1" "mailto:fred@phone.example?subject=New%20mail";')
    log = RecordingLog()
    for _ in range(3):
        send(tmp_path, cfg, MSG, log)
    send(tmp_path, cfg, MSG.replace(b"Subject:", b"Auto-Submitted: auto-generated\r\nSubject:"), log)
    assert len(messages(maildir_folder(tmp_path))) == 4  # every message stored
    got = sent(tmp_path)
    assert len(got) == 2  # the third: over notify_per_hour; the fourth: an automatic message
    args, data = got[0]
    assert args == ["-oi", "-f", "<>", "fred@phone.example"]
    assert b"Auto-Submitted: auto-notified" in data and b"Subject: New mail" in data and b"Importance: high" in data
    text = " ".join(line for _level, line in log.lines)
    assert "more than 2 this hour" in text and "the message is automatic" in text

"""vdeliver.sieve.vacation: RFC 5230 / RFC 3834's rules for whether to answer, and the reply
itself (headers, encoding, threading, no header injection)."""

from __future__ import annotations

import email
import email.policy

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdeliver.sieve.headers import split_fields
from vdeliver.sieve.vacation import Rules, compose, refusal

OWN = {"fred@example.org", "f.flintstone@example.org"}
BASE = b"From: Alice <alice@example.org>\nTo: Fred <fred@example.org>\nSubject: lunch?\nMessage-ID: <q1@x.org>\n"


def fields(extra: bytes = b"", base: bytes = BASE) -> list[tuple[str, bytes]]:
    return split_fields(base + extra)


@pytest.mark.parametrize(("extra", "sender", "why"), [
    (b"", "", "the sender is <>"),
    (b"", "MAILER-DAEMON@example.org", "never answered"),
    (b"", "noreply@shop.example", "never answered"),
    (b"", "owner-dev@lists.example", "never answered"),
    (b"", "noreply+4711@shop.example", "never answered"),
    (b"", "dev-request+fred=example.org@lists.example", "never answered"),
    (b"", "bounce+123@news.example", "never answered"),
    (b"", "dev-request@lists.example", "never answered"),
    (b"", "fred@example.org", "the sender is the user"),
    (b"Auto-Submitted: auto-replied\n", "alice@example.org", "Auto-Submitted"),
    (b"List-Id: <dev.example.org>\n", "alice@example.org", "a list message"),
    (b"List-Unsubscribe: <mailto:u@x>\n", "alice@example.org", "a list message"),
    (b"Precedence: bulk\n", "alice@example.org", "Precedence"),
    (b"X-Auto-Response-Suppress: DR, OOF\n", "alice@example.org", "X-Auto-Response-Suppress"),
    (b"X-Spam-Flag: YES\n", "alice@example.org", "spam"),
])
def test_refused(extra: bytes, sender: str, why: str) -> None:
    assert why in refusal(fields(extra), sender, OWN, Rules())


@pytest.mark.parametrize("extra", [b"Auto-Submitted: no\n", b"Precedence: first-class\n", b"X-Spam-Flag: NO\n"])
def test_allowed(extra: bytes) -> None:
    assert refusal(fields(extra), "alice@example.org", OWN, Rules()) == ""


@pytest.mark.parametrize(("to", "answered"), [
    (b"To: Fred <FRED@Example.org>\n", True),
    (b"To: team: f.flintstone@example.org;\n", True),
    (b"To: other@example.org\nCc: =?utf-8?q?Fred=2C_F?= <fred@example.org>\n", True),
    (b"To: other@example.org\nBcc: fred@example.org\n", True),
    (b"To: other@example.org\nResent-To: fred@example.org\n", True),
    (b"To: other@example.org\n", False),
    (b"To: fred@example.org.evil\n", False),
    (b"", False),
])
def test_addressed_to_the_user(to: bytes, answered: bool) -> None:
    base = b"From: alice@example.org\n" + to + b"Subject: x\n"
    assert (refusal(fields(base=base), "alice@example.org", OWN, Rules()) == "") == answered
    assert refusal(fields(base=base), "alice@example.org", OWN, Rules(check_recipient=False)) == ""


def parse(data: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def test_the_reply() -> None:
    original = fields(b"References: <r0@x.org>\n")
    data = compose(original=original, sender="alice@example.org", recipient="fred@example.org", from_="",
                   subject=None, reason="Away until Monday.\r\nSee you.", mime=False, hostname="mx.example.org")
    msg = parse(data)
    assert msg["From"] == "fred@example.org" and msg["To"] == "alice@example.org"
    assert msg["Subject"] == "Auto: lunch?" and msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<q1@x.org>" and msg["References"] == "<r0@x.org> <q1@x.org>"
    assert msg["Message-ID"].endswith("@mx.example.org>") and msg["Date"]
    assert msg.get_content() == "Away until Monday.\nSee you.\n"
    assert b"\r" not in data


@pytest.mark.parametrize("subject_line", [b"", b"Subject: \n", b"Subject:   \t\n"])
def test_no_original_subject_gives_pigeonholes_automated_reply(subject_line: bytes) -> None:
    original = [(n, v) for n, v in fields() if n != "subject"]
    if subject_line:
        original += split_fields(subject_line)
    msg = parse(compose(original=original, sender="alice@example.org", recipient="fred@example.org", from_="",
                        subject=None, reason="Away.", mime=False, hostname="mx"))
    assert msg["Subject"] == "Automated reply"


def test_non_ascii_subject_and_from() -> None:
    data = compose(original=fields(), sender="alice@example.org", recipient="fred@example.org",
                   from_="Frédéric <fred@example.org>", subject="Abwesend bis März — Grüße", reason="Grüße",
                   mime=False, hostname="mx")
    msg = parse(data)
    assert str(msg["Subject"]) == "Abwesend bis März — Grüße"
    assert "Frédéric" in str(msg["From"]) and data.isascii() is False  # the 8-bit body
    assert b"Content-Transfer-Encoding: 8bit" in data


def test_mime_reason_brings_its_content_fields_only() -> None:
    reason = "Content-Type: text/html; charset=utf-8\r\nBcc: evil@example.net\r\n\r\n<p>Away</p>\r\n"
    msg = parse(compose(original=fields(), sender="alice@example.org", recipient="fred@example.org", from_="",
                        subject="Away", reason=reason, mime=True, hostname="mx"))
    assert msg.get_content_type() == "text/html" and msg["Bcc"] is None
    assert "<p>Away</p>" in msg.get_content()


def test_no_header_injection() -> None:
    original = split_fields(b"From: alice@example.org\nTo: fred@example.org\n"
                            b"Subject: =?utf-8?q?hi=0D=0ABcc:_x@evil?=\n")
    msg = parse(compose(original=original, sender="alice@example.org", recipient="fred@example.org",
                        from_="Fred\r\nBcc: y@evil <fred@example.org>", subject=None, reason="x", mime=False,
                        hostname="mx\r\nBcc: z"))
    assert msg["Bcc"] is None and "Bcc" not in str(msg["Subject"]).split(":")[0]


@given(st.binary(max_size=300), st.text(max_size=200), st.text(max_size=300), st.text(max_size=40))
def test_any_input_gives_one_reply_with_one_of_each(raw: bytes, subject: str, reason: str, sender: str) -> None:
    original = split_fields(raw)
    refusal(original, sender, OWN, Rules())  # never raises
    data = compose(original=original, sender=sender, recipient="fred@example.org", from_="", subject=subject or None,
                   reason=reason, mime=False, hostname="mx")
    msg = parse(data)
    for name in ("From", "To", "Subject", "Auto-Submitted", "Message-ID"):
        assert len(msg.get_all(name) or []) == 1, name
    assert all(len(line) <= 998 for line in data.split(b"\n"))

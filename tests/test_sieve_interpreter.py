"""The Sieve interpreter: RFC 5228's actions and the implicit keep, the core tests, and the same
folders, redirects and implicit keep as Pigeonhole's sieve-test for every script and message
of a corpus; and `vdeliver sieve-test` (text and --json)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sieve_oracle import Pigeonhole
from vdeliver.sieve.errors import SieveError
from vdeliver.sieve.interpreter import Envelope, Message, Result, run
from vdeliver.sieve.validator import compile_script

ROOT = Path(__file__).resolve().parent.parent

PLAIN = (b"Return-Path: <alice@example.org>\r\nFrom: Alice <alice@example.org>\r\n"
         b"To: fred@example.com, \"Wilma F.\" <wilma+lists@example.com>\r\nCc: team: barney@example.net;\r\n"
         b"Subject: Weekly report 42\r\nX-Spam-Score: 7\r\nMessage-ID: <a1@example.org>\r\n\r\nHello\r\n")
LIST = (b"From: list-bounces@lists.example.org\r\nTo: dev@lists.example.org\r\n"
        b"List-Id: Developers <dev.lists.example.org>\r\nSubject: =?UTF-8?Q?caf=C3=A9?= meeting\r\n"
        b"Received: from a\r\nReceived: from b\r\n\r\n" + b"x" * 5000 + b"\r\n")
ENCODED_COMMA = (b"From: =?utf-8?Q?Doe=2C_John?= <jd@example.org>\r\nTo: x@example.org\r\n\r\nbody\r\n")
FOLDED = (b"From: \"Quoted, Name\" <q@example.org> (comment)\r\nTo: undisclosed-recipients:;\r\n"
          b"Subject: folded\r\n line two\r\n\r\nbody\r\n")
DATED = (b"Date: Sat, 05 Dec 2026 13:02:03 -0700\r\nResent-Date: Mon, 1 Feb 2027 00:00:00 +1400\r\n"
         b"Received: from x; garbage date\r\nReceived: from y by z; Tue, 1 Dec 2026 10:00:00 +0000\r\n"
         b"From: a@example.org\r\nSubject: dated\r\n\r\nbody\r\n")
MIME = (b"From: a@example.org\r\nSubject: mime\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=\"XX\"\r\n\r\npreamble\r\n--XX\r\n"
        b"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"Caf=E9 meeting at noon=\r\n tomorrow\r\n--XX\r\n"
        b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"PGI+VXJnZW50PC9iPiByZXBseQ==\r\n--XX\r\n"
        b"Content-Type: application/octet-stream\r\n\r\nBINARYSTUFF\r\n--XX--\r\nepilogue\r\n")
MESSAGES = {"plain": PLAIN, "list": LIST, "folded": FOLDED, "dated": DATED, "mime": MIME, "comma": ENCODED_COMMA}
_PARTS = ("year", "month", "day", "date", "julian", "hour", "minute", "second", "time", "iso8601", "std11", "zone",
          "weekday")
ENVELOPE = Envelope("alice@example.org", "fred+work@example.com")


def result_of(script: bytes, message: bytes = PLAIN, envelope: Envelope = ENVELOPE) -> Result:
    return run(compile_script(script), Message.from_bytes(message), envelope)


# -- actions and the implicit keep ----------------------------------------------------------------


def test_no_script_action_keeps() -> None:
    r = result_of(b"")
    assert r.actions == [] and r.implicit_keep and r.stores() == ["INBOX"]


def test_keep_fileinto_redirect_discard() -> None:
    r = result_of(b'require ["fileinto", "copy"];\nredirect "a@example.net";\nredirect :copy "b@example.net";\n'
                  b'fileinto "Work";\nfileinto "Work";\nkeep;\ndiscard;\n')
    assert [a.to_json() for a in r.actions] == [
        {"type": "redirect", "address": "a@example.net", "copy": False},
        {"type": "redirect", "address": "b@example.net", "copy": True},
        {"type": "fileinto", "mailbox": "Work", "flags": [], "copy": False, "create": False},
        {"type": "keep", "flags": []},
        {"type": "discard"},
    ]
    assert not r.implicit_keep and r.stores() == ["Work", "INBOX"]


def test_copy_keeps_the_implicit_keep() -> None:
    r = result_of(b'require ["fileinto", "copy"];\nfileinto :copy "Archive";\nredirect :copy "x@example.net";')
    assert r.implicit_keep and r.stores() == ["Archive", "INBOX"]


def test_stop_and_branches() -> None:
    script = (b'require "fileinto";\nif header :contains "subject" "report" { fileinto "Reports"; stop; }\n'
              b'elsif true { fileinto "Other"; }\nfileinto "Never";')
    assert result_of(script).stores() == ["Reports"]
    assert result_of(script, LIST).stores() == ["Other", "Never"]


def test_the_error_command_fails_the_run() -> None:
    with pytest.raises(SieveError, match="line 2: error: custom failure"):
        result_of(b'require "ihave";\nerror "custom failure";')


def test_environment_and_mailbox_callbacks() -> None:
    script = (b'require ["environment", "mailbox", "fileinto", "variables"];\n'
              b'if environment :matches "location" "*" { fileinto "${1}"; }\n'
              b'if environment :is "name" "vdeliver" { fileinto "ours"; }\n'
              b'if mailboxexists "Work" { fileinto :create "Work"; }')
    r = result_of(script)
    assert r.stores() == ["MDA", "ours"]
    r = run(compile_script(script), Message.from_bytes(PLAIN), ENVELOPE, environment={"location": "MS"},
            mailbox_exists=lambda name: name == "Work")
    assert r.stores() == ["MS", "Work"] and r.actions[-1].create


def test_a_redirect_address_from_variables_is_checked_when_it_runs() -> None:
    with pytest.raises(SieveError, match="redirect address 'bad addr' is invalid"):
        result_of(b'require "variables";\nset "x" "bad addr";\nredirect "${x}";')
    r = result_of(b'require "variables";\nset "x" "Bob <bob@example.net>";\nredirect "${x}";')
    assert [a.address for a in r.actions] == ["bob@example.net"]


def test_limits_fail_the_run_not_the_mail() -> None:
    script = b"".join(b'redirect "u%d@example.net";\n' % i for i in range(10))
    with pytest.raises(SieveError, match="more than 4 redirects"):
        result_of(script)
    many = b'require "fileinto";\n' + b"".join(b'fileinto "F%d";\n' % i for i in range(40))
    with pytest.raises(SieveError, match="more than 32 actions"):
        result_of(many)


# -- tests ------------------------------------------------------------------------------------------

TRUTHS: list[tuple[bytes, bytes, bool]] = [
    (b'exists ["from", "subject"]', PLAIN, True),
    (b'exists ["from", "x-nope"]', PLAIN, False),
    (b"size :over 100", PLAIN, True),
    (b"size :under 100", PLAIN, False),
    (b"size :over 6K", LIST, False),
    (b"size :over 5K", LIST, True),
    (b'header :is "subject" "weekly report 42"', PLAIN, True),  # i;ascii-casemap by default
    (b'header :comparator "i;octet" :is "subject" "weekly report 42"', PLAIN, False),
    (b'header :contains "subject" "caf\xc3\xa9"', LIST, True),  # RFC 2047 decoded
    (b'header :matches "subject" "*report ??"', PLAIN, True),
    (b'header :is "subject" "folded line two"', FOLDED, True),  # unfolded
    (b'header :contains "received" "from b"', LIST, True),
    (b'address :is "from" "alice@example.org"', PLAIN, True),
    (b'address :localpart :is "to" "wilma+lists"', PLAIN, True),
    (b'address :domain :is "cc" "example.net"', PLAIN, True),  # a group's members
    (b'address :all :is "from" "q@example.org"', FOLDED, True),
    # the address list is parsed before decoding: an encoded comma does not split it
    (b'address :all :is "from" "jd@example.org"', ENCODED_COMMA, True),
    (b'envelope :is "from" "alice@example.org"', PLAIN, True),
    (b'envelope :domain :is "to" "example.com"', PLAIN, True),
    (b'not envelope :is "to" "fred@example.com"', PLAIN, True),
    (b'anyof (false, header :contains "list-id" "dev.lists")', LIST, True),
    (b'allof (true, header :contains "list-id" "dev.lists")', PLAIN, False),
]


@pytest.mark.parametrize(("test", "message", "expected"), TRUTHS, ids=[t[0].decode()[:40] for t in TRUTHS])
def test_core_tests(test: bytes, message: bytes, expected: bool) -> None:
    r = result_of(b'require "envelope";\nif ' + test + b" { discard; }", message)
    assert (not r.implicit_keep) == expected


# -- the same result as Pigeonhole -------------------------------------------------------------------

SCRIPTS: list[bytes] = [b'require ["envelope", "fileinto", "copy"];\nif ' + t + b' { fileinto "Hit"; }'
                        for t, _m, _e in TRUTHS] + [
    b'require "fileinto";\nif header :contains "list-id" "dev" { fileinto "Lists"; stop; }\nkeep;',
    b'require ["fileinto", "copy"];\nfileinto :copy "A";\nredirect "x@example.net";\n',
    b"discard;",
    b'if size :over 4K { discard; } else { redirect "big@example.net"; }',
    b'require "fileinto";\nfileinto "INBOX";\nkeep;',
    # variables (RFC 5229), match variables, modifiers, encoded characters
    b'require ["variables", "fileinto"];\nset "folder" "Reports";\nfileinto "${folder}";',
    b'require ["variables", "fileinto"];\nif header :matches "subject" "* report *" { fileinto "${1}-${2}"; }',
    (b'require ["variables", "fileinto", "envelope"];\n'
    b'if envelope :matches "to" "*+*@*" { fileinto "Detail.${2}"; } else { fileinto "None"; }'),
    (b'require ["variables", "fileinto"];\nset :upper :length "n" "abc";\nset :upperfirst "w" "work";\n'
    b'if string :is "${n}" "3" { fileinto "${w}${unknown}${}"; }'),
    b'require ["variables", "fileinto"];\nset :quotewildcard "q" "a*b?";\nfileinto "${q}";',
    b'require ["variables", "encoded-character", "fileinto"];\nfileinto "${hex: 41 42}${unicode: 263a}";',
    b'require ["variables", "fileinto", "relational"];\nif string :count "ge" ["a", "", "b"] "2" { discard; }',
    # index (RFC 5260), mailbox (RFC 5490), environment (RFC 5183)
    (b'require ["index", "fileinto", "variables"];\nif header :index 2 :matches "received" "*" { fileinto "2-${1}"; }\n'
     b'if header :index 1 :last :matches "received" "*" { fileinto "L1-${1}"; }\n'
     b'if address :index 2 :all :matches "to" "*" { fileinto "a2-${1}"; }\n'
     b'if header :index 9 :matches "received" "*" { fileinto "none"; }'),
    (b'require ["mailbox", "fileinto"];\nfileinto :create "New";\nif mailboxexists "INBOX" { fileinto "In"; }\n'
     b'if mailboxexists ["INBOX", "Nope"] { fileinto "Both"; }'),
    b'require "environment";\nif environment :is "nosuch" "" { discard; }',
    # date (RFC 5260): every date part in the local zone, the header's own and another
    b'require ["date", "fileinto", "variables"];\n' + b"".join(
        b'if date :matches "date" "%s" "*" { fileinto "%s=${1}"; }\n' % (p.encode(), p.encode()) for p in _PARTS),
    b'require ["date", "fileinto", "variables"];\n' + b"".join(
        b'if date :originalzone :matches "resent-date" "%s" "*" { fileinto "o-%s=${1}"; }\n'
        b'if date :zone "+0130" :matches "date" "%s" "*" { fileinto "z-%s=${1}"; }\n'
        % (p.encode(), p.encode(), p.encode(), p.encode()) for p in _PARTS),
    (b'require ["date", "relational", "fileinto"];\n'
     b'if date :value "ge" "date" "date" "2026-12-01" { fileinto "Dec"; }\n'
     b'if date :is "received" "date" "2026-12-01" { fileinto "never"; }\n'
     b'if date "date" "fortnight" "1" { fileinto "never"; }\n'
     b'if currentdate :zone "CET" "year" "2026" { fileinto "never"; }\n'
     b'if currentdate :value "gt" "year" "2000" { keep; }'),
    # body (RFC 5173): the default :text, :raw, :content by type
    (b'require ["body", "fileinto"];\nif body :contains "caf\xc3\xa9 meeting" { fileinto "text"; }\n'
     b'if body :contains "urgent" { fileinto "html-too"; }\nif body :contains "BINARYSTUFF" { fileinto "bin"; }\n'
     b'if body :raw :contains "Caf=E9" { fileinto "raw"; }\nif body :raw :contains "caf\xc3\xa9" { fileinto "no"; }\n'
     b'if body :content "text/html" :contains "urgent" { fileinto "html"; }\n'
     b'if body :content "application" :contains "binary" { fileinto "app"; }\n'
     b'if body :content "text/plain" :contains "hello" { fileinto "hello"; }'),
    # ihave (RFC 5463): what is supported becomes available; a block behind what is not never runs
    (b'require "ihave";\nif ihave "fileinto" { fileinto "A"; }\nif ihave "nosuchext" { nosuchcmd 1 2; } '
    b'else { fileinto "B"; }'),
    b'require "ihave";\nif ihave ["fileinto", "nosuch"] { bogus; } elsif ihave "fileinto" { fileinto "C"; }',
    # imap4flags (RFC 5232)
    (b'require ["imap4flags", "fileinto"];\naddflag "\\\\Seen Foo";\naddflag "foo";\nfileinto "A";\n'
    b'fileinto :flags "\\\\Flagged" "B";\nkeep;'),
    (b'require ["imap4flags", "variables"];\nsetflag "mine" "X Y";\nremoveflag "mine" "x";\n'
    b'if hasflag "mine" "Y" { addflag "Z"; }\nif hasflag :contains "z" { discard; }'),
]



@pytest.mark.peers
@pytest.mark.parametrize("name", sorted(MESSAGES))
@pytest.mark.parametrize("script", SCRIPTS, ids=[s.decode(errors="replace")[-50:] for s in SCRIPTS])
def test_same_result_as_pigeonhole(pigeonhole: Pigeonhole, script: bytes, name: str) -> None:
    message = MESSAGES[name]
    theirs = pigeonhole.run(script, message, ENVELOPE.sender, ENVELOPE.recipient)
    assert theirs.ok, theirs.output
    ours = result_of(script, message)
    assert sorted(ours.stores()) == sorted(theirs.stores()), theirs.output
    assert sorted(a.address for a in ours.actions if a.type == "redirect") == sorted(theirs.redirects())
    assert ours.implicit_keep == theirs.implicit_keep, theirs.output
    assert any(a.type == "discard" for a in ours.actions) == theirs.discarded, theirs.output
    flags: dict[str, list[str]] = {}
    for a in ours.actions:
        if a.type in ("keep", "fileinto"):
            flags.setdefault("INBOX" if a.type == "keep" else a.mailbox, sorted(f.lower() for f in a.flags))
    if ours.implicit_keep:
        flags.setdefault("INBOX", sorted(f.lower() for f in ours.implicit_flags))
    assert flags == theirs.store_flags(), theirs.output


# -- vdeliver sieve-test ---------------------------------------------------------------------------------


def sieve_test(*args: str, stdin: bytes = PLAIN) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vdeliver", "sieve-test", *args], input=stdin.decode(),
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_sieve_test_json(tmp_path: Path) -> None:
    script = tmp_path / "s.sieve"
    script.write_bytes(b'require "fileinto";\nif address :domain :is "from" "example.org" { fileinto "Org"; }')
    done = sieve_test("--json", "-f", "alice@example.org", "-r", "fred@example.com", str(script))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "status": "ok", "errors": [], "implicit_keep": False,
        "actions": [{"type": "fileinto", "mailbox": "Org", "flags": [], "copy": False, "create": False}],
    }
    message = tmp_path / "m.eml"
    message.write_bytes(LIST)
    done = sieve_test(str(script), str(message))
    assert done.returncode == 0 and "Implicit keep:\n * store message in folder: INBOX" in done.stdout


def test_sieve_test_reports_errors_with_lines(tmp_path: Path) -> None:
    script = tmp_path / "bad.sieve"
    script.write_bytes(b"keep;\nfoo;\nif true { bar; }\n")
    done = sieve_test("--json", str(script))
    assert done.returncode == 1
    out = json.loads(done.stdout)
    assert out["status"] == "compile-error" and [e["line"] for e in out["errors"]] == [2, 3]
    done = sieve_test(str(script))
    assert done.returncode == 1 and f"{script}: line 2: error: unknown command 'foo'" in done.stdout
    runaway = tmp_path / "runaway.sieve"
    runaway.write_bytes(b"".join(b'redirect "u%d@example.net";\n' % i for i in range(9)))
    out = json.loads(sieve_test("--json", str(runaway)).stdout)
    assert out["status"] == "runtime-error" and out["errors"][0]["line"] == 5
    assert sieve_test(str(tmp_path / "missing.sieve")).returncode == 2


def test_sieve_test_trace(tmp_path: Path) -> None:
    script = tmp_path / "s.sieve"
    script.write_bytes(b'require ["fileinto", "variables"];\nset "f" "Reports";\n'
                       b'if anyof (header :contains "subject" "nope", header :contains "subject" "report") {\n'
                       b'  fileinto "${f}";\n}\n')
    done = sieve_test("--trace", str(script))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:4] == [
        'trace: line 2: set "f" "Reports"',
        'trace: line 3: header :contains ["subject"] ["nope"]: false',
        'trace: line 3: header :contains ["subject"] ["report"]: true',
        'trace: line 4: fileinto "Reports"',
    ]
    done = sieve_test("--json", "--trace", str(script))
    assert json.loads(done.stdout)["actions"][0]["mailbox"] == "Reports" and "trace: line 4" in done.stderr

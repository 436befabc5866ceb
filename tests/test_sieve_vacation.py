"""vacation (RFC 5230) and vacation-seconds (RFC 6131) in the language: verdicts, periods,
handles and the action, as Pigeonhole's sieve-test gives them."""

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
MSG = b"From: Alice <alice@example.org>\r\nTo: fred@example.org\r\nSubject: hello\r\nMessage-ID: <m1@x>\r\n\r\nbody\r\n"
ENVELOPE = Envelope("alice@example.org", "fred@example.org")

SCRIPTS = [
    b'require "vacation";\nvacation "I am away.";',
    b'require "vacation";\nvacation :days 0 "x";',
    b'require "vacation";\nvacation :days 100 :from "Fred <fred@example.org>" :addresses ["a@b.c"] "x";',
    b'require ["vacation", "vacation-seconds"];\nvacation :seconds 10 "x";',
    b'require ["vacation", "vacation-seconds"];\nvacation :seconds 200000 "x";',
    b'require ["vacation", "vacation-seconds"];\nvacation :seconds 10 :days 1 "x";',
    b'require "vacation";\nvacation :seconds 10 "x";',
    b'require "vacation";\nvacation :from "not an address" "x";',
    b'require "vacation";\nvacation :subject "S" :handle "h" "x";',
    b'require "vacation";\nvacation;',
    b'require ["vacation", "fileinto"];\nfileinto "A";\nvacation "x";\n',
    b'require "vacation";\nvacation "a";\nvacation "b";',
    b'require ["vacation", "reject"];\nvacation "away";\nreject "no";',
    b'require ["vacation", "variables"];\nset "d" "Back Monday.";\nvacation :subject "Out: ${d}" "${d}";',
    b'vacation "x";',
    b'require "vacation";\nvacation :mime "Content-Type: text/plain\\r\\n\\r\\nx";',
]


def actions(text: bytes) -> Result:
    return run(compile_script(text), Message.from_bytes(MSG), ENVELOPE)


def _theirs(output: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in output.splitlines():
        if line.strip().startswith("=> "):
            key, _, value = line.strip()[3:].partition(":")
            found[key.strip()] = value[1:] if value.startswith(" ") else value
    return found


@pytest.mark.peers
@pytest.mark.parametrize("text", SCRIPTS, ids=[f"s{i}" for i in range(len(SCRIPTS))])
def test_same_as_pigeonhole(text: bytes) -> None:
    oracle = Pigeonhole.start("plugin {\n  sieve_extensions = +vacation-seconds\n}\n")
    try:
        theirs = oracle.run(text, MSG, sender=ENVELOPE.sender, recipient=ENVELOPE.recipient)
        try:
            ours = actions(text)
        except SieveError as exc:
            assert not theirs.ok and exc.line in [n for n, _ in theirs.errors], (exc, theirs.output)
            return
        assert theirs.ok, theirs.output
        [vacation] = [a for a in ours.actions if a.type == "vacation"]
        assert vacation.vacation is not None
        want = _theirs(theirs.output)
        assert str(vacation.vacation.seconds) == want["seconds"]
        assert vacation.vacation.subject == want.get("subject", "")
        assert vacation.vacation.from_ == want.get("from", "")
        if "\n" not in vacation.vacation.handle:
            assert vacation.vacation.handle == want["handle"]
        assert ours.implicit_keep == theirs.implicit_keep
    finally:
        oracle.close()


def test_the_json_action(tmp_path: Path) -> None:
    (tmp_path / "s.sieve").write_bytes(b'require "vacation";\n'
                                       b'vacation :days 3 :subject "Away" :handle "h" "Back soon.";')
    (tmp_path / "m.eml").write_bytes(MSG)
    done = subprocess.run([sys.executable, "-m", "vdeliver", "sieve-test", "--json", "-f", "alice@example.org",
                           str(tmp_path / "s.sieve"), str(tmp_path / "m.eml")], capture_output=True, cwd=ROOT,
                          check=False)
    assert done.returncode == 0, done
    out = json.loads(done.stdout)
    assert out["actions"] == [{"type": "vacation", "to": "alice@example.org", "from": "", "subject": "Away",
                               "reason": "Back soon.", "seconds": 259200, "handle": "h", "mime": False}]
    assert out["implicit_keep"] is True


def test_periods_follow_the_settings() -> None:
    text = b'require ["vacation", "vacation-seconds"];\nvacation :seconds 30 "x";'
    r = run(compile_script(text), Message.from_bytes(MSG), ENVELOPE, vacation_periods=(3600, 0, 600))
    assert r.actions[0].vacation is not None and r.actions[0].vacation.seconds == 30
    text = b'require "vacation";\nvacation :days 30 "x";'
    r = run(compile_script(text), Message.from_bytes(MSG), ENVELOPE, vacation_periods=(3600, 0, 600))
    assert r.actions[0].vacation is not None and r.actions[0].vacation.seconds == 600  # the most


@pytest.mark.parametrize(("start", "end", "answered"), [
    ("2000-01-01", "2999-12-31", True),   # away now
    ("2999-01-01", "2999-12-31", False),  # not yet
    ("2000-01-01", "2000-12-31", False),  # back already
])
def test_a_date_bounded_vacation_as_webmail_writes_it(start: str, end: str, answered: bool) -> None:
    """Roundcube's vacation form writes the dates as currentdate tests around the vacation."""
    text = (b'require ["vacation", "date", "relational"];\n'
            b'if allof (currentdate :value "ge" "date" "' + start.encode() + b'",\n'
            b'          currentdate :value "le" "date" "' + end.encode() + b'")\n'
            b'{\n  vacation :days 1 :subject "Out of office" "I am away.";\n}')
    assert any(a.type == "vacation" for a in actions(text).actions) == answered

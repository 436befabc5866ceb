"""editheader (RFC 5293): addheader and deleteheader, their compile and run-time errors, the
protected fields, :index / :last counting, later tests seeing the edits, variables, and the
edited header block (Result.header) byte for byte against what Pigeonhole's sieve-test stores
when it executes the script (`-e` into a Maildir: the INBOX copy holds Pigeonhole's header)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.sieve_oracle import Pigeonhole
from vdeliver.sieve.errors import SieveError
from vdeliver.sieve.headers import MAX_HEADER_SIZE
from vdeliver.sieve.interpreter import Envelope, Message, Result, run
from vdeliver.sieve.validator import compile_script

ROOT = Path(__file__).resolve().parent.parent
REQUIRE = b'require ["editheader", "variables", "encoded-character", "relational", "comparator-i;ascii-numeric"];\n'
MESSAGE = (b"Return-Path: <alice@example.org>\r\nReceived: from a by b; Mon, 1 Dec 2025 10:00:00 +0000\r\n"
           b"Received: from c by d; Mon, 1 Dec 2025 09:00:00 +0000\r\nFrom: Alice <alice@example.org>\r\n"
           b"To: fred@example.com\r\nsUBject: =?utf-8?q?caf=C3=A9?= report\r\n  folded line\r\n"
           b"X-Spam: yes\r\nX-Spam: no\r\nx-spam: maybe\r\nAuto-Submitted: auto-replied\r\n\r\nbody\r\n")
LF_MESSAGE = b"From: a@example.org\nSubject: s\n\nbody\n"
ENVELOPE = Envelope("alice@example.org", "fred@example.com")


def result_of(script: bytes, message: bytes = MESSAGE) -> Result:
    return run(compile_script(script), Message.from_bytes(message), ENVELOPE)


def header_of(script: bytes, message: bytes = MESSAGE) -> bytes | None:
    return result_of(REQUIRE + script, message).header


def compile_error(script: bytes) -> tuple[int, str]:
    with pytest.raises(SieveError) as info:
        compile_script(script)
    return info.value.line, info.value.message


# -- RFC 5293's examples ---------------------------------------------------------------------------


def test_rfc_5293_addheader_example_marks_and_redirects_once() -> None:
    script = (b'require ["editheader"];\n'
              b'if not header :contains "X-Sieve-Filtered" ["<kim@job.example.com>", "<kim@home.example.com>"] {\n'
              b'  addheader "X-Sieve-Filtered" "<kim@job.example.com>";\n  redirect "kim@home.example.com";\n}\n')
    first = result_of(script)
    assert [a.address for a in first.actions] == ["kim@home.example.com"]
    assert first.header is not None and first.header.startswith(b"X-Sieve-Filtered: <kim@job.example.com>\n")
    again = result_of(script, first.header + b"\nbody\n")
    assert again.actions == [] and again.header is None


def test_rfc_5293_deleteheader_examples() -> None:
    # Section 5: every field of that name; only those whose value matches; the nth (from the end).
    assert b"X-Spam" not in (header_of(b'deleteheader "X-Spam";') or b"x").lower()
    assert header_of(b'deleteheader :contains "x-spam" "o";') == MESSAGE.split(b"\r\n\r\n")[0].replace(
        b"\r\n", b"\n").replace(b"X-Spam: no\n", b"") + b"\n"
    kept = header_of(b'deleteheader :index 1 :last "X-Spam";') or b""
    assert b"X-Spam: yes\nX-Spam: no\nAuto" in kept and b"maybe" not in kept


# -- the header block ----------------------------------------------------------------------------


def test_no_edit_no_header() -> None:
    assert header_of(b'if header :is "subject" "x" { addheader "X" "y"; }') is None
    assert header_of(b'deleteheader "X-Absent";') is None
    assert header_of(b'deleteheader :is "X-Spam" "never";') is None
    assert header_of(b'deleteheader "Received";') is None  # protected: nothing changes


def test_untouched_fields_stay_as_they_came_with_lf() -> None:
    header = header_of(b'addheader "x-my-FIELD" "v";\naddheader :last "X-Tail" "t";')
    original = MESSAGE.split(b"\r\n\r\n")[0].replace(b"\r\n", b"\n") + b"\n"
    assert header == b"X-My-Field: v\n" + original + b"X-Tail: t\n"
    assert b"\r" not in header and not header.endswith(b"\n\n")


def test_added_fields_fold_and_encode_as_pigeonhole_writes_them() -> None:
    long = b"hello w\xc3\xb6rld this is a long value that should be folded somewhere around seventy eight characters"
    header = header_of(b'addheader "X-Test" "' + long + b'";', LF_MESSAGE)
    assert header == (b"X-Test: hello =?utf-8?q?w=C3=B6rld?= this is a long value that should be folded\n"
                      b"\tsomewhere around seventy eight characters\nFrom: a@example.org\nSubject: s\n")
    assert header_of(b'addheader "X-A" "x\xc3\xa9 y";', LF_MESSAGE) == b"X-A: =?utf-8?b?eMOp?= y\n" + LF_MESSAGE[:-6]
    assert header_of(b'addheader "X-A" "a${hex:0a}b";', LF_MESSAGE).startswith(b"X-A: a\n\tb\nFrom")  # type: ignore[union-attr]
    assert header_of(b'addheader "X-A" "a${hex:01}b";', LF_MESSAGE).startswith(b"X-A: =?utf-8?q?a=01b?=\n")  # type: ignore[union-attr]
    assert header_of(b'addheader "X-A" "";', LF_MESSAGE).startswith(b"X-A: \nFrom")  # type: ignore[union-attr]


# -- semantics -----------------------------------------------------------------------------------


def test_addheader_goes_first_or_last_and_later_tests_see_it() -> None:
    script = (b'require ["editheader", "fileinto", "variables"];\naddheader "X-One" "1";\naddheader "X-Two" "2";\n'
              b'addheader :last "X-Three" "3";\n'
              b'if header :is "x-one" "1" { fileinto "one"; }\nif exists "X-Three" { fileinto "three"; }\n'
              b'if header :count "eq" :comparator "i;ascii-numeric" "x-spam" "3" { fileinto "three-spam"; }\n'
              b'deleteheader :index 2 "X-Spam";\nif header :matches "X-Spam" "*" { fileinto "${1}"; }\n'
              b'if address :domain "from" "example.org" { deleteheader "From"; }\n'
              b'if not exists "from" { fileinto "no-from"; }\n')
    r = result_of(script.replace(b'"variables"]', b'"variables", "relational", "comparator-i;ascii-numeric"]'))
    assert r.stores() == ["one", "three", "three-spam", "yes", "no-from"]
    assert r.header is not None and r.header.startswith(b"X-Two: 2\nX-One: 1\nReturn-Path")
    assert r.header.endswith(b"Auto-Submitted: auto-replied\nX-Three: 3\n")


def test_index_counts_from_the_top_or_from_the_end() -> None:
    def spam(script: bytes) -> list[bytes]:
        header = header_of(script) or MESSAGE.replace(b"\r\n", b"\n")
        return [line.split(b": ")[1] for line in header.split(b"\n") if line.lower().startswith(b"x-spam:")]

    assert spam(b'deleteheader :index 1 "x-spam";') == [b"no", b"maybe"]
    assert spam(b'deleteheader :index 1 :last "x-spam";') == [b"yes", b"no"]
    assert spam(b'deleteheader :index 3 :last "x-spam";') == [b"no", b"maybe"]
    assert spam(b'deleteheader :index 4 "x-spam";') == [b"yes", b"no", b"maybe"]
    assert spam(b'deleteheader :index 0 "x-spam";') == []  # 0: all, as in Pigeonhole
    assert spam(b'deleteheader :index 2 :is "x-spam" "yes";') == [b"yes", b"no", b"maybe"]  # the 2nd is "no"
    assert spam(b'deleteheader :index 2 :is "x-spam" "no";') == [b"yes", b"maybe"]
    assert spam(b'deleteheader :matches "x-spam" ["*e*", "n?"];') == []
    assert spam(b'addheader "X-Spam" "new";\ndeleteheader :index 1 "x-spam";') == [b"yes", b"no", b"maybe"]


def test_value_patterns_match_the_decoded_value() -> None:
    assert b"sUBject" not in (header_of(b'deleteheader :is "subject" "caf\xc3\xa9 report  folded line";') or b"x")
    assert header_of(b'deleteheader :contains "subject" "=?utf-8";') is None


def test_the_size_test_sees_the_edited_message() -> None:
    size = len(LF_MESSAGE)
    script = b'addheader "X-Pad" "' + b"p" * 100 + b'";\nif size :over %d { addheader "X-Big" "y"; }' % (size + 50)
    assert b"X-Big" in (header_of(script, LF_MESSAGE) or b"")


def test_variables_expand_in_names_and_values() -> None:
    header = header_of(b'set "n" "X-Made";\nset "v" "by ${n}";\naddheader "${n}" "${v}";\n'
                       b'if header :matches "x-made" "by *" { addheader "X-Echo" "${1}"; }\n'
                       b'deleteheader "${n}";', LF_MESSAGE)
    assert header == b"X-Echo: X-Made\n" + LF_MESSAGE[:-6]


def test_tests_see_added_values_as_written() -> None:
    header = header_of(b'addheader "X-C" "  padded  ";\n'
                       b'if header :matches "X-C" "*" { addheader "X-Seen" "[${1}]"; }\n'
                       b'addheader "X-E" "=?utf-8?q?caf=C3=A9?=";\n'
                       b'if header :is "X-E" "caf\xc3\xa9" { addheader "X-Decoded" "yes"; }\n', LF_MESSAGE)
    assert header is not None and b"X-Seen: [  padded]\n" in header and b"X-Decoded" not in header


def test_non_ascii_values_round_trip_through_tests() -> None:
    header = header_of(b'addheader "X-U" "\xe2\x82\xac 100 caf\xc3\xa9";\n'
                       b'if header :is "x-u" "\xe2\x82\xac 100 caf\xc3\xa9" { addheader "X-Ok" "1"; }', LF_MESSAGE)
    assert header is not None and b"X-Ok: 1\n" in header and header.isascii()
    again = Message.from_bytes(header + b"\n")
    assert again.values("x-u") == ["\u20ac 100 caf\u00e9"]


# -- protected fields and limits ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Received", "received", "Auto-Submitted", "X-Sieve-Redirected-From"])
def test_protected_fields_cannot_be_deleted(name: str) -> None:
    assert header_of(b'deleteheader "%s";' % name.encode()) is None


def test_protected_additions() -> None:
    assert header_of(b'addheader "X-Sieve-Redirected-From" "x";') is None
    # As Pigeonhole: Received and Auto-Submitted may be added, only not deleted.
    assert (header_of(b'addheader "Received" "x";') or b"").startswith(b"Received: x\n")
    assert header_of(b'deleteheader "Subject";') is not None  # Subject: always allowed


def test_the_maximum_value_size() -> None:
    assert header_of(b'addheader "X-A" "' + b"a" * MAX_HEADER_SIZE + b'";', LF_MESSAGE) is not None
    assert compile_error(REQUIRE + b'\naddheader "X-A"\n  "' + b"a" * (MAX_HEADER_SIZE + 1) + b'";') == (
        4, "addheader command: specified header value '" + "a" * 80 + "' is too large (2049 bytes)")
    assert "(2050 bytes)" in compile_error(REQUIRE + b'addheader "X-A" "' + "\u00e9".encode() * 1025 + b'";')[1]
    with pytest.raises(SieveError, match=r"line 3: addheader action: .* is too large \(2049 bytes\)"):
        header_of(b'set "v" "' + b"a" * 2049 + b'";\naddheader "X-A" "${v}";')


# -- errors, each on its line ------------------------------------------------------------------------

ERRORS: list[tuple[bytes, int, str]] = [
    (b'addheader "X A" "x";', 2, "addheader command: specified field name 'X A' is invalid"),
    (b'addheader "X:A" "x";', 2, "specified field name 'X:A' is invalid"),
    (b'addheader "X\xc3\xa9" "x";', 2, "is invalid"),
    (b'addheader "" "x";', 2, "specified field name '' is empty"),
    (b'\n\ndeleteheader "X A";', 4, "deleteheader command: specified field name 'X A' is invalid"),
    (b'addheader ["X-A", "X-B"] "x";', 2, "needs a single string"),
    (b'addheader "X-A" ["x", "y"];', 2, "needs a single string"),
    (b'addheader :last "X-A";', 2, "takes 2 positional argument(s), not 1"),
    (b'addheader :index 1 "X-A" "v";', 2, "unknown tag ':index'"),
    (b'deleteheader :last "X-A";', 2, "the :last tag for the deleteheader command cannot be given without :index"),
    (b'deleteheader;', 2, "takes 2 positional argument(s), not 0"),
    (b'deleteheader "X-A" "v" "w";', 2, "takes 2 positional argument(s), not 3"),
    (b'deleteheader :index "1" "X-A";', 2, "needs a number"),
    (b'deleteheader :comparator "i;nope" "X-A" "v";', 2, "unknown comparator"),
]


@pytest.mark.parametrize(("body", "line", "message"), ERRORS)
def test_compile_errors_carry_their_line(body: bytes, line: int, message: str) -> None:
    got_line, got = compile_error(b'require "editheader";\n' + body)
    assert got_line == line and message in got, got


# Where Pigeonhole differs: it accepts an empty field name (and writes ": x"), and refuses
# three positional arguments without a line ("code generation failed").
PIGEONHOLE_DIFFERS = {b'addheader "" "x";', b'deleteheader "X-A" "v" "w";'}


@pytest.mark.parametrize(("body", "line", "message"), ERRORS)
def test_compile_errors_on_pigeonholes_lines(stored: Stored, body: bytes, line: int, message: str) -> None:
    if body in PIGEONHOLE_DIFFERS:
        pytest.skip("a documented difference")
    theirs = stored.oracle.run(b'require "editheader";\n' + body)
    # (":last" without ":index": Pigeonhole reports the error, then runs the script all the same)
    assert line in [n for n, _ in theirs.errors], theirs.output


def test_editheader_must_be_required() -> None:
    assert compile_error(b'addheader "X" "y";') == (1, "command 'addheader' needs require \"editheader\"")
    assert compile_error(b'\ndeleteheader "X";')[0] == 2


def test_run_time_errors() -> None:
    with pytest.raises(SieveError, match="line 3: addheader action: specified field name 'X A' is invalid"):
        header_of(b'set "n" "X A";\naddheader "${n}" "v";')
    with pytest.raises(SieveError, match="line 2: deleteheader action: specified field name '' is empty"):
        header_of(b'deleteheader "${none}";')


# -- sieve-test --json -----------------------------------------------------------------------------


def test_sieve_test_json_shows_the_header_only_when_edited(tmp_path: Path) -> None:
    (tmp_path / "msg").write_bytes(LF_MESSAGE)
    for script, expected in ((b'addheader "X-A" "b";', "X-A: b\nFrom: a@example.org\nSubject: s\n"), (b"keep;", None)):
        (tmp_path / "s.sieve").write_bytes(b'require "editheader";\n' + script)
        done = subprocess.run([sys.executable, "-m", "vdeliver", "sieve-test", "--json", str(tmp_path / "s.sieve"),
                               str(tmp_path / "msg")], capture_output=True, cwd=ROOT, check=True)
        out = json.loads(done.stdout)
        assert out.get("header") == expected and ("header" in out) == (expected is not None)


# -- hypothesis: anything a script can give never breaks the header ---------------------------------

_TEXT = st.text(st.characters(codec="utf-8"), max_size=200)
_NAMES = st.one_of(_TEXT, st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30))


def _quoted(text: str) -> bytes:
    return b'"' + text.encode("utf-8").replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _parses_back(header: bytes) -> None:
    assert header.endswith(b"\n") and b"\n\n" not in header and not header.startswith(b"\n")
    for line in header[:-1].split(b"\n"):
        assert line[:1] in (b" ", b"\t") or (b":" in line and line.split(b":")[0].strip()), header


@given(name=_NAMES, value=_TEXT, last=st.booleans(), delete=st.booleans(), index=st.integers(0, 4))
def test_arbitrary_names_and_values(name: str, value: str, last: bool, delete: bool, index: int) -> None:
    script = (REQUIRE + b"set \"n\" " + _quoted(name) + b";\nset \"v\" " + _quoted(value) + b";\n"
              + (b'addheader :last "${n}" "${v}";\n' if last else b'addheader "${n}" "${v}";\n'))
    if delete:
        script += (b'deleteheader :index %d :contains "${n}" "${v}";\n' % index) if index else b'deleteheader "${n}";\n'
    try:
        result = run(compile_script(script), Message.from_bytes(MESSAGE), ENVELOPE)
    except SieveError:
        return
    if result.header is not None:
        _parses_back(result.header)
        again = Message.from_bytes(result.header + b"\nbody\n")
        assert len(again.fields) == result.header.count(b"\n") - sum(
            line[:1] in (b" ", b"\t") for line in result.header.split(b"\n"))


# -- against Pigeonhole ----------------------------------------------------------------------------


class Stored:
    """Pigeonhole's sieve-test with editheader enabled, executing the script (-e) into a
    Maildir: the header of the message it stores is the header Pigeonhole made."""

    def __init__(self, oracle: Pigeonhole) -> None:
        self.oracle = oracle

    def header(self, script: bytes, message: bytes) -> tuple[str, bytes | None]:
        o = self.oracle
        o.count += 1
        inbox = o.base / "Maildir" / "new"
        for old in inbox.glob("*"):
            old.unlink()
        path, mail = o.base / f"e{o.count}.sieve", o.base / f"e{o.count}.eml"
        path.write_bytes(script)
        mail.write_bytes(message)
        path.chmod(0o644)
        mail.chmod(0o644)
        done = subprocess.run([o.program, "-c", str(o.base / "dovecot.conf"), "-e", "-l",
                               f"maildir:{o.base}/Maildir", str(path), str(mail)],
                              capture_output=True, timeout=60, **o.run_kw)
        out = done.stdout.decode("utf-8", "replace") + done.stderr.decode("utf-8", "replace")
        stored = sorted(inbox.glob("*"))
        return out, (stored[0].read_bytes().split(b"\n\n")[0] + b"\n") if stored else None


@pytest.fixture(scope="module")
def stored() -> Iterator[Stored]:
    oracle = Pigeonhole.start("plugin {\n  sieve_extensions = +editheader\n}\n")
    yield Stored(oracle)
    oracle.close()


VALUES = [
    "plain", "", "  padded  ", "caf\u00e9", "x\u00e9 y", "\u20ac" * 40, "a\nb", "a\r\nb", "ab\n", "\n ab", "a\x01b",
    "a\rb", "tab\there", "=?utf-8?q?x?=", "a =?b", "word " * 30, "w" * 120, "x " + "\u00e9" * 70,
    "mixed \u00e9t\u00e9 and more words to make it long enough to fold " * 3, "trailing   " * 12,
    "\u00e9" * 30 + " " + "a" * 90, "caf\u00e9 " * 25, "a" * 62 + "\u00e9" * 3 + " z", "a" * 61 + "\u00e9=?" * 9,
    "\u00e9" * 21 + "a" + "\u20ac" * 30, "_?= " * 20 + "\u00e9",
]
SCRIPTS = [
    b'addheader "X-Test" "${v}";',
    b'addheader :last "x-lower-case" "${v}";',
    b'addheader "X-A" "${v}";\nif header :matches "X-A" "*" { addheader :last "X-Seen" "[${1}]"; }',
    b'addheader "X-A" "${v}";\ndeleteheader :index 1 :contains "x-a" "${v}";',
]
EDITS = [
    b'deleteheader "X-Spam";',
    b'deleteheader :index 2 "X-Spam";',
    b'deleteheader :index 1 :last "x-spam";',
    b'deleteheader :index 0 "x-spam";',
    b'deleteheader :is "x-spam" ["no", "maybe"];',
    b'deleteheader :matches "subject" "caf* report*";',
    b'deleteheader :index 2 :is "x-spam" "yes";',
    b'deleteheader "Received";\ndeleteheader "auto-submitted";\naddheader "Received" "r";',
    b'addheader "X-Sieve-Redirected-From" "x";\ndeleteheader "x-sieve-redirected-from";',
    (b'addheader "X-N" "1";\naddheader "X-N" "2";\naddheader :last "X-N" "3";\ndeleteheader :index 2 "x-n";\n'
    b'if header :count "eq" :comparator "i;ascii-numeric" "x-n" "2" { addheader "X-Two" "yes"; }'),
    b'deleteheader "From";\nif not address :domain "from" "example.org" { addheader "X-Gone" "from"; }',
    (b'deleteheader "To";\naddheader "To" "Someone <new@example.net>";\n'
    b'if address :is "to" "new@example.net" { addheader :last "X-New-To" "yes"; }'),
    b'addheader "X-Pad" "${hex:20}";\nif size :over 1K { addheader "X-Big" "yes"; }',
]


def _check(stored: Stored, script: bytes, message: bytes) -> None:
    out, theirs = stored.header(script, message)
    try:
        ours = run(compile_script(script), Message.from_bytes(message), ENVELOPE).header
    except SieveError as exc:
        assert theirs is None or theirs == message.replace(b"\r\n", b"\n").split(b"\n\n")[0] + b"\n", (exc, out)
        assert "error" in out, out
        return
    original = message.replace(b"\r\n", b"\n").split(b"\n\n")[0] + b"\n"
    assert theirs is not None, out
    assert (ours if ours is not None else original) == theirs, out


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("script", SCRIPTS)
def test_added_fields_as_pigeonhole_stores_them(stored: Stored, script: bytes, value: str) -> None:
    full = REQUIRE + b"set \"v\" " + _quoted(value) + b";\n" + script + b"\nkeep;\n"
    if "\x01" in value or "\r" in value:
        full = full.replace(b"set \"v\" " + _quoted(value), b"set \"v\" \"" + value.encode().replace(
            b"\x01", b"${hex:01}").replace(b"\r", b"${hex:0d}").replace(b"\n", b"${hex:0a}") + b'"')
    if script.startswith(b'addheader "X-A" "${v}";\nif header :matches') and "\n" in value.rstrip("\n") and \
            value.split("\n", 1)[1][:1] not in (" ", "\t", ""):
        pytest.skip("Pigeonhole's tests lose the character after a bare line break (docs/sieve.md)")
    _check(stored, full, LF_MESSAGE)


@pytest.mark.parametrize("edit", EDITS)
@pytest.mark.parametrize("message", [MESSAGE, MESSAGE.replace(b"\r\n", b"\n")], ids=["crlf", "lf"])
def test_edits_as_pigeonhole_stores_them(stored: Stored, edit: bytes, message: bytes) -> None:
    _check(stored, REQUIRE + edit + b"\nkeep;\n", message)

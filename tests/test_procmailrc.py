"""`vmailctl sieve from-procmailrc`: a procmailrc turned into Sieve.

Three kinds of checks:

- the corpus (tests/procmailrc/*.procmailrc, in the styles people write): each converts, the
  script compiles with vdeliver's validator, and the recipes that cannot be converted are the
  ones listed, with their lines;
- differential, against the real procmail: every corpus file and every message of
  tests/procmailrc/messages/ goes through `procmail -m` in a private $HOME (a recording
  $SENDMAIL for forwards) and through the converted script in `vdeliver sieve-test --json`;
  the folders (and forwards) the message ends in must be the same.  Skipped cleanly without
  procmail, failed under VDELIVER_REQUIRE_PEERS=1;
- hypothesis: any text as a procmailrc gives a script that compiles, or the converter's
  own error, nothing else.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import require
from vdeliver.accounts import procmailrc
from vdeliver.accounts.vmailctl import main as vmailctl
from vdeliver.sieve import interpreter
from vdeliver.sieve.validator import compile_script

CORPUS = Path(__file__).parent / "procmailrc"
RCFILES = sorted(CORPUS.glob("*.procmailrc"))
MESSAGES = sorted((CORPUS / "messages").glob("*.eml"))
SENDER = "sender@elsewhere.example"
HOME = "/home/fred"


def convert(text: str, home: str = HOME) -> procmailrc.Result:
    result = procmailrc.convert(text, home=home)
    compile_script(result.script)
    return result


def body(result: procmailrc.Result) -> str:
    """The script without its comment lines."""
    return "\n".join(line for line in result.script.splitlines() if not line.lstrip().startswith("#"))


def destinations(script: str, message: bytes, sender: str = SENDER) -> set[str]:
    compiled = compile_script(script)
    result = interpreter.run(compiled, interpreter.Message.from_bytes(message),
                             interpreter.Envelope(sender, "fred@example.com"))
    out: set[str] = set()
    for a in result.actions:
        if a.type == "fileinto":
            out.add(a.mailbox)
        elif a.type == "keep":
            out.add("INBOX")
        elif a.type == "redirect":
            out.add("!" + a.address)
    if result.implicit_keep:
        out.add("INBOX")
    return out


def sieve_test_destinations(script: str, message: bytes, where: Path) -> set[str]:
    """The destinations `vdeliver sieve-test --json` gives (the tool a user runs): the same
    reading as destinations(), through the command line."""
    import json

    (where / "converted.sieve").write_text(script)
    (where / "message.eml").write_bytes(message)
    done = subprocess.run([sys.executable, "-m", "vdeliver", "sieve-test", "--json", "-f", SENDER, "-r",
                           "fred@example.com", str(where / "converted.sieve"), str(where / "message.eml")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=60,
                          check=False)
    out = json.loads(done.stdout)
    assert out["status"] == "ok", out
    found: set[str] = set()
    for a in out["actions"]:
        if a["type"] == "fileinto":
            found.add(a["mailbox"])
        elif a["type"] == "keep":
            found.add("INBOX")
        elif a["type"] == "redirect":
            found.add("!" + a["address"])
    if out["implicit_keep"]:
        found.add("INBOX")
    return found


# -- the corpus ----------------------------------------------------------------------------------------

EXPECTED_SKIPPED = {
    "forward.procmailrc": [],
    "lists.procmailrc": [],
    "mbox.procmailrc": [],
    "nesting.procmailrc": [],
    "size-body.procmailrc": [],
    "spam.procmailrc": [],
    "scoring.procmailrc": [6, 12, 15, 20],
    "vacation.procmailrc": [10, 12],
    "variables.procmailrc": [7, 20],
}


@pytest.mark.parametrize("rcfile", RCFILES, ids=lambda p: p.name)
def test_corpus_converts_and_compiles(rcfile: Path) -> None:
    result = procmailrc.convert_file(str(rcfile), home=HOME)
    compile_script(result.script)
    assert [s.line for s in result.skipped] == EXPECTED_SKIPPED[rcfile.name], result.skipped
    assert result.converted > 0
    for s in result.skipped:
        assert f"# line {s.line}: {s.reason}" in result.script
        assert s.text


def test_corpus_is_big_enough() -> None:
    assert len(RCFILES) >= 8 and len(MESSAGES) >= 10
    assert set(EXPECTED_SKIPPED) == {p.name for p in RCFILES}


def test_skipped_reasons_are_specific() -> None:
    result = procmailrc.convert_file(str(CORPUS / "scoring.procmailrc"), home=HOME)
    reasons = {s.line: s.reason for s in result.skipped}
    assert "weighted" in reasons[6]
    assert "filter" in reasons[12] or "program" in reasons[12]
    assert "exit code of a program" in reasons[15]
    assert "only the header" in reasons[20]
    result = procmailrc.convert_file(str(CORPUS / "variables.procmailrc"), home=HOME)
    reasons = {s.line: s.reason for s in result.skipped}
    assert "backquotes" in reasons[7]
    assert "$TODAY is not known" in reasons[20] and "line 7" in reasons[20]


# -- what converts to what -----------------------------------------------------------------------------


def test_folders_and_stop() -> None:
    r = convert("MAILDIR=$HOME/Mail\n:0:\n* ^Subject:.*report\nreports\n:0\n* ^Subject:.*x\nlists/dev/\n"
                ":0\n* ^Subject:.*y\nmh/.\n:0\n* ^Subject:.*z\n.Spam.low/\n:0\n* ^Subject:.*w\n/dev/null\n")
    b = body(r)
    assert 'if header :regex "subject" "report" {\n    fileinto "reports";\n    stop;\n}' in b
    assert 'fileinto "lists/dev";' in b and 'fileinto "mh";' in b and 'fileinto "Spam.low";' in b
    assert "discard;\n    stop;" in b
    assert r.skipped == [] and r.converted == 5


def test_folder_outside_maildir_is_reported() -> None:
    r = convert("MAILDIR=$HOME/Mail\n:0\n* ^Subject:.*x\n/tmp/elsewhere\n")
    assert r.skipped[0].line == 4 and "outside MAILDIR" in r.skipped[0].reason


def test_default_is_keep() -> None:
    r = convert("MAILDIR=$HOME/Maildir/\nDEFAULT=$MAILDIR\n:0\n* ^Subject:.*x\n$DEFAULT\n:0\n* ^Subject:.*y\n"
                "./\n")
    assert body(r).count("keep;") == 2


def test_copy_flag() -> None:
    r = convert(":0 c\n! a@example.org\n:0c\n* ^Subject:.*x\nMail/x\n")
    b = body(r)
    assert 'redirect :copy "a@example.org";' in b and 'fileinto :copy "Mail/x";' in b
    assert "stop" not in b
    assert '"copy"' in b


def test_header_field_forms() -> None:
    b = body(convert(":0\n* ^X-Spam-Flag: YES\nJunk\n"))
    assert 'header :regex "x-spam-flag" "^YES"' in b
    b = body(convert(":0\n* ^(To|Cc):.*dev@lists\\.example\\.org\nL\n"))
    assert 'header :regex ["to", "cc"] "dev@lists\\\\.example\\\\.org"' in b
    b = body(convert(":0\n* ^List-Id:\nL\n"))
    assert 'exists "list-id"' in b
    b = body(convert(":0 D\n* ^Subject:.*Meeting\nL\n"))
    assert ':comparator "i;octet"' in b


def test_to_macro_spreads_over_the_address_fields() -> None:
    b = body(convert(":0\n* ^TO_fred@example\\.com\nL\n"))
    for name in ("to", "cc", "bcc", "resent-to", "original-to", "x-envelope-to", "apparently-to",
                 "apparently-resent-to"):
        assert f'"{name}"' in b
    assert '"^(.*[^a-zA-Z0-9._-])?fred@example\\\\.com"' in b


def test_from_daemon() -> None:
    r = convert(":0\n* !^FROM_DAEMON\n* ^Subject:.*x\nL\n")
    b = body(r)
    assert "not anyof(" in b and 'exists "mailing-list"' in b and 'envelope :regex "from"' in b


def test_match_extraction() -> None:
    b = body(convert(":0\n* ^Subject:.*Ticket \\/[0-9]+\n* ^From:.*x\n.Tickets.$MATCH/\n"))
    assert 'header :regex "subject" "Ticket ([0-9]+)"' in b
    # the capturing test comes last, its group read at once
    assert b.index('"from"') < b.index('"subject"')
    assert 'set "MATCH" "${1}";\n    fileinto "Tickets.${MATCH}";' in b
    message = b"From: x@y\nSubject: about Ticket 4711 today\n\nb\n"
    script = convert(":0\n* ^Subject:.*Ticket \\/[0-9]+\n.Tickets.$MATCH/\n").script
    assert destinations(script, message) == {"Tickets.4711"}


def test_size_body_and_variable_conditions() -> None:
    b = body(convert(":0\n* > 5000\n* < 90000\nBig\n"))
    assert "allof(size :over 5000, size :under 90000)" in b
    r = convert(":0 B\n* ^begin [0-7]+\nU\n")
    assert 'body :raw :regex "(^|${hex:0A})begin [0-7]+"' in body(r)
    assert destinations(r.script, b"Subject: s\n\nhello\nbegin 644 f\n") == {"U"}
    assert destinations(r.script, b"Subject: s\n\nhello begin 644 f\n") == {"INBOX"}
    r = convert("KIND=work\n:0\n* KIND ?? ^wo\nW\n")
    assert 'string :regex "work"' in body(r)
    assert destinations(r.script, b"Subject: s\n\nb\n") == {"W"}


def test_dollar_conditions_expand_constants() -> None:
    r = convert('ME="fred@example\\.com"\n:0\n* $ ^To:.*$ME\nMine\n')
    assert 'header :regex "to" "fred@example\\\\.com"' in body(r)
    r = convert("ME=fred@example\\.com\n:0\n* $ ^To:.*$ME\nMine\n")  # unquoted: sh drops the backslash
    assert 'header :regex "to" "fred@example.com"' in body(r)
    r = convert(":0\n* $ ^To:.*$NOBODY\nMine\n")
    assert r.skipped[0].line == 2 and "not set in the rcfile" in r.skipped[0].reason


def test_nesting_and_else() -> None:
    r = convert(CORPUS.joinpath("nesting.procmailrc").read_text())
    b = body(r)
    assert 'string :is "${pm_matched1}" "0"' in b and 'string :is "${pm_matched0}" "1"' in b
    assert r.skipped == []


def test_assignment_in_a_conditional_block_is_not_constant() -> None:
    r = convert(":0\n* ^Subject:.*x\n{ F=one }\n:0\n$F\n")
    assert r.skipped and r.skipped[0].line == 5 and "conditional block" in r.skipped[0].reason


def test_ignored_settings_are_notes() -> None:
    r = convert("LOGFILE=$HOME/pm.log\nVERBOSE=on\nSHELL=/bin/sh\n:0\n* ^Subject:.*x\nX\n")
    assert r.skipped == [] and [n.line for n in r.notes] == [1, 2, 3]


def test_unconvertible_patterns() -> None:
    for rc, words in [
        (":0\n* some text\nX\n", "does not start with ^Field:"),
        (":0\n* ^From.*boss\nX\n", "not spelled out"),
        (":0\n* ^Subject:.*a$.*b\nX\n", "spans header lines"),
        (":0\n* 1^1 ^Subject:.*a\nX\n", "weighted"),
        (":0 e\nX\n", "flag e"),
        (":0 c\n* ^Subject:.*a\n{\n:0\nX\n}\n", "nesting block"),
        ("X=`date`\n", "backquotes"),
        (":0 f\n| sed s/a/b/\n", "program"),
        (":0\n! fred\n", "local-part@domain"),
        (":0\n* ^Subject:(a\nX\n", "without its ')'"),
        ("TRAP=/bin/true\n", "TRAP"),
        ("random words\n", "not a recipe"),
    ]:
        r = convert(rc)
        assert r.skipped, rc
        assert words in r.skipped[0].reason, (rc, r.skipped[0].reason)


def test_includerc(tmp_path: Path) -> None:
    (tmp_path / "Mail").mkdir()
    (tmp_path / "lists.rc").write_text(":0\n* ^List-Id:.*dev\ndev/\n:0\n| prog\n")
    rc = tmp_path / ".procmailrc"
    rc.write_text("MAILDIR=$HOME/Mail\nINCLUDERC=$HOME/lists.rc\nINCLUDERC=$HOME/missing.rc\n:0\nrest/\n")
    r = procmailrc.convert_file(str(rc))
    compile_script(r.script)
    assert 'fileinto "dev";' in r.script and 'fileinto "rest";' in r.script
    assert [(s.file and Path(s.file).name, s.line) for s in r.skipped] == [("lists.rc", 5), (None, 3)]


# -- the command ---------------------------------------------------------------------------------------


def test_cli_text_json_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok = tmp_path / "ok.rc"
    ok.write_text(":0\n* ^Subject:.*x\nX/\n")
    assert vmailctl(["sieve", "from-procmailrc", str(ok)]) == 0
    out, err = capsys.readouterr()
    compile_script(out)
    assert err == ""
    bad = CORPUS / "vacation.procmailrc"
    assert vmailctl(["sieve", "from-procmailrc", str(bad), "--home", HOME]) == 1
    out, err = capsys.readouterr()
    compile_script(out)
    assert "# line 10: a pipe to a program" in out
    assert "line 10: not converted: a pipe to a program" in err and "line 12:" in err
    assert vmailctl(["sieve", "from-procmailrc", "--json", str(bad)]) == 1
    data = json.loads(capsys.readouterr().out)
    assert set(data) >= {"script", "skipped", "converted"}
    assert [s["line"] for s in data["skipped"]] == [10, 12]
    assert all(set(s) >= {"line", "reason", "text"} for s in data["skipped"])
    assert data["converted"] == 1
    compile_script(data["script"])
    assert vmailctl(["sieve", "from-procmailrc", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert vmailctl(["sieve", "from-procmailrc"]) == 2


def test_cli_needs_no_configuration(tmp_path: Path) -> None:
    rc = tmp_path / "rc"
    rc.write_text(":0\n* ^Subject:.*x\nX/\n")
    env = dict(os.environ, VDELIVER_CONFIG=str(tmp_path / "nonexistent.toml"))
    proc = subprocess.run([sys.executable, "-m", "vdeliver.accounts.vmailctl", "sieve", "from-procmailrc", str(rc)],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert 'fileinto "X";' in proc.stdout


# -- against the real procmail -------------------------------------------------------------------------

INBOXES = {"INBOX.default", "Maildir", "Mail/inbox"}  # DEFAULT as the corpus sets it
_RUNS = Path(tempfile.mkdtemp(prefix="vdeliver-procmailrc-"))
_PARALLEL = 12


def _procmail(procmail: str, rcfile: Path, message: bytes, home: Path) -> set[str]:
    """Where procmail puts the message: the folders it wrote (by their Sieve names), "!addr" for
    each `!` forward (read from procmail's log: the recording $SENDMAIL is the folder)."""
    for d in ("Mail/work", "Maildir"):  # procmail makes no directory for an mbox file
        (home / d).mkdir(parents=True, exist_ok=True)
    sendmail = home / "sendmail"
    sent = home / "sent"
    sendmail.write_text(f'#!/bin/sh\necho "$@" >> {sent}\ncat > /dev/null\n')
    sendmail.chmod(0o755)
    data = f"From {SENDER} Mon Jun  1 10:00:00 2026\n".encode() + message
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "LOGNAME": "fred"}
    proc = subprocess.run([procmail, "-m", f"HOME={home}", f"SENDMAIL={sendmail}",
                           f"DEFAULT={home}/INBOX.default/", f"LOGFILE={home}/procmail.log", str(rcfile)],
                          input=data, env=env, capture_output=True, timeout=120, cwd=home)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    found: set[str] = set()
    for dirpath, _dirs, filenames in os.walk(home):
        here = Path(dirpath)
        if here.name in ("new", "cur", "tmp"):
            continue
        if any((here / sub).is_dir() and os.listdir(here / sub) for sub in ("new", "cur")):
            found.add(_name(here.relative_to(home)))
        for f in filenames:
            path = here / f
            if f in ("sendmail", "sent", "procmail.log") or f.endswith((".lock", ".cache")):
                continue
            if f.isdigit():  # an MH folder's message
                found.add(_name(here.relative_to(home)))
            elif path.stat().st_size:
                found.add(_name(path.relative_to(home)))
    # procmail does not wait for a forward (no w flag): wait until no process of this run (a
    # forked procmail has SENDMAIL=... in its arguments, the recorder its path) is left.
    deadline = time.monotonic() + 20
    while _running(str(sendmail)) and time.monotonic() < deadline:
        time.sleep(0.02)
    if sent.exists():
        for line in sent.read_text().splitlines():
            words = line.split()
            if "-t" not in words:  # -t: a program's own mail (the vacation reply), not a forward
                found.update("!" + w for w in words if not w.startswith("-"))
    return found


def _running(marker: str) -> bool:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        return True
            except OSError:
                continue
    return False


def _name(rel: Path) -> str:
    text = str(rel)
    if text in INBOXES:
        return "INBOX"
    for root in ("Maildir/", "Mail/"):
        if text.startswith(root):
            text = text[len(root):]
            break
    if "/" not in text and text.startswith("."):
        return text[1:]
    return text


@functools.cache
def _compare(procmail: str, rcfile: Path) -> dict[str, tuple[set[str], set[str]]]:
    """message name -> (procmail's destinations, the converted script's), each message in its
    own $HOME; the messages run side by side (procmail's mbox locking takes a second)."""
    def one(msg: Path) -> tuple[str, tuple[set[str], set[str]]]:
        home = _RUNS / f"{rcfile.stem}-{msg.stem}"
        home.mkdir()
        message = msg.read_bytes()
        theirs = _procmail(procmail, rcfile, message, home)
        ours = sieve_test_destinations(procmailrc.convert_file(str(rcfile), home=str(home)).script, message, home)
        return msg.name, (theirs, ours)

    with ThreadPoolExecutor(_PARALLEL) as pool:
        return dict(pool.map(one, MESSAGES))


@pytest.fixture(scope="module")
def procmail_path() -> str:
    return require("procmail")["procmail"]


@pytest.mark.parametrize("rcfile", RCFILES, ids=lambda p: p.name)
def test_differential_against_procmail(procmail_path: str, rcfile: Path) -> None:
    differences = [f"{name}: procmail {sorted(theirs)}, Sieve {sorted(ours)}"
                   for name, (theirs, ours) in _compare(procmail_path, rcfile).items() if theirs != ours]
    assert not differences, "\n".join(differences)


def test_differential_covers_every_kind_of_destination(procmail_path: str) -> None:
    """The corpus and messages reach folders of each kind, /dev/null, forwards and the inbox."""
    seen: set[str] = set()
    discarded = 0
    for rcfile in RCFILES:
        for theirs, _ours in _compare(procmail_path, rcfile).values():
            seen |= theirs
            discarded += not theirs
    assert discarded > 0
    for wanted in ("INBOX", "Lists.dev", "Debian.user", "Junk", "Tickets", "urgent", "meetings", "work/example",
                   "bulk", "Work.reports", "Work.tickets", "Work", "Fun", "Bulk", "Bounces", "Big", "Uuencoded",
                   "Security", "Tiny", "Lists.tickets-4711", "Lists.archive", "!fred.phone@example.net",
                   "!anna@example.org"):
        assert wanted in seen, (wanted, sorted(seen))


# -- any text ------------------------------------------------------------------------------------------

_PIECES = st.sampled_from([
    ":0", ":0:", ":0c", ":0 B", ":0 HB", ":0 D", ":0 E", ":0 A", ":0 fw", ":0 h", "* ", "* !", "* $", "* > 100",
    "* < 5", "^Subject:", "^TO_", "^TO", "^FROM_DAEMON", "^FROM_MAILER", ".*", "\\/", "[a-z]", "[^x]", "(a|b)",
    "?", "+", "$", "^", "{", "}", "! a@b.example", "| prog", "/dev/null", ".Folder/", "dir/", "mh/.", "MAILDIR=",
    "$HOME", "$MATCH", "${X:-y}", "X=", "`date`", "\"", "'", "\\", "\n", " ", "#", "INCLUDERC=", "1^1", "B ??",
    "X ??", "\\<", "\\>", "^^", "é", "\x00", "\t",
])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=300), st.lists(_PIECES, max_size=40).map("".join)))
def test_any_text_converts_to_a_script_that_compiles(text: str) -> None:
    try:
        result = procmailrc.convert(text, home="/home/h")
    except procmailrc.ProcmailrcError:
        return
    compile_script(result.script)
    assert result.converted >= 0
    for s in result.skipped:
        assert isinstance(s.line, int) and s.reason


def test_includerc_with_a_nul_byte_is_skipped_not_a_traceback() -> None:
    result = procmailrc.convert("INCLUDERC=a\x00b\n:0\n* ^Subject: x\nfolder\n", home="/home/h")
    assert any("NUL" in s for s in map(str, result.skipped)), result.skipped

"""A user's Sieve script at delivery (`[sieve] enabled = true`): folders for Maildir and mbox
users, each mailbox once, discard, :create, unsafe names, a broken script keeping the mail in
the INBOX with `<script>.log`, all stores taken back when a later one fails; and the real
`vdeliver` command and the LMTP path running the same code."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from tests.dovecot_harness import Dovecot, bad_log_lines, passwd_file_auth
from tests.helpers import Account, MailRoot, require_root, run_vdeliver, world_tmpdir
from tests.unit_helpers import RecordingLog, fail_at_call, patch_os
from vdeliver import config, flags, maildir
from vdeliver.config import Config
from vdeliver.deliver import deliver
from vdeliver.errors import DeliveryError
from vdeliver.recipient import Recipient

FRED = Recipient("example.org", "fred")
RAW = b"From: Alice <alice@example.org>\nTo: fred@example.org\nSubject: weekly report\n\nhello\n"


def make_config(tmp_path: Path, fmt: str = "maildir", enabled: bool = True, escape: str = "mboxo",
                **sieve: object) -> Config:
    return config.build({
        "mbox_escape": escape,
        "format": fmt,
        "mbox_path": f"{tmp_path}/mbox/{{domain}}/{{user}}",
        "maildir_path": f"{tmp_path}/home/{{domain}}/{{user}}/Maildir",
        "spool_dir": str(tmp_path), "hostname": "unit.test", "log": "none", "lock_timeout": 1,
        "create_mailbox": True,
        "sieve": {"enabled": enabled, "sendmail": str(fake_sendmail(tmp_path)), **sieve},
    })


def fake_sendmail(tmp_path: Path, status: int = 0, sleep: float = 0) -> Path:
    """A program where sendmail would be: it records its arguments and the message it was
    given (tmp_path/sent-N.args, sent-N.eml) and exits with `status`."""
    path = tmp_path / "sendmail"
    path.write_text("#!/bin/sh\n"
                    f"n=$(ls {tmp_path} | grep -c '^sent-.*args$')\n"
                    f"printf '%s\\n' \"$@\" > {tmp_path}/sent-$n.args\n"
                    f"cat > {tmp_path}/sent-$n.eml\n"
                    f"sleep {sleep}\n"
                    + (f"echo 'sendmail says no' >&2; exit {status}\n" if status else ""))
    path.chmod(0o755)
    return path


def sent(tmp_path: Path) -> list[tuple[list[str], bytes]]:
    """What the fake sendmail was given, in order: (arguments, message)."""
    count = len(list(tmp_path.glob("sent-*.args")))
    return [((tmp_path / f"sent-{i}.args").read_text().splitlines(), (tmp_path / f"sent-{i}.eml").read_bytes())
            for i in range(count)]


def home(tmp_path: Path) -> Path:
    path = tmp_path / "home" / "example.org" / "fred"
    path.mkdir(parents=True, exist_ok=True)
    return path


def script(tmp_path: Path, text: bytes) -> Path:
    """Install `text` as the active script, as managesieved does."""
    h = home(tmp_path)
    (h / "sieve").mkdir(exist_ok=True)
    (h / "sieve" / "main.sieve").write_bytes(text)
    link = h / ".dovecot.sieve"
    if not link.is_symlink():
        link.symlink_to("sieve/main.sieve")
    return h


def run(tmp_path: Path, cfg: Config, raw: bytes = RAW, log: RecordingLog | None = None) -> object:
    src = tmp_path / "in.eml"
    src.write_bytes(raw)
    fd = os.open(src, os.O_RDONLY)
    try:
        return deliver(cfg, FRED, fd, "alice@example.org", log=log)
    finally:
        os.close(fd)


def maildir_folder(tmp_path: Path, name: str = "") -> Path:
    md = home(tmp_path) / "Maildir"
    return md / f".{name}" if name else md


def messages(folder: Path) -> list[bytes]:
    return [(folder / "new" / n).read_bytes() for n in sorted(os.listdir(folder / "new"))] if (
        folder / "new").is_dir() else []


def test_fileinto_existing_folder_and_keep(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    script(tmp_path, b'require "fileinto";\nif header :contains "subject" "report" { fileinto "Work.Reports"; keep; }')
    maildir.create(str(maildir_folder(tmp_path)))
    maildir.create(str(maildir_folder(tmp_path, "Work.Reports")))
    result = run(tmp_path, cfg)
    assert len(messages(maildir_folder(tmp_path, "Work.Reports"))) == 1
    assert len(messages(maildir_folder(tmp_path))) == 1
    assert "(sieve)" in result.where()  # type: ignore[attr-defined]


def test_missing_folder_without_create_goes_to_the_inbox_and_is_logged(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    h = script(tmp_path, b'require "fileinto";\nfileinto "Nope";')
    log = RecordingLog()
    run(tmp_path, cfg, log=log)
    assert len(messages(maildir_folder(tmp_path))) == 1
    assert not maildir_folder(tmp_path, "Nope").exists()
    assert "no such mailbox" in (h / ".dovecot.sieve.log").read_text()
    assert any("sieve: to=<fred@example.org>" in text for _level, text in log.lines)


def test_create_makes_the_folder_with_a_dovecot_name(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    script(tmp_path, b'require ["fileinto", "mailbox"];\nfileinto :create "Caf\xc3\xa9 & Co";')
    run(tmp_path, cfg)
    assert len(messages(maildir_folder(tmp_path, "Caf&AOk- &- Co"))) == 1  # modified UTF-7, as Dovecot names it
    assert messages(maildir_folder(tmp_path)) == []


def test_system_flags_are_stored_in_the_maildir_name(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    script(tmp_path, b'require ["fileinto", "imap4flags", "mailbox"];\naddflag ["\\\\Seen", "Custom"];\n'
                     b'fileinto :create :flags "\\\\Flagged \\\\Answered" "Work";\nkeep;')
    run(tmp_path, cfg)  # keep: the internal flags; Work: its own
    inbox = maildir_folder(tmp_path)
    work = maildir_folder(tmp_path, "Work")
    assert os.listdir(inbox / "new") == [] and [n[-5:] for n in os.listdir(inbox / "cur")] == [":2,Sa"]
    assert [n[-5:] for n in os.listdir(work / "cur")] == [":2,FR"]
    assert (inbox / "dovecot-keywords").read_text() == "0 Custom\n"  # letter a: keyword 0
    assert flags.maildir_info(str(inbox), ("\\Seen", "\\Draft", "\\Deleted")) == "DST"


def test_a_first_delivery_creates_the_inbox_before_a_folder_inside_it(tmp_path: Path) -> None:
    """create_mailbox with no Maildir yet, and a script that files into a new folder first."""
    cfg = make_config(tmp_path)
    script(tmp_path, b'require ["fileinto", "mailbox"];\nfileinto :create "Work";\nkeep;')
    run(tmp_path, cfg)
    assert len(messages(maildir_folder(tmp_path))) == 1 and len(messages(maildir_folder(tmp_path, "Work"))) == 1


def test_discard_stores_nothing(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    script(tmp_path, b"discard;")
    result = run(tmp_path, cfg)
    assert result.where() == "discarded by sieve"  # type: ignore[attr-defined]
    assert messages(maildir_folder(tmp_path)) == []


@pytest.mark.parametrize("name", ["..", "a..b", ".hidden", "a\x01b", "x/y", "/etc"])
def test_unsafe_folder_names_are_refused(tmp_path: Path, name: str) -> None:
    cfg = make_config(tmp_path)
    script(tmp_path, b'require ["fileinto", "mailbox"];\nfileinto :create "' + name.encode() + b'";')
    run(tmp_path, cfg)
    assert len(messages(maildir_folder(tmp_path))) == 1
    assert sorted(os.listdir(maildir_folder(tmp_path))) == ["cur", "new", "tmp"]


# Names Dovecot 2.3 refuses to CREATE or SELECT (measured over IMAP, and pinned by the Dovecot test
# below): mail stored there would be out of the user's sight for good.  And names too long for the
# file system, or, for mbox, for the dotlock's temporary name: they deferred the delivery for ever.
HIDDEN = [("mbox", "Foo.lock", "names ending in '.lock'"), ("mbox", "Lists/x.lock/dev", "names ending in '.lock'"),
          ("mbox", "~Tilde", "begin with '~'"), ("maildir", "~Tilde", "begin with '~'"),
          ("mbox", "y" * 256, "longer than 255 bytes"), ("maildir", "Work." + "y" * 251, "longer than 255 bytes"),
          ("mbox", "Caf\u00e9" * 40, "longer than 255 bytes"),  # 200 bytes of UTF-8, 320 on disk
          ("mbox", "Lists/" + "y" * 240, "no room for its lock file")]  # vdeliver's dotlock name: too long


@pytest.mark.parametrize(("fmt", "name", "why"), HIDDEN)
def test_fileinto_a_folder_name_dovecot_hides_keeps_the_message_in_the_inbox(tmp_path: Path, fmt: str, name: str,
                                                                            why: str) -> None:
    """`fileinto :create "Foo.lock"` for an mbox user made ~/mail/Foo.lock: a file Dovecot never
    lists (and the dotlock of a folder "Foo": broken as stale, mail and all); a name too long
    for the file system deferred the delivery for ever.  Such a name is now what any invalid
    name is: the message stays in the INBOX, the script's log says why, no file is made."""
    cfg = make_config(tmp_path, fmt=fmt)
    h = script(tmp_path, b'require ["fileinto", "mailbox"];\nfileinto :create "' + name.encode() + b'";')
    (tmp_path / "mbox" / "example.org").mkdir(parents=True)
    log = RecordingLog()
    run(tmp_path, cfg, log=log)
    if fmt == "mbox":
        assert (tmp_path / "mbox" / "example.org" / "fred").read_bytes().count(b"Subject: weekly report") == 1
        assert not (h / "mail").exists() or os.listdir(h / "mail") == []
    else:
        assert len(messages(maildir_folder(tmp_path))) == 1
        assert sorted(os.listdir(maildir_folder(tmp_path))) == ["cur", "new", "tmp"]
    logged = (h / ".dovecot.sieve.log").read_text()
    assert logged.count("\n") == 1 and "invalid folder name" in logged and why in logged
    assert "kept in the INBOX" in logged
    assert any("invalid folder name" in text for _level, text in log.lines)


@pytest.mark.parametrize("order", [b'"Lists/dev" "Lists"', b'"Lists" "Lists/dev"'])
def test_an_mbox_folder_that_holds_folders_keeps_its_message_in_the_inbox(tmp_path: Path, order: bytes) -> None:
    """For an mbox user "Lists" cannot be a mailbox once "Lists/dev" made it a directory (Dovecot
    lists it \\Noselect): filing into both in one message, in either order, or into "Lists"
    later, stores the "Lists" copy in the INBOX instead of deferring for ever on EISDIR."""
    cfg = make_config(tmp_path, fmt="mbox")
    first, second = order.split(b" ")
    h = script(tmp_path, b'require ["fileinto", "mailbox"];\nfileinto :create ' + first + b';\n'
                         b'fileinto :create ' + second + b';')
    (tmp_path / "mbox" / "example.org").mkdir(parents=True)
    run(tmp_path, cfg)
    run(tmp_path, cfg)
    assert (h / "mail" / "Lists" / "dev").read_bytes().count(b"Subject: weekly report") == 2
    assert (tmp_path / "mbox" / "example.org" / "fred").read_bytes().count(b"Subject: weekly report") == 2
    logged = (h / ".dovecot.sieve.log").read_text()
    assert logged.count("fileinto 'Lists': invalid folder name (a directory of folders") == 2, logged


@pytest.mark.parametrize("name", ["Foo.lock", "x.vdeliver-journal", "x.unresolved", "x.untrusted"])
def test_maildir_folder_names_dovecot_shows_are_still_filed_into(tmp_path: Path, name: str) -> None:
    """Only mbox storage reserves `.lock`: for a Maildir user "Foo.lock" is the folder "lock"
    inside "Foo" (Maildir++ `.Foo.lock`), and Dovecot shows it; the journal's other suffixes are
    names Dovecot shows in both formats."""
    cfg = make_config(tmp_path)
    script(tmp_path, b'require ["fileinto", "mailbox"];\nfileinto :create "' + name.encode() + b'";')
    run(tmp_path, cfg)
    assert len(messages(maildir_folder(tmp_path, name))) == 1 and messages(maildir_folder(tmp_path)) == []


def test_an_mbox_folder_named_like_a_journal_suffix_is_filed_into(tmp_path: Path) -> None:
    """vdeliver's journals start with '.', which no folder level may: "x.vdeliver-journal" is an
    ordinary mbox folder Dovecot lists, never mistaken for a journal."""
    cfg = make_config(tmp_path, fmt="mbox")
    h = script(tmp_path, b'require ["fileinto", "mailbox"];\nfileinto :create "x.vdeliver-journal";\n'
                         b'fileinto :create "x.unresolved";\nfileinto :create "x.untrusted";\n'
                         b'fileinto :create "X.LOCK";')
    (tmp_path / "mbox" / "example.org").mkdir(parents=True)
    run(tmp_path, cfg)
    for name in ("x.vdeliver-journal", "x.unresolved", "x.untrusted", "X.LOCK"):
        assert (h / "mail" / name).read_bytes().count(b"Subject: weekly report") == 1, name


@pytest.mark.parametrize("text", [b"fileinto \"x\";", b"foo;",
                                  b"".join(b'redirect "u%d@example.net";' % i for i in range(9))])
def test_a_script_that_cannot_decide_keeps_the_mail_in_the_inbox(tmp_path: Path, text: bytes) -> None:
    cfg = make_config(tmp_path)
    h = script(tmp_path, text)
    run(tmp_path, cfg)
    assert len(messages(maildir_folder(tmp_path))) == 1
    assert (h / ".dovecot.sieve.log").read_text().count("\n") == 1


def test_no_script_or_disabled_is_plain_delivery(tmp_path: Path) -> None:
    home(tmp_path)
    run(tmp_path, make_config(tmp_path))
    assert len(messages(maildir_folder(tmp_path))) == 1
    script(tmp_path, b"discard;")
    run(tmp_path, make_config(tmp_path, enabled=False))
    assert len(messages(maildir_folder(tmp_path))) == 2


def test_mbox_user_folders_under_home_mail(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, fmt="mbox")
    h = script(tmp_path, b'require ["fileinto", "mailbox"];\nfileinto :create "Lists/dev";\nfileinto "Missing";\n'
                         b'fileinto :create "Caf\xc3\xa9/Neu";')
    (tmp_path / "mbox" / "example.org").mkdir(parents=True)
    run(tmp_path, cfg)
    assert (h / "mail" / "Caf&AOk-" / "Neu").read_bytes().count(b"Subject: weekly report") == 1  # as Dovecot names it
    folder = h / "mail" / "Lists" / "dev"
    data = folder.read_bytes()
    assert data.startswith(b"From alice@example.org ") and b"Subject: weekly report" in data
    assert (tmp_path / "mbox" / "example.org" / "fred").read_bytes().count(b"Subject: weekly report") == 1


def test_a_failed_store_takes_back_the_ones_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fileinto A, then B fails (disk full at its fsync): A's copy is removed and the delivery
    defers, so sendmail's retry stores the message exactly once per folder."""
    cfg = make_config(tmp_path)
    script(tmp_path, b'require "fileinto";\nfileinto "A";\nfileinto "B";')
    for name in ("A", "B"):
        maildir.create(str(maildir_folder(tmp_path, name)))
    patch_os(monkeypatch, "fsync", fail_at_call(3, errno.ENOSPC, os.fsync))  # A: file, new/; B: file
    with pytest.raises(DeliveryError) as info:
        run(tmp_path, cfg)
    assert info.value.status.temporary
    assert messages(maildir_folder(tmp_path, "A")) == [] and messages(maildir_folder(tmp_path, "B")) == []
    monkeypatch.undo()
    run(tmp_path, cfg)
    assert len(messages(maildir_folder(tmp_path, "A"))) == 1 and len(messages(maildir_folder(tmp_path, "B"))) == 1


def test_a_failed_mbox_store_takes_back_the_ones_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_config(tmp_path, fmt="mbox")
    h = script(tmp_path, b'require ["fileinto", "mailbox"];\nfileinto :create "A";\nkeep;')
    inbox = tmp_path / "mbox" / "example.org" / "fred"
    inbox.parent.mkdir(parents=True)
    inbox.write_bytes(b"")
    inbox.chmod(0o600)
    real = os.fsync

    def fsync(fd: int) -> None:  # the folder's append fails; the INBOX, stored first, is taken back
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/mail/A"):
            raise OSError(errno.EIO, "injected")
        real(fd)

    patch_os(monkeypatch, "fsync", fsync)
    with pytest.raises(DeliveryError):
        run(tmp_path, cfg)
    assert (h / "mail" / "A").read_bytes() == b"" and inbox.read_bytes() == b""


def test_the_vdeliver_command_runs_the_script(mailroot: MailRoot) -> None:
    """The installed launcher, as sendmail runs it (as vmail): the script files the message,
    and the log line says where it went."""
    cfg = mailroot.write_config(log="stderr")
    cfg.write_text(cfg.read_text() + "\n[sieve]\nenabled = true\n")
    md = mailroot.add_maildir("example.org", "fred")
    (md.parent / "sieve").mkdir()
    (md.parent / "sieve" / "main.sieve").write_bytes(b'require "fileinto";\nfileinto "Reports";\n')
    (md.parent / ".dovecot.sieve").symlink_to("sieve/main.sieve")
    maildir.create(str(md / ".Reports"))
    for path in (md.parent / "sieve", md.parent / "sieve" / "main.sieve", md / ".Reports", md / ".Reports" / "new",
                 md / ".Reports" / "cur", md / ".Reports" / "tmp"):
        os.chown(path, mailroot.owner.uid, mailroot.owner.gid)
    os.lchown(md.parent / ".dovecot.sieve", mailroot.owner.uid, mailroot.owner.gid)
    done = run_vdeliver(["-f", "alice@example.org", "-a", "example.org", "-a", "fred"], RAW,
                        config=mailroot.config, as_user=mailroot.owner)
    assert done.returncode == 0, done.stderr
    assert len(os.listdir(md / ".Reports" / "new")) == 1 and os.listdir(md / "new") == []
    assert b"(sieve)" in done.stderr and b".Reports" in done.stderr


def test_no_script_imports_nothing_of_sieve(tmp_path: Path) -> None:
    """The delivery of a user without an active script (even with [sieve] enabled) costs one
    lstat, and no import of vdeliver.sieve."""
    home(tmp_path)
    code = (
        "import os, sys\n"
        "from vdeliver import config\n"
        "from vdeliver.deliver import deliver\n"
        "from vdeliver.recipient import Recipient\n"
        f"cfg = config.build({{'format': 'maildir', 'maildir_path': '{tmp_path}/home/{{domain}}/{{user}}/Maildir',"
        f" 'spool_dir': '{tmp_path}', 'log': 'none', 'create_mailbox': True, 'sieve': {{'enabled': True}}}})\n"
        f"fd = os.open('{tmp_path}/in.eml', os.O_RDONLY)\n"
        "deliver(cfg, Recipient('example.org', 'fred'), fd, 'a@example.org')\n"
        "print(sorted(m for m in sys.modules if m.startswith('vdeliver.sieve')))\n"
    )
    (tmp_path / "in.eml").write_bytes(RAW)
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert len(messages(maildir_folder(tmp_path))) == 1


def test_folders_hang_off_the_maildir_even_for_a_detail_folder(tmp_path: Path) -> None:
    """fred+lists with detail_folders: the INBOX is .lists, but fileinto "Work" is the
    Maildir's .Work, not a folder inside .lists."""
    cfg = config.build({
        "format": "maildir", "maildir_path": f"{tmp_path}/home/{{domain}}/{{user}}/Maildir",
        "spool_dir": str(tmp_path), "log": "none", "create_mailbox": True, "detail_folders": True,
        "sieve": {"enabled": True},
    })
    script(tmp_path, b'require "fileinto";\nfileinto "Work";\nkeep;')
    for name in ("", "lists", "Work"):
        maildir.create(str(maildir_folder(tmp_path, name)))
    src = tmp_path / "in.eml"
    src.write_bytes(RAW)
    fd = os.open(src, os.O_RDONLY)
    try:
        deliver(cfg, Recipient("example.org", "fred", "lists"), fd, "alice@example.org")
    finally:
        os.close(fd)
    assert len(messages(maildir_folder(tmp_path, "Work"))) == 1
    assert len(messages(maildir_folder(tmp_path, "lists"))) == 1  # keep: the +detail folder
    assert messages(maildir_folder(tmp_path)) == []


@pytest.mark.peers
def test_dovecot_shows_the_folders_the_script_filed_into(vmail: Account) -> None:
    """Read back through a real Dovecot: a Maildir user's `.Caf&AOk-` is the folder "Café",
    `.Work.Reports` is Work/Reports under Maildir++'s '.', and an mbox user's ~/mail/Lists
    is the folder "Lists"; each holds the message, with the flags and keywords the script set
    (Maildir: info letters and dovecot-keywords; mbox: Status, X-Status, X-Keywords), and
    subscribed, as `:create` made them."""
    require_root("Dovecot's mail processes switch to the vmail user")
    root = MailRoot(world_tmpdir(), vmail)
    try:
        passwd = root.base / "passwd"
        md = root.add_maildir("home.com", "fred")
        root.add_mbox("away.com", "wilma", b"From a@example.org Sat Dec  5 10:00:00 2026\n"
                                           b"X-IMAPbase: 1764928800 0000000002 later\nX-UID: 1\nSubject: first\n\n"
                                           b"first\n\n")
        passwd.write_text(
            f"fred@home.com:s3cret:{vmail.uid}:{vmail.gid}::{root.home}/home.com/fred::userdb_mail=maildir:~/Maildir\n"
            f"wilma@away.com:s3cret:{vmail.uid}:{vmail.gid}::{root.home}/away.com/wilma::\n")
        passwd.chmod(0o644)
        cfg = root.write_config()
        cfg.write_text(cfg.read_text() + "\n[sieve]\nenabled = true\n")
        scripts = {
            md.parent: b'require ["fileinto", "mailbox", "imap4flags"];\naddflag ["\\\\Flagged", "$Label1"];\n'
                       b'fileinto :create "Caf\xc3\xa9";\nfileinto :create :flags "\\\\Seen done" "Work.Reports";\n'
                       b'keep :flags "Urgent";',
            root.home / "away.com" / "wilma": b'require ["fileinto", "mailbox", "imap4flags"];\n'
                                              b'fileinto :create :flags "\\\\Seen \\\\Answered later" "Lists";\n'
                                              b'fileinto :create "Caf\xc3\xa9/Neu";\n'
                                              b'keep :flags ["\\\\Flagged", "\\\\Draft", "\\\\Deleted", "later", '
                                              b'"unknown"];',
        }
        # A keyword Dovecot already numbered: vdeliver's keyword takes another slot, and this one stays.
        (md / "dovecot-keywords").write_text("0 urgent\n")
        os.chown(md / "dovecot-keywords", vmail.uid, vmail.gid)
        for home_dir, text in scripts.items():
            (home_dir / "sieve").mkdir(parents=True, exist_ok=True)
            (home_dir / "sieve" / "main.sieve").write_bytes(text)
            (home_dir / ".dovecot.sieve").symlink_to("sieve/main.sieve")
            for path in (home_dir, home_dir / "sieve", home_dir / "sieve" / "main.sieve"):
                os.chown(path, vmail.uid, vmail.gid)
            os.lchown(home_dir / ".dovecot.sieve", vmail.uid, vmail.gid)
        for address in ("fred@home.com", "wilma@away.com"):
            user, domain = address.split("@")
            done = run_vdeliver(["-f", "alice@example.org", "-a", domain, "-a", user], RAW, config=cfg, as_user=vmail)
            assert done.returncode == 0, done.stderr
        with Dovecot(root, vmail, auth=passwd_file_auth(passwd)) as dc:
            # wilma's INBOX knows the keyword "later" (its X-IMAPbase); her new folder knows none.
            expected = (("fred@home.com", {"Caf&AOk-": {"\\Flagged", "$Label1"}, "Work.Reports": {"\\Seen", "done"},
                                           "INBOX": {"urgent"}}),
                        ("wilma@away.com", {"Lists": {"\\Seen", "\\Answered"}, "Caf&AOk-/Neu": set(),
                                            "INBOX": {"\\Flagged", "\\Draft", "\\Deleted", "later"}}))
            for address, folders in expected:
                imap = dc.login(address, "s3cret")
                try:
                    listed = b" ".join(line for line in imap.list()[1] if isinstance(line, bytes))
                    # :create subscribed each new folder, in Dovecot's subscriptions file
                    subscribed = b" ".join(line for line in imap.lsub()[1] if isinstance(line, bytes))
                    for folder in folders:
                        assert folder == "INBOX" or folder.encode() in subscribed, (folder, subscribed)
                    for folder, want in folders.items():
                        assert folder.encode() in listed or folder == "INBOX", (folder, listed)
                        status, data = imap.select(f'"{folder}"', readonly=True)
                        count = b"2" if (address, folder) == ("wilma@away.com", "INBOX") else b"1"
                        assert status == "OK" and data[0] == count, (folder, data)
                        status, fetched = imap.fetch(count.decode(), "(FLAGS)")
                        line = fetched[0] if isinstance(fetched[0], bytes) else b""
                        got = set(line.decode().partition("FLAGS (")[2].partition(")")[0].split()) - {"\\Recent"}
                        assert status == "OK" and {f.lower() for f in got} == {f.lower() for f in want}, (folder,
                                                                                                          fetched)
                finally:
                    imap.logout()
        assert (md / "dovecot-keywords").read_text().startswith("0 urgent\n")
    finally:
        import shutil

        shutil.rmtree(root.base, ignore_errors=True)


@pytest.mark.peers
def test_dovecot_shows_the_message_a_script_filed_into_a_name_it_hides(vmail: Account) -> None:
    """Read back through a real Dovecot 2.3: it refuses to CREATE an mbox folder "Foo.lock" or
    any folder "~Tilde" (and would never list or open one vdeliver made), so the mbox user's
    `fileinto :create` of those names leaves the message in the INBOX, where IMAP shows it,
    and nothing in ~/mail.  For a Maildir user "Foo.lock" is an ordinary folder (Maildir++
    `.Foo.lock`, "lock" inside "Foo"), and Dovecot shows the message there."""
    require_root("Dovecot's mail processes switch to the vmail user")
    root = MailRoot(world_tmpdir(), vmail)
    try:
        passwd = root.base / "passwd"
        md = root.add_maildir("home.com", "fred")
        root.add_mbox("away.com", "wilma")
        wilma = root.home / "away.com" / "wilma"
        passwd.write_text(
            f"fred@home.com:s3cret:{vmail.uid}:{vmail.gid}::{root.home}/home.com/fred::userdb_mail=maildir:~/Maildir\n"
            f"wilma@away.com:s3cret:{vmail.uid}:{vmail.gid}::{wilma}::\n")
        passwd.chmod(0o644)
        cfg = root.write_config()
        cfg.write_text(cfg.read_text() + "\n[sieve]\nenabled = true\n")
        scripts = {md.parent: b'require ["fileinto", "mailbox"];\nfileinto :create "Foo.lock";',
                   wilma: b'require ["fileinto", "mailbox"];\nfileinto :create "Foo.lock";\nfileinto :create "~Tilde";'}
        for home_dir, text in scripts.items():
            (home_dir / "sieve").mkdir(parents=True, exist_ok=True)
            (home_dir / "sieve" / "main.sieve").write_bytes(text)
            (home_dir / ".dovecot.sieve").symlink_to("sieve/main.sieve")
            for path in (home_dir, home_dir / "sieve", home_dir / "sieve" / "main.sieve"):
                os.chown(path, vmail.uid, vmail.gid)
            os.lchown(home_dir / ".dovecot.sieve", vmail.uid, vmail.gid)
        for address in ("fred@home.com", "wilma@away.com"):
            user, domain = address.split("@")
            done = run_vdeliver(["-f", "alice@example.org", "-a", domain, "-a", user], RAW, config=cfg, as_user=vmail)
            assert done.returncode == 0, done.stderr
        with Dovecot(root, vmail, auth=passwd_file_auth(passwd)) as dc:
            for address, folder in (("fred@home.com", "Foo.lock"), ("wilma@away.com", "INBOX")):
                imap = dc.login(address, "s3cret")
                try:
                    status, data = imap.select(f'"{folder}"', readonly=True)
                    assert status == "OK" and data[0] == b"1", (address, folder, data)
                    status, fetched = imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
                    assert status == "OK" and b"weekly report" in b"".join(
                        p for item in fetched for p in (item if isinstance(item, tuple) else (item,))
                        if isinstance(p, bytes)), fetched
                    if address.startswith("wilma"):
                        listed = [line for line in imap.list()[1] if isinstance(line, bytes)]
                        assert len(listed) == 1 and listed[0].endswith(b" INBOX"), listed
                        # The rule vdeliver follows, as Dovecot states it.
                        for name in ("Foo.lock", "~Tilde"):
                            status, said = imap.create(f'"{name}"')
                            assert status == "NO" and b"Invalid mailbox name" in said[0], (name, said)
                finally:
                    imap.logout()
            assert bad_log_lines(dc.log_text()) == []
        assert sorted(os.listdir(wilma / "mail")) == [".imap"]  # Dovecot's index, and no folder
        assert (wilma / ".dovecot.sieve.log").read_text().count("invalid folder name") == 2
    finally:
        shutil.rmtree(root.base, ignore_errors=True)


# -- redirect ------------------------------------------------------------------------------------------


def test_redirect_sends_the_message_through_sendmail(tmp_path: Path) -> None:
    """sendmail -oi -f <envelope sender> <address>; the message as it came, with our Delivered-To
    (the next hop sees the loop) and without our Return-Path; nothing stored here."""
    cfg = make_config(tmp_path)
    home(tmp_path)
    script(tmp_path, b'redirect "bob@example.net";')
    result = run(tmp_path, cfg)
    [(args, data)] = sent(tmp_path)
    assert args == ["-oi", "-f", "alice@example.org", "bob@example.net"]
    assert data == b"Delivered-To: fred@example.org\n" + RAW
    assert messages(maildir_folder(tmp_path)) == []
    assert result.where() == "redirected to <bob@example.net> (sieve)"  # type: ignore[attr-defined]


def test_redirect_copy_also_keeps(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    script(tmp_path, b'require "copy";\nredirect :copy "bob@example.net";\nredirect "carol@example.net";')
    run(tmp_path, cfg)
    assert [args[-1] for args, _data in sent(tmp_path)] == ["bob@example.net", "carol@example.net"]
    assert messages(maildir_folder(tmp_path)) == []  # carol's redirect (no :copy) cancelled the keep


@pytest.mark.parametrize("escape", ["mboxo", "mboxrd"])
def test_redirect_of_an_mbox_user_gives_the_message_as_it_came(tmp_path: Path, escape: str) -> None:
    """mboxrd escaping is undone; mboxo's cannot be (its `>From ` looks like one that came)."""
    cfg = make_config(tmp_path, fmt="mbox", escape=escape)
    script(tmp_path, b'redirect "bob@example.net";')
    (tmp_path / "mbox" / "example.org").mkdir(parents=True)
    raw = RAW + b"From the start\n>From a quote\n"
    run(tmp_path, cfg, raw)
    [(_args, data)] = sent(tmp_path)
    body = data.partition(b"\n")[2]
    assert body == raw if escape == "mboxrd" else body == raw.replace(b"\nFrom the", b"\n>From the")


@pytest.mark.parametrize(("status", "sleep"), [(75, 0), (1, 0), (0, 5)])
def test_a_redirect_that_fails_keeps_the_message_in_the_inbox(tmp_path: Path, status: int, sleep: float) -> None:
    """sendmail's refusal, or no answer within sendmail_timeout: the message is stored in the INBOX
    and the user's script log says why."""
    cfg = make_config(tmp_path, sendmail_timeout=0.5)
    fake_sendmail(tmp_path, status, sleep)
    h = script(tmp_path, b'redirect "bob@example.net";')
    log = RecordingLog()
    result = run(tmp_path, cfg, log=log)
    assert len(messages(maildir_folder(tmp_path))) == 1
    text = (h / ".dovecot.sieve.log").read_text()
    assert "redirect to <bob@example.net> failed" in text
    assert ("did not finish in 0.5 s" in text) if sleep else (f"exit status {status}: sendmail says no" in text)
    assert "redirected" not in result.where()  # type: ignore[attr-defined]


def test_no_sendmail_keeps_the_message_in_the_inbox(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, sendmail=str(tmp_path / "missing"))
    h = script(tmp_path, b'redirect "bob@example.net";')
    run(tmp_path, cfg)
    assert len(messages(maildir_folder(tmp_path))) == 1
    assert "cannot run" in (h / ".dovecot.sieve.log").read_text()


def test_a_redirect_loop_is_not_sent(tmp_path: Path) -> None:
    """A message that was already delivered to the address (its Delivered-To line) is not sent
    there again: it stays here."""
    cfg = make_config(tmp_path)
    h = script(tmp_path, b'redirect "Bob@example.net";')
    run(tmp_path, cfg, b"Delivered-To: bob@example.net\n" + RAW)
    assert sent(tmp_path) == []
    assert len(messages(maildir_folder(tmp_path))) == 1
    assert "already delivered there" in (h / ".dovecot.sieve.log").read_text()


def test_redirect_of_a_bounce_keeps_the_null_sender(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    script(tmp_path, b'redirect "bob@example.net";')
    src = tmp_path / "in.eml"
    src.write_bytes(RAW)
    fd = os.open(src, os.O_RDONLY)
    try:
        deliver(cfg, FRED, fd, "", log=None)
    finally:
        os.close(fd)
    [(args, _data)] = sent(tmp_path)
    assert args[:3] == ["-oi", "-f", "<>"]


@pytest.mark.parametrize(("key", "value", "message"), [
    ("sendmail", "sendmail", "must be an absolute path"),
    ("sendmail_timeout", 0, "must be more than 0 seconds"),
    ("sendmail_timeout", "10", "must be a number"),
])
def test_redirect_settings_are_checked(tmp_path: Path, key: str, value: object, message: str) -> None:
    from vdeliver.sieve.delivery import settings

    cfg = make_config(tmp_path)
    cfg.tables["sieve"][key] = value
    with pytest.raises(config.ConfigError, match=message):
        settings(cfg)


# -- global scripts and include ------------------------------------------------------------------------


def global_dir(tmp_path: Path, scripts: dict[str, bytes]) -> Path:
    d = tmp_path / "global"
    d.mkdir(exist_ok=True)
    for name, text in scripts.items():
        (d / name).write_bytes(text)
    return d


SPAM = b'require "fileinto";\nif header :contains "subject" "viagra" { fileinto "Junk"; }'


def test_a_before_script_files_spam_and_ends_the_sequence(tmp_path: Path) -> None:
    """Pigeonhole's rule: the user's script runs only when the one before kept."""
    d = global_dir(tmp_path, {"10-spam.sieve": SPAM})
    cfg = make_config(tmp_path, before=str(d))
    script(tmp_path, b'require "fileinto";\nfileinto "Mine";')
    for name in ("Junk", "Mine"):
        maildir.create(str(maildir_folder(tmp_path, name)))
    run(tmp_path, cfg, RAW.replace(b"weekly report", b"cheap viagra"))
    run(tmp_path, cfg)
    assert len(messages(maildir_folder(tmp_path, "Junk"))) == 1
    assert len(messages(maildir_folder(tmp_path, "Mine"))) == 1
    assert messages(maildir_folder(tmp_path)) == []


def test_global_scripts_run_for_a_user_without_a_script(tmp_path: Path) -> None:
    d = global_dir(tmp_path, {"spam.sieve": SPAM, "not-a-script.txt": b"bogus;"})
    cfg = make_config(tmp_path, before=[str(d / "spam.sieve")],
                      after=str(global_dir(tmp_path, {"z.sieve": b'require "imap4flags";\naddflag "\\\\Flagged";'})))
    home(tmp_path)
    for name in ("", "Junk"):
        maildir.create(str(maildir_folder(tmp_path, name)))
    run(tmp_path, cfg, RAW.replace(b"weekly report", b"viagra"))
    run(tmp_path, cfg)
    assert len(messages(maildir_folder(tmp_path, "Junk"))) == 1
    inbox = maildir_folder(tmp_path)
    assert [n[-4:] for n in os.listdir(inbox / "cur")] == [":2,F"]  # the after script ran: the keep stood


def test_a_broken_global_script_is_skipped_and_told_to_syslog_only(tmp_path: Path) -> None:
    d = global_dir(tmp_path, {"broken.sieve": b"bogus;"})
    cfg = make_config(tmp_path, before=str(d))
    h = script(tmp_path, b'require ["fileinto", "mailbox"];\nfileinto :create "Mine";')
    log = RecordingLog()
    run(tmp_path, cfg, log=log)
    assert len(messages(maildir_folder(tmp_path, "Mine"))) == 1
    assert any("broken.sieve" in text and "unknown command 'bogus'; script skipped" in text for _l, text in log.lines)
    assert not (h / ".dovecot.sieve.log").exists() and not (d / "broken.sieve.log").exists()


def test_include_finds_personal_and_global_scripts(tmp_path: Path) -> None:
    d = global_dir(tmp_path, {"spam.sieve": SPAM})
    cfg = make_config(tmp_path, global_dir=str(d))
    h = script(tmp_path, b'require ["include", "fileinto"];\ninclude :global "spam";\ninclude "lists";')
    (h / "sieve" / "lists.sieve").write_bytes(b'require ["fileinto", "mailbox"];\n'
                                              b'if address :is "from" "alice@example.org" {\n'
                                              b'  fileinto :create "Alice";\n}')
    for name in ("", "Junk"):
        maildir.create(str(maildir_folder(tmp_path, name)))
    run(tmp_path, cfg, RAW.replace(b"weekly report", b"viagra"))
    run(tmp_path, cfg)
    assert len(messages(maildir_folder(tmp_path, "Junk"))) == 1
    assert len(messages(maildir_folder(tmp_path, "Alice"))) == 2  # both are from Alice; the spam is in Junk too
    assert messages(maildir_folder(tmp_path)) == []


def test_an_included_link_or_missing_script_keeps_the_mail(tmp_path: Path) -> None:
    """An included script is never a symlink (it could point anywhere the vmail user can read)."""
    cfg = make_config(tmp_path)
    h = script(tmp_path, b'require ["include", "fileinto"];\ninclude "other";\nfileinto "Never";')
    (tmp_path / "outside.sieve").write_bytes(b"discard;")
    (h / "sieve" / "other.sieve").symlink_to(tmp_path / "outside.sieve")
    run(tmp_path, cfg)
    assert len(messages(maildir_folder(tmp_path))) == 1
    assert "included personal script 'other' does not exist" in (h / ".dovecot.sieve.log").read_text()


@pytest.mark.parametrize(("key", "value", "message"), [
    ("before", "relative/path", "must be an absolute path"),
    ("after", ["/ok", 3], "must be a string or a list of strings"),
    ("global_dir", "rel", "must be an absolute path"),
    ("max_cpu_time", 0, "must be more than 0 seconds"),
])
def test_global_script_settings_are_checked(tmp_path: Path, key: str, value: object, message: str) -> None:
    from vdeliver.sieve.delivery import settings

    cfg = make_config(tmp_path)
    cfg.tables["sieve"][key] = value
    with pytest.raises(config.ConfigError, match=message):
        settings(cfg)


def test_dovecot_config_names_the_same_global_scripts(tmp_path: Path) -> None:
    from vdeliver.accounts import dovecot

    cfg = make_config(tmp_path, before=["/etc/vdeliver/sieve/before.d", "/etc/vdeliver/spam.sieve"],
                      after="/etc/vdeliver/after.sieve", global_dir="/etc/vdeliver/sieve/global")
    conf = dovecot.render_files(cfg, lookup_uid=False)["conf.d/90-vdeliver-sieve.conf"]
    assert "  sieve_before = /etc/vdeliver/sieve/before.d\n  sieve_before2 = /etc/vdeliver/spam.sieve\n" in conf
    assert "  sieve_after = /etc/vdeliver/after.sieve\n" in conf
    assert "  sieve_global = /etc/vdeliver/sieve/global\n" in conf


# -- special-use (RFC 8579) -------------------------------------------------------------------------------


def test_fileinto_specialuse_finds_the_folder_by_its_flag(tmp_path: Path) -> None:
    """`fileinto :specialuse "\\Junk" "Spam"` stores into the folder [sieve] special_use names for
    \\Junk when it exists, and into "Spam" (with its :create) when it does not."""
    text = b'require ["fileinto", "special-use", "mailbox"];\nfileinto :specialuse "\\\\Junk" :create "Spam";'
    cfg = make_config(tmp_path, special_use={"\\Junk": "Junk Mail"})
    script(tmp_path, text)
    maildir.create(str(maildir_folder(tmp_path)))
    run(tmp_path, cfg)
    assert len(messages(maildir_folder(tmp_path, "Spam"))) == 1  # no "Junk Mail" yet: the named folder
    maildir.create(str(maildir_folder(tmp_path, "Junk Mail")))
    run(tmp_path, cfg)
    assert len(messages(maildir_folder(tmp_path, "Junk Mail"))) == 1
    assert len(messages(maildir_folder(tmp_path, "Spam"))) == 1


def test_specialuse_exists(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)  # Debian's defaults: \Junk is "Junk"
    script(tmp_path, b'require ["fileinto", "special-use"];\n'
                     b'if specialuse_exists "\\\\Junk" { fileinto "Yes"; }\n'
                     b'if specialuse_exists "Junk" ["\\\\Junk"] { fileinto "Also"; }\n'
                     b'if specialuse_exists "INBOX" "\\\\Junk" { fileinto "Never"; }')
    for name in ("", "Junk", "Yes", "Also", "Never"):
        maildir.create(str(maildir_folder(tmp_path, name)))
    run(tmp_path, cfg)
    assert [len(messages(maildir_folder(tmp_path, n))) for n in ("Yes", "Also", "Never")] == [1, 1, 0]


@pytest.mark.parametrize("value", [{"Junk": "Spam"}, {"\\Junk": ""}, "Junk"])
def test_special_use_settings_are_checked(tmp_path: Path, value: object) -> None:
    from vdeliver.sieve.delivery import settings

    cfg = make_config(tmp_path)
    cfg.tables["sieve"]["special_use"] = value
    with pytest.raises(config.ConfigError, match="special_use"):
        settings(cfg)


def test_dovecot_lists_the_special_use_folder_vdeliver_filed_into(vmail: Account) -> None:
    """The namespace block `vmailctl dovecot-config` writes gives Dovecot the same folder for
    \\Junk as vdeliver's [sieve] special_use: LIST (SPECIAL-USE) shows it, holding the message."""
    from vdeliver.accounts import dovecot as generated

    require_root("Dovecot's mail processes switch to the vmail user")
    root = MailRoot(world_tmpdir(), vmail)
    try:
        passwd = root.base / "passwd"
        md = root.add_maildir("home.com", "fred")
        passwd.write_text(f"fred@home.com:s3cret:{vmail.uid}:{vmail.gid}::{root.home}/home.com/fred::"
                          "userdb_mail=maildir:~/Maildir\n")
        passwd.chmod(0o644)
        cfg = root.write_config()
        cfg.write_text(cfg.read_text() + '\n[sieve]\nenabled = true\n\n[sieve.special_use]\n"\\\\Junk" = "Spam Box"\n')
        (md.parent / "sieve").mkdir()
        (md.parent / "sieve" / "main.sieve").write_bytes(b'require ["fileinto", "special-use", "mailbox"];\n'
                                                         b'fileinto :specialuse "\\\\Junk" :create "Spam";')
        (md.parent / ".dovecot.sieve").symlink_to("sieve/main.sieve")
        maildir.create(str(md / ".Spam Box"))
        for path in (md.parent / "sieve", md.parent / "sieve" / "main.sieve", *(md / ".Spam Box").rglob("*"),
                     md / ".Spam Box"):
            os.chown(path, vmail.uid, vmail.gid)
        os.lchown(md.parent / ".dovecot.sieve", vmail.uid, vmail.gid)
        done = run_vdeliver(["-f", "alice@example.org", "-a", "home.com", "-a", "fred"], RAW, config=cfg,
                            as_user=vmail)
        assert done.returncode == 0, done.stderr
        conf = generated.render_files(config.load(str(cfg)), lookup_uid=False)["conf.d/90-vdeliver-sieve.conf"]
        namespace = conf[conf.index("namespace inbox {"):]
        with Dovecot(root, vmail, auth=passwd_file_auth(passwd), extra=namespace) as dc:
            imap = dc.login("fred@home.com", "s3cret")
            try:
                status, listed = imap.list()
                junk = [line for line in listed if isinstance(line, bytes) and b"\\Junk" in line]
                assert status == "OK" and len(junk) == 1 and b"Spam Box" in junk[0], listed
                status, data = imap.select('"Spam Box"', readonly=True)
                assert status == "OK" and data[0] == b"1", data
            finally:
                imap.logout()
    finally:
        import shutil

        shutil.rmtree(root.base, ignore_errors=True)


def test_create_subscribes_the_new_folder_once(tmp_path: Path) -> None:
    """Dovecot's subscriptions file: its version 2 form for a new file; the old form (a name a
    line) kept as it is; a folder already there is not added twice."""
    cfg = make_config(tmp_path)
    script(tmp_path, b'require ["fileinto", "mailbox"];\nfileinto :create "Work.Caf\xc3\xa9";')
    run(tmp_path, cfg)
    subs = maildir_folder(tmp_path) / "subscriptions"
    assert subs.read_bytes() == b"V\t2\n\nWork\tCaf&AOk-\n"
    import shutil

    shutil.rmtree(maildir_folder(tmp_path, "Work.Caf&AOk-"))
    subs.write_bytes(b"Old.Name\n")
    run(tmp_path, cfg)
    assert subs.read_bytes() == b"Old.Name\nWork.Caf&AOk-\n"
    run(tmp_path, cfg)  # the folder exists now: nothing is created, nothing subscribed
    assert subs.read_bytes() == b"Old.Name\nWork.Caf&AOk-\n"
    assert not (maildir_folder(tmp_path) / "subscriptions.lock").exists()


def test_mbox_create_subscribes_under_home_mail(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, fmt="mbox")
    h = script(tmp_path, b'require ["fileinto", "mailbox"];\nfileinto :create "Lists/dev";')
    (tmp_path / "mbox" / "example.org").mkdir(parents=True)
    run(tmp_path, cfg)
    assert (h / "mail" / ".subscriptions").read_bytes() == b"V\t2\n\nLists\tdev\n"


def test_a_script_that_creates_too_many_folders_keeps_the_mail_in_the_inbox(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, max_create=3)
    h = script(tmp_path, b'require ["fileinto", "mailbox"];\n' +
               b"".join(b'fileinto :create "F%d";\n' % i for i in range(4)))
    run(tmp_path, cfg)
    assert len(messages(maildir_folder(tmp_path))) == 1
    assert sorted(os.listdir(maildir_folder(tmp_path))) == ["cur", "new", "tmp"]  # no folder made
    assert "creates 4 folders for one message, more than 3" in (h / ".dovecot.sieve.log").read_text()
    script(tmp_path, b'require ["fileinto", "mailbox"];\n' +
           b"".join(b'fileinto :create "F%d";\n' % i for i in range(3)))
    run(tmp_path, cfg)
    assert all(len(messages(maildir_folder(tmp_path, f"F{i}"))) == 1 for i in range(3))


def test_recipients_of_one_message_share_one_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The LMTP server's transaction passes one dict for all its recipients: the message is
    parsed once, and each script still sees its own recipient's Delivered-To line."""
    from vdeliver.sieve import interpreter

    cfg = make_config(tmp_path)
    users = ("fred", "wilma", "barney")
    for user in users:
        h = tmp_path / "home" / "example.org" / user
        (h / "sieve").mkdir(parents=True)
        (h / "sieve" / "main.sieve").write_bytes(
            b'require ["fileinto", "mailbox"];\nif header :is "delivered-to" "' + user.encode() +
            b'@example.org" { fileinto :create "Mine"; }')
        (h / ".dovecot.sieve").symlink_to("sieve/main.sieve")
    parsed: list[bytes] = []
    real = interpreter.Message.from_bytes.__func__  # type: ignore[attr-defined]

    def counting(cls: type, data: bytes) -> object:
        parsed.append(data)
        return real(cls, data)

    monkeypatch.setattr(interpreter.Message, "from_bytes", classmethod(counting))
    src = tmp_path / "in.eml"
    src.write_bytes(RAW)
    shared: dict[str, object] = {}
    for user in users:
        fd = os.open(src, os.O_RDONLY)
        try:
            deliver(cfg, Recipient("example.org", user), fd, "alice@example.org", shared=shared)
        finally:
            os.close(fd)
        folder = tmp_path / "home" / "example.org" / user / "Maildir" / ".Mine"
        assert len(messages(folder)) == 1, user
    assert sum(b"Subject: weekly report" in data for data in parsed) == 1  # the message itself, once


# -- editheader at delivery ----------------------------------------------------------------------------


def test_editheader_changes_what_is_stored_and_sent(tmp_path: Path) -> None:
    """Every copy (the folder, the INBOX, the redirect) carries the edited header; the body is
    as it came; our Delivered-To stays, so the loop protection stays."""
    cfg = make_config(tmp_path)
    script(tmp_path, b'require ["editheader", "fileinto", "mailbox", "copy"];\n'
                     b'addheader "X-Filed" "by sieve";\ndeleteheader "subject";\n'
                     b'deleteheader "delivered-to";\n'
                     b'fileinto :create "Work";\nredirect :copy "bob@example.net";\nkeep;')
    run(tmp_path, cfg, RAW + b"From the body\n")
    [folder] = messages(maildir_folder(tmp_path, "Work"))
    [inbox] = messages(maildir_folder(tmp_path))
    [(_args, sent_copy)] = sent(tmp_path)
    for copy in (folder, inbox, sent_copy):
        head, _, body = copy.partition(b"\n\n")
        assert b"X-Filed: by sieve" in head and b"Subject:" not in head
        assert b"Delivered-To: fred@example.org" in head
        assert body == b"hello\nFrom the body\n"


def test_editheader_cannot_set_mbox_state(tmp_path: Path) -> None:
    """An mbox reader keeps flags in Status / X-Status / X-Keywords: a script cannot add them."""
    cfg = make_config(tmp_path, fmt="mbox")
    script(tmp_path, b'require "editheader";\naddheader "Status" "RO";\naddheader "X-Keywords" "x";\n'
                     b'addheader "X-Ok" "yes";')
    (tmp_path / "mbox" / "example.org").mkdir(parents=True)
    run(tmp_path, cfg)
    data = (tmp_path / "mbox" / "example.org" / "fred").read_bytes()
    assert b"X-Ok: yes" in data and b"\nStatus:" not in data and b"X-Keywords" not in data
    assert data.startswith(b"From alice@example.org ") and data.endswith(b"hello\n\n")


def test_sieve_runs_unless_switched_off(tmp_path: Path) -> None:
    """No [sieve] table at all: users' scripts run (the default); `enabled = false` stops them."""
    base = {"format": "maildir", "maildir_path": f"{tmp_path}/home/{{domain}}/{{user}}/Maildir",
            "spool_dir": str(tmp_path), "hostname": "unit.test", "log": "none", "create_mailbox": True}
    script(tmp_path, b"discard;")
    run(tmp_path, config.build(base))
    assert messages(maildir_folder(tmp_path)) == []
    run(tmp_path, config.build({**base, "sieve": {"enabled": False}}))
    assert len(messages(maildir_folder(tmp_path))) == 1


@pytest.mark.peers
def test_dovecot_never_lists_an_mbox_crash_journal_as_a_folder(vmail: Account) -> None:
    """Every mbox vdeliver writes keeps its crash journal beside it for good, also an mbox
    folder in ~/mail where Dovecot lists folders: Dovecot must show the folders, never a
    journal.  Named `.<mbox>.vdeliver-journal` it was listed as a folder; ending in `.lock`
    (`.<mbox>.vdeliver-journal.lock`) Dovecot takes it for an internal name."""
    from vdeliver import recovery

    require_root("Dovecot's mail processes switch to the vmail user")
    root = MailRoot(world_tmpdir(), vmail)
    try:
        passwd = root.base / "passwd"
        inbox = root.add_mbox("away.com", "wilma")
        home_dir = root.home / "away.com" / "wilma"
        passwd.write_text(f"wilma@away.com:s3cret:{vmail.uid}:{vmail.gid}::{home_dir}::\n")
        passwd.chmod(0o644)
        cfg = root.write_config()
        cfg.write_text(cfg.read_text() + "\n[sieve]\nenabled = true\n")
        (home_dir / "sieve").mkdir(parents=True, exist_ok=True)
        (home_dir / "sieve" / "main.sieve").write_bytes(b'require ["fileinto", "mailbox"];\n'
                                                        b'fileinto :create "Lists"; keep;')
        (home_dir / ".dovecot.sieve").symlink_to("sieve/main.sieve")
        for path in (home_dir, home_dir / "sieve", home_dir / "sieve" / "main.sieve"):
            os.chown(path, vmail.uid, vmail.gid)
        os.lchown(home_dir / ".dovecot.sieve", vmail.uid, vmail.gid)
        for _ in range(2):
            done = run_vdeliver(["-f", "alice@example.org", "-a", "away.com", "-a", "wilma"], RAW, config=cfg,
                                as_user=vmail)
            assert done.returncode == 0, done.stderr
        folder = home_dir / "mail" / "Lists"
        assert recovery.state(str(inbox)) == "idle" and recovery.state(str(folder)) == "idle"
        with Dovecot(root, vmail, auth=passwd_file_auth(passwd)) as dc:
            imap = dc.login("wilma@away.com", "s3cret")
            try:
                listed = [line for line in imap.list('""', "*")[1] if isinstance(line, bytes)]
                names = sorted(line.rsplit(b" ", 1)[-1].strip(b'"') for line in listed)
                typ, data = imap.select("Lists")
                assert typ == "OK" and data[0] == b"2", data
                # Nor can a user make a folder by a journal's name (vdeliver would find it there).
                typ, data = imap.create(".Lists.vdeliver-journal.lock")
                assert typ == "NO", data
            finally:
                imap.logout()
            log = dc.log_text()
        assert names == [b"INBOX", b"Lists"], listed
        assert not bad_log_lines(log), log
    finally:
        shutil.rmtree(root.base, ignore_errors=True)

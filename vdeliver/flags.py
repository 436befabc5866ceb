"""IMAP flags stored with a new message, where Dovecot reads them (a Sieve script's imap4flags).

- **Maildir**: system flags are info letters (`cur/NAME:2,FS`); keywords are the letters
  `a`..`z`, each named by a line `N name` in the folder's `dovecot-keywords` file.  A keyword
  the file lacks is added in the first free slot, as Dovecot adds one: under Dovecot's
  `dovecot-uidlist.lock` (Dovecot adds keywords only while it holds it) and its
  `dovecot-keywords.lock` dotlock, written into the lock file and renamed over the old one,
  the mtime made to grow (Dovecot re-reads the file only when its mtime changes).  There are
  26 slots, as in Dovecot; a keyword past them is not stored.
- **mbox**: `Status: R` for \\Seen, `X-Status:` with A (\\Answered), F (\\Flagged),
  T (\\Draft) and D (\\Deleted), and `X-Keywords:` with the keywords, written after the From_
  line.  Dovecot reads an X-Keywords keyword only if the mailbox's first message names it in
  its `X-IMAPbase` line (else it deletes the line); adding one there means rewriting the
  mailbox's first message, which a delivery does not do, so a keyword the mbox does not
  know yet is not stored (the log says so).  The message's own lines of these names were
  taken out when it was read (message.py): a sender never sets a flag.

A flag that is neither a system flag nor a valid keyword (an IMAP atom, RFC 3501) is not
stored.  Names are compared case-insensitively, as IMAP and Dovecot compare them.
"""

from __future__ import annotations

import errno
import os
import time

SYSTEM = {"\\seen": "\\Seen", "\\answered": "\\Answered", "\\flagged": "\\Flagged", "\\deleted": "\\Deleted",
          "\\draft": "\\Draft"}
MAILDIR_LETTERS = {"\\Draft": "D", "\\Flagged": "F", "\\Answered": "R", "\\Seen": "S", "\\Deleted": "T"}
MAX_KEYWORDS = 26  # Maildir letters a..z
KEYWORDS_FILE = "dovecot-keywords"
UIDLIST_LOCK = "dovecot-uidlist.lock"
STALE = 120.0  # seconds: a lock this old was left by a process that died (Dovecot's own value)
LOCK_WAIT = 10.0  # seconds to wait for Dovecot's locks before storing without the keywords
_NOT_ATOM = set('(){ %*"\\]')


def split(flags: tuple[str, ...] | list[str]) -> tuple[list[str], list[str]]:
    """(system flags, keywords), each once, in the order given; flags that are neither dropped."""
    system: list[str] = []
    keywords: list[str] = []
    seen: set[str] = set()
    for flag in flags:
        key = flag.lower()
        if key in seen:
            continue
        seen.add(key)
        if key in SYSTEM:
            system.append(SYSTEM[key])
        elif is_keyword(flag):
            keywords.append(flag)
    return system, keywords


def is_keyword(flag: str) -> bool:
    """An IMAP atom (RFC 3501 9): printable ASCII without specials; not a system flag."""
    return bool(flag) and len(flag) <= 255 and all(33 <= ord(c) <= 126 and c not in _NOT_ATOM for c in flag)


def valid_special_use(flag: str) -> bool:
    """RFC 6154 / RFC 8579: a special-use flag is a backslash and an IMAP atom (`\\Junk`)."""
    return len(flag) > 1 and flag[0] == "\\" and is_keyword(flag[1:])


# -- mbox -----------------------------------------------------------------------------------------


def mbox_header(flags: tuple[str, ...] | list[str], known: dict[str, str] | None = None,
                notes: list[str] | None = None) -> bytes:
    """The Status / X-Status / X-Keywords lines for a new message ("" when there are none).
    `known` (lower case -> name): the keywords the mbox's X-IMAPbase line names, the only
    ones Dovecot accepts in X-Keywords (it deletes the line when it names another); the
    others are not stored, and `notes` says so."""
    system, wanted = split(flags)
    known = known or {}
    keywords = [known[k.lower()] for k in wanted if k.lower() in known]
    if notes is not None and len(keywords) < len(wanted):
        notes.append("keywords not stored (an mbox takes only those its X-IMAPbase line names): " +
                     " ".join(k for k in wanted if k.lower() not in known))
    lines = b""
    if "\\Seen" in system:
        lines += b"Status: R\n"
    x_status = "".join(letter for flag, letter in (("\\Answered", "A"), ("\\Flagged", "F"), ("\\Draft", "T"),
                                                     ("\\Deleted", "D")) if flag in system)
    if x_status:
        lines += b"X-Status: " + x_status.encode("ascii") + b"\n"
    if keywords:
        lines += b"X-Keywords: " + " ".join(keywords).encode("ascii") + b"\n"
    return lines


def mbox_keywords(path: str) -> dict[str, str]:
    """The keywords the mbox's first message names in its X-IMAPbase line (Dovecot's list,
    `X-IMAPbase: UIDVALIDITY UIDNEXT keyword...`), lower case -> name; empty when none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        head = os.read(fd, 1 << 16)
    except OSError:
        return {}
    finally:
        os.close(fd)
    end = head.find(b"\n\n")
    lines = head[: end if end >= 0 else len(head)].split(b"\n")
    for i, line in enumerate(lines):
        if line[:11].lower() == b"x-imapbase:":
            value = line[11:]
            for more in lines[i + 1:]:  # folded onto the next lines when long
                if more[:1] not in (b" ", b"\t"):
                    break
                value += b" " + more
            words = value.decode("ascii", "replace").split()[2:]
            return {w.lower(): w for w in words if is_keyword(w)}
    return {}


# -- Maildir --------------------------------------------------------------------------------------


def maildir_info(path: str, flags: tuple[str, ...] | list[str], notes: list[str] | None = None) -> str:
    """The info letters (after `:2,`) for a new message in the Maildir at `path`: system
    letters, then keyword letters, in ASCII order.  Keywords `dovecot-keywords` lacks are
    added; when that cannot be done (locks held past LOCK_WAIT, a full table, an I/O error)
    the message is stored without them and `notes` says why."""
    system, keywords = split(flags)
    letters = {MAILDIR_LETTERS[f] for f in system}
    if keywords:
        try:
            slots = _keyword_slots(path, keywords)
        except OSError as exc:
            slots = {}
            if notes is not None:
                notes.append(f"keywords not stored in {path}: {exc.strerror or exc}")
        letters.update(chr(ord("a") + i) for i in slots.values())
        if notes is not None and keywords and 0 < len(slots) < len(keywords):
            notes.append(f"keywords not stored in {path}: more than {MAX_KEYWORDS} keywords")
    return "".join(sorted(letters))


def read_keywords(path: str) -> dict[int, str]:
    """Slot -> name, from the folder's dovecot-keywords (empty when there is none)."""
    try:
        fd = os.open(os.path.join(path, KEYWORDS_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    try:
        data = b""
        while len(data) < 1 << 16:  # 26 names of an atom each: a bigger file is not Dovecot's
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    table: dict[int, str] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        number, sep, name = line.partition(" ")
        if sep and name and number.isdigit() and int(number) < MAX_KEYWORDS:
            table[int(number)] = name
    return table


def _keyword_slots(path: str, keywords: list[str]) -> dict[str, int]:
    """keyword -> its slot, adding the missing ones to dovecot-keywords under Dovecot's locks."""
    found = _lookup(read_keywords(path), keywords)
    if len(found) == len(keywords):
        return found
    with DotLock(os.path.join(path, UIDLIST_LOCK)), DotLock(os.path.join(path, KEYWORDS_FILE + ".lock")) as lock:
        table = read_keywords(path)  # again, under the locks
        found = _lookup(table, keywords)
        free = [i for i in range(MAX_KEYWORDS) if i not in table]
        for keyword in keywords:
            if keyword not in found and free:
                slot = free.pop(0)
                table[slot] = keyword
                found[keyword] = slot
        text = "".join(f"{i} {table[i]}\n" for i in sorted(table)).encode("utf-8")
        lock.replace(os.path.join(path, KEYWORDS_FILE), text)
    return found


def _lookup(table: dict[int, str], keywords: list[str]) -> dict[str, int]:
    by_name = {name.lower(): slot for slot, name in table.items()}
    return {k: by_name[k.lower()] for k in keywords if k.lower() in by_name}


class DotLock:
    """A dotlock as Dovecot's file_dotlock makes one: the lock file created with O_EXCL,
    waited for up to LOCK_WAIT seconds, broken when older than STALE seconds."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> DotLock:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                return self
            except FileExistsError:
                try:
                    if time.time() - os.lstat(self.path).st_mtime > STALE:
                        os.unlink(self.path)
                        continue
                except FileNotFoundError:
                    continue
            if time.monotonic() >= deadline:
                raise OSError(errno.EAGAIN, f"{os.path.basename(self.path)} held for more than {LOCK_WAIT:g} s")
            time.sleep(0.05)

    def replace(self, target: str, data: bytes) -> None:
        """Write `data` into the lock file and rename it over `target` (the lock goes with it),
        its mtime past the old file's, so that Dovecot sees the change."""
        from vdeliver.fileio import fsync_dir, write_all

        write_all(self.fd, data)
        try:
            old = os.stat(target).st_mtime
        except FileNotFoundError:
            old = 0.0
        now = time.time()
        mtime = max(float(int(now)), float(int(old)) + 1)
        os.utime(self.fd, (now, mtime))
        os.fsync(self.fd)
        os.rename(self.path, target)
        self.path = ""
        fsync_dir(os.path.dirname(target))

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass

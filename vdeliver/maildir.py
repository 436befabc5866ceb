"""Deliver one prepared message into a Maildir, with Maildir++ quota.

1. write tmp/<name> (O_EXCL), fsync it;
2. link() it to new/<name> (a clash picks a new name), fsync new/ so the entry
   survives a power cut (mpop#8), unlink the tmp file.
Any failure removes the tmp file.  Names follow Dovecot:
`<secs>.M<usecs>P<pid>R<random>.<host>,S=<size>,W=<size with CRLF>`.

Maildir++ quota: `maildirsize` holds `<bytes>S,<count>C` on its first line and one
`<bytes> <count>` line per change.  A message that would exceed the quota is
refused; after delivery a `<size> 1` line is appended.  A file that has grown past
5120 bytes is recalculated from the directory, as the Maildir++ rules ask.
"""

import errno
import os
import stat
import time

from vdeliver.errors import DeliveryError, Status, status_for_errno
from vdeliver.message import Prepared, _write_all

SUBDIRS = ("tmp", "new", "cur")
QUOTA_FILE = "maildirsize"
QUOTA_REBUILD_AT = 5120
CLEAN_ODDS = 8  # out of 256: tmp/ is swept for old files on about 1 delivery in 32


class MaildirError(DeliveryError):
    pass


def _fail(reason: str, detail: str, dsn: str = "4.3.0") -> MaildirError:
    return MaildirError(Status(dsn, reason, detail))


def escape_host(host: str) -> str:
    return host.replace("/", "\\057").replace(":", "\\072")


def unique_name(host: str, size: int, rfc822_size: int) -> str:
    now = time.time()
    secs = int(now)
    usecs = int((now - secs) * 1_000_000)
    rnd = os.urandom(6).hex()
    return f"{secs}.M{usecs}P{os.getpid()}R{rnd}.{escape_host(host)},S={size},W={rfc822_size}"


def is_maildir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(os.path.join(path, "new")).st_mode)
    except OSError:
        return False


def create(path: str) -> None:
    """Create the Maildir and its parents (0700)."""
    try:
        os.makedirs(path, 0o700, exist_ok=True)
        for sub in SUBDIRS:
            try:
                os.mkdir(os.path.join(path, sub), 0o700)
            except FileExistsError:
                pass
    except OSError as exc:
        raise _fail("cannot create mailbox", f"{path}: {exc.strerror}") from None


def _check_dir(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise _fail("user unknown", f"no mailbox {path}", "5.1.1") from None
    except OSError as exc:
        raise _fail("cannot open mailbox", f"{path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise _fail("mailbox is a symbolic link", path)
    if not stat.S_ISDIR(st.st_mode):
        raise _fail("mailbox is not a Maildir", f"{path} is not a directory")
    for sub in ("tmp", "new"):
        try:
            sst = os.lstat(os.path.join(path, sub))
        except OSError as exc:
            raise _fail("mailbox is not a Maildir", f"{path}/{sub}: {exc.strerror}") from None
        if not stat.S_ISDIR(sst.st_mode):
            raise _fail("mailbox is not a Maildir", f"{path}/{sub} is not a directory")
    if st.st_uid != os.geteuid():
        raise _fail("mailbox has the wrong owner", f"{path}: uid {st.st_uid}, we are {os.geteuid()}")


# -- Maildir++ quota -------------------------------------------------------------


def parse_quota_definition(line: str) -> "tuple[int, int]":
    """`1000000S,1000C` -> (1000000, 1000); 0 means no limit."""
    limit_bytes = limit_count = 0
    for part in line.strip().split(","):
        part = part.strip()
        if not part:
            continue
        unit, digits = part[-1:], part[:-1]
        if not digits.isdigit():
            continue
        if unit == "S":
            limit_bytes = int(digits)
        elif unit == "C":
            limit_count = int(digits)
    return limit_bytes, limit_count


def read_quota(path: str) -> "tuple[int, int, int, int, int] | None":
    """(limit_bytes, limit_count, used_bytes, used_count, file_size), or None."""
    try:
        with open(os.path.join(path, QUOTA_FILE), "rb") as f:
            data = f.read(1 << 20)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _fail("cannot read quota", f"{path}/{QUOTA_FILE}: {exc.strerror}") from None
    lines = data.decode("ascii", "replace").split("\n")
    limit_bytes, limit_count = parse_quota_definition(lines[0])
    used_bytes = used_count = 0
    for line in lines[1:]:
        fields = line.split()
        if len(fields) == 2:
            try:
                used_bytes += int(fields[0])
                used_count += int(fields[1])
            except ValueError:
                continue
    return limit_bytes, limit_count, used_bytes, used_count, len(data)


def _size_from_name(name: str) -> "int | None":
    for part in name.split(":", 1)[0].split(",")[1:]:
        if part.startswith("S=") and part[2:].isdigit():
            return int(part[2:])
    return None


def recalculate(path: str, definition: str) -> "tuple[int, int]":
    """Rebuild maildirsize from the messages in new/ and cur/ of every folder."""
    used_bytes = used_count = 0
    folders = [path] + [
        os.path.join(path, d) for d in os.listdir(path) if d.startswith(".") and d not in (".", "..")
    ]
    for folder in folders:
        if folder != path and os.path.basename(folder) == ".Trash":
            continue
        for sub in ("new", "cur"):
            try:
                names = os.listdir(os.path.join(folder, sub))
            except OSError:
                continue
            for name in names:
                size = _size_from_name(name)
                if size is None:
                    try:
                        size = os.stat(os.path.join(folder, sub, name)).st_size
                    except OSError:
                        continue
                used_bytes += size
                used_count += 1
    tmp = os.path.join(path, "tmp", f"{QUOTA_FILE}.{os.getpid()}.{os.urandom(4).hex()}")
    content = f"{definition.strip()}\n{used_bytes} {used_count}\n".encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(path, QUOTA_FILE))
    return used_bytes, used_count


def check_quota(path: str, size: int, over_quota_bounce: bool) -> bool:
    """Refuse a message over quota; True when maildirsize exists and must be updated."""
    quota = read_quota(path)
    if quota is None:
        return False
    limit_bytes, limit_count, used_bytes, used_count, file_size = quota
    if file_size >= QUOTA_REBUILD_AT:
        with open(os.path.join(path, QUOTA_FILE), "rb") as f:
            definition = f.readline().decode("ascii", "replace")
        try:
            used_bytes, used_count = recalculate(path, definition)
        except OSError:
            pass
    if (limit_bytes and used_bytes + size > limit_bytes) or (limit_count and used_count + 1 > limit_count):
        dsn = "5.2.2" if over_quota_bounce else "4.2.2"
        raise _fail(
            "mailbox full",
            f"{path}: quota {limit_bytes}S,{limit_count}C, used {used_bytes}S,{used_count}C, message {size}",
            dsn,
        )
    return True


def _add_to_quota(path: str, size: int) -> None:
    try:
        fd = os.open(os.path.join(path, QUOTA_FILE), os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, f"{size} 1\n".encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def deliver(
    path: str,
    msg: Prepared,
    *,
    host: str,
    create_missing: bool = False,
    over_quota_bounce: bool = False,
    before_link: "object" = None,
    tmp_max_age: int = 0,
) -> str:
    """Store msg in the Maildir at path; returns the new file's name."""
    if create_missing and not os.path.lexists(path):
        create(path)
    _check_dir(path)
    tmpdir = os.path.join(path, "tmp")
    newdir = os.path.join(path, "new")
    leftover = _linked_leftover(tmpdir, msg)
    if leftover is not None:
        # sendmail's retry of a delivery killed between link() and unlink(): the message
        # is already in the Maildir.  Finish that delivery instead of storing a copy.
        _remove(leftover)
        if os.path.exists(os.path.join(path, QUOTA_FILE)):
            _add_to_quota(path, msg.length)
        return os.path.basename(leftover)
    update_quota = check_quota(path, msg.length, over_quota_bounce)
    for _attempt in range(10):
        name = unique_name(host, msg.length, msg.rfc822_size)
        tmp = os.path.join(tmpdir, name)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            raise _fail("cannot write mailbox", f"{tmpdir}: {exc.strerror}") from None
        try:
            try:
                for chunk in msg.spool.chunks():
                    _write_all(fd, chunk)
                os.fsync(fd)
            finally:
                os.close(fd)
            if before_link is not None:
                before_link()  # type: ignore[operator]
            final = os.path.join(newdir, name)
            try:
                os.link(tmp, final)
            except FileExistsError:
                os.unlink(tmp)
                continue
            try:
                _fsync_dir(newdir)
            except OSError:
                _remove(final)  # not acknowledged: sendmail will try again
                raise
        except OSError as exc:
            _remove(tmp)
            raise MaildirError(status_for_errno(exc.errno or errno.EIO, path, over_quota_bounce)) from None
        except BaseException:
            _remove(tmp)
            raise
        _remove(tmp)
        if update_quota:
            _add_to_quota(path, msg.length)
        if tmp_max_age > 0 and os.urandom(1)[0] < CLEAN_ODDS:
            clean_tmp(tmpdir, tmp_max_age)
        return name
    raise _fail("cannot write mailbox", f"{newdir}: no unique name after 10 tries")


def clean_tmp(tmpdir: str, max_age: int, now: "float | None" = None) -> int:
    """Remove files older than max_age from tmp/ (left by killed deliveries).

    The Maildir convention: a tmp/ file neither written nor read for 36 hours is
    garbage.  Called on about one delivery in 256/CLEAN_ODDS, so its cost (one
    directory read) is not paid on every delivery; a delivery in progress keeps
    its file's mtime fresh.
    """
    cutoff = (time.time() if now is None else now) - max_age
    removed = 0
    try:
        entries = os.scandir(tmpdir)
    except OSError:
        return 0
    with entries:
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and max(st.st_mtime, st.st_atime) < cutoff:
                try:
                    os.unlink(entry.path)
                    removed += 1
                except OSError:
                    pass
    return removed


def _linked_leftover(tmpdir: str, msg: Prepared) -> "str | None":
    """A tmp/ file with a second link (in new/ or cur/) holding exactly this record.

    Only a delivery killed after link() and before unlink() leaves one; tmp/ is
    normally empty, so this costs one directory read.  The size in our file names
    filters the candidates before any byte is compared.
    """
    try:
        names = os.listdir(tmpdir)
    except OSError:
        return None
    marker = f",S={msg.length},"
    for name in names:
        if marker not in name:
            continue
        candidate = os.path.join(tmpdir, name)
        try:
            st = os.lstat(candidate)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_nlink < 2 or st.st_size != msg.length:
            continue
        if _same_bytes(candidate, msg):
            return candidate
    return None


def _same_bytes(path: str, msg: Prepared) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        offset = 0
        for chunk in msg.spool.chunks():
            if os.pread(fd, len(chunk), offset) != chunk:
                return False
            offset += len(chunk)
        return os.pread(fd, 1, offset) == b""
    except OSError:
        return False
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

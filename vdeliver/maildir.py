"""Deliver one prepared message into a Maildir, with Maildir++ quota.

1. write tmp/<name> (O_EXCL), fsync it (a record spooled to an unnamed file on this
   file system is not copied: that file is linked in as tmp/<name>, message.Spool.link_into);
2. link() it to new/<name> (a clash picks a new name), fsync new/ so the entry
   survives a power cut (mpop#8), unlink the tmp file.
Any failure removes the tmp file.  Every step after the first open is relative to
directory descriptors of the Maildir, tmp/ and new/ (opened O_NOFOLLOW): the
vmail user owns these directories, and a path checked once could name another
place by the time of the link().  Once new/ is synced, nothing (quota
bookkeeping, tmp/ cleaning) can turn the delivery into a failure.  Names follow Dovecot:
`<secs>.M<usecs>P<pid>R<random>.<host>,S=<size>,W=<size with CRLF>`.

Maildir++ quota: `maildirsize` holds `<bytes>S,<count>C` on its first line and one
`<bytes> <count>` line per change.  A message that would exceed the quota is
refused; after delivery a `<size> 1` line is appended.  A file that has grown past
5120 bytes is recalculated from the directory, as the Maildir++ rules ask.

Over 400 lines on purpose: delivery, the Maildir++ quota and the recognition of a delivery
killed between link() and unlink() share the directory descriptors and naming rules.
"""

import _stat as stat  # the C module: `stat` is a Python module over it, 50 us more a process
import errno
import posix as os  # not `os`, which costs 1 ms a process: see vdeliver/fileio.py
import time

from vdeliver.errors import DeliveryError, fail, status_for_errno
from vdeliver.fileio import basename, join, lexists, makedirs, write_all, write_new
from vdeliver.message import Prepared, Spool

TYPE_CHECKING = False  # typing costs an import on the hot path; mypy knows this name
if TYPE_CHECKING:
    from vdeliver.hooks import Hook

SUBDIRS = ("tmp", "new", "cur")
QUOTA_FILE = "maildirsize"
QUOTA_REBUILD_AT = 5120
CLEAN_ODDS = 8  # out of 256: tmp/ is swept for old files on about 1 delivery in 32




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
        return stat.S_ISDIR(os.stat(join(path, "new")).st_mode)
    except OSError:
        return False


def create(path: str) -> None:
    """Create the Maildir and its parents (0700)."""
    try:
        makedirs(path, 0o700)
        for sub in SUBDIRS:
            try:
                os.mkdir(join(path, sub), 0o700)
            except FileExistsError:
                pass
    except OSError as exc:
        raise fail("cannot create mailbox", f"{path}: {exc.strerror}") from None


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _open_dir(path: str) -> int:
    """The Maildir itself, opened without following a link; every later step is relative to
    this descriptor (or to tmp/'s and new/'s), so a directory swapped for a symbolic link
    after the checks cannot redirect the message."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        raise fail("user unknown", f"no mailbox {path}", "5.1.1") from None
    except OSError as exc:
        if _is_symlink(exc, path):
            raise fail("mailbox is a symbolic link", path) from None
        if exc.errno == errno.ENOTDIR:
            raise fail("mailbox is not a Maildir", f"{path} is not a directory") from None
        raise fail("cannot open mailbox", f"{path}: {exc.strerror}") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        os.close(fd)
        raise fail("mailbox has the wrong owner", f"{path}: uid {st.st_uid}, we are {os.geteuid()}")
    return fd


def _open_sub(dirfd: int, sub: str, path: str) -> int:
    try:
        return os.open(sub, _DIR_FLAGS, dir_fd=dirfd)
    except OSError as exc:
        why = "is a symbolic link" if _is_symlink(exc, sub, dirfd) else (
            "is not a directory" if exc.errno == errno.ENOTDIR else exc.strerror)
        raise fail("mailbox is not a Maildir", f"{path}/{sub}: {why}") from None


def _is_symlink(exc: OSError, path: str, dirfd: "int | None" = None) -> bool:
    """Did open(O_DIRECTORY|O_NOFOLLOW) fail on a symbolic link?  Linux says ENOTDIR for a
    link (ELOOP only without O_DIRECTORY), so for the log line we look at what is there."""
    if exc.errno == errno.ELOOP:
        return True
    if exc.errno != errno.ENOTDIR:
        return False
    try:
        return stat.S_ISLNK(os.stat(path, dir_fd=dirfd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _check_dir(path: str) -> None:
    """Raise unless path is a Maildir (tmp/ and new/) owned by us."""
    fd = _open_dir(path)
    try:
        for sub in ("tmp", "new"):
            os.close(_open_sub(fd, sub, path))
    finally:
        os.close(fd)


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


def _read_quota_file(path: str, dirfd: "int | None") -> "bytes | None":
    """maildirsize's bytes, or None when there is none.  Opened O_NONBLOCK|O_NOFOLLOW and
    checked to be a regular file: a FIFO or device planted there must not hang delivery."""
    try:
        if dirfd is None:
            fd = os.open(join(path, QUOTA_FILE), os.O_RDONLY | _FILE_FLAGS)
        else:
            fd = os.open(QUOTA_FILE, os.O_RDONLY | _FILE_FLAGS, dir_fd=dirfd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise fail("cannot read quota", f"{path}/{QUOTA_FILE}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise fail("quota file is not a regular file", f"{path}/{QUOTA_FILE}")
        chunks = []
        total = 0
        while total < (1 << 20):
            data = os.read(fd, 1 << 16)
            if not data:
                break
            chunks.append(data)
            total += len(data)
        return b"".join(chunks)
    except OSError as exc:
        raise fail("cannot read quota", f"{path}/{QUOTA_FILE}: {exc.strerror}") from None
    finally:
        os.close(fd)


def read_quota(path: str, dirfd: "int | None" = None) -> "tuple[int, int, int, int, int] | None":
    """(limit_bytes, limit_count, used_bytes, used_count, file_size), or None."""
    data = _read_quota_file(path, dirfd)
    if data is None:
        return None
    return _parse_quota(data)


def quota_reached(path: str, size: int = 1) -> "str | None":
    """Before the message (at RCPT): "quota 1000S,0C, used 900S,1C" when a message of `size`
    bytes would not fit the Maildir++ quota, else None.  A quota that cannot be read is None:
    the delivery checks it again and says why."""
    try:
        quota = read_quota(path)
    except (OSError, DeliveryError):
        return None
    if quota is None:
        return None
    limit_bytes, limit_count, used_bytes, used_count, _size = quota
    if (limit_bytes and used_bytes + max(size, 1) > limit_bytes) or (limit_count and used_count + 1 > limit_count):
        return f"quota {limit_bytes}S,{limit_count}C, used {used_bytes}S,{used_count}C"
    return None


def _parse_quota(data: bytes) -> "tuple[int, int, int, int, int]":
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


def recalculate(path: str, definition: str, dirfd: "int | None" = None) -> "tuple[int, int]":
    """Rebuild maildirsize from the messages in new/ and cur/ of every folder."""
    used_bytes = used_count = 0
    folders = [path] + [
        join(path, d) for d in os.listdir(path) if d.startswith(".") and d not in (".", "..")
    ]
    for folder in folders:
        if folder != path and basename(folder) == ".Trash":
            continue
        for sub in ("new", "cur"):
            try:
                names = os.listdir(join(folder, sub))
            except OSError:
                continue
            for name in names:
                size = _size_from_name(name)
                if size is None:
                    try:
                        size = os.stat(join(folder, sub, name)).st_size
                    except OSError:
                        continue
                used_bytes += size
                used_count += 1
    tmp = f"tmp/{QUOTA_FILE}.{os.getpid()}.{os.urandom(4).hex()}"
    content = f"{definition.strip()}\n{used_bytes} {used_count}\n".encode()
    own = dirfd is None
    mfd: int = _open_dir(path) if dirfd is None else dirfd
    try:
        tfd = _open_sub(mfd, "tmp", path)
        try:
            name = basename(tmp)
            write_new(name, content, 0o600, dir_fd=tfd)
            os.rename(name, QUOTA_FILE, src_dir_fd=tfd, dst_dir_fd=mfd)
        finally:
            os.close(tfd)
    finally:
        if own:
            os.close(mfd)
    return used_bytes, used_count


def check_quota(path: str, size: int, over_quota_bounce: bool, dirfd: "int | None" = None) -> bool:
    """Refuse a message over quota; True when maildirsize exists and must be updated."""
    data = _read_quota_file(path, dirfd)
    if data is None:
        return False
    limit_bytes, limit_count, used_bytes, used_count, file_size = _parse_quota(data)
    if file_size >= QUOTA_REBUILD_AT:
        definition = data.split(b"\n", 1)[0].decode("ascii", "replace")
        try:
            used_bytes, used_count = recalculate(path, definition, dirfd)
        except (OSError, DeliveryError):
            pass
    if (limit_bytes and used_bytes + size > limit_bytes) or (limit_count and used_count + 1 > limit_count):
        dsn = "5.2.2" if over_quota_bounce else "4.2.2"
        raise fail(
            "mailbox full",
            f"{path}: quota {limit_bytes}S,{limit_count}C, used {used_bytes}S,{used_count}C, message {size}",
            dsn,
        )
    return True


def _add_to_quota(dirfd: int, size: int) -> None:
    """Bookkeeping after the message is in new/: it may fail, never raise (the message is
    delivered; a lost line is corrected by the next recalculation)."""
    try:
        fd = os.open(QUOTA_FILE, os.O_WRONLY | os.O_APPEND | _FILE_FLAGS, dir_fd=dirfd)
    except OSError:
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
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
    before_link: "Hook | None" = None,
    tmp_max_age: int = 0,
) -> str:
    """Store msg in the Maildir at path; returns the new file's name."""
    if create_missing and not lexists(path):
        create(path)
    mfd = _open_dir(path)
    tfd = nfd = -1
    try:
        tfd = _open_sub(mfd, "tmp", path)
        nfd = _open_sub(mfd, "new", path)
        leftover = _linked_leftover(tfd, msg, host)
        if leftover is not None:
            # sendmail's retry of a delivery killed between link() and unlink(): the message
            # is already in the Maildir.  Finish that delivery instead of storing a copy.
            _after_link(mfd, tfd, leftover, msg.length, True, 0)
            return leftover
        update_quota = check_quota(path, msg.length, over_quota_bounce, mfd)
        name = _store(path, msg, tfd, nfd, host, over_quota_bounce, before_link)
        # The commit point: the file is in new/ and new/ is synced.  What follows is
        # housekeeping and never turns the delivery into a failure.
        _after_link(mfd, tfd, name, msg.length, update_quota, tmp_max_age)
        return name
    finally:
        for fd in (nfd, tfd, mfd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _store(path: str, msg: Prepared, tfd: int, nfd: int, host: str, over_quota_bounce: bool,
           before_link: "Hook | None") -> str:
    """tmp/NAME written and synced, linked to new/NAME, new/ synced; tmp/NAME still there."""
    spool = msg.spool
    for _attempt in range(10):
        name = unique_name(host, msg.length, msg.rfc822_size)
        fd = -1
        try:
            # A record spooled to a file on this file system becomes tmp/NAME itself.
            if not (isinstance(spool, Spool) and spool.link_into(tfd, name)):
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=tfd)
        except FileExistsError:
            continue
        except OSError as exc:  # a full disk or quota here is the same as while writing
            raise DeliveryError(status_for_errno(exc.errno or errno.EIO, f"{path}/tmp", over_quota_bounce)) from None
        try:
            if fd < 0:
                assert isinstance(spool, Spool)
                os.fsync(spool.fd)
            else:
                try:
                    if not (isinstance(spool, Spool) and spool.copy_file(fd)):
                        for chunk in spool.chunks():
                            write_all(fd, chunk)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            if before_link is not None:
                before_link()
            try:
                os.link(name, name, src_dir_fd=tfd, dst_dir_fd=nfd, follow_symlinks=False)
            except FileExistsError:
                _remove(name, tfd)
                continue
            try:
                os.fsync(nfd)
            except OSError:
                _remove(name, nfd)  # not acknowledged: sendmail will try again
                raise
        except OSError as exc:
            _remove(name, tfd)
            raise DeliveryError(status_for_errno(exc.errno or errno.EIO, path, over_quota_bounce)) from None
        except BaseException:
            _remove(name, tfd)
            raise
        return name
    raise fail("cannot write mailbox", f"{path}/new: no unique name after 10 tries")


def link_copy(path: str, source: str, source_name: str, msg: Prepared, *, host: str,
              over_quota_bounce: bool = False) -> "str | None":
    """Store msg in the Maildir at path as a hard link to a copy of the same bytes already
    delivered to source/new/source_name (another recipient of the same LMTP transaction), as
    Dovecot does; returns the new name, or None when a link cannot stand for a copy here
    (another file system or owner, the source already moved by a mail reader, a link limit):
    the caller then writes a copy with deliver().  Quota is checked and counted as for a
    copy; new/ is synced before returning, as after deliver()."""
    mfd = _open_dir(path)
    sfd = nfd = -1
    try:
        nfd = _open_sub(mfd, "new", path)
        try:
            sfd = _open_sub_of(source, "new")
            st = os.stat(source_name, dir_fd=sfd, follow_symlinks=False)
        except (OSError, DeliveryError):
            return None
        here = os.fstat(mfd)
        # Never across owners or file systems: the link shares the inode, its owner and mode.
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != here.st_uid or st.st_dev != here.st_dev
                or st.st_size != msg.length):
            return None
        update_quota = check_quota(path, msg.length, over_quota_bounce, mfd)
        for _attempt in range(10):
            name = unique_name(host, msg.length, msg.rfc822_size)
            try:
                os.link(source_name, name, src_dir_fd=sfd, dst_dir_fd=nfd, follow_symlinks=False)
            except FileExistsError:
                continue
            except OSError:
                return None  # EMLINK, EXDEV, ENOENT (moved to cur/ meanwhile): write a copy
            try:
                os.fsync(nfd)
            except OSError as exc:
                _remove(name, nfd)  # not acknowledged: the client will try again
                raise DeliveryError(status_for_errno(exc.errno or errno.EIO, path, over_quota_bounce)) from None
            if update_quota:
                _add_to_quota(mfd, msg.length)
            return name
        return None
    finally:
        for fd in (sfd, nfd, mfd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _open_sub_of(path: str, sub: str) -> int:
    fd = _open_dir(path)
    try:
        return _open_sub(fd, sub, path)
    finally:
        os.close(fd)


def set_flags(path: str, name: str, letters: str) -> str:
    """Move a message just delivered from new/NAME to cur/NAME:2,LETTERS, as a mail reader does
    when it sets flags, and make the move durable; returns the new name.  A crash in between
    leaves the message in new/ without flags, never lost and never twice."""
    mfd = _open_dir(path)
    try:
        nfd = _open_sub(mfd, "new", path)
        cfd = _open_sub(mfd, "cur", path)
        try:
            final = f"{name}:2,{letters}"
            os.rename(name, final, src_dir_fd=nfd, dst_dir_fd=cfd)
            try:  # the message is in cur/ now, whatever the syncs say
                os.fsync(cfd)
                os.fsync(nfd)
            except OSError:
                pass
            return final
        finally:
            os.close(nfd)
            os.close(cfd)
    finally:
        os.close(mfd)


def undo(path: str, name: str) -> None:
    """Take back a delivery that succeeded (new/NAME, or cur/NAME:2,... once flagged), and
    make its removal durable."""
    mfd = _open_dir(path)
    try:
        sub = "cur" if ":2," in name else "new"
        nfd = _open_sub(mfd, sub, path)
        try:
            os.unlink(name, dir_fd=nfd)
            os.fsync(nfd)
        finally:
            os.close(nfd)
    finally:
        os.close(mfd)


def _after_link(mfd: int, tfd: int, name: str, size: int, update_quota: bool, tmp_max_age: int) -> None:
    try:
        _remove(name, tfd)
        if update_quota:
            _add_to_quota(mfd, size)
        if tmp_max_age > 0 and os.urandom(1)[0] < CLEAN_ODDS:
            clean_tmp(tfd, tmp_max_age)
    except Exception:  # noqa: BLE001 - delivered is delivered
        pass


def clean_tmp(tmpdir: "str | int", max_age: int, now: "float | None" = None) -> int:
    """Remove files older than max_age from tmp/ (left by killed deliveries).

    The Maildir convention: a tmp/ file neither written nor read for 36 hours is
    garbage.  Called on about one delivery in 256/CLEAN_ODDS, so its cost (one
    directory read) is not paid on every delivery; a delivery in progress keeps
    its file's mtime fresh.
    """
    cutoff = (time.time() if now is None else now) - max_age
    removed = 0
    own = isinstance(tmpdir, str)
    try:
        dirfd = os.open(tmpdir, _DIR_FLAGS) if isinstance(tmpdir, str) else tmpdir
    except OSError:
        return 0
    try:
        for name in os.listdir(dirfd):
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and max(st.st_mtime, st.st_atime) < cutoff:
                try:
                    os.unlink(name, dir_fd=dirfd)
                    removed += 1
                except OSError:
                    pass
    except OSError:
        pass
    finally:
        if own:
            os.close(dirfd)
    return removed


def _writer_pid(name: str, host: str) -> int:
    """The P<pid> of a tmp/ file this host named (our names), else 0: a file another host wrote
    (a shared Maildir), or not named by us, cannot be asked whose it is."""
    pid_at = name.find("P", name.find(".M"))
    end = name.find("R", pid_at)
    if pid_at < 0 or end < 0 or not name[pid_at + 1:end].isdigit() or f".{escape_host(host)}," not in name:
        return 0
    return int(name[pid_at + 1:end])


def _alive(pid: int) -> bool:
    # locking._pid_alive's twin: importing vdeliver.locking would put it on the Maildir path,
    # which takes no lock (the pinned import set, tests/test_architecture.py).
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists (another user's)
    return True


def _linked_leftover(tfd: int, msg: Prepared, host: str = "") -> "str | None":
    """A tmp/ file with a second link (in new/ or cur/) holding exactly this record, left by a
    delivery that is no longer running.

    Only a delivery killed after link() and before unlink() leaves one; tmp/ is
    normally empty, so this costs one directory read.  The size in our file names
    filters the candidates before any byte is compared.
    """
    try:
        names = os.listdir(tfd)
    except OSError:
        return None
    marker = f",S={msg.length},"
    # The files of deliveries still running are not leftovers, whatever their links: ask by
    # the pid in the name before any stat().  Under load tmp/ holds one file per delivery in
    # flight (32 clients into one Maildir: up to 32 of the same size), and a stat() of each,
    # on every delivery, grew the cost of a delivery with the concurrency.
    alive: "dict[int, bool]" = {}
    for name in names:
        if marker not in name:
            continue
        pid = _writer_pid(name, host) if host else 0
        if pid > 0:
            if pid not in alive:
                alive[pid] = _alive(pid)
            if alive[pid]:
                continue
        try:
            st = os.stat(name, dir_fd=tfd, follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_nlink < 2 or st.st_size != msg.length:
            continue
        if _same_bytes(name, tfd, msg):
            return name
    return None


def _same_bytes(name: str, tfd: int, msg: Prepared) -> bool:
    try:
        fd = os.open(name, os.O_RDONLY | _FILE_FLAGS, dir_fd=tfd)
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


def _remove(name: str, dirfd: int) -> None:
    try:
        os.unlink(name, dir_fd=dirfd)
    except OSError:
        pass

"""Small file-system steps every writer shares: whole writes, fsync of a directory, the
unnamed spool file, a new file written and synced, and an atomic replace; and the few
os.path and os.environ steps of the delivery path, without `os`.

Why without `os`: `python3 -IS` does not import it, and importing it (with the
_collections_abc it needs for os.environ) costs about 1 ms, an eighth of the interpreter's own
start-up: more than a delivery's own work (issue 21).  The modules of the command line's
delivery path (cli, config, log, errors, deliver, message, maildir, mbox, locking, fileio)
therefore `import posix as os`: the same functions (os re-exports posix), without the module.
A test that patches `os.fsync` must patch `posix.fsync` as well.  Code off that path uses `os`.

Errors are OSError; each caller turns them into its own status (a delivery defers, vmailctl
says exit 75 or 1).
"""

import posix as os
import sys

_S_IFMT = 0o170000
_S_IFDIR = 0o040000
_S_IFLNK = 0o120000


def getenv(name: str) -> "str | None":
    """os.environ.get(name), also where os is not imported: then posix.environ, the process's
    environment at start-up, is the same thing (os.environ is made from it)."""
    if "os" in sys.modules:
        return sys.modules["os"].environ.get(name)  # type: ignore[no-any-return]
    value = os.environ.get(name.encode())
    return None if value is None else value.decode(sys.getfilesystemencoding(), "surrogateescape")


def join(head: str, *tails: str) -> str:
    """os.path.join for str paths."""
    for tail in tails:
        if tail.startswith("/") or not head:
            head = tail
        elif head.endswith("/"):
            head += tail
        else:
            head += "/" + tail
    return head


def split(path: str) -> "tuple[str, str]":
    """os.path.split: (everything before the last slash, without trailing slashes unless it
    is only slashes; the last component)."""
    cut = path.rfind("/") + 1
    head, tail = path[:cut], path[cut:]
    stripped = head.rstrip("/")
    return (stripped or head), tail


def dirname(path: str) -> str:
    return split(path)[0]


def basename(path: str) -> str:
    return path[path.rfind("/") + 1:]


def abspath(path: str) -> str:
    """The path made absolute against the working directory (not normalised: a name, not a lookup)."""
    return path if path.startswith("/") else join(os.getcwd(), path)


def _mode(path: str, follow: bool) -> int:
    try:
        return (os.stat(path) if follow else os.lstat(path)).st_mode
    except (OSError, ValueError):
        return -1


def exists(path: str) -> bool:
    return _mode(path, True) >= 0


def lexists(path: str) -> bool:
    return _mode(path, False) >= 0


def isdir(path: str) -> bool:
    mode = _mode(path, True)
    return mode >= 0 and mode & _S_IFMT == _S_IFDIR


def makedirs(path: str, mode: int) -> None:
    """os.makedirs(path, mode, exist_ok=True)."""
    if isdir(path):
        return
    head, tail = split(path)
    if head and tail and not lexists(head):
        makedirs(head, mode)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not isdir(path):
            raise


def islink(path: str) -> bool:
    mode = _mode(path, False)
    return mode >= 0 and mode & _S_IFMT == _S_IFLNK


def write_all(fd: int, data: "bytes | bytearray | memoryview") -> None:
    """os.write until everything is written (a write may be short)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


IOV_MAX = 1024  # Linux's limit on the pieces of one writev


def writev_all(fd: int, parts: "list[bytes | bytearray | memoryview]") -> None:
    """Write the pieces in order, as few writev calls as it takes (a write may be short)."""
    todo = [part for part in parts if len(part)]
    while todo:
        n = os.writev(fd, todo[:IOV_MAX])
        done = 0
        while done < len(todo) and n >= len(todo[done]):
            n -= len(todo[done])
            done += 1
        todo = todo[done:]
        if n:
            todo[0] = memoryview(todo[0])[n:]


def fsync_dir(directory: str) -> None:
    """Make a directory's entries durable (a new or removed name survives a power cut)."""
    fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def anonymous_spool(directory: str, prefix: str) -> int:
    """A read-write file in `directory` that has no name (O_TMPFILE): nothing is left behind
    whatever happens to us.  Where the file system cannot do that, a named file is made
    and unlinked at once.  Mode 0600."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except (OSError, AttributeError):
        import tempfile

        fd, name = tempfile.mkstemp(prefix=prefix, dir=directory)
        try:
            os.unlink(name)
        except OSError:
            os.close(fd)
            raise
        return fd


def write_new(path: str, data: bytes, mode: int, dir_fd: "int | None" = None) -> None:
    """Create `path` (never an existing name, never through a symlink) with exactly `mode`
    (set through the descriptor: the umask does not narrow it), write `data` and fsync it.
    A file left half-written by a failure is removed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    os.close(fd)


def _into_place(tmp: str, path: str) -> None:
    """Rename tmp over path; tmp is removed when that fails."""
    try:
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def replace_symlink(target: str, path: str) -> None:
    """Point the symbolic link `path` at `target`, atomically (made beside it, renamed over)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    os.symlink(target, tmp)
    _into_place(tmp, path)


def replace(path: str, data: bytes, mode: int) -> None:
    """Atomically replace `path` by a file holding `data`: readers see the old file or the
    new one, never a part.  The rename is not synced: call fsync_dir() when a power cut
    matters."""
    tmp = f"{path}.tmp.{os.getpid()}"
    write_new(tmp, data, mode)
    _into_place(tmp, path)

"""Small file-system steps every writer shares: whole writes, fsync of a directory, the
unnamed spool file, a new file written and synced, and an atomic replace.

Imports only `os` at import time (it is on the delivery path).  Errors are OSError; each
caller turns them into its own status (a delivery defers, vmailctl says exit 75 or 1).
"""

import os


def write_all(fd: int, data: "bytes | bytearray | memoryview") -> None:
    """os.write until everything is written (a write may be short)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


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

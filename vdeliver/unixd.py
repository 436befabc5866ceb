"""What the resident servers do as root before they serve: pid file, unix sockets, privileges.

Both servers (LMTP, socketmap) start as root, create their files, then become their run
user for good.  The directories they create files in (`/run/vdeliver`) may belong to that
user, who could plant a symlink or a hard link there, or swap a directory, between a check
and a use.  So nothing here follows a path someone else controls:

- a directory is reached by walking its path with O_DIRECTORY|O_NOFOLLOW descriptors; a
  symbolic link on the way is followed only when root owns it (Debian's /var/run -> /run);
- in a directory only root can change (owned by root, not group- or world-writable) the
  files are made as root; in a directory the run user owns they are made with that user's
  effective uid and gid (so root's rights are never used there); any other directory is
  refused;
- files are created with O_CREAT|O_EXCL|O_NOFOLLOW relative to the directory descriptor,
  owned and moded through their own descriptor (fchown/fchmod), and renamed into place;
- a unix socket is bound by its bare name with the working directory set to the
  directory descriptor (fchdir), with the umask giving its mode, and an old one is removed only when lstat shows a
  socket owned by the expected user that nobody answers on.
"""

from __future__ import annotations

import errno
import os
import stat
from contextlib import contextmanager

from vdeliver.privileges import DaemonError, RunUser, drop_privileges

__all__ = [
    "DaemonError",
    "PidFile",
    "Place",
    "RunUser",
    "as_user",
    "bind_unix",
    "drop_privileges",
    "open_dir",
    "remove_socket",
]

TYPE_CHECKING = False  # vdeliver run as root imports this module to drop privileges: keep it light
if TYPE_CHECKING:
    import socket  # imported where a socket is made
    from collections.abc import Iterator

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@contextmanager
def as_user(uid: int, gid: int) -> Iterator[None]:
    """As root, run the block with another user's effective ids (and none of root's groups'
    rights on the way back in: only the ids change), so that file operations in that user's
    directories cannot be turned against root.  Not root, or uid < 0: nothing changes."""
    if os.geteuid() != 0 or uid < 0:
        yield
        return
    os.setegid(gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def open_dir(path: str) -> int:
    """A descriptor of directory `path`, reached without following anyone else's links."""
    if not path.startswith("/"):
        raise DaemonError(errno.EINVAL, f"{path}: not an absolute path")
    fd = os.open("/", _DIR)
    walked = ""
    try:
        for part in [p for p in path.split("/") if p]:
            walked += "/" + part
            if part == "..":
                raise DaemonError(errno.EINVAL, f"{path}: '..' in the path")
            try:
                nfd = os.open(part, _DIR, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise DaemonError(exc.errno or errno.EIO, f"{walked}: {exc.strerror}") from None
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    raise DaemonError(errno.ENOTDIR, f"{walked}: not a directory") from None
                if st.st_uid != 0:
                    raise DaemonError(errno.ELOOP, f"{walked}: a symbolic link owned by uid {st.st_uid}; "
                                      "refusing to follow it as root") from None
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _make_dir(path: str, mode: int, owner: RunUser) -> None:
    """Create a missing last directory (`/run/vdeliver` after a reboot), owned by the run user."""
    parent, name = os.path.split(path.rstrip("/"))
    pfd = open_dir(parent or "/")
    try:
        try:
            os.mkdir(name, mode, dir_fd=pfd)
        except FileExistsError:
            return
        fd = os.open(name, _DIR, dir_fd=pfd)
        try:
            if os.geteuid() == 0 and owner.uid >= 0:
                os.fchown(fd, owner.uid, owner.gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    finally:
        os.close(pfd)


class Place:
    """A directory the server makes files in, and how it may do so."""

    def __init__(self, directory: str, owner: RunUser, create: bool = True) -> None:
        self.directory = directory
        self.owner = owner
        if create and not os.path.lexists(directory):
            _make_dir(directory, 0o755, owner)
        self.fd = open_dir(directory)
        st = os.fstat(self.fd)
        root_only = st.st_uid == 0 and not st.st_mode & 0o022
        if os.geteuid() != 0 or root_only:
            self.as_user = False  # root's own directory, or we are not root at all
        elif owner.uid >= 0 and st.st_uid == owner.uid and not st.st_mode & 0o002:
            self.as_user = True  # the run user's directory: make files with its rights only
        else:
            os.close(self.fd)
            who = f"uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"
            raise DaemonError(errno.EPERM, f"{directory} ({who}) may be changed by others: make it "
                              f"root-owned 0755, or owned by the run user {owner.name or '(none set)'}")

    @contextmanager
    def cwd(self) -> Iterator[None]:
        """Make relative names (bind, connect) mean this directory, by its descriptor."""
        back = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        os.fchdir(self.fd)
        try:
            yield
        finally:
            os.fchdir(back)
            os.close(back)

    @contextmanager
    def rights(self) -> Iterator[None]:
        """Run the block with the run user's effective ids in that user's directory."""
        if not self.as_user:
            yield
            return
        with as_user(self.owner.uid, self.owner.gid):
            yield

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- pid files ------------------------------------------------------------------------------


class PidFile:
    """`<dir>/<name>` holding our pid: written atomically, never through a link."""

    def __init__(self, path: str, owner: RunUser) -> None:
        self.path = path
        directory, self.name = os.path.split(path)
        self.place = Place(directory or "/", owner)

    def write(self) -> None:
        place = self.place
        tmp = f".{self.name}.{os.getpid()}.{os.urandom(4).hex()}"
        with place.rights():
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                         dir_fd=place.fd)
            try:
                if os.geteuid() == 0 and place.owner.uid >= 0:
                    os.fchown(fd, place.owner.uid, place.owner.gid)  # so the run user can empty it later
                os.fchmod(fd, 0o644)
                os.write(fd, f"{os.getpid()}\n".encode())
            except BaseException:
                os.close(fd)
                os.unlink(tmp, dir_fd=place.fd)
                raise
            os.close(fd)
            os.rename(tmp, self.name, src_dir_fd=place.fd, dst_dir_fd=place.fd)

    def remove(self) -> None:
        """At exit (as the run user by now): remove it if it is still ours, else leave it;
        where we may not remove it (root's directory), empty it."""
        place = self.place
        try:
            fd = os.open(self.name, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=place.fd)
        except OSError:
            place.close()
            return
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode) or os.read(fd, 32).strip() != str(os.getpid()).encode():
                return  # not ours any more
            try:
                os.unlink(self.name, dir_fd=place.fd)
            except OSError:
                os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)
            place.close()


# -- unix sockets ---------------------------------------------------------------------------


def bind_unix(path: str, mode: int, owner: RunUser, socket_owner: tuple[int, int] | None = None,
              backlog: int = 64) -> tuple[socket.socket, int]:
    """A listening unix socket at path with the given mode; returns (socket, its inode)."""
    directory, name = os.path.split(path)
    place = Place(directory or "/", owner)
    try:
        with place.cwd(), place.rights():
            _remove_stale(place, name, path)
            import socket

            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o777 & ~mode)  # the socket is born with its mode: no window, no chmod
            try:
                sock.bind(name)
            except OSError:
                sock.close()
                raise
            finally:
                os.umask(old)
            st = os.stat(name, dir_fd=place.fd, follow_symlinks=False)
            ino = st.st_ino
            if socket_owner is not None and socket_owner != (st.st_uid, st.st_gid):
                if os.geteuid() != 0:  # made with the run user's rights: it cannot give the file away
                    sock.close()
                    raise DaemonError(errno.EPERM, f"{path}: socket_owner other than the run user needs the "
                                      f"socket directory {directory} to be root's (only root may give a file away)")
                os.chown(name, socket_owner[0], socket_owner[1], dir_fd=place.fd, follow_symlinks=False)
            sock.listen(backlog)
            return sock, ino
    finally:
        place.close()


def _remove_stale(place: Place, name: str, path: str) -> None:
    try:
        st = os.stat(name, dir_fd=place.fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise DaemonError(errno.EEXIST, f"{path} exists and is not a socket: remove it")
    if st.st_uid not in (os.geteuid(), place.owner.effective_uid):
        raise DaemonError(errno.EEXIST, f"{path} is a socket of uid {st.st_uid}, not ours: remove it by hand")
    import socket

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(name)  # relative: the caller made place.fd the working directory
    except OSError:
        again = os.stat(name, dir_fd=place.fd, follow_symlinks=False)
        if (again.st_ino, again.st_dev) == (st.st_ino, st.st_dev):
            os.unlink(name, dir_fd=place.fd)  # nobody listens: a leftover of ours
        return
    finally:
        probe.close()
    raise DaemonError(errno.EADDRINUSE, f"{path}: another server is listening")


def remove_socket(path: str, ino: int) -> None:
    """At exit: remove our socket file, only if it is still the one we bound."""
    directory, name = os.path.split(path)
    try:
        fd = os.open(directory or "/", _DIR)
    except OSError:
        return
    try:
        if os.stat(name, dir_fd=fd, follow_symlinks=False).st_ino == ino:
            os.unlink(name, dir_fd=fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- privileges -----------------------------------------------------------------------------


def notify(state: str) -> bool:
    """Tell the service manager how the server is (systemd's sd_notify: "READY=1",
    "RELOADING=1", "STOPPING=1", "STATUS=..."), for a unit with `Type=notify`.  Nothing to do
    (False) without $NOTIFY_SOCKET; never raises: a server runs the same without a manager."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path or path[0] not in "/@":
        return False
    import socket

    address = "\0" + path[1:] if path[0] == "@" else path  # '@': Linux's abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(1)
            sock.connect(address)
            sock.sendall(state.encode("utf-8", "replace"))
        return True
    except OSError:
        return False

"""Whom a process runs as: the one user and group lookup, and giving up root for good.

Imported by `vdeliver` when it is started as root (sendmail's U= normally starts it as the
vmail user already) and by the daemons through unixd.py, so it imports only `posix` and
`errno`; pwd and grp when a name is looked up.
"""

import errno
import posix as os  # not `os`, which costs 1 ms a process: see vdeliver/fileio.py


class DaemonError(OSError):
    """A file the server needs cannot be made safely; the text says why and what to fix."""


class RunUser:
    """Whom the server runs as after start-up: uid/gid, or -1 for "stay as we are"."""

    def __init__(self, name: str = "", group: str = "") -> None:
        self.name = name
        self.uid = self.gid = -1
        if name:
            import pwd

            try:
                pw = pwd.getpwnam(name)
            except KeyError:
                raise DaemonError(errno.EINVAL, f"no such user {name!r}") from None
            self.uid, self.gid = pw.pw_uid, pw.pw_gid
            if group:
                import grp

                try:
                    self.gid = grp.getgrnam(group).gr_gid
                except KeyError:
                    raise DaemonError(errno.EINVAL, f"no such group {group!r}") from None

    @property
    def effective_uid(self) -> int:
        return self.uid if self.uid >= 0 else os.geteuid()


def drop_privileges(owner: RunUser) -> None:
    """Become the run user for good (no way back to root)."""
    if os.geteuid() != 0 or owner.uid < 0:
        return
    os.setgroups([])
    os.setgid(owner.gid)
    os.setuid(owner.uid)
    if owner.uid != 0 and 0 in (os.geteuid(), os.getuid()):  # pragma: no cover - setuid failed silently
        raise DaemonError(errno.EPERM, f"could not become {owner.name}")

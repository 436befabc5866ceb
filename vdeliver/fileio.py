"""Small file-system steps every writer shares.  Imports only `os` (it is on the delivery path)."""

import os


def fsync_dir(directory: str) -> None:
    """Make a directory's entries durable (a new or removed name survives a power cut)."""
    fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

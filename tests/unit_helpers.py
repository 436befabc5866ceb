"""Small pieces the in-process unit tests share: a log that records, and failures injected
through the same seams the kill harness (tests/faultinject.py) uses."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from vdeliver import fileio

if TYPE_CHECKING:
    import pytest
from vdeliver.message import Prepared, Spool

WriteAll = Callable[[int, "bytes | bytearray | memoryview"], None]


class RecordingLog:
    """A hooks.Log that keeps (level, text) pairs."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def info(self, text: str) -> None:
        self.lines.append(("info", text))

    def warning(self, text: str) -> None:
        self.lines.append(("warning", text))

    def error(self, text: str) -> None:
        self.lines.append(("error", text))


def fail_at_byte(k: int, err: int) -> WriteAll:
    """A write_all that writes k bytes of what it is given in all, then fails with err."""
    real = fileio.write_all
    left = [k]

    def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if len(view) >= left[0]:
            real(fd, view[: left[0]])
            raise OSError(err, os.strerror(err))
        left[0] -= len(view)
        real(fd, view)

    return write_all


def patch_os(monkeypatch: "pytest.MonkeyPatch", name: str, value: object) -> None:
    """Replace os.NAME for a test, in `posix` as well: the delivery path's modules call the
    same functions through `import posix as os` (vdeliver/fileio.py says why)."""
    import posix

    monkeypatch.setattr(os, name, value)
    monkeypatch.setattr(posix, name, value)


def fail_at_call(n: int, err: int, real: Callable[[int], None]) -> Callable[[int], None]:
    """An fsync (or other one-descriptor call) that fails on its n-th call (1-based) only."""
    count = [0]

    def call(fd: int) -> None:
        count[0] += 1
        if count[0] == n:
            raise OSError(err, os.strerror(err))
        real(fd)

    return call


def prepared(record: bytes, spool_dir: str, threshold: int = 1 << 20) -> Prepared:
    """A Prepared holding exactly `record` (in memory, or in a spool file past threshold)."""
    spool = Spool(threshold, spool_dir)
    spool.write(record)
    return Prepared(spool, "alice@example.org", len(record), record.count(b"\n"), len(record), False)


def spooled(record: bytes, spool_dir: str) -> Iterator[Prepared]:
    """For a fixture (`yield from`): a prepared message, closed afterwards."""
    m = prepared(record, spool_dir)
    try:
        yield m
    finally:
        m.close()


def open_fds() -> set[str]:
    """This process's open descriptors, to show that nothing leaked."""
    return set(os.listdir("/proc/self/fd"))

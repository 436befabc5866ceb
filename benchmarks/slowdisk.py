"""A disk whose cache flush is slow: ext4 on a RAM disk that takes FLUSH_MS to flush (issue 21).

This machine's disk flushes its cache in about 0.1 ms, so syncs cost little more than the CPU
around them, and what group commit is for (a disk whose flush takes milliseconds: a SATA disk, a
consumer SSD without power-loss protection, a network volume) cannot be seen on it.  SlowDisk
builds such a disk for one benchmark run, from Debian packages and the kernel's own layers, so
that everything above the device is real: ext4 and its journal (jbd2), the page cache, the block
layer, which merges the flushes that wait at the same time as it does for a real disk:

    ext4  ->  /dev/loopN  ->  a file on FUSE (nbdfuse, libnbd-bin)  ->  NBD  ->  nbdkit python plugin

The plugin (PLUGIN below) keeps the blocks in memory and makes each flush request (and each
write with FUA, which the kernel sends for a journal commit block) sleep FLUSH_MS, one at a time,
as a disk with a volatile write cache does, and counts them (SlowDisk.flushes()); reads and writes
cost only their copy.  Nothing
written there survives the run.  Needs root (loop device, mount), nbdkit, nbdkit-plugin-python,
libnbd-bin and fuse3 (scripts/bootstrap --peers installs them).

    with SlowDisk(flush_ms=4) as disk:
        disk.path        # a mounted, empty ext4 file system, mode 0755
        disk.sync_ms()   # what one fdatasync of a rewritten block costs there (median of 20, ms)
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time

TOOLS = ("nbdkit", "nbdfuse", "losetup", "mkfs.ext4", "mount", "umount", "fusermount3")
PACKAGES = "nbdkit nbdkit-plugin-python libnbd-bin fuse3"

PLUGIN = '''
import builtins
import threading
import time

import nbdkit

API_VERSION = 2
size = 512 << 20
flush_s = 0.004
disk = bytearray(0)
flushing = threading.Lock()
count_path = ""
flushes = 0


def config(key, value):
    global size, flush_s, count_path
    if key == "size":
        size = int(value)
    elif key == "flush_ms":
        flush_s = float(value) / 1000.0
    elif key == "count":
        count_path = value
    else:
        raise RuntimeError("unknown parameter " + key)


def config_complete():
    global disk
    disk = bytearray(size)


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    return 1


def get_size(h):
    return size


def can_write(h):
    return True


def can_flush(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    buf[:] = disk[offset:offset + len(buf)]


def _flush():
    global flushes
    with flushing:  # one cache flush at a time, as one disk does
        time.sleep(flush_s)
        flushes += 1
        if count_path:
            with builtins.open(count_path, "w") as f:
                f.write(str(flushes))


def pwrite(h, buf, offset, flags):
    disk[offset:offset + len(buf)] = buf
    if flags & nbdkit.FLAG_FUA:
        _flush()


def flush(h, flags):
    _flush()
'''


def missing() -> str | None:
    """Why a SlowDisk cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (a loop device and a mount)"
    absent = [t for t in TOOLS if shutil.which(t) is None]
    if absent:
        return f"{', '.join(absent)} not installed (apt-get install {PACKAGES})"
    if not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"):
        return "no /dev/fuse or /dev/loop-control on this machine"
    return None


class SlowDisk:
    def __init__(self, flush_ms: float = 4.0, size_mb: int = 512, deadline: float = 30.0) -> None:
        self.flush_ms = flush_ms
        self.size = size_mb << 20
        self.deadline = deadline
        self.base = ""
        self.path = ""
        self.loop = ""
        self.fuse: subprocess.Popen[bytes] | None = None
        self.counter = ""

    def __enter__(self) -> SlowDisk:
        why = missing()
        if why:
            raise RuntimeError(f"slow-flush disk: {why}")
        self.base = tempfile.mkdtemp(prefix="vdeliver-slowdisk-")
        os.chmod(self.base, 0o755)
        try:
            self._make()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _make(self) -> None:
        self.counter = os.path.join(self.base, "flushes")
        plugin = os.path.join(self.base, "disk.py")
        with open(plugin, "w") as f:
            f.write(PLUGIN)
        mnt_fuse = os.path.join(self.base, "fuse")
        self.path = os.path.join(self.base, "mnt")
        os.mkdir(mnt_fuse)
        os.mkdir(self.path)
        image = os.path.join(mnt_fuse, "disk")
        self.fuse = subprocess.Popen(
            ["nbdfuse", image, "[", "nbdkit", "python", plugin, f"size={self.size}", f"flush_ms={self.flush_ms}",
             f"count={self.counter}", "]"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        until = time.monotonic() + self.deadline
        while not os.path.exists(image):
            if self.fuse.poll() is not None:
                err = self.fuse.stderr.read().decode(errors="replace").strip() if self.fuse.stderr else ""
                raise RuntimeError(f"slow-flush disk: nbdfuse exited {self.fuse.returncode}: {err[-300:]}")
            if time.monotonic() > until:
                raise RuntimeError(f"slow-flush disk: {image} did not appear within {self.deadline:.0f} s")
            time.sleep(0.05)
        self.loop = (_run(["losetup", "--find", "--show", image]) or "").strip()
        _run(["mkfs.ext4", "-q", "-F", self.loop])
        _run(["mount", self.loop, self.path])
        os.chmod(self.path, 0o755)

    def sync_ms(self) -> float:
        return sync_ms(self.path)

    def flushes(self) -> int:
        """Cache flushes the disk has done so far (each flush request and each FUA write)."""
        try:
            with open(self.counter) as f:
                return int(f.read() or 0)
        except FileNotFoundError:
            return 0

    def __exit__(self, *_exc: object) -> None:
        # Something still holding the file system open: detach it lazily rather than leave it.
        if self.path and os.path.ismount(self.path) and _run(["umount", self.path], check=False) is None:
            _run(["umount", "--lazy", self.path], check=False)
        if self.loop:
            _run(["losetup", "--detach", self.loop], check=False)
            self.loop = ""
        if self.fuse is not None:
            fuse = os.path.join(self.base, "fuse")
            if _run(["fusermount3", "-u", fuse], check=False) is None:
                _run(["fusermount3", "-u", "-z", fuse], check=False)
            try:
                self.fuse.wait(self.deadline)
            except subprocess.TimeoutExpired:
                self.fuse.kill()
                self.fuse.wait(5)
            if self.fuse.stderr:
                self.fuse.stderr.close()
            self.fuse = None
        if self.base:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = ""


def sync_ms(directory: str, rounds: int = 20) -> float:
    """One fdatasync of a rewritten 512-byte block (the journal's case) in a file in `directory`,
    median of `rounds`, in milliseconds."""
    fd, probe = tempfile.mkstemp(prefix=".sync-probe-", dir=directory)
    try:
        os.pwrite(fd, bytes(4096), 0)
        os.fsync(fd)
        times = []
        for _ in range(rounds):
            os.pwrite(fd, b"x" * 512, 0)
            started = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        os.unlink(probe)
    return statistics.median(times) * 1000


def _run(argv: list[str], check: bool = True) -> str | None:
    """The command's output; a failure raises, or with check=False gives None."""
    try:
        r = subprocess.run(argv, capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        if check:
            raise RuntimeError(f"slow-flush disk: {' '.join(argv)}: no answer within 60 s") from None
        return None
    if r.returncode != 0:
        if check:
            raise RuntimeError(f"slow-flush disk: {' '.join(argv)}: {r.stderr.decode(errors='replace').strip()}")
        return None
    return r.stdout.decode()

"""What the agents deliver and where: test messages, mailboxes (empty or large), the integrity check.

Every message carries an `X-Bench-Id` header naming the agent, cell and sequence number, and
a body with no `From ` lines (so no agent needs to escape anything and a body read back must
equal the one sent, byte for byte).  After each cell the harness reads every mailbox back and
checks that each message an agent acknowledged is there exactly once with its body intact, so
no agent wins by skipping work.

Large mailboxes are made quickly: the 1 GB mbox is real messages followed by one message
whose body is a sparse hole (appending agents never read it; Dovecot parses it once to build
its index), and the 100,000-message Maildir is hard links to one file in cur/.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field

SENDER = "bench-sender@example.org"
FROM_LINE = b"From bench-sender@example.org  Wed Nov 25 02:56:49 2026\n"
SIZES = {"4KB": 4 * 1024, "100KB": 100 * 1024, "10MB": 10 * 1024 * 1024}
SEED_END = b"X-Bench-Seed-End: this is the last message of the pre-filled mailbox"
FILL_TAG = ".fill,"
LINKS_PER_FILE = 50_000
_ID_RE = re.compile(rb"^X-Bench-Id: (\S+)$", re.MULTILINE)

_BODIES: dict[int, tuple[bytes, str]] = {}


def _body(size: int) -> tuple[bytes, str]:
    """A body of about `size` bytes of 72-column text (no `From ` lines), and its digest."""
    if size not in _BODIES:
        lines = []
        total = 0
        i = 0
        while total < size:
            line = f"line {i:07d} the quick brown fox jumps over the lazy dog 0123456789 abcd\n".encode()
            lines.append(line)
            total += len(line)
            i += 1
        body = b"".join(lines)[: max(size - 400, 64)]  # leave room for the header block
        body = body.rstrip(b"\n") + b"\n"
        _BODIES[size] = (body, digest(body))
    return _BODIES[size]


def digest(body: bytes) -> str:
    return hashlib.sha1(body.rstrip(b"\n")).hexdigest()


@dataclass
class Message:
    bench_id: str
    size: int

    @property
    def body(self) -> bytes:
        return _body(self.size)[0]

    @property
    def body_digest(self) -> str:
        return _body(self.size)[1]

    def headers(self) -> bytes:
        return (
            f"From: Bench Sender <{SENDER}>\n"
            f"To: <rcpt@example.com>\n"
            f"Subject: benchmark message {self.bench_id}\n"
            f"Message-ID: <{self.bench_id}@bench.example.org>\n"
            f"Date: Wed, 25 Nov 2026 02:56:49 +0000\n"
            f"X-Bench-Id: {self.bench_id}\n"
            "\n"
        ).encode()

    def with_from_line(self) -> bytes:
        """As sendmail hands it to a procmail-style mailer: a leading From_ line, no -f."""
        return FROM_LINE + self.headers() + self.body

    def bare(self) -> bytes:
        """Without the From_ line (for agents given the sender as -f or MAIL FROM)."""
        return self.headers() + self.body


@dataclass
class Box:
    """One mailbox: (domain, user) resolves to it for every agent through the same templates."""

    fmt: str
    domain: str
    user: str
    path: str
    seeded: int = 0  # messages put there before the run (not counted)


@dataclass
class Layout:
    """The private mail tree: vbox/{domain}/{user} (mbox), home/{domain}/{user}/Maildir."""

    root: str
    uid: int
    gid: int

    @property
    def vbox(self) -> str:
        return os.path.join(self.root, "vbox")

    @property
    def home(self) -> str:
        return os.path.join(self.root, "home")

    def mbox_template(self) -> str:
        return os.path.join(self.vbox, "{domain}", "{user}")

    def maildir_template(self) -> str:
        return os.path.join(self.home, "{domain}", "{user}", "Maildir")

    def _mkdir(self, path: str) -> None:
        os.makedirs(path, mode=0o755, exist_ok=True)
        os.chown(path, self.uid, self.gid)

    def setup(self) -> None:
        for d in (self.root, self.vbox, self.home):
            self._mkdir(d)
        os.chmod(self.root, 0o755)

    def box(self, fmt: str, domain: str, user: str, large: int = 0, quick: bool = False) -> Box:
        """An empty mailbox, or a large one (`large` > 0: the count/size class of the fill)."""
        if fmt == "mbox":
            self._mkdir(os.path.join(self.vbox, domain))
            path = os.path.join(self.vbox, domain, user)
            seeded = 0
            with open(path, "wb") as f:
                if large:
                    seeded = _fill_mbox(f, large, quick)
            os.chmod(path, 0o600)
            os.chown(path, self.uid, self.gid)
            return Box(fmt, domain, user, path, seeded)
        self._mkdir(os.path.join(self.home, domain))
        userdir = os.path.join(self.home, domain, user)
        self._mkdir(userdir)
        path = os.path.join(userdir, "Maildir")
        self._mkdir(path)
        for sub in ("tmp", "new", "cur"):
            self._mkdir(os.path.join(path, sub))
        seeded = _fill_maildir(path, large, self.uid, self.gid) if large else 0
        return Box(fmt, domain, user, path, seeded)

    def remove_domain(self, domain: str) -> None:
        for top in (self.vbox, self.home):
            shutil.rmtree(os.path.join(top, domain), ignore_errors=True)


def _fill_mbox(f, target_bytes: int, quick: bool) -> int:  # type: ignore[no-untyped-def]
    """Real messages (bulk writes) then one message with a sparse body up to target_bytes."""
    real_bytes = min(target_bytes // 16, 32 << 20)
    one = FROM_LINE + Message("seed", 4096).bare() + b"\n"
    chunk = one * max(1, (1 << 20) // len(one))
    count = 0
    written = 0
    while written < real_bytes:
        f.write(chunk)
        written += len(chunk)
        count += len(chunk) // len(one)
    head = FROM_LINE + b"From: seed@example.org\nSubject: the large one\n\n"
    f.write(head)
    f.flush()
    hole_end = max(target_bytes - 4096, f.tell())
    f.truncate(hole_end)  # a hole of NUL bytes: the body of this message
    f.seek(hole_end)
    f.write(b"\n\n" + FROM_LINE + b"From: seed@example.org\nSubject: seed end\n\n" + SEED_END + b"\n\n")
    f.flush()
    os.fsync(f.fileno())
    return count + 2


def _fill_maildir(path: str, count: int, uid: int, gid: int) -> int:
    """`count` hard links in cur/ to one 4 KB message: a big directory for almost no disk."""
    data = Message("seed", 4096).bare()
    cur = os.path.join(path, "cur")
    size = len(data)
    wsize = size + data.count(b"\n")
    src = ""
    for i in range(count):
        if i % LINKS_PER_FILE == 0:  # ext4 allows 65,000 links to one inode
            src = os.path.join(os.path.dirname(path), f"fill-source-{i // LINKS_PER_FILE}")
            with open(src, "wb") as f:
                f.write(data)
            os.chown(src, uid, gid)
        os.link(src, os.path.join(cur, f"{1700000000 + i}.M{i}P1{FILL_TAG}S={size},W={wsize}:2,S"))
    fd = os.open(cur, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return count


@dataclass
class Found:
    """What one mailbox holds: bench id -> digests of the bodies seen under that id."""

    messages: dict[str, list[str]] = field(default_factory=dict)
    unreadable: int = 0

    def add(self, raw: bytes) -> None:
        raw = raw.replace(b"\r\n", b"\n")
        head, sep, body = raw.partition(b"\n\n")
        m = _ID_RE.search(head)
        if m is None or not sep:
            self.unreadable += 1
            return
        self.messages.setdefault(m.group(1).decode(), []).append(digest(body))


def read_box(box: Box) -> Found:
    found = Found()
    if box.fmt == "maildir":
        for sub in ("new", "cur"):
            d = os.path.join(box.path, sub)
            for name in os.listdir(d):
                if FILL_TAG in name:
                    continue
                with open(os.path.join(d, name), "rb") as f:
                    found.add(f.read())
        return found
    import mailbox

    start = _appended_offset(box.path) if box.seeded else 0
    with tempfile.NamedTemporaryFile(prefix="bench-mbox-") as tmp:
        with open(box.path, "rb") as src:
            src.seek(start)
            shutil.copyfileobj(src, tmp, 1 << 20)
        tmp.flush()
        mb = mailbox.mbox(tmp.name, create=False)
        try:
            for key in mb.keys():
                found.add(mb.get_bytes(key))
        finally:
            mb.close()
    return found


def _appended_offset(path: str) -> int:
    """Where the messages delivered after the seed begin (Dovecot may have shifted the seed)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            at = mm.rfind(SEED_END)
            if at < 0:
                raise RuntimeError(f"{path}: the seed's last message is gone")
            nxt = mm.find(b"\nFrom ", at)
            return size if nxt < 0 else nxt + 1


@dataclass
class Integrity:
    expected: int = 0
    intact: int = 0
    missing: int = 0
    duplicated: int = 0
    corrupt: int = 0
    unexpected: int = 0

    @property
    def ok(self) -> bool:
        return self.expected == self.intact and not (self.missing or self.duplicated or self.corrupt or self.unexpected)

    def text(self) -> str:
        if self.ok:
            return f"{self.intact}/{self.expected} intact"
        parts = [f"{self.intact}/{self.expected} intact"]
        parts.extend(f"{getattr(self, name)} {name}"
                     for name in ("missing", "duplicated", "corrupt", "unexpected") if getattr(self, name))
        return ", ".join(parts)


def check(boxes: list[Box], expected: dict[str, str]) -> Integrity:
    """expected: bench id -> body digest of every message the agent acknowledged."""
    seen: dict[str, list[str]] = {}
    unreadable = 0
    for box in boxes:
        found = read_box(box)
        unreadable += found.unreadable
        for bench_id, digests in found.messages.items():
            seen.setdefault(bench_id, []).extend(digests)
    result = Integrity(expected=len(expected), unexpected=unreadable)
    for bench_id, want in expected.items():
        got = seen.pop(bench_id, [])
        if not got:
            result.missing += 1
        elif len(got) > 1:
            result.duplicated += 1
        elif got[0] != want:
            result.corrupt += 1
        else:
            result.intact += 1
    result.unexpected += sum(len(v) for v in seen.values())
    return result

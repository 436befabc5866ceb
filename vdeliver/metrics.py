"""Health and metrics of the resident servers, in the Prometheus text format (version 0.0.4).

    [lmtp] metrics = "127.0.0.1:9325"          # or a unix socket path; "" (the default): off
    [socketmap] metrics = "/run/vdeliver/socketmap-metrics.sock"

A small HTTP/1.0 responder in a thread of its own answers `GET /metrics` (and `/`) with every
counter, gauge and latency summary; anything else gets 404, a request head over 8 KiB or
slower than 5 s is dropped.  TCP is loopback only (as the LMTP listener): a Prometheus agent
on the host scrapes it, or `curl --unix-socket PATH http://x/metrics`.  Nothing here can fail
a delivery or a lookup: a metric that cannot be computed is left out of the page.

    reg = Registry("vdeliver_lmtp")
    reg.inc("deliveries_total", "Deliveries by result.", status="sent")
    reg.observe("delivery_seconds", "Time to deliver one recipient.", 0.004)
    reg.gauge("connections", "Open connections.", lambda: len(server.threads))
    endpoint = MetricsServer(reg, "127.0.0.1:9325", log).start()   # bind; serve in a thread

Standard library only; imported only when `metrics` is set.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

QUANTILES = (0.5, 0.9, 0.99)
RESERVOIR = 2048  # the latest observations a summary's quantiles are computed from
MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
    return "{" + body + "}"


_UNSAFE = {i: "\ufffd" for i in [*range(32), 0x7F, 0x85, 0x2028, 0x2029] if i != 10}


def _escape(value: str) -> str:
    """The format's three escapes; other control characters and line separators (which line
    readers split on) become U+FFFD."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").translate(_UNSAFE)


def _number(value: float) -> str:
    if isinstance(value, int) or (math.isfinite(value) and value == int(value) and abs(value) < 1e15):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Summary:
    __slots__ = ("count", "recent", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.recent: deque[float] = deque(maxlen=RESERVOIR)

    def quantile(self, q: float) -> float:
        values = sorted(self.recent)
        if not values:
            return math.nan
        return values[min(len(values) - 1, int(q * len(values)))]


class Registry:
    """Counters (monotonic, by labels), gauges (a function read at scrape time) and latency
    summaries (quantiles over the latest RESERVOIR observations), under one name prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}  # name -> (type, help)
        self._counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        self._summaries: dict[str, dict[tuple[tuple[str, str], ...], _Summary]] = {}
        self._gauges: dict[str, Callable[[], float | dict[tuple[tuple[str, str], ...], float]]] = {}
        self.started = time.time()
        self.gauge("start_time_seconds", "When the server started (Unix time).", lambda: self.started)

    def _declare(self, name: str, kind: str, text: str) -> None:
        if name not in self._help:
            self._help[name] = (kind, text)

    def inc(self, name: str, text: str, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._declare(name, "counter", text)
            series = self._counters.setdefault(name, {})
            series[key] = series.get(key, 0) + amount

    def observe(self, name: str, text: str, seconds: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._declare(name, "summary", text)
            summary = self._summaries.setdefault(name, {}).get(key)
            if summary is None:
                summary = self._summaries[name][key] = _Summary()
            summary.count += 1
            summary.total += seconds
            summary.recent.append(seconds)

    def gauge(self, name: str, text: str, read: Callable[[], float | dict[tuple[tuple[str, str], ...], float]],
              kind: str = "gauge") -> None:
        """read() gives the value, or {labels: value}; it runs at every scrape.  kind "counter"
        for a count kept elsewhere (it only grows)."""
        with self._lock:
            self._declare(name, kind, text)
            self._gauges[name] = read

    def counter_value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters.get(name, {}).get(tuple(sorted(labels.items())), 0)

    def render(self) -> str:
        """The page: one HELP and TYPE line per metric, then its samples."""
        with self._lock:
            help_items = dict(self._help)
            counters = {n: dict(s) for n, s in self._counters.items()}
            summaries = {n: {k: (s.count, s.total, [s.quantile(q) for q in QUANTILES]) for k, s in d.items()}
                         for n, d in self._summaries.items()}
            gauges = dict(self._gauges)
        out: list[str] = []
        for name, (kind, text) in sorted(help_items.items()):
            full = f"{self.prefix}_{name}"
            samples: list[str] = []
            if kind == "counter" and name not in gauges:
                samples = [f"{full}{_labels(dict(k))} {_number(v)}" for k, v in sorted(counters.get(name, {}).items())]
            elif kind == "summary":
                for k, (count, total, qs) in sorted(summaries.get(name, {}).items()):
                    for q, value in zip(QUANTILES, qs, strict=True):
                        samples.append(f"{full}{_labels({**dict(k), 'quantile': str(q)})} {_number(value)}")
                    samples.append(f"{full}_sum{_labels(dict(k))} {_number(total)}")
                    samples.append(f"{full}_count{_labels(dict(k))} {count}")
            else:
                try:
                    read = gauges[name]()
                except Exception:  # noqa: BLE001 - a metric that cannot be read is left out, never an error
                    continue
                if isinstance(read, dict):
                    samples = [f"{full}{_labels(dict(k))} {_number(v)}" for k, v in sorted(read.items())]
                else:
                    samples = [f"{full} {_number(read)}"]
            out.append(f"# HELP {full} {text}")
            out.append(f"# TYPE {full} {kind}")
            out.extend(samples)
        return "\n".join(out) + "\n"


def parse_endpoint(value: str) -> tuple[str, int] | str | None:
    """"" -> None; "/path" -> the unix socket path; "HOST:PORT" on loopback -> (host, port).
    Raises ValueError with the reason."""
    if not value:
        return None
    if value.startswith("/"):
        if len(value.encode()) > 107:
            raise ValueError("path too long for a unix socket (107 bytes)")
        return value
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be a unix socket path or HOST:PORT (got {value!r})")
    import ipaddress

    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"host must be a loopback IP address (got {host!r})") from None
    if not ip.is_loopback:
        raise ValueError(f"only loopback addresses are allowed (got {host})")
    return host, int(port)


class MetricsServer:
    """Serves a Registry over HTTP/1.0 on a unix socket or a loopback port, one thread."""

    def __init__(self, registry: Registry, endpoint: tuple[str, int] | str, log: object = None) -> None:
        self.registry = registry
        self.endpoint = endpoint
        self.log = log
        self.sock: socket.socket | None = None
        self._ino = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def bind(self, owner: object = None) -> MetricsServer:
        """Bind now (as root, before dropping privileges); owner: the unixd.RunUser the socket is for."""
        if isinstance(self.endpoint, str):
            from vdeliver import unixd

            run_user = owner if owner is not None else unixd.RunUser()
            self.sock, self._ino = unixd.bind_unix(self.endpoint, 0o666, run_user)  # type: ignore[arg-type]
        else:
            host, port = self.endpoint
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(16)
            self.sock = sock
        return self

    def describe(self) -> str:
        return self.endpoint if isinstance(self.endpoint, str) else f"{self.endpoint[0]}:{self.endpoint[1]}"

    def start(self) -> MetricsServer:
        if self.sock is None:
            self.bind()
        self._thread = threading.Thread(target=self._serve, name="metrics", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if isinstance(self.endpoint, str) and self._ino >= 0:
            from vdeliver import unixd

            unixd.remove_socket(self.endpoint, self._ino)
        if self._thread is not None:
            self._thread.join(2)

    def _serve(self) -> None:
        while not self._stop.is_set():
            sock = self.sock
            if sock is None:
                return
            try:
                client, _ = sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.1)
                continue
            try:
                self._answer(client)
            except Exception:  # noqa: BLE001 - a scrape gone wrong is the scraper's problem, never the server's
                pass
            finally:
                client.close()

    def _answer(self, client: socket.socket) -> None:
        client.settimeout(REQUEST_TIMEOUT)
        deadline = time.monotonic() + REQUEST_TIMEOUT
        head = b""
        while b"\r\n\r\n" not in head and b"\n\n" not in head:
            if len(head) > MAX_REQUEST or time.monotonic() > deadline:
                return
            chunk = client.recv(4096)
            if not chunk:
                break
            head += chunk
        words = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
        path = words[1].split(b"?", 1)[0] if len(words) >= 2 else b""
        if len(words) < 2 or words[0] not in (b"GET", b"HEAD"):
            status, body = "405 Method Not Allowed", b"only GET\n"
        elif path not in (b"/metrics", b"/"):
            status, body = "404 Not Found", b"try /metrics\n"
        else:
            status, body = "200 OK", self.registry.render().encode("utf-8", "replace")
        reply = (f"HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        client.sendall(reply + (body if words[:1] != [b"HEAD"] else b""))


def process_gauges(registry: Registry) -> None:
    """Resident memory and open descriptors of this process (Linux /proc)."""

    def rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def fds() -> float:
        return len(os.listdir("/proc/self/fd"))

    registry.gauge("resident_memory_bytes", "Resident memory of the server.", rss)
    registry.gauge("open_fds", "Open file descriptors of the server.", fds)

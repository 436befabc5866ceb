"""Health and metrics (issue 20): the LMTP and socketmap servers serve their counters, gauges and
latency summaries in the Prometheus text format on a unix socket or a loopback port; the page
is well formed whatever the label values; a bad `metrics` value is one clear line."""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import IS_ROOT, MailRoot, free_port, world_tmpdir
from tests.socketmap_harness import Client, populate, running_server, write_config
from tests.test_lmtp_server import Lmtpd, transaction
from vdeliver import metrics
from vdeliver.config import ConfigError, build
from vdeliver.socketmap import protocol as p

SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\.)*",?)*\})? \S+$')


def scrape(endpoint: str | tuple[str, int], path: str = "/metrics", method: str = "GET") -> tuple[int, str]:
    family = socket.AF_UNIX if isinstance(endpoint, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(endpoint)
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def samples(page: str) -> dict[str, float]:
    out = {}
    for line in page.splitlines():
        if line and not line.startswith("#"):
            assert SAMPLE.match(line), line
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def well_formed(page: str) -> None:
    """Every sample has a HELP and TYPE line before it, for its metric (or summary base name)."""
    declared: set[str] = set()
    for line in page.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert kind in ("counter", "gauge", "summary"), line
            declared.add(name)
        elif line and not line.startswith("#"):
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            base = re.sub(r"_(sum|count)$", "", name)
            assert name in declared or base in declared, line
    assert page.endswith("\n")


# -- the registry and the page --------------------------------------------------------------


def test_the_page() -> None:
    reg = metrics.Registry("x")
    reg.inc("deliveries_total", "Deliveries.", status="sent")
    reg.inc("deliveries_total", "Deliveries.", status="sent")
    reg.inc("deliveries_total", "Deliveries.", status="deferred")
    for ms in range(1, 101):
        reg.observe("delivery_seconds", "Time.", ms / 1000)
    reg.gauge("connections", "Open.", lambda: 3)
    reg.gauge("broken", "Raises.", lambda: 1 / 0)
    page = reg.render()
    well_formed(page)
    got = samples(page)
    assert got['x_deliveries_total{status="sent"}'] == 2 and got['x_deliveries_total{status="deferred"}'] == 1
    assert got["x_connections"] == 3 and "x_broken " not in page  # a gauge that fails is left out
    assert got['x_delivery_seconds{quantile="0.5"}'] == pytest.approx(0.051)
    assert got['x_delivery_seconds{quantile="0.99"}'] == pytest.approx(0.1)
    assert got["x_delivery_seconds_count"] == 100 and got["x_delivery_seconds_sum"] == pytest.approx(5.05)
    assert "# HELP x_deliveries_total Deliveries.\n# TYPE x_deliveries_total counter\n" in page


@given(st.text(max_size=40))
def test_any_label_value_gives_a_well_formed_page(value: str) -> None:
    reg = metrics.Registry("x")
    reg.inc("lookups_total", "Lookups.", map=value)
    page = reg.render()
    well_formed(page)
    assert len([line for line in page.splitlines() if line.startswith("x_lookups_total")]) == 1
    samples(page)


@pytest.mark.parametrize(("value", "message"), [
    ("10.0.0.1:9325", "only loopback addresses"),
    ("localhost:9325", "loopback IP address"),
    ("127.0.0.1:0", "HOST:PORT"),
    ("127.0.0.1", "HOST:PORT"),
    ("relative/path", "HOST:PORT"),
    ("/" + "x" * 120, "too long"),
])
def test_bad_endpoints_are_one_clear_line(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        metrics.parse_endpoint(value)
    from vdeliver.lmtp.settings import settings

    with pytest.raises(ConfigError, match=message):
        settings(build({"lmtp": {"metrics": value}}))
    from vdeliver.socketmap.settings import load_settings

    with pytest.raises(ConfigError, match=message):
        load_settings(build({"socketmap": {"metrics": value, "allow_root": True}}))


def test_the_responder(tmp_path: Path) -> None:
    reg = metrics.Registry("x")
    reg.inc("hits_total", "Hits.")
    port = free_port()
    server = metrics.MetricsServer(reg, ("127.0.0.1", port)).start()
    try:
        status, page = scrape(("127.0.0.1", port))
        assert status == 200 and "x_hits_total 1" in page
        assert scrape(("127.0.0.1", port), "/")[0] == 200
        assert scrape(("127.0.0.1", port), "/other")[0] == 404
        assert scrape(("127.0.0.1", port), method="POST")[0] == 405
        # A client that says nothing is dropped after REQUEST_TIMEOUT; the next one is served.
        with socket.create_connection(("127.0.0.1", port)) as idle:
            idle.sendall(b"GET /metrics")
            started = time.monotonic()
            assert scrape(("127.0.0.1", port))[0] == 200
            assert time.monotonic() - started < metrics.REQUEST_TIMEOUT + 3
    finally:
        server.close()


# -- the servers ------------------------------------------------------------------------------


@pytest.fixture
def lmtpd(mailroot: MailRoot) -> Iterator[Lmtpd]:
    if not IS_ROOT:
        pytest.skip("the server tests start vdeliver-lmtpd as root serving as vmail")
    mailroot.add_maildir("example.org", "fred")
    server = Lmtpd(mailroot, metrics=str(mailroot.base / "run" / "lmtp-metrics.sock")).start()
    yield server
    server.stop()


def test_lmtp_metrics(lmtpd: Lmtpd) -> None:
    endpoint = str(lmtpd.rundir / "lmtp-metrics.sock")
    assert os.path.exists(endpoint)
    c = lmtpd.client()
    try:
        replies = transaction(c, "s@example.org", ["fred@example.org", "nobody@nowhere.example"])
    finally:
        c.quit()
    assert replies["fred@example.org"][0] == 250 and replies["nobody@nowhere.example"][0] >= 400
    status, page = scrape(endpoint)
    assert status == 200
    well_formed(page)
    got = samples(page)
    assert got['vdeliver_lmtp_deliveries_total{status="sent"}'] == 1
    assert sum(v for k, v in got.items() if k.startswith("vdeliver_lmtp_deliveries_total")) == 2
    assert got["vdeliver_lmtp_rcpt_accepted_total"] == 1
    assert got["vdeliver_lmtp_delivery_seconds_count"] == 1
    assert got["vdeliver_lmtp_connections_total"] >= 1 and got["vdeliver_lmtp_up"] == 1
    assert got["vdeliver_lmtp_resident_memory_bytes"] > 1_000_000


def test_lmtp_metrics_count_deliveries_with_log_none(mailroot: MailRoot) -> None:
    """log = "none" skips building the delivery lines, not the counters behind them."""
    if not IS_ROOT:
        pytest.skip("the server tests start vdeliver-lmtpd as root serving as vmail")
    mailroot.add_maildir("example.org", "fred")
    mailroot.extra["log"] = "none"
    server = Lmtpd(mailroot, metrics=str(mailroot.base / "run" / "lmtp-metrics.sock")).start()
    try:
        c = server.client()
        try:
            replies = transaction(c, "s@example.org", ["fred@example.org", "nobody@nowhere.example"])
        finally:
            c.quit()
        got = samples(scrape(str(server.rundir / "lmtp-metrics.sock"))[1])
    finally:
        server.stop()
    assert replies["fred@example.org"][0] == 250 and replies["nobody@nowhere.example"][0] >= 400
    assert got['vdeliver_lmtp_deliveries_total{status="sent"}'] == 1
    assert sum(v for k, v in got.items() if k.startswith("vdeliver_lmtp_deliveries_total")) == 2
    assert got["vdeliver_lmtp_delivered_bytes_total"] > 0 and got["vdeliver_lmtp_delivery_seconds_count"] == 1
    assert "status=sent" not in server.log()


def test_socketmap_metrics() -> None:
    base = world_tmpdir("vdeliver-smm-")
    try:
        port = free_port()
        config = write_config(base, f'database = "{base}/accounts.sqlite"', f'metrics = "127.0.0.1:{port}"')
        populate(config)
        with running_server(config):
            client = Client(str(base / "in.sock"))
            try:
                for _ in range(3):
                    assert client.ask("virtuser", "fred@away.com") != p.NOTFOUND
                assert client.ask("virtuser", "nobody@away.com") == p.NOTFOUND
            finally:
                client.close()
            deadline = time.monotonic() + 10
            while True:
                try:
                    status, page = scrape(("127.0.0.1", port))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        assert status == 200
        well_formed(page)
        got = samples(page)
        assert got['vdeliver_socketmap_lookups_total{map="virtuser",status="OK"}'] == 3
        assert got['vdeliver_socketmap_lookups_total{map="virtuser",status="NOTFOUND"}'] == 1
        assert got['vdeliver_socketmap_cache_total{event="hit"}'] == 2
        assert got["vdeliver_socketmap_cache_hit_ratio"] == pytest.approx(0.5)
        assert got["vdeliver_socketmap_database_up"] == 1 and got["vdeliver_socketmap_up"] == 1
        assert got["vdeliver_socketmap_lookup_seconds_count"] == 4
    finally:
        shutil.rmtree(base, ignore_errors=True)

"""SRS0 for redirects (vdeliver/srs.py): the address a redirect is sent from, the way back for a
bounce through the socketmap server's virtuser and access maps, and forged or stale bounce
addresses refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.test_sieve_delivery import RAW, make_config, run, script, sent
from vdeliver import config, srs

SECRET = b"a secret of more than sixteen bytes"
DAY = 86400.0


def test_round_trip_and_refusals() -> None:
    now = 1_800_000_000.0
    address = srs.forward("Alice.Smith@Example.ORG", "srs.hub.example", SECRET, now)
    assert address.startswith("SRS0=") and address.endswith("@srs.hub.example")
    assert srs.reverse(address, "srs.hub.example", SECRET, now) == "Alice.Smith@Example.ORG"
    assert srs.reverse(address.lower(), "SRS.hub.example", SECRET, now + 20 * DAY) == "alice.smith@example.org"
    assert srs.reverse(address, "srs.hub.example", SECRET, now + 22 * DAY) is None  # stale
    assert srs.reverse(address, "srs.hub.example", b"another secret, just as long", now) is None  # forged
    forged = address.replace("=Example.ORG=", "=evil.example=")
    assert srs.reverse(forged, "srs.hub.example", SECRET, now) is None
    assert srs.reverse(address, "other.example", SECRET, now) is None
    assert srs.reverse("alice@srs.hub.example", "srs.hub.example", SECRET, now) is None
    assert srs.reverse("SRS0=x=y@srs.hub.example", "srs.hub.example", SECRET, now) is None
    assert srs.forward("", "srs.hub.example", SECRET, now) == ""  # a bounce stays a bounce


def test_the_day_wraps_around() -> None:
    then = 1023 * DAY  # day 1023, answered on day 1 of the next round
    address = srs.forward("a@b.example", "s.example", SECRET, then)
    assert srs.reverse(address, "s.example", SECRET, then + 2 * DAY) == "a@b.example"


@given(st.text(min_size=1, max_size=40).filter(lambda t: "@" not in t), st.text(min_size=1, max_size=40))
def test_anything_survives_the_round_trip(local: str, domain: str) -> None:
    address = srs.forward(f"{local}@{domain}", "srs.example", SECRET, 1_800_000_000.0)
    if not address.startswith("SRS0="):  # a domain no address has ("=", empty): left as it is
        assert address == f"{local}@{domain}" and ("=" in domain or "@" in domain)
        return
    assert srs.reverse(address, "srs.example", SECRET, 1_800_000_000.0) == f"{local}@{domain}"


def test_the_secret_file_is_checked(tmp_path: Path) -> None:
    good = tmp_path / "secret"
    good.write_bytes(SECRET + b"\nignored\n")
    good.chmod(0o640)
    assert srs.read_secret(str(good)) == SECRET
    good.chmod(0o666)
    with pytest.raises(srs.SrsError, match="nobody but its owner can write"):
        srs.read_secret(str(good))
    good.chmod(0o600)
    (tmp_path / "link").symlink_to(good)
    with pytest.raises(srs.SrsError):
        srs.read_secret(str(tmp_path / "link"))
    (tmp_path / "short").write_bytes(b"short\n")
    (tmp_path / "short").chmod(0o600)
    with pytest.raises(srs.SrsError, match="at least 16"):
        srs.read_secret(str(tmp_path / "short"))


def test_a_redirect_is_sent_from_an_srs_address(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(SECRET)
    (tmp_path / "secret").chmod(0o600)
    cfg = make_config(tmp_path, srs_domain="srs.hub.example", srs_secret_file=str(tmp_path / "secret"))
    script(tmp_path, b'redirect "bob@example.net";')
    run(tmp_path, cfg)
    [(args, _data)] = sent(tmp_path)
    sender = args[2]
    assert sender.startswith("SRS0=") and sender.endswith("=example.org=alice@srs.hub.example")
    assert srs.reverse(sender, "srs.hub.example", SECRET) == "alice@example.org"


def test_srs_settings_go_together(tmp_path: Path) -> None:
    from vdeliver.sieve.delivery import settings

    with pytest.raises(config.ConfigError, match="go together"):
        settings(make_config(tmp_path, srs_domain="srs.hub.example"))
    with pytest.raises(config.ConfigError, match="absolute path"):
        settings(make_config(tmp_path, srs_domain="srs.hub.example", srs_secret_file="secret"))


def test_the_socketmap_sends_a_bounce_back_and_refuses_a_forged_one(tmp_path: Path) -> None:
    from vdeliver.socketmap.lookup import open_backend

    (tmp_path / "secret").write_bytes(SECRET)
    (tmp_path / "secret").chmod(0o600)
    cfg = config.build({"accounts": {"database": str(tmp_path / "accounts.sqlite")},
                        "sieve": {"srs_domain": "srs.hub.example", "srs_secret_file": str(tmp_path / "secret")}})
    backend = open_backend(cfg, statement_timeout=3.0)
    address = srs.forward("alice@example.org", "srs.hub.example", SECRET)
    assert backend.lookup("virtuser", address) == "alice@example.org"
    assert backend.lookup("access_in", f"To:{address}") == "RELAY"
    assert backend.lookup("access_out", f"To:{address}") == "RELAY"
    assert backend.srs is not None
    forged = address.replace("=example.org=", "=evil.example=")
    assert backend._srs("virtuser", forged) is None and backend._srs("access_out", f"To:{forged}") is None
    # The incoming sendmail relays for the SRS domain (map R): what is not ours is refused at RCPT.
    assert backend.lookup("access_in", f"To:{forged}") == "ERROR:5.1.1:550 Invalid or expired SRS address"
    assert backend._srs("access_in", "To:postmaster@srs.hub.example") is None  # To:srs.hub.example decides
    assert backend._srs("access_in", "To:example.org") is None
    os.unlink(tmp_path / "secret")
    with pytest.raises(Exception, match="srs_secret_file"):
        open_backend(cfg, statement_timeout=3.0)


def test_without_srs_the_envelope_is_kept(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    script(tmp_path, b'redirect "bob@example.net";')
    run(tmp_path, cfg, RAW)
    [(args, _data)] = sent(tmp_path)
    assert args[2] == "alice@example.org"

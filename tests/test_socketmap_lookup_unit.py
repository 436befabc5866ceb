"""The socket map's pure functions, without a server or makemap: parse_map() and key_parts()
of vdeliver.socketmap.lookup, and the read path vdeliver.accounts.snapshot (whole, slice,
targets) over an in-memory SQLite database made from the schema's migrations, or over a
fake query function that records what is asked.  test_socketmap_lookup.py compares the
running server with the compiled maps end to end."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdeliver.accounts import snapshot
from vdeliver.accounts.schema import MIGRATIONS
from vdeliver.socketmap.lookup import MAPS, key_parts, parse_map

# -- parse_map --------------------------------------------------------------------------


def test_parse_map_virtusertable() -> None:
    text = ("# generated\n\nfred@away.com\tfred-away-com\n  Joe@Away.COM   a b  c \n"
            "@away.com\terror:nouser 550 5.1.1 User unknown\nfred@away.com\tsecond\nlonely\n")
    assert parse_map("virtusertable", text) == {
        "fred@away.com": "fred-away-com",  # the first of duplicates, as makemap keeps it
        "joe@away.com": "a b  c",
        "@away.com": "error:nouser 550 5.1.1 User unknown",
        "lonely": "",
    }


def test_parse_map_access() -> None:
    text = "To:fred@away.com\tRELAY\nConnect:127.0.0.1 OK\n"
    assert parse_map("access.in", text) == {"to:fred@away.com": "RELAY", "connect:127.0.0.1": "OK"}
    assert parse_map("access_out", text) == parse_map("access.in", text)


def test_parse_map_virtuserdomains() -> None:
    assert parse_map("virtuserdomains", "Away.com\nalias.com\n\n# x\n") == {"away.com": "Away.com",
                                                                              "alias.com": "alias.com"}


@pytest.mark.parametrize("name", ["aliases", "vdeliver-aliases"])
def test_parse_map_aliases(name: str) -> None:
    text = "vd-fred-away-com: fred@away.com, \\fred\nOwner-X :  x@y\nno colon here\n"
    assert parse_map(name, text) == {
        "vd-fred-away-com": "fred@away.com, \\fred",
        "owner-x": "x@y",
        "no colon here": "",
    }


def test_parse_map_crlf_and_blank_lines() -> None:
    assert parse_map("virtusertable", "a@b.c x\r\n\r\n   \r\n#c\r\n") == {"a@b.c": "x"}


_MAP_NAMES = st.sampled_from(sorted(set(MAPS.values()) | {"virtusertable", "vdeliver-aliases"}))


@given(name=_MAP_NAMES, text=st.text())
def test_parse_map_never_raises(name: str, text: str) -> None:
    entries = parse_map(name, text)
    for key, value in entries.items():
        assert key == key.strip() and value == value.strip()
        assert "\n" not in key and "\n" not in value
        assert not key.startswith("#")


@given(name=st.sampled_from(["virtusertable", "access.in"]),
       pairs=st.lists(st.tuples(st.from_regex(r"[A-Za-z0-9@.:_-]{1,20}", fullmatch=True),
                                st.from_regex(r"[A-Za-z0-9@.:_-]{1,10}( [A-Za-z0-9]{1,5})?", fullmatch=True)),
                      max_size=20))
def test_parse_map_reads_back_what_a_map_file_says(name: str, pairs: list[tuple[str, str]]) -> None:
    text = "".join(f"{k}\t{v}\n" for k, v in pairs)
    expected: dict[str, str] = {}
    for k, v in pairs:
        if not k.startswith("#"):
            expected.setdefault(k.lower(), v)
    assert parse_map(name, text) == expected


# -- key_parts --------------------------------------------------------------------------


@pytest.mark.parametrize(("map_name", "key", "expected"), [
    ("virtuser", "fred@away.com", ("away.com", "fred")),
    ("virtuser", "Fred@Away.COM", ("away.com", "fred")),
    ("virtuser", "fred+lists@away.com", ("away.com", "fred+lists")),
    ("virtuser", "@away.com", ("away.com", "")),
    ("virtuser", "away.com.", ("away.com", "")),
    ("virtuser", "a@b@away.com", ("away.com", "a@b")),
    ("virtuser", "To:fred@away.com", ("away.com", "to:fred")),  # tags belong to access maps only
    ("virtuserdomains", "Away.com", ("away.com", "")),
    ("access_in", "To:fred@away.com", ("away.com", "fred")),
    ("access_in", "TO:Fred@Away.com.", ("away.com", "fred")),
    ("access_out", "To:away.com", ("away.com", "")),
    ("access_in", "Connect:127.0.0.1", ("127.0.0.1", "")),
    ("access_in", "IPv6:1:2::3", ("ipv6:1:2::3", "")),  # not an alphabetic tag: kept
    ("access_in", ":fred@away.com", ("away.com", ":fred")),
    ("aliases", "vd-fred-away-com", ("vd-fred-away-com", "")),
    ("virtuser", "", ("", "")),
])
def test_key_parts(map_name: str, key: str, expected: tuple[str, str]) -> None:
    assert key_parts(map_name, key) == expected


@given(map_name=st.sampled_from(sorted(MAPS)), key=st.text())
def test_key_parts_never_raises(map_name: str, key: str) -> None:
    domain, local = key_parts(map_name, key)
    assert domain == domain.lower() and not domain.endswith(".")
    assert local == local.lower()
    assert "@" not in domain
    if "@" not in key:
        assert local == ""


@given(local=st.from_regex(r"[a-z0-9._+-]{1,20}", fullmatch=True),
       domain=st.from_regex(r"[a-z0-9-]{1,10}(\.[a-z0-9-]{1,10}){0,3}", fullmatch=True))
def test_key_parts_of_every_key_form(local: str, domain: str) -> None:
    address = f"{local}@{domain}"
    assert key_parts("virtuser", address) == (domain, local)
    assert key_parts("virtuser", address.upper() + ".") == (domain, local)
    assert key_parts("access_in", f"To:{address}") == (domain, local)
    assert key_parts("access_out", f"To:{domain}") == (domain, "")
    assert key_parts("virtuser", f"@{domain}") == (domain, "")


# -- snapshot over SQLite ------------------------------------------------------------------

Query = snapshot.Query


def make_db(rows: dict[str, list[tuple[Any, ...]]] | None = None) -> sqlite3.Connection:
    db = sqlite3.connect(":memory:")
    for _version, _name, statements in MIGRATIONS:
        for sql in statements:
            db.execute(sql)
    for table, values in (rows if rows is not None else SAMPLE).items():
        for row in values:
            marks = ", ".join("?" for _ in row)
            db.execute(f"INSERT INTO {table} VALUES ({marks})", row)
    return db


def query_of(db: sqlite3.Connection, log: list[tuple[str, tuple[Any, ...]]] | None = None) -> Query:
    def q(sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        if log is not None:
            log.append((sql, params))
        cur = db.execute(sql, params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    return q


T = "2026-01-01T00:00:00Z"
SAMPLE: dict[str, list[tuple[Any, ...]]] = {
    "domains": [("away.com", None, None, T), ("other.org", None, "postmaster@away.com", T),
                ("alias.com", "away.com", None, T)],
    # username, domain, password, format, quota_bytes, status, reason, keep_copy, created_at
    "mailboxes": [("fred", "away.com", "{ARGON2ID}secret", "mbox", 0, "active", "", 1, T),
                  ("joe", "away.com", "", "maildir", 1000, "disabled", "left", 0, T),
                  ("postmaster", "away.com", "", "mbox", 0, "active", "", 0, T)],
    "aliases": [("info", "away.com", "joe@away.com"), ("info", "away.com", "fred@away.com"),
                ("sales", "other.org", "joe@away.com")],
    "forwards": [("fred", "away.com", "fred@gmail.example")],
}


@pytest.fixture
def db() -> Iterator[sqlite3.Connection]:
    conn = make_db()
    try:
        yield conn
    finally:
        conn.close()


def test_whole(db: sqlite3.Connection) -> None:
    snap = snapshot.whole(query_of(db), serial=7, changed_at=T)
    assert (snap.serial, snap.changed_at) == (7, T)
    assert [d["name"] for d in snap.domains] == ["alias.com", "away.com", "other.org"]
    assert snap.domains[0] == {"name": "alias.com", "alias_of": "away.com", "catchall": None, "created_at": T}
    assert [(m["username"], m["domain"]) for m in snap.mailboxes] == [
        ("fred", "away.com"), ("joe", "away.com"), ("postmaster", "away.com")]
    assert set(snap.mailboxes[0]) == {c.strip() for c in snapshot.MAILBOX_COLS.split(",")}
    assert all("password" not in m for m in snap.mailboxes)  # hashes never leave the database
    assert snap.aliases == {"info@away.com": ["fred@away.com", "joe@away.com"], "sales@other.org": ["joe@away.com"]}
    assert snap.forwards == {"fred@away.com": ["fred@gmail.example"]}
    assert snap.hosted() == {"alias.com", "away.com", "other.org"}


def test_whole_of_an_empty_database() -> None:
    conn = make_db({})
    try:
        snap = snapshot.whole(query_of(conn))
    finally:
        conn.close()
    assert (snap.domains, snap.mailboxes, snap.aliases, snap.forwards) == ([], [], {}, {})
    assert snap == snapshot.empty()


def test_slice_of_a_mailbox(db: sqlite3.Connection) -> None:
    snap = snapshot.slice(query_of(db), "away.com", "fred")
    assert [d["name"] for d in snap.domains] == ["away.com"]
    assert [(m["username"], m["keep_copy"]) for m in snap.mailboxes] == [("fred", 1)]
    assert snap.aliases == {}
    assert snap.forwards == {"fred@away.com": ["fred@gmail.example"]}
    assert (snap.serial, snap.changed_at) == (0, "")


def test_slice_of_an_alias(db: sqlite3.Connection) -> None:
    snap = snapshot.slice(query_of(db), "away.com", "info")
    assert snap.mailboxes == [] and snap.forwards == {}
    assert snap.aliases == {"info@away.com": ["fred@away.com", "joe@away.com"]}


def test_slice_through_an_alias_domain(db: sqlite3.Connection) -> None:
    snap = snapshot.slice(query_of(db), "alias.com", "fred")
    assert [d["name"] for d in snap.domains] == ["alias.com", "away.com"]
    assert [(m["username"], m["domain"]) for m in snap.mailboxes] == [("fred", "away.com")]
    assert snap.forwards == {"fred@away.com": ["fred@gmail.example"]}


def test_slice_of_a_domain_key_reads_only_the_domain(db: sqlite3.Connection) -> None:
    log: list[tuple[str, tuple[Any, ...]]] = []
    snap = snapshot.slice(query_of(db, log), "other.org", "")
    assert [d["catchall"] for d in snap.domains] == ["postmaster@away.com"]
    assert (snap.mailboxes, snap.aliases, snap.forwards) == ([], {}, {})
    assert len(log) == 1 and "FROM domains" in log[0][0]


def test_slice_of_nothing(db: sqlite3.Connection) -> None:
    log: list[tuple[str, tuple[Any, ...]]] = []
    assert snapshot.slice(query_of(db, log), "", "fred") == snapshot.empty()
    assert log == []  # no domain: no query at all
    assert snapshot.slice(query_of(db, log), "nowhere.example", "fred") == snapshot.empty()
    assert len(log) == 1


def test_slice_reads_only_the_keys_rows_in_one_statement(db: sqlite3.Connection) -> None:
    """One round trip a lookup (issue 21): one statement over the four tables, by the key only."""
    log: list[tuple[str, tuple[Any, ...]]] = []
    snapshot.slice(query_of(db, log), "away.com", "fred")
    assert len(log) == 1
    sql, params = log[0]
    assert {part.split()[0] for part in sql.split(" FROM ")[1:]} == {"domains", "mailboxes", "aliases", "forwards"}
    assert set(params) == {"away.com", "fred"}
    assert "password" not in sql


def test_targets(db: sqlite3.Connection) -> None:
    q = query_of(db)
    assert snapshot.targets(q, "forwards") == {"fred@away.com": ["fred@gmail.example"]}
    assert snapshot.targets(q, "aliases", "other.org", "sales") == {"sales@other.org": ["joe@away.com"]}
    assert snapshot.targets(q, "aliases", "away.com", "nobody") == {}
    with pytest.raises(AssertionError):
        snapshot.targets(q, "mailboxes")


def test_targets_with_a_fake_query() -> None:
    """Only the query contract matters: rows in the order given are grouped by address."""
    asked: list[tuple[str, tuple[Any, ...]]] = []
    canned = {
        "SELECT username, domain, target FROM aliases ORDER BY domain, username, target": [
            {"username": "a", "domain": "x.org", "target": "1@y"},
            {"username": "a", "domain": "x.org", "target": "2@y"},
            {"username": "b", "domain": "x.org", "target": "3@y"},
        ],
    }

    def q(sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        asked.append((sql, params))
        return canned.get(sql, [])

    assert snapshot.targets(q, "aliases") == {"a@x.org": ["1@y", "2@y"], "b@x.org": ["3@y"]}
    assert snapshot.targets(q, "aliases", "x.org", "a") == {}
    sql = ("SELECT username, domain, target FROM aliases WHERE domain = ? AND username = ?"
           " ORDER BY domain, username, target")
    assert asked[1] == (sql, ("x.org", "a"))


_USERS = st.sampled_from(["fred", "joe", "info", "sales"])
_DOMAINS = st.sampled_from(["away.com", "other.org"])
_ADDR = st.tuples(_USERS, _DOMAINS)


@given(mailboxes=st.sets(_ADDR, max_size=6),
       aliases=st.sets(st.tuples(_USERS, _DOMAINS, st.sampled_from(["a@x.example", "b@x.example", "fred@away.com"])),
                       max_size=8),
       forwards=st.sets(st.tuples(_USERS, _DOMAINS, st.sampled_from(["f@y.example", "g@y.example"])), max_size=6),
       key=_ADDR)
def test_a_slice_holds_exactly_the_keys_rows_of_the_whole(
        mailboxes: set[tuple[str, str]], aliases: set[tuple[str, str, str]],
        forwards: set[tuple[str, str, str]], key: tuple[str, str]) -> None:
    rows: dict[str, list[tuple[Any, ...]]] = {
        "domains": [("away.com", None, None, T), ("other.org", None, "fred@away.com", T)],
        "mailboxes": [(u, d, "", "mbox", 0, "active", "", 0, T) for u, d in sorted(mailboxes)],
        "aliases": sorted(aliases),
        "forwards": sorted(f for f in forwards if (f[0], f[1]) in mailboxes),
    }
    conn = make_db(rows)
    try:
        q = query_of(conn)
        whole = snapshot.whole(q)
        local, domain = key
        part = snapshot.slice(q, domain, local)
    finally:
        conn.close()
    address = f"{local}@{domain}"
    assert part.domains == [d for d in whole.domains if d["name"] == domain]
    assert part.mailboxes == [m for m in whole.mailboxes if (m["username"], m["domain"]) == key]
    assert part.aliases == {a: t for a, t in whole.aliases.items() if a == address}
    assert part.forwards == {a: t for a, t in whole.forwards.items() if a == address}

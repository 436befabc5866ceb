"""accounts/routing.py on hand-built Snapshots: where mail for an address goes next
(next_hops, in sendmail's virtusertable order) and the loops vmailctl refuses (find_loop),
checked against an independent cycle search on random alias graphs."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdeliver.accounts.routing import find_loop, next_hops, strip_detail
from vdeliver.accounts.snapshot import Snapshot


def dom(name: str, alias_of: str | None = None, catchall: str | None = None) -> dict[str, Any]:
    return {"name": name, "alias_of": alias_of, "catchall": catchall, "created_at": ""}


def box(address: str) -> dict[str, Any]:
    user, _, domain = address.partition("@")
    return {"username": user, "domain": domain, "format": "mbox", "quota_bytes": 0, "status": "active",
            "reason": "", "keep_copy": 0, "created_at": ""}


def snap(domains: list[dict[str, Any]], mailboxes: Sequence[str] = (), aliases: dict[str, list[str]] | None = None,
         forwards: dict[str, list[str]] | None = None) -> Snapshot:
    return Snapshot(serial=0, changed_at="", domains=domains, mailboxes=[box(m) for m in mailboxes],
                    aliases=aliases or {}, forwards=forwards or {})


def test_strip_detail() -> None:
    assert strip_detail("fred+lists@away.com") == "fred@away.com"
    assert strip_detail("fred+a+b@away.com") == "fred@away.com"
    assert strip_detail("fred@away.com") == "fred@away.com"
    assert strip_detail("a@b@away.com") == "a@b@away.com"


# -- next_hops ----------------------------------------------------------------------------

BASE = snap(
    [dom("away.com", catchall="postmaster@away.com"), dom("alias.com", alias_of="away.com"), dom("plain.org")],
    mailboxes=["fred@away.com", "joe@away.com", "postmaster@away.com", "info@away.com"],
    aliases={"info@away.com": ["joe@away.com"], "sales@away.com": ["fred@away.com", "joe@away.com"],
             "team@plain.org": ["fred@away.com"]},
    forwards={"fred@away.com": ["fred@gmail.example", "fred@away.com"]},
)


@pytest.mark.parametrize(("address", "hops"), [
    ("someone@gmail.example", []),  # off-site: leaves this host
    ("fred@alias.com", ["fred@away.com"]),  # an alias domain points to its domain
    ("anyone+x@alias.com", ["anyone@away.com"]),
    ("fred@away.com", ["fred@gmail.example", "fred@away.com"]),  # a forward comes first
    ("fred+lists@away.com", ["fred@gmail.example", "fred@away.com"]),
    ("joe@away.com", []),  # a mailbox ends the walk
    ("info@away.com", []),  # a mailbox wins over an alias of the same name
    ("sales@away.com", ["fred@away.com", "joe@away.com"]),
    ("nobody@away.com", ["postmaster@away.com"]),  # the catch-all
    ("nobody@plain.org", []),  # no catch-all: nowhere (sendmail bounces)
    ("team@plain.org", ["fred@away.com"]),
])
def test_next_hops(address: str, hops: list[str]) -> None:
    assert next_hops(BASE, address) == hops


def test_next_hops_returns_a_copy() -> None:
    hops = next_hops(BASE, "sales@away.com")
    hops.append("mutated@x")
    assert BASE.aliases["sales@away.com"] == ["fred@away.com", "joe@away.com"]


def test_next_hops_of_an_empty_snapshot() -> None:
    assert next_hops(snap([]), "fred@away.com") == []


# -- find_loop ------------------------------------------------------------------------------


def test_mailboxes_aliases_and_forwards_without_a_loop() -> None:
    s = snap([dom("away.com")], mailboxes=["fred@away.com", "joe@away.com"],
             aliases={"info@away.com": ["joe@away.com", "fred@away.com"]},
             forwards={"fred@away.com": ["fred@gmail.example"]})
    assert find_loop(s) == []


def test_alias_loop() -> None:
    s = snap([dom("away.com")], aliases={"a@away.com": ["b@away.com"], "b@away.com": ["a@away.com"]})
    assert find_loop(s) == ["a@away.com", "b@away.com", "a@away.com"]


def test_alias_to_itself() -> None:
    s = snap([dom("away.com")], aliases={"a@away.com": ["x@off.example", "a@away.com"]})
    assert find_loop(s) == ["a@away.com", "a@away.com"]


def test_loop_through_a_detail() -> None:
    s = snap([dom("away.com")], aliases={"a@away.com": ["b+tag@away.com"], "b@away.com": ["a+x@away.com"]})
    assert find_loop(s) == ["a@away.com", "b@away.com", "a@away.com"]


def test_forward_loop_between_mailboxes() -> None:
    s = snap([dom("away.com")], mailboxes=["fred@away.com", "joe@away.com"],
             forwards={"fred@away.com": ["joe@away.com"], "joe@away.com": ["fred@away.com"]})
    assert find_loop(s) == ["fred@away.com", "joe@away.com", "fred@away.com"]


def test_loop_through_an_alias_domain() -> None:
    s = snap([dom("away.com"), dom("alias.com", alias_of="away.com")],
             aliases={"x@away.com": ["x@alias.com"]})
    assert find_loop(s) == ["x@away.com", "x@alias.com", "x@away.com"]


def test_catchall_to_a_missing_address_loops() -> None:
    s = snap([dom("away.com", catchall="nobody@away.com")])
    assert find_loop(s) == ["nobody@away.com", "nobody@away.com"]


def test_catchall_to_a_mailbox_does_not_loop() -> None:
    s = snap([dom("away.com", catchall="postmaster@away.com")], mailboxes=["postmaster@away.com"])
    assert find_loop(s) == []


def test_catchalls_pointing_at_each_other() -> None:
    s = snap([dom("a.example", catchall="x@b.example"), dom("b.example", catchall="y@a.example")])
    loop = find_loop(s)
    assert loop[0] == loop[-1] and set(loop) == {"x@b.example", "y@a.example"}


def test_a_chain_that_leaves_the_host_is_no_loop() -> None:
    s = snap([dom("away.com"), dom("alias.com", alias_of="away.com")],
             aliases={"a@away.com": ["b@alias.com"], "b@away.com": ["c@elsewhere.example"]})
    assert find_loop(s) == []


# -- an independent check on random graphs ---------------------------------------------------

_LOCALS = ["a", "b", "c", "d"]
_DOMS = ["one.example", "two.example", "off.example"]
_ADDRS = [f"{u}@{d}" for u in _LOCALS for d in _DOMS]
_TARGETS = _ADDRS + [f"a+t@{d}" for d in _DOMS]


def _has_cycle(s: Snapshot, sources: list[str]) -> bool:
    """Prune nodes without a successor left until nothing changes; a cycle stays."""
    nodes: set[str] = set()
    todo = [strip_detail(x) for x in sources]
    while todo:
        n = todo.pop()
        if n not in nodes:
            nodes.add(n)
            todo += [strip_detail(x) for x in next_hops(s, n)]
    edges = {n: {strip_detail(x) for x in next_hops(s, n)} for n in nodes}
    while True:
        sinks = {n for n, out in edges.items() if not out & edges.keys()}
        if not sinks:
            return bool(edges)
        for n in sinks:
            del edges[n]


@given(
    alias_of=st.sampled_from([None, "one.example"]),
    catchall=st.sampled_from([None, *_TARGETS]),
    mailboxes=st.sets(st.sampled_from(_ADDRS), max_size=4),
    aliases=st.dictionaries(st.sampled_from(_ADDRS), st.lists(st.sampled_from(_TARGETS), min_size=1, max_size=3),
                            max_size=6),
    forwards=st.dictionaries(st.sampled_from(_ADDRS), st.lists(st.sampled_from(_TARGETS), min_size=1, max_size=2),
                             max_size=3),
)
def test_find_loop_agrees_with_an_independent_search(alias_of: str | None, catchall: str | None,
                                                      mailboxes: set[str], aliases: dict[str, list[str]],
                                                      forwards: dict[str, list[str]]) -> None:
    domains = [dom("one.example", catchall=catchall), dom("two.example", alias_of=alias_of)]
    s = snap(domains, sorted(mailboxes), aliases, forwards)
    loop = find_loop(s)
    sources = list(aliases) + list(forwards)
    sources += [f"{d['name']}-catchall@{d['name']}" for d in domains if d["catchall"]]
    sources += [d["catchall"] for d in domains if d["catchall"]]
    assert bool(loop) == _has_cycle(s, sources)
    if loop:
        assert len(loop) >= 2 and loop[0] == loop[-1]
        assert len(set(loop[:-1])) == len(loop) - 1  # a simple cycle
        for here, there in itertools.pairwise(loop):
            assert there in {strip_detail(x) for x in next_hops(s, here)}

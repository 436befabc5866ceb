"""Comparators and match types (RFC 5228 2.7, RFC 4790, RFC 5231), and what header and address
tests see of a message (RFC 2047 decoding, RFC 5322 address lists, RFC 5233 subaddresses)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdeliver.sieve.headers import Address, addresses, decode_value, envelope_address
from vdeliver.sieve.match import MatchError, glob, match

MATCHES: list[tuple[str, str, str, str, str | None, bool]] = [
    # type, comparator, value, key, relation, expected
    ("is", "i;ascii-casemap", "Frobnitzm", "frobnitzm", None, True),
    ("is", "i;octet", "Frobnitzm", "frobnitzm", None, False),
    ("is", "i;ascii-casemap", "\u00c9t\u00e9", "\u00e9t\u00e9", None, False),  # only ASCII folds
    ("contains", "i;ascii-casemap", "MAILER-DAEMON", "daemon", None, True),
    ("contains", "i;octet", "", "", None, True),
    ("matches", "i;ascii-casemap", "Saturday", "s*day", None, True),
    ("matches", "i;octet", "Saturday", "s*day", None, False),
    ("matches", "i;octet", "a*b", "a\\*b", None, True),  # an escaped star is a star
    ("matches", "i;octet", "axb", "a\\*b", None, False),
    ("matches", "i;octet", "abc", "a?c", None, True),
    ("matches", "i;octet", "ac", "a?c", None, False),
    ("matches", "i;octet", "\u00e9", "?", None, True),  # ? is one character, not one octet
    ("matches", "i;octet", "", "*", None, True),
    ("matches", "i;octet", "x", "", None, False),
    ("is", "i;ascii-numeric", "0042", "42", None, True),
    ("is", "i;ascii-numeric", "42abc", "42", None, True),  # the leading digits count
    ("is", "i;ascii-numeric", "abc", "xyz", None, True),  # both "infinity"
    ("is", "i;ascii-numeric", "abc", "42", None, False),
    ("value", "i;ascii-numeric", "10", "9", "gt", True),
    ("value", "i;ascii-numeric", "abc", "9", "gt", True),  # infinity is greater than any number
    ("value", "i;ascii-numeric", "5", "5", "ge", True),
    ("value", "i;ascii-numeric", "5", "5", "ne", False),
    ("value", "i;ascii-casemap", "B", "a", "gt", True),
    ("value", "i;octet", "B", "a", "gt", False),
]


@pytest.mark.parametrize(("kind", "comparator", "value", "key", "relation", "expected"), MATCHES)
def test_match(kind: str, comparator: str, value: str, key: str, relation: str | None, expected: bool) -> None:
    assert match(kind, comparator, value, key, relation) is expected


def test_bad_requests_are_match_errors() -> None:
    for args in (("contains", "i;ascii-numeric", "1", "1"), ("is", "i;nope", "a", "a"), ("nope", "i;octet", "a", "a")):
        with pytest.raises(MatchError):
            match(*args)
    with pytest.raises(MatchError):
        match("value", "i;octet", "a", "a", "bigger")


def test_glob_groups_for_match_variables() -> None:
    assert glob("Weekly report 42", "*report ??") == ["Weekly ", "4", "2"]
    assert glob("a.b.c", "*.*") == ["a", "b.c"]  # stars take as little as they can, the last the rest
    assert glob("abc", "x*") is None


@pytest.mark.timeout(30)
def test_a_hostile_key_cannot_stall_matching() -> None:
    value = "a" * 100_000
    assert not match("matches", "i;octet", value, "*a*a*a*a*a*a*a*a*a*a*b")
    assert match("matches", "i;octet", value + "b", "*a*a*a*a*a*a*a*a*a*a*b")


def _reference(value: str, key: str) -> bool:
    pattern, i = "", 0
    while i < len(key):
        ch = key[i]
        if ch == "\\" and i + 1 < len(key):
            pattern += re.escape(key[i + 1])
            i += 2
            continue
        pattern += ".*" if ch == "*" else "." if ch == "?" else re.escape(ch)
        i += 1
    return re.fullmatch(pattern, value, re.DOTALL) is not None


_small = st.text(alphabet="ab*?\\.", max_size=8)


@given(_small, _small)
def test_matches_agrees_with_a_regex_reference(value: str, key: str) -> None:
    assert match("matches", "i;octet", value, key) == _reference(value, key)


@given(st.text(max_size=10), st.text(alphabet=st.characters(blacklist_characters="*?\\"), max_size=5))
def test_matches_without_wildcards_is_is_and_stars_around_are_contains(value: str, key: str) -> None:
    assert match("matches", "i;octet", value, key) == match("is", "i;octet", value, key)
    assert match("matches", "i;octet", value, f"*{key}*") == match("contains", "i;octet", value, key)


@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=10),
       st.text(alphabet=st.characters(max_codepoint=127), max_size=10))
def test_casemap_is_octet_on_lower_case(value: str, key: str) -> None:
    for kind in ("is", "contains"):
        assert match(kind, "i;ascii-casemap", value, key) == match(kind, "i;octet", value.lower(), key.lower())


# -- header values and addresses ---------------------------------------------------------------------

DECODED = [
    (b"=?ISO-8859-1?Q?Andr=E9?= Pirard", "Andr\u00e9 Pirard"),  # RFC 2047 section 8
    (b"=?ISO-8859-1?B?SWYgeW91IGNhbiByZWFkIHRoaXMgeW8=?= =?ISO-8859-2?B?dSB1bmRlcnN0YW5kIHRoZSBleGFtcGxlLg==?=",
     "If you can read this you understand the example."),
    (b"=?ISO-8859-1?Q?a?= =?ISO-8859-1?Q?b?=", "ab"),
    (b"=?ISO-8859-1?Q?a?= b", "a b"),
    (b"=?UTF-8?Q?caf=C3=A9_au_lait?=", "caf\u00e9 au lait"),
    (b"=?x-unknown?Q?abc?=", "=?x-unknown?Q?abc?="),
    (b"=?UTF-8?B?!!!?=", "=?UTF-8?B?!!!?="),
    (b"folded\r\n line", "folded line"),
    (b"  padded \t", "padded"),
    (b"caf\xc3\xa9 \xff", "caf\u00e9 \ufffd"),
]


@pytest.mark.parametrize(("raw", "text"), DECODED)
def test_decode_value(raw: bytes, text: str) -> None:
    assert decode_value(raw) == text


@given(st.binary(max_size=80))
def test_decode_value_never_raises(raw: bytes) -> None:
    assert isinstance(decode_value(raw), str)


ADDRESSES = [
    ("alice@example.org", [("alice", "example.org")]),
    ("Alice <alice@example.org>, bob@example.net", [("alice", "example.org"), ("bob", "example.net")]),
    ('"Doe, John" <john@example.org> (work)', [("john", "example.org")]),
    ('"john doe"@example.org', [("john doe", "example.org")]),
    ("team: a@x.org, b@y.org;, c@z.org", [("a", "x.org"), ("b", "y.org"), ("c", "z.org")]),
    ("undisclosed-recipients:;", []),
    ("<@relay.example:user@example.org>", [("user", "example.org")]),
    ("MAILER-DAEMON", [("MAILER-DAEMON", "")]),
    ("a@b.c (comment (nested) here)", [("a", "b.c")]),
    ("", []),
]


@pytest.mark.parametrize(("value", "expected"), ADDRESSES)
def test_addresses(value: str, expected: list[tuple[str, str]]) -> None:
    assert [(a.localpart, a.domain) for a in addresses(value)] == expected


@given(st.text(max_size=60))
def test_addresses_never_raise(value: str) -> None:
    assert all(isinstance(a, Address) for a in addresses(value))


def test_address_parts_and_subaddress() -> None:
    a = Address("ken+sieve", "example.org")
    assert [a.part(p) for p in ("all", "localpart", "domain", "user", "detail")] == [
        "ken+sieve@example.org", "ken+sieve", "example.org", "ken", "sieve"]
    assert Address("ken", "example.org").part("detail") is None  # no detail: matches nothing
    assert Address("ken+", "example.org").part("detail") == ""
    assert envelope_address("<>") == Address("", "") and envelope_address("") == Address("", "")
    assert envelope_address("<a@b.c>") == Address("a", "b.c")


def test_variable_expansion_and_modifiers() -> None:
    from vdeliver.sieve.variables import change_flags, expand, flags_of, modify

    v = {"company": "ACME", "a": "${b}"}
    assert expand("${Company} ${1} ${0} ${missing}.", v, ["all", "one"]) == "ACME one all ."
    assert expand("${a}", v, []) == "${b}"  # one pass: a value is not expanded again
    assert expand("${} ${a b} ${ ${company}", v, []) == "${} ${a b} ${ ACME"
    assert expand("${00001}", {}, ["x", "y"]) == "y"
    assert modify("juMBlEd lETteRS", {"upperfirst": True, "lower": True}) == "Jumbled letters"
    assert modify("a*b?c\\", {"quotewildcard": True, "length": True}) == "9"
    assert flags_of("\\seen Foo foo \\SEEN bar") == ("\\Seen", "Foo", "bar")
    assert change_flags("removeflag", "a B c", ["b"]) == "a c"
    assert change_flags("addflag", "a", ["A", "b"]) == "a b"

"""Comparators and match types (RFC 5228 2.7, RFC 4790, RFC 5231), and what header and address
tests see of a message (RFC 2047 decoding, RFC 5322 address lists, RFC 5233 subaddresses)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.sieve_oracle import Pigeonhole
from vdeliver.sieve.headers import Address, addresses, decode_value, envelope_address
from vdeliver.sieve.match import MatchError, glob, glob_groups, match, matches_any

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


# -- the RFCs' examples, table by table ---------------------------------------------------------------

RFC_CASES: list[tuple[str, str, str, str, str | None, bool]] = [
    # RFC 5228 section 2.7.1: "?" one character, "*" zero or more, "\\" takes the next literally
    ("matches", "i;ascii-casemap", "frobnitzm", "fro?nitzm", None, True),
    ("matches", "i;ascii-casemap", "frobnitzm", "fro*", None, True),
    ("matches", "i;ascii-casemap", "frobnitzm", "*m", None, True),
    ("matches", "i;ascii-casemap", "frobnitzm", "f?o*", None, True),
    ("matches", "i;ascii-casemap", "frobnitzm", "f?b*", None, False),
    ("matches", "i;ascii-casemap", "frobnitzm", "", None, False),
    ("matches", "i;ascii-casemap", "", "", None, True),
    ("matches", "i;ascii-casemap", "1?2", "1\\?2", None, True),
    ("matches", "i;ascii-casemap", "1x2", "1\\?2", None, False),
    ("matches", "i;ascii-casemap", "a\\b", "a\\\\b", None, True),  # an escaped backslash
    ("contains", "i;ascii-casemap", "frobnitzm", "", None, True),  # "" is in every string
    ("contains", "i;ascii-casemap", "MAKE MONEY FAST", "money", None, True),
    # RFC 5228 section 2.7.3: i;octet is exact, i;ascii-casemap folds A-Z only
    ("is", "i;octet", "MAKE MONEY FAST", "MAKE MONEY FAST", None, True),
    ("is", "i;octet", "MAKE MONEY FAST", "make money fast", None, False),
    ("is", "i;ascii-casemap", "MAKE MONEY FAST", "make money fast", None, True),
    ("contains", "i;ascii-casemap", "\u00c7A", "\u00e7a", None, False),
    ("matches", "i;ascii-casemap", "\u00c7A", "?a", None, True),
    # RFC 4790 section 9.1.1 i;ascii-numeric: the leading digits as an unbounded number,
    # no leading digit is positive infinity (Pigeonhole: "" is infinity too)
    ("is", "i;ascii-numeric", "123", "0123", None, True),
    ("is", "i;ascii-numeric", "123x", "123", None, True),
    ("is", "i;ascii-numeric", "12 3", "12", None, True),
    ("is", "i;ascii-numeric", " 12", "12", None, False),  # a blank is not a digit
    ("is", "i;ascii-numeric", "-1", "1", None, False),  # nor is a sign
    ("is", "i;ascii-numeric", "", "x", None, True),
    ("is", "i;ascii-numeric", "\u0663", "3", None, False),  # only ASCII digits count
    ("value", "i;ascii-numeric", "18446744073709551617", "18446744073709551616", "gt", True),
    ("value", "i;ascii-numeric", "x", "99999999999999999999", "gt", True),
    ("value", "i;ascii-numeric", "x", "y", "eq", True),
    ("value", "i;ascii-numeric", "x", "y", "lt", False),
    ("value", "i;ascii-numeric", "5", "x", "lt", True),
    # RFC 5231 section 5 and 9: "X-Priority: 1 (Highest)" is less than 3; the six relations
    ("value", "i;ascii-numeric", "1 (Highest)", "3", "lt", True),
    ("value", "i;ascii-numeric", "5", "3", "lt", False),
    ("value", "i;ascii-numeric", "3", "3", "le", True),
    ("value", "i;ascii-numeric", "3", "3", "ge", True),
    ("value", "i;ascii-numeric", "3", "3", "gt", False),
    ("value", "i;ascii-numeric", "3", "4", "ne", True),
    ("value", "i;ascii-numeric", "3", "4", "eq", False),
    ("value", "i;ascii-casemap", "Bob", "alice", "gt", True),
    ("value", "i;ascii-casemap", "ALICE", "alice", "eq", True),
    ("value", "i;octet", "ALICE", "alice", "lt", True),  # "A" < "a" as octets
    ("value", "i;ascii-casemap", "_", "a", "lt", True),  # folded to lower case, as Pigeonhole
    ("value", "i;ascii-casemap", "_", "A", "gt", False),
    ("value", "i;octet", "a", "ab", "lt", True),  # a prefix sorts first
    ("value", "i;octet", "\u00e9", "z", "gt", True),  # UTF-8 octet order is code point order
    ("value", "i;octet", "\U0001f600", "\uffff", "gt", True),
]


@pytest.mark.parametrize(("kind", "comparator", "value", "key", "relation", "expected"), RFC_CASES)
def test_rfc_examples(kind: str, comparator: str, value: str, key: str, relation: str | None, expected: bool) -> None:
    assert match(kind, comparator, value, key, relation) is expected


def test_count_is_a_number_compared_with_the_key() -> None:
    # RFC 5231 section 4.1: :count compares the number of values, as i;ascii-numeric does
    def count(values: list[str], relation: str, key: str) -> bool:
        return matches_any("value", "i;ascii-numeric", [str(len(values))], [key], relation)

    assert count(["a@b", "c@d", "e@f"], "ge", "3") and not count(["a@b"], "ge", "3")
    assert count([], "eq", "0") and count([], "lt", "x")  # any count is less than "infinity"


def test_any_value_against_any_key() -> None:
    # RFC 5228 section 2.7.1: true when any value matches any key
    assert matches_any("is", "i;ascii-casemap", ["a", "b"], ["x", "B"])
    assert not matches_any("is", "i;ascii-casemap", ["a", "b"], ["x", "y"])
    assert not matches_any("contains", "i;ascii-casemap", [], [""])  # no value, no match
    assert not matches_any("contains", "i;ascii-casemap", ["a"], [])
    assert matches_any("value", "i;ascii-numeric", ["1", "9"], ["5"], "gt")


def test_groups_under_a_comparator_come_from_the_value_as_written() -> None:
    assert glob_groups("i;ascii-casemap", "Weekly REPORT 42", "*report ??") == ["Weekly ", "4", "2"]
    assert glob_groups("i;octet", "Weekly REPORT 42", "*report ??") is None
    assert glob_groups("i;ascii-casemap", "[acme-users] [fwd] version 1.0 is out", "[*] *") == [
        "acme-users", "[fwd] version 1.0 is out"]  # RFC 5229 section 3.2's example
    with pytest.raises(MatchError):
        glob_groups("i;ascii-numeric", "1", "*")
    with pytest.raises(MatchError):
        glob_groups("i;nope", "1", "*")


@pytest.mark.timeout(10)
@pytest.mark.parametrize("key", ["*a*a*a*a*a*b", "*?*?*?*?*?*?*b", "a*" * 200 + "b", "*" + "?" * 500 + "b",
                                 "*aaaaaaaaaaaaaaaaaaaab*", "*a?a?a?a?a?a?a?a?a?a?c*"])
def test_no_key_stalls_on_100_kb(key: str) -> None:
    value = "a" * 100_000
    assert not match("matches", "i;ascii-casemap", value, key)
    assert glob_groups("i;ascii-casemap", value, key) is None


def _rebuild(key: str, groups: list[str]) -> str:
    """The key with each wildcard replaced by its group, escapes taken literally."""
    out, rest, i = [], iter(groups), 0
    while i < len(key):
        if key[i] == "\\" and i + 1 < len(key):
            out.append(key[i + 1])
            i += 2
            continue
        out.append(next(rest) if key[i] in "*?" else key[i])
        i += 1
    assert next(rest, None) is None, "one group for each wildcard"
    return "".join(out)


@given(st.text(alphabet="ab\u00e9", max_size=10), st.text(alphabet="ab\u00e9*?\\", max_size=8))
def test_groups_rebuild_the_value(value: str, key: str) -> None:
    groups = glob(value, key)
    assert (groups is not None) == _reference(value, key)
    if groups is not None:
        assert _rebuild(key, groups) == value
        qmarks = [g for g, w in zip(groups, _wildcards(key), strict=True) if w == "?"]
        assert all(len(g) == 1 for g in qmarks)


def _wildcards(key: str) -> list[str]:
    found, i = [], 0
    while i < len(key):
        if key[i] == "\\":
            i += 2
            continue
        if key[i] in "*?":
            found.append(key[i])
        i += 1
    return found


@given(st.text(alphabet="aAbB_[\u00e9", max_size=6), st.text(alphabet="aAbB_[\u00e9", max_size=6),
       st.sampled_from(["gt", "ge", "lt", "le", "eq", "ne"]))
def test_value_relations_are_consistent(value: str, key: str, relation: str) -> None:
    for comparator in ("i;octet", "i;ascii-casemap", "i;ascii-numeric"):
        def rel(r: str, v: str = value, k: str = key, c: str = comparator) -> bool:
            return match("value", c, v, k, r)

        assert rel("eq") != rel("ne") and rel("lt") != rel("ge") and rel("gt") != rel("le")
        assert rel("eq") == match("is", comparator, value, key)
        assert rel("gt") == match("value", comparator, key, value, "lt")  # swapped sides
    if value.isascii() and key.isascii():  # casemap is octet on lower case, orderings included
        lower = match("value", "i;octet", value.lower(), key.lower(), relation)
        assert match("value", "i;ascii-casemap", value, key, relation) == lower


# -- against Pigeonhole -----------------------------------------------------------------------------------

ORACLE_GROUPS = [
    ("abc", "*?"), ("abc", "?*"), ("a.b.c", "*.*"), ("a.b.c", "*.*.*"), ("abc", "**"), ("abc", "*?*"),
    ("[acme-users] [fwd] version 1.0 is out", "[*] *"), ("xaaay", "x*a*y"), ("abcabc", "*b*"), ("abcabc", "*b?*"),
    ("a*b", "a\\*b"), ("a\\b", "a\\\\b"), ("ab", "a\\b"), ("aXb", "a?B"), ("Weekly report 42", "*report ??"),
    ("list-bounces@lists.example.org", "*-bounces@*"), ("aaa", "*a"), ("aaa", "a*a"), ("abab", "*ab*ab*"),
    ("no match", "*x*"),
]


@pytest.mark.peers
@pytest.mark.parametrize(("value", "key"), ORACLE_GROUPS)
def test_match_variables_as_pigeonhole(pigeonhole: Pigeonhole, value: str, key: str) -> None:
    script = ('require ["fileinto", "variables"];\n'
              f'if header :matches "subject" {_q(key)} {{ fileinto "G:${{0}}|${{1}}|${{2}}|${{3}}|${{4}}"; }}\n')
    message = f"From: a@example.org\r\nSubject: {value}\r\n\r\nbody\r\n".encode()
    theirs = pigeonhole.run(script.encode(), message)
    groups = glob_groups("i;ascii-casemap", value, key)
    ours = ["INBOX"] if groups is None else ["G:" + "|".join(([value, *groups] + [""] * 5)[:5])]
    assert theirs.stores() == ours, theirs.output


ORACLE_RELATIONS = [
    ("_", "lt", "a", "i;ascii-casemap"), ("_", "gt", "A", "i;ascii-casemap"), ("[", "lt", "a", "i;ascii-casemap"),
    ("", "eq", "", "i;ascii-numeric"), ("", "gt", "5", "i;ascii-numeric"), ("", "eq", "x", "i;ascii-numeric"),
    ("007", "eq", "7", "i;ascii-numeric"), ("1 (Highest)", "lt", "3", "i;ascii-numeric"),
    ("99999999999999999999999", "gt", "99999999999999999999998", "i;ascii-numeric"),
    ("B", "gt", "a", "i;octet"), ("\u00e9", "gt", "z", "i;octet"), ("a", "lt", "ab", "i;octet"),
    ("Bob", "gt", "alice", "i;ascii-casemap"), ("x", "ne", "X", "i;ascii-casemap"), ("x", "ne", "X", "i;octet"),
]


@pytest.mark.peers
@pytest.mark.parametrize(("value", "relation", "key", "comparator"), ORACLE_RELATIONS)
def test_relations_as_pigeonhole(pigeonhole: Pigeonhole, value: str, relation: str, key: str, comparator: str) -> None:
    script = ('require ["relational", "comparator-i;ascii-numeric"];\n'
              f'if header :value {_q(relation)} :comparator {_q(comparator)} "subject" {_q(key)} {{ discard; }}\n')
    message = f"From: a@example.org\r\nSubject: {value}\r\n\r\nbody\r\n".encode()
    theirs = pigeonhole.run(script.encode(), message)
    assert theirs.ok, theirs.output
    assert theirs.discarded == match("value", comparator, value, key, relation), theirs.output


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

"""What Sieve's header, address and envelope tests see of a message (vdeliver/sieve/headers.py):
RFC 2047 section 8's examples, RFC 5322 address lists as RFC 5228 sections 2.7.4 and 5.1 read
them, RFC 5233 subaddresses; hypothesis for "never raises"; Pigeonhole's sieve-test as the
oracle for the address parts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.sieve_oracle import Pigeonhole
from vdeliver.sieve.headers import Address, addresses, decode_value, envelope_address, unfold

# -- header values: unfolding and RFC 2047 ---------------------------------------------------------------

RFC2047 = [
    # RFC 2047 section 8: the header fields ...
    (b"=?US-ASCII?Q?Keith_Moore?= <moore@cs.utk.edu>", "Keith Moore <moore@cs.utk.edu>"),
    (b"=?ISO-8859-1?Q?Keld_J=F8rn_Simonsen?= <keld@dkuug.dk>", "Keld J\u00f8rn Simonsen <keld@dkuug.dk>"),
    (b"=?ISO-8859-1?Q?Andr=E9?= Pirard <PIRARD@vm1.ulg.ac.be>", "Andr\u00e9 Pirard <PIRARD@vm1.ulg.ac.be>"),
    (b"=?ISO-8859-1?B?SWYgeW91IGNhbiByZWFkIHRoaXMgeW8=?=\r\n    =?ISO-8859-2?B?dSB1bmRlcnN0YW5kIHRoZSBleGFtcGxlLg==?=",
     "If you can read this you understand the example."),
    (b"=?ISO-8859-1?Q?Olle_J=E4rnefors?= <ojarnef@admin.kth.se>", "Olle J\u00e4rnefors <ojarnef@admin.kth.se>"),
    (b"Nathaniel Borenstein <nsb@thumper.bellcore.com>\r\n    (=?iso-8859-8?b?7eXs+SDv4SDp7Oj08A==?=)",
     ("Nathaniel Borenstein <nsb@thumper.bellcore.com>    (\u05dd\u05d5\u05dc\u05e9 \u05df\u05d1 "
     "\u05d9\u05dc\u05d8\u05e4\u05e0)")),
    # ... and its table of what the display shows: blanks between two encoded words are not text
    (b"(=?ISO-8859-1?Q?a?=)", "(a)"),
    (b"(=?ISO-8859-1?Q?a?= b)", "(a b)"),
    (b"(=?ISO-8859-1?Q?a?= =?ISO-8859-1?Q?b?=)", "(ab)"),
    (b"(=?ISO-8859-1?Q?a?=  =?ISO-8859-1?Q?b?=)", "(ab)"),
    (b"(=?ISO-8859-1?Q?a?=\r\n    =?ISO-8859-1?Q?b?=)", "(ab)"),
    (b"(=?ISO-8859-1?Q?a_b?=)", "(a b)"),
    (b"(=?ISO-8859-1?Q?a?= =?ISO-8859-2?Q?_b?=)", "(a b)"),
    # RFC 2231 section 5: a language after the charset
    (b"=?US-ASCII*EN?Q?Keith_Moore?=", "Keith Moore"),
]

ODD = [
    (b"=?utf-8?q?caf=C3=A9?=", "caf\u00e9"),  # lower-case q
    (b"=?UTF-8?B?w6k?=", "\u00e9"),  # base64 without its padding
    (b"=?utf-8?Q?a?=b", "ab"),  # nothing between the word and the text: still decoded (as Pigeonhole)
    (b"a=?utf-8?Q?b?=", "ab"),
    (b"=?utf-8?Q?a=ZZ?=", "a=ZZ"),  # a broken =XX escape stays as written (Pigeonhole too)
    (b"=?x-unknown?Q?abc?=", "=?x-unknown?Q?abc?="),  # Pigeonhole: "abc"
    (b"=?UTF-8?B?!!!?=", "=?UTF-8?B?!!!?="),  # Pigeonhole: ""
    (b"=?unicode-escape?Q?\\x41?=", "=?unicode-escape?Q?\\x41?="),  # a Python codec, not a charset
    (b"=?utf-8?q?=FF?=", "\ufffd"),  # not UTF-8 in a known charset: U+FFFD, as Pigeonhole
    (b"=?utf-7?Q?+2AA-?=", "\ufffd"),  # a lone surrogate: U+FFFD, as Pigeonhole
    (b"=?utf-8?Q?a?= (c) =?utf-8?Q?b?=", "a (c) b"),
    (b"=?iso-8859-1?q?=E9?= =?utf-8?q?=C3=A9?=", "\u00e9\u00e9"),
    (b"folded\r\n line", "folded line"),
    (b"folded\n\tline", "folded\tline"),
    (b"  padded \t", "padded"),
    (b"caf\xc3\xa9 \xff", "caf\u00e9 \ufffd"),  # raw 8-bit: UTF-8, or U+FFFD
    (b"", ""),
]


@pytest.mark.parametrize(("raw", "text"), RFC2047 + ODD)
def test_decode_value(raw: bytes, text: str) -> None:
    assert decode_value(raw) == text


def test_unfold_leaves_encoded_words() -> None:
    assert unfold(b" =?utf-8?Q?Doe=2C_John?=\r\n <john@example.org> ") == "=?utf-8?Q?Doe=2C_John?= <john@example.org>"


@given(st.binary(max_size=200))
def test_decode_value_never_raises_and_gives_valid_unicode(raw: bytes) -> None:
    text = decode_value(raw)
    text.encode("utf-8")  # no lone surrogates


_WORDS = st.builds(
    lambda charset, enc, payload: f"=?{charset}?{enc}?{payload}?=".encode(),
    st.sampled_from(["utf-8", "iso-8859-1", "utf-7", "utf-16", "x-nope", "ascii", "idna", "gb2312", "shift_jis"]),
    st.sampled_from("BbQq"),
    st.text(alphabet="=ABCDEFabcdef0123456789+/_-", max_size=24),
)


@given(st.lists(st.one_of(_WORDS, st.sampled_from([b" ", b"\r\n ", b"x", b"=?", b"?="])), max_size=6))
def test_encoded_words_never_raise(parts: list[bytes]) -> None:
    decode_value(b"".join(parts)).encode("utf-8")


# -- address lists -----------------------------------------------------------------------------------------

ADDRESS_LISTS: list[tuple[str, list[tuple[str, str]]]] = [
    # RFC 5322 appendix A.1
    ("John Doe <jdoe@machine.example>", [("jdoe", "machine.example")]),
    ('"Joe Q. Public" <john.q.public@example.com>', [("john.q.public", "example.com")]),
    ("Mary Smith <mary@x.test>, jdoe@example.org, Who? <one@y.test>",
     [("mary", "x.test"), ("jdoe", "example.org"), ("one", "y.test")]),
    ('<boss@nil.test>, "Giant; \\"Big\\" Box" <sysservices@example.net>',
     [("boss", "nil.test"), ("sysservices", "example.net")]),
    ("A Group:Ed Jones <c@a.test>,joe@where.test,John <jdoe@one.test>;",
     [("c", "a.test"), ("joe", "where.test"), ("jdoe", "one.test")]),
    ("Undisclosed recipients:;", []),  # an empty group has no address (Pigeonhole: the whole value, invalid)
    # RFC 5322 appendix A.5 (comments) and A.6.3 (obsolete folding)
    ("Pete(A nice \\) chap) <pete(his account)@silly.test(his host)>", [("pete", "silly.test")]),
    (("A Group(Some people):Chris Jones <c@(Chris's host.)public.example>, joe@example.org, "
     "John <jdoe@one.test> (my dear friend); (the end of the group)"),
     [("c", "public.example"), ("joe", "example.org"), ("jdoe", "one.test")]),
    ("(Empty list)(start)Hidden recipients  :(nobody(that I know))  ;", []),
    # RFC 5322 section 4.4: obsolete routes, and empty list members
    ("<@machine.tld:mary@example.net>, , jdoe@test  . example", [("mary", "example.net"), ("jdoe", "test  . example")]),
    ("<@r1.example,@r2.example:user@example.org>", [("user", "example.org")]),
    # quoted local parts come unquoted
    ('"john doe"@example.org', [("john doe", "example.org")]),
    ('"q\\"x"@example.org', [('q"x', "example.org")]),
    ('"a@b"@example.org', [("a@b", "example.org")]),
    ("a@[192.0.2.1]", [("a", "[192.0.2.1]")]),
    ("a@b.c (comment (nested) here)", [("a", "b.c")]),
    ("team: a@x.org, b@y.org;, c@z.org", [("a", "x.org"), ("b", "y.org"), ("c", "z.org")]),
    ("", []),
    ("(only a comment)", []),
]


@pytest.mark.parametrize(("value", "expected"), ADDRESS_LISTS)
def test_address_lists(value: str, expected: list[tuple[str, str]]) -> None:
    found = addresses(value)
    assert [(a.localpart, a.domain) for a in found] == expected
    assert all(a.valid for a in found)


INVALID = [
    # (value, what :all sees): RFC 5228 section 5.1, an address that is not valid is matched by
    # no :localpart or :domain; Pigeonhole gives it to :all as written.  So do we.
    ("MAILER-DAEMON", ["MAILER-DAEMON"]),
    ("undisclosed", ["undisclosed"]),
    ("<>", ["<>"]),
    ("Name <>", ["Name <>"]),
    ("@example.org", ["@example.org"]),
    ("x: y;", ["y"]),  # Pigeonhole: the whole "x: y;"
    ("a@b.c, MAILER-DAEMON", ["a@b.c", "MAILER-DAEMON"]),
]


@pytest.mark.parametrize(("value", "alls"), INVALID)
def test_invalid_addresses_have_only_all(value: str, alls: list[str]) -> None:
    found = addresses(value)
    assert [a.part("all") for a in found] == alls
    for a in found:
        if not a.valid:
            assert [a.part(p) for p in ("localpart", "domain", "user", "detail")] == [None] * 4


def test_all_quotes_a_local_part_that_is_not_a_dot_atom() -> None:
    # as Pigeonhole prints it: `address :all :is "to" "\"john doe\"@example.org"` is true there
    alls = [a.part("all") for a in addresses('"john doe"@example.org, "q\\"x"@e.org, "a.b"@e.org, ".x"@e.org')]
    assert alls == ['"john doe"@example.org', '"q\\"x"@e.org', "a.b@e.org", '".x"@e.org']


def test_an_encoded_display_name_is_parsed_before_it_is_decoded() -> None:
    raw = b"=?utf-8?Q?M=C3=BCller=2C_Hans?= <hans@example.de>"
    assert [(a.localpart, a.domain) for a in addresses(unfold(raw))] == [("hans", "example.de")]
    # decode_value() first would find a comma in the display name, and a second "address":
    assert len(addresses(decode_value(raw))) == 2


@given(st.text(max_size=80))
def test_addresses_never_raise(value: str) -> None:
    for a in addresses(value):
        assert isinstance(a, Address) and a.localpart
        for part in ("all", "localpart", "domain", "user", "detail"):
            got = a.part(part)
            assert got is None or isinstance(got, str)


@given(st.text(alphabet='ab@<>(),:;"\\. ', max_size=40))
def test_addresses_never_raise_on_punctuation(value: str) -> None:
    addresses(value)
    envelope_address(value)


# -- envelope addresses and subaddresses (RFC 5228 section 5.4, RFC 5233) -------------------------------

ENVELOPE = [
    ("user@example.org", ("user", "example.org")),
    ("<user@example.org>", ("user", "example.org")),
    ("  <user@example.org>  ", ("user", "example.org")),
    ("<@relay.example:user@example.org>", ("user", "example.org")),
    ('"john doe"@example.org', ("john doe", "example.org")),
    ("<>", ("", "")),
    ("", ("", "")),
    ("postmaster", ("postmaster", "")),
]


@pytest.mark.parametrize(("raw", "expected"), ENVELOPE)
def test_envelope_address(raw: str, expected: tuple[str, str]) -> None:
    a = envelope_address(raw)
    assert (a.localpart, a.domain) == expected


def test_the_null_sender_is_the_empty_string_for_every_part() -> None:
    # RFC 5228 section 5.4: "the null reverse-path is matched against the empty string,
    # regardless of the ADDRESS-PART argument"
    null = envelope_address("<>")
    assert [null.part(p) for p in ("all", "localpart", "domain", "user", "detail")] == [""] * 5


SUBADDRESSES = [
    # RFC 5233 section 4's example, and its rules on a missing or empty detail
    ("ken+sieve@example.org", "ken", "sieve"),
    ("ken+mta-filters@example.org", "ken", "mta-filters"),
    ("ken@example.org", "ken", None),  # no separator: :detail matches nothing
    ("ken+@example.org", "ken", ""),  # separator last: the detail is empty
    ("ken+a+b@example.org", "ken", "a+b"),  # the first separator splits
    ("+detail@example.org", "", "detail"),
]


@pytest.mark.parametrize(("address", "user", "detail"), SUBADDRESSES)
def test_subaddress(address: str, user: str, detail: str | None) -> None:
    a = envelope_address(address)
    assert a.part("user") == user and a.part("detail") == detail
    assert a.part("localpart") == address.split("@")[0] and a.part("domain") == "example.org"


def test_subaddress_with_another_separator() -> None:
    a = Address("ken-sieve", "example.org")
    assert (a.part("user", "-"), a.part("detail", "-")) == ("ken", "sieve")
    assert (a.part("user"), a.part("detail")) == ("ken-sieve", None)


# -- against Pigeonhole ------------------------------------------------------------------------------------

ORACLE_LISTS = [
    b"Alice <alice@example.org>, bob@example.net",
    b'"Doe, John" <john@example.org> (work)',
    b'"john doe"@example.org',
    b"team: a@x.org, b@y.org;, c@z.org",
    b"<@r1,@r2:user@example.org>",
    b"MAILER-DAEMON",
    b"a@b.c (comment (nested) here)",
    b"ken+sieve@example.org, ken+@example.org, ken@example.org",
    b"<>",
    b"Name <>",
    b'"q\\"x"@example.org',
    b"Fred <fred@Example.COM>",
    b"a@b\r\n\t, c@d",
]


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.mark.peers
@pytest.mark.parametrize("raw", ORACLE_LISTS, ids=[r.decode() for r in ORACLE_LISTS])
def test_address_parts_as_pigeonhole_sees_them(pigeonhole: Pigeonhole, raw: bytes) -> None:
    """Every part we find is matched there by :is, no more are counted, and a part we say is
    missing matches nothing there."""
    found = addresses(unfold(raw))
    lines = ['require ["fileinto", "subaddress", "relational", "comparator-i;ascii-numeric"];']
    expected = []
    lines.append(f'if address :count "eq" :comparator "i;ascii-numeric" "to" "{len(found)}" {{ fileinto "count"; }}')
    expected.append("count")
    for i, a in enumerate(found):
        for part in ("all", "localpart", "domain", "user", "detail"):
            value = a.part(part)
            if value is None:
                if len(found) > 1:
                    continue  # another address's part could match
                # it has no such part: a key that matches everything must not match it
                lines.append(f'if address :{part} :matches "to" "*" {{ fileinto "{part}{i}"; }}')
            else:
                lines.append(f'if address :{part} :is "to" {_q(value)} {{ fileinto "{part}{i}"; }}')
                expected.append(f"{part}{i}")
    message = b"From: a@example.org\r\nTo: " + raw + b"\r\nSubject: s\r\n\r\nbody\r\n"
    theirs = pigeonhole.run("\n".join(lines).encode(), message)
    assert theirs.ok, theirs.output
    assert sorted(theirs.stores()) == sorted(expected), theirs.output

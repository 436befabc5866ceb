"""recipient.parse: every argument form real sendmail set-ups produce, every refusal."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdeliver.errors import DeliveryError
from vdeliver.recipient import Recipient, RecipientError, normalize_domain, parse

FRED_AWAY = Recipient("away.com", "fred")


@pytest.mark.parametrize("domain", ["away.com", "<away.com>", "away.com.virtuser", "away.com.virtuser.",
                                    "Away.COM", "<AWAY.com.VIRTUSER.>", "away.com."])
@pytest.mark.parametrize("user", ["fred", "fred@vm.localdomain", "fred@away.com", "<fred@away.com>", "Fred",
                                  "<FRED@vm>"])
def test_all_forms_resolve_to_the_same_recipient(domain: str, user: str) -> None:
    assert parse(domain, user) == FRED_AWAY


def test_domain_from_h_wins_over_the_machine_name_in_u() -> None:
    # always_add_domain + R=EnvToSMTP append the host name, not the virtual domain.
    assert parse("home.com", "fred@vm.localdomain") == Recipient("home.com", "fred")


def test_one_argument_form() -> None:
    assert parse(None, "fred@away.com") == FRED_AWAY
    assert parse(None, "<Fred@Away.Com.virtuser.>") == FRED_AWAY


def test_keep_case() -> None:
    assert parse("Away.com", "Fred", keep_case=True) == Recipient("away.com", "Fred")


def test_detail() -> None:
    assert parse("away.com", "fred+lists") == Recipient("away.com", "fred", "lists")
    assert parse("away.com", "fred+lists", delimiter="") == Recipient("away.com", "fred+lists")
    assert parse("away.com", "fred-lists", delimiter="-") == Recipient("away.com", "fred", "lists")


def test_idn_domain_becomes_punycode() -> None:
    assert parse("bücher.example", "fred").domain == "xn--bcher-kva.example"
    assert normalize_domain("<BÜCHER.example.virtuser.>") == "xn--bcher-kva.example"


@pytest.mark.parametrize(
    ("domain", "user"),
    [
        ("away.com", "../etc"),
        ("away.com", "fred/../../x"),
        ("away.com", "a/b"),
        ("away.com", ".hidden"),
        ("away.com", "fr..ed"),
        ("away.com", ""),
        ("away.com", "<>"),
        ("away.com", "fr\x00ed"),
        ("away.com", "fr\ned"),
        ("away.com", "fred\x7f"),
        ("away.com", "fr ed"),
        ("away.com", "x" * 65),
        ("away.com", "fred+../x"),
        ("away.com", "fred+.x"),
        ("away.com", "+detail"),
        ("", "fred"),
        ("<>", "fred"),
        (".", "fred"),
        ("..", "fred"),
        ("../etc", "fred"),
        ("away/com", "fred"),
        ("away..com", "fred"),
        (".away.com", "fred"),
        ("-away.com", "fred"),
        ("away.com\x00", "fred"),
        ("a" * 64 + ".com", "fred"),
        ("a." * 130 + "com", "fred"),
        ("away com", "fred"),
    ],
)
def test_refusals_are_temporary(domain: str, user: str) -> None:
    with pytest.raises(RecipientError) as info:
        parse(domain, user)
    assert info.value.status.temporary
    assert info.value.status.exit_code() == 75
    assert "\n" not in info.value.status.text()


def test_one_argument_form_without_domain_is_refused() -> None:
    with pytest.raises(RecipientError):
        parse(None, "fred")


@given(st.text(max_size=80), st.text(max_size=80))
def test_any_input_gives_a_safe_name_or_a_temporary_error(domain: str, user: str) -> None:
    try:
        r = parse(domain, user)
    except DeliveryError as exc:
        assert exc.status.exit_code() == 75
        return
    for name in (r.domain, r.user, r.detail):
        assert "/" not in name and "\x00" not in name
        assert not name.startswith(".") and ".." not in name
        assert name.isascii() and name.isprintable()
    assert r.domain and r.user


@pytest.mark.parametrize(("raw", "ascii_name"), [
    ("straße.de", "xn--strae-oqa.de"),            # IDNA 2003 folded it to strasse.de: another domain
    ("STRASSE.de", "strasse.de"),
    ("faß.de", "xn--fa-hia.de"),
    ("Bücher.example", "xn--bcher-kva.example"),
])
def test_idn_domains_follow_idna2008_uts46_nontransitional(raw: str, ascii_name: str) -> None:
    assert normalize_domain(raw) == ascii_name
    from vdeliver.accounts import names

    assert names.domain(raw) == ascii_name  # vmailctl agrees


@pytest.mark.parametrize("raw", ["a\u200db.de", "-bücher.de", "bü--cher.de".replace("ü", "\u0301"), "x\u2488y.de"])
def test_invalid_idn_labels_get_one_clear_line(raw: str) -> None:
    from vdeliver.recipient import RecipientError

    with pytest.raises(RecipientError) as err:
        normalize_domain(raw)
    text = err.value.status.text()
    assert "\n" not in text and ("invalid IDN domain" in text or "invalid character" in text)


@given(st.text(alphabet=st.sampled_from([chr(i) for i in range(0x80)] + ["é", "\u2028"]), max_size=12))
def test_control_character_in_any_address_is_refused(local: str) -> None:
    """Whatever path the check takes (printable ASCII is checked in C), a control character
    or DEL in the user or the domain argument is refused."""
    bad = any(ch < " " or ch == "\x7f" for ch in local)
    for user_arg, domain_arg in ((f"{local}@away.com", None), ("fred", local or "x")):
        try:
            parse(domain_arg, user_arg)
        except RecipientError as exc:
            if bad:
                assert "control character" in exc.status.detail
            continue
        assert not bad

"""log.py: delivery lines escaped as Postfix does, whatever a sender puts in them."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vdeliver.log import delivery_line, escape, field

TEXT = st.text(alphabet=st.sampled_from([chr(i) for i in range(0x80)] + ["é", "\udc80", "\u2028", "\udcff"]),
               max_size=24)


def by_character(text: str, extra: str) -> str:
    """The escaping rule, one character at a time."""
    out = []
    for ch in text:
        o = ord(ch)
        if 0x20 <= o < 0x7F and ch not in extra:
            out.append(ch)
        elif 0xDC80 <= o <= 0xDCFF:
            out.append(f"\\x{o - 0xDC00:02x}")
        elif o < 0x80:
            out.append(f"\\x{o:02x}")
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)


@given(TEXT)
def test_field_and_escape_equal_the_character_rule(text: str) -> None:
    """The shortcut for text with nothing to escape gives what the rule gives."""
    assert field(text) == by_character(text, "\\ ,<>")
    assert escape(text) == by_character(text, "")


def test_forged_sender_cannot_end_its_field() -> None:
    line = delivery_line("fred@away.com", "a>, status=sent (x", 10, 0.0, "5.1.1", "bounced", "no")
    assert line.startswith("to=<fred@away.com>, sender=<a\\x3e\\x2c\\x20status=sent\\x20(x>, size=10")

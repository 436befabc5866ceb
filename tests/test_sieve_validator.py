"""The Sieve validator: signatures, require, if/elsif/else order, comparators, extensions; and
the same verdict (and line) as Pigeonhole's sieve-test on a corpus of valid and invalid scripts."""

from __future__ import annotations

import pytest

from tests.sieve_oracle import Pigeonhole, assert_same_verdict
from vdeliver.sieve.errors import SieveError
from vdeliver.sieve.validator import compile_script

VALID: list[bytes] = [
    b"keep;",
    b'require "fileinto";\nfileinto "A";',
    b'require ["fileinto", "copy"];\nfileinto :copy "A";\nredirect :copy "a@example.org";',
    b'require "envelope";\nif envelope :all :is "from" "a@example.org" { keep; }',
    b'if address :domain :is ["from", "to"] "example.org" { discard; }',
    b'if header :contains "subject" ["a", "b"] { stop; }',
    b'if header :matches :comparator "i;octet" "subject" "*x?" { stop; }',
    b'if exists ["from", "date"] { keep; } elsif true { discard; } else { stop; }',
    b"if size :under 10K { keep; }",
    b'require "comparator-i;ascii-numeric";\nif header :comparator "i;ascii-numeric" :is "x" "1" { keep; }',
    (b'require ["relational", "comparator-i;ascii-numeric"];\n'
    b'if header :value "gt" :comparator "i;ascii-numeric" "x" "1" { keep; }'),
    b'require "relational";\nif address :count "ge" :all "to" "2" { keep; }',
    b'require ["envelope", "subaddress"];\nif envelope :detail :is "to" "lists" { discard; }',
    b"if not anyof (false, allof (true, true)) { keep; }",
    b'redirect "fred@example.org";',
    b"if true {\n  if false { stop; }\n  else { keep; }\n}",
    b'require "variables";\nset :lower :upperfirst :quotewildcard :length "a" "b";\nif string "${a}" "1" { stop; }',
    b'require "encoded-character";\nif header :is "x" "${hex: ff}" { keep; }',
    b'require "date";\nif date "date" "fortnight" "1" { keep; }',  # Pigeonhole warns; the test is false
    b'require "date";\nif currentdate :zone "CET" "year" "2026" { keep; }',
    (b'require ["imap4flags", "fileinto", "variables"];\nsetflag "f" "\\\\Seen";\naddflag "x";\nremoveflag "f" "x";\n'
    b'if hasflag :is "f" "x" { keep :flags ["a", "b"]; fileinto :flags "c" "D"; }'),
    b'require "encoded-character";\nif header :is "x" "${hex: 41}${unicode: 263a} ${hex:}" { keep; }',
    b'redirect "Bob <bob@example.org>";',
    b'redirect "<a@[192.0.2.1]>";',
]

INVALID: list[tuple[bytes, int]] = [
    (b'fileinto "A";', 1),
    (b'keep;\nrequire "fileinto";', 2),
    (b"if true { keep; }\nelse { discard; }\nelse { stop; }", 3),
    (b"keep;\nelsif true { keep; }", 2),
    (b"foo;", 1),
    (b"if foo { keep; }", 1),
    (b'if header :foo "a" "b" { keep; }', 1),
    (b'if header :is :contains "a" "b" { keep; }', 1),
    (b"if size 10 { keep; }", 1),
    (b'if size :over "10" { keep; }', 1),
    (b'keep "x";', 1),
    (b"if true;", 1),
    (b"keep { }", 1),
    (b'if header :comparator "i;ascii-numeric" :is "x" "1" { keep; }', 1),
    (b'if header :comparator "i;nosuch" :is "x" "1" { keep; }', 1),
    (b'require "nosuch";', 1),
    (b"if not (true) { keep; }", 1),
    (b"if anyof true { keep; }", 1),
    (b"else { keep; }", 1),
    (b'redirect ["a@b.c", "d@e.f"];', 1),
    (b'keep;\nredirect "not an address";', 2),  # RFC 5228 4.2: an address, checked when it is constant
    (b'redirect "user";', 1),
    (b'redirect "a@b.c, d@e.f";', 1),
    (b'redirect "";', 1),
    (b'require "fileinto";\nfileinto :copy "x";', 2),
    (b'if header "subject" { keep; }', 1),
    (b'if header :value "gt" "x" "1" { keep; }', 1),
    (b'require "relational";\nif header :value "gtx" "x" "1" { keep; }', 2),
    (b"keep;\n\nif true {\n  foo;\n}", 4),
    (b'if address :user "to" "x" { keep; }', 1),
    (b'require "variables";\nset "1x" "a";', 2),
    (b'require "variables";\nset :lower :upper "a" "b";', 2),
    (b'keep :flags "x";', 1),
    (b'require "imap4flags";\nsetflag;', 2),
    (b'if string :is "a" "a" { keep; }', 1),
    (b'require "imap4flags";\nsetflag "var" "x";', 2),
    (b'require ["index"];\nif header :last "received" "x" { keep; }', 2),
    (b'if header :index 1 "received" "x" { keep; }', 1),
    (b'require "fileinto";\nfileinto :create "x";', 2),
    (b'if mailboxexists "x" { keep; }', 1),
    (b'require "environment";\nif environment "a" { keep; }', 2),
    (b'require "date";\nif currentdate :originalzone "year" "2026" { keep; }', 2),
    (b'if ihave "fileinto" { keep; }', 1),
    (b'if body :contains "x" { keep; }', 1),
    (b'require "body";\nif body :raw :text :contains "x" { keep; }', 2),
    (b'require "ihave";\nif not ihave "fileinto" { bogus; }', 2),
]


def test_compiles_to_nodes() -> None:
    compiled = compile_script(b'require "fileinto";\nif header :contains "subject" "x" { fileinto "A"; }')
    assert compiled.extensions == {"fileinto"}
    node = compiled.commands[0]
    assert node.name == "if" and node.tests[0].tags == {"contains": True}
    assert node.tests[0].args == (["subject"], ["x"])
    assert node.block is not None and node.block[0].args == ("A",)


@pytest.mark.parametrize("script", VALID, ids=[repr(v[:40]) for v in VALID])
def test_accepts(script: bytes) -> None:
    compile_script(script)


@pytest.mark.parametrize(("script", "line"), INVALID, ids=[repr(v[0][:40]) for v in INVALID])
def test_refuses_with_line(script: bytes, line: int) -> None:
    with pytest.raises(SieveError) as info:
        compile_script(script)
    assert info.value.line == line
    assert all("\n" not in e.message for e in info.value.errors)


def test_every_error_is_reported() -> None:
    with pytest.raises(SieveError) as info:
        compile_script(b"foo;\nbar;\nkeep;\nbaz;")
    assert [e.line for e in info.value.errors] == [1, 2, 4]


def test_actions_that_send_mail_are_refused_until_they_exist() -> None:
    with pytest.raises(SieveError, match="extension 'notify' is not supported by vdeliver yet \\(the old draft"):
        compile_script(b'require "notify";')



@pytest.mark.peers
@pytest.mark.parametrize("script", VALID + [s for s, _ in INVALID], ids=[repr(v[:40]) for v in VALID] +
                         [repr(v[0][:40]) for v in INVALID])
def test_same_verdict_as_pigeonhole(pigeonhole: Pigeonhole, script: bytes) -> None:
    assert_same_verdict(pigeonhole, script, compile_script, SieveError)


@pytest.mark.peers
def test_the_generated_sieve_extensions_offer_exactly_what_vdeliver_runs() -> None:
    """With the Pigeonhole settings `vmailctl dovecot-config` writes, Pigeonhole (hence
    managesieved and webmail) accepts every extension vdeliver implements and refuses one it
    does not."""
    from vdeliver.accounts import dovecot
    from vdeliver.config import Config
    from vdeliver.sieve.validator import EXTENSIONS

    conf = dovecot.render_files(Config("/etc/vdeliver.toml"), lookup_uid=False)["conf.d/90-vdeliver-sieve.conf"]
    oracle = Pigeonhole.start(conf)
    try:
        every = ", ".join(f'"{e}"' for e in sorted(EXTENSIONS - dovecot.PIGEONHOLE_LACKS))
        assert oracle.run(f"require [{every}];\nkeep;".encode()).ok
        refused = oracle.run(b'require "extlists";\nkeep;')  # one vdeliver does not offer
        assert not refused.ok and refused.errors[0][0] == 1
    finally:
        oracle.close()


SPECIAL_USE = [
    b'require ["fileinto", "special-use"];\nfileinto :specialuse "\\\\Junk" "Spam";',
    b'require ["fileinto", "special-use", "mailbox"];\nfileinto :specialuse "\\\\Junk" :create "Spam";',
    b'require "special-use";\nif specialuse_exists "\\\\Junk" { keep; }',
    b'require "special-use";\nif specialuse_exists "INBOX" ["\\\\Junk", "\\\\Sent"] { keep; }',
    b'require ["fileinto", "special-use"];\nfileinto :specialuse "Junk" "Spam";',  # no backslash
    b'require "special-use";\nif specialuse_exists "\\\\Bad flag" { keep; }',
    b'require "fileinto";\nfileinto :specialuse "\\\\Junk" "Spam";',  # not required
    b'require "special-use";\nif specialuse_exists { keep; }',
]


@pytest.mark.peers
def test_special_use_same_verdict_as_pigeonhole() -> None:
    """RFC 8579; Debian's Pigeonhole has it, off unless sieve_extensions names it."""
    oracle = Pigeonhole.start("plugin {\n  sieve_extensions = +special-use\n}\n")
    try:
        for script in SPECIAL_USE:
            assert_same_verdict(oracle, script, compile_script, SieveError)
    finally:
        oracle.close()

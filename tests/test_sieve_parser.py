"""The Sieve lexer and parser (RFC 5228 section 8): trees, errors with their lines, the limits,
properties (nothing but SieveError on any input; print and parse again gives the same tree),
and the same verdict as Pigeonhole's sieve-test on every case of a syntax corpus."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.sieve_oracle import Pigeonhole, assert_same_verdict
from vdeliver.sieve import parser
from vdeliver.sieve.errors import SieveError, SieveSyntaxError
from vdeliver.sieve.parser import parse
from vdeliver.sieve.tree import Argument, Command, Number, Script, StringList, Tag, to_sieve
from vdeliver.sieve.tree import Test as T  # not `Test`: pytest would try to collect it


def s(*values: str) -> StringList:
    return StringList(tuple(values), False)


def sl(*values: str) -> StringList:
    return StringList(tuple(values), True)


# -- trees ------------------------------------------------------------------------------------

TREES: list[tuple[bytes, Script]] = [
    (b"", Script(())),
    (b"keep;", Script((Command("keep"),))),
    (b"KEEP ;\r\n", Script((Command("keep"),))),
    (b"keep;\rkeep;", Script((Command("keep"), Command("keep")))),  # a lone CR is white space
    (b'require ["fileinto", "envelope"];',
     Script((Command("require", (sl("fileinto", "envelope"),)),))),
    (b'if header :Contains "Subject" "hi" { discard; stop; }',
     Script((Command("if", (), (T("header", (Tag("contains"), s("Subject"), s("hi"))),),
                     block=(Command("discard"), Command("stop"))),))),
    (b"if anyof (true, not false) {} else { keep; }",
     Script((Command("if", (), (T("anyof", (), (T("true"), T("not", (), (T("false"),))), True),),
                     block=()),
             Command("else", block=(Command("keep"),))))),
    (b"if size :over 1K { keep; } elsif size :under 2M { keep; }",
     Script((Command("if", (), (T("size", (Tag("over"), Number(1024))),), block=(Command("keep"),)),
             Command("elsif", (), (T("size", (Tag("under"), Number(2 << 20))),), block=(Command("keep"),))))),
    (b"x 1G;", Script((Command("x", (Number(1 << 30),)),))),
    (b'fileinto "a\\\\b\\"c\\qd";', Script((Command("fileinto", (s('a\\b"cqd'),)),))),
    # comments anywhere white space may be; a hash comment may end the file without a newline
    (b"/* a\r\n comment */ keep; # and another", Script((Command("keep"),))),
    (b"keep /* inside */ ;", Script((Command("keep"),))),
    # text: blocks: blanks and a comment after the colon, dot-stuffing, CRLF line ends in the value
    (b"x text:   # note\n.foo\n..bar\n\n.\n;", Script((Command("x", (s(".foo\r\n.bar\r\n\r\n"),)),))),
    (b"x text:\r\nline\r\n.\r\n;", Script((Command("x", (s("line\r\n"),)),))),
    (b'x "multi\nline";', Script((Command("x", (s("multi\nline"),)),))),
    (b'x :a :b 3 ["1"] "2" true;',
     Script((Command("x", (Tag("a"), Tag("b"), Number(3), sl("1"), s("2")), (T("true"),)),))),
    (b'fileinto "\xc3\xa9t\xc3\xa9";', Script((Command("fileinto", (s("\u00e9t\u00e9"),)),))),
]


@pytest.mark.parametrize(("script", "tree"), TREES, ids=[repr(t[0][:30]) for t in TREES])
def test_parses_to_the_tree(script: bytes, tree: Script) -> None:
    assert parse(script) == tree
    assert parse(to_sieve(tree)) == tree


def test_lines_are_kept_for_messages() -> None:
    tree = parse(b"\n\nif true {\n  keep;\n}\n")
    command = tree.commands[0]
    assert command.line == 3 and command.block is not None and command.block[0].line == 4


# -- errors -------------------------------------------------------------------------------------

ERRORS: list[tuple[bytes, int, str]] = [
    (b"keep", 1, "expected ';' to end the command 'keep'"),
    (b"if true { keep }", 1, "expected ';' to end the command 'keep'"),
    (b"if true { keep;", 1, "expected a command or '}' to end the block of 'if'"),
    (b"keep; }", 1, "expected a command, but found '}'"),
    (b'x "open', 1, "end of file before the end of a quoted string"),
    (b"x\n/* never\nclosed", 3, "end of file before the end of a bracket comment ('/* ... */') started at line 2"),
    (b"x text:\nline\n", 3, "end of file before the end of a multi-line string"),
    (b'x\n"open\n', 3, "end of file before the end of a quoted string started at line 2"),
    (b"\xef\xbb\xbfkeep;", 1, "unexpected character U+FEFF"),  # a byte order mark: Pigeonhole refuses it too
    (b"x text: junk\n.\n;", 1, "expected the end of the line after 'text:'"),
    (b"x [];", 1, "expected a string after '[' in a string list, but found ']'"),
    (b'x ["a",];', 1, "expected a string after ',' in a string list"),
    (b'x ["a" "b"];', 1, "expected ',' or ']' in a string list"),
    (b"x (true,);", 1, "expected a test, but found ')'"),
    (b"if (true; false) {}", 1, "expected ',' or ')' in a test list, but found ';'"),
    (b"if () {}", 1, "expected a test, but found ')'"),
    (b"x : a;", 1, "expected a tag name after ':'"),
    (b"x 18446744073709551616;", 1, "number exceeds the limit"),
    (b"x 18014398509481984K;", 1, "number exceeds the limit"),
    (b"x 12abc;", 1, "after a number"),
    (b"x\n\n@;", 3, "unexpected character '@'"),
    (b"\n\nfileinto \"\xff\";", 3, "not valid UTF-8"),
]


@pytest.mark.parametrize(("script", "line", "message"), ERRORS, ids=[repr(e[0][:30]) for e in ERRORS])
def test_refuses_with_line_and_reason(script: bytes, line: int, message: str) -> None:
    with pytest.raises(SieveSyntaxError) as info:
        parse(script)
    assert info.value.line == line
    assert message in info.value.message
    assert "\n" not in str(info.value)


def test_limits() -> None:
    with pytest.raises(SieveError, match="too large"):
        parse(b"keep;" * 300, max_size=1000)
    deep = b"if true {" * parser.MAX_BLOCK_NESTING + b"}" * parser.MAX_BLOCK_NESTING
    assert parse(deep).commands[0].name == "if"
    with pytest.raises(SieveSyntaxError, match="blocks nested more than"):
        parse(b"if true {" * (parser.MAX_BLOCK_NESTING + 1) + b"}" * (parser.MAX_BLOCK_NESTING + 1))
    with pytest.raises(SieveSyntaxError, match="tests nested more than"):
        parse(b"if " + b"not " * (parser.MAX_TEST_NESTING + 1) + b"true {}")
    with pytest.raises(SieveSyntaxError, match="tests nested more than"):
        parse(b"if " + b"anyof(" * 10000 + b"true" + b")" * 10000 + b" {}")
    with pytest.raises(SieveSyntaxError, match="blocks nested more than"):
        parse(b"if true {" * 100000)


# -- properties ----------------------------------------------------------------------------------

_tokens = st.sampled_from([b"if", b"elsif", b"else", b"keep", b"true", b"not", b"anyof", b"header", b":is",
                           b":contains", b"1K", b"99", b'"a"', b'"\\"', b"[", b"]", b"(", b")", b"{", b"}",
                           b",", b";", b"text:\n", b"\n.\n", b".", b"#", b"/*", b"*/", b"\r\n", b"\r", b" ",
                           b"\xff", b"\xc3\xa9"])


@given(st.lists(st.one_of(_tokens, st.binary(max_size=8)), max_size=60))
def test_any_bytes_give_a_tree_or_a_sieve_error(pieces: list[bytes]) -> None:
    try:
        tree = parse(b" ".join(pieces))
    except SieveError as exc:
        assert exc.line >= 0 and "\n" not in exc.message
    else:
        assert parse(to_sieve(tree)) == tree


_names = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True)
_strings = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
_arguments: st.SearchStrategy[Argument] = st.one_of(
    _names.map(Tag),
    st.integers(0, (1 << 64) - 1).map(Number),
    _strings.map(lambda v: StringList((v,), False)),
    st.lists(_strings, min_size=1, max_size=3).map(lambda vs: StringList(tuple(vs), True)),
)


def _tests(depth: int) -> st.SearchStrategy[T]:
    leaf = st.builds(T, _names, st.lists(_arguments, max_size=3).map(tuple))
    if depth <= 0:
        return leaf
    inner = _tests(depth - 1)
    return st.one_of(
        leaf,
        st.builds(lambda n, a, t: T(n, a, (t,)), _names, st.lists(_arguments, max_size=2).map(tuple), inner),
        st.builds(lambda n, ts: T(n, (), tuple(ts), True), _names, st.lists(inner, min_size=1, max_size=3)),
    )


def _commands(depth: int) -> st.SearchStrategy[tuple[Command, ...]]:
    def command(name: str, args: tuple[Argument, ...], tests: list[T], as_list: bool,
                block: tuple[Command, ...] | None) -> Command:
        if not as_list:
            tests = tests[:1]
        return Command(name, args, tuple(tests), as_list and bool(tests), block)

    blocks = st.none() if depth <= 0 else st.one_of(st.none(), _commands(depth - 1))
    one = st.builds(command, _names, st.lists(_arguments, max_size=3).map(tuple),
                    st.lists(_tests(2), max_size=2), st.booleans(), blocks)
    return st.lists(one, max_size=4).map(tuple)


@given(_commands(2))
def test_printing_and_parsing_again_gives_the_same_tree(commands: tuple[Command, ...]) -> None:
    tree = Script(commands)
    assert parse(to_sieve(tree)) == tree
    assert parse(to_sieve(tree).encode("utf-8")) == tree


# -- the same verdict as Pigeonhole ----------------------------------------------------------------

# Scripts that only syntax decides: the commands and tests in them are core Sieve used correctly,
# so Pigeonhole accepts exactly the ones that parse.
CORPUS: list[bytes] = [t[0] for t in TREES if b"x " not in t[0] and b"fileinto" not in t[0]] + [
    b'require "fileinto";\nfileinto text:\n.foo\n..bar\n.\n;\n',
    b'require "fileinto";\r\nfileinto "a\\\\b\\"c\\qd";\r\n',
    b"if size :over 18446744073709551615 { keep; }",
    b"if size :over 17179869184K { keep; }",
    b"keep; # comment at the end",
    b"if header :is [\"a\", \"b\"] \"c\" { keep; }",
    b"if not not true { stop; }",
    b"if allof(true,true,anyof(false,true)){keep;}elsif false{discard;}else{stop;}",
] + [e[0].replace(b"x ", b"keep ").replace(b"x\n", b"keep\n") for e in ERRORS]



@pytest.mark.peers
@pytest.mark.parametrize("script", CORPUS, ids=[repr(c[:30]) for c in CORPUS])
def test_same_verdict_as_pigeonhole(pigeonhole: Pigeonhole, script: bytes) -> None:
    assert_same_verdict(pigeonhole, script, parse, SieveSyntaxError)

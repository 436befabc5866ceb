"""Sieve's grammar (RFC 5228 section 8.2): tokens -> tree.

    commands   = *command
    command    = identifier arguments ( ";" / block )
    block      = "{" commands "}"
    arguments  = *argument [ test / test-list ]
    argument   = string-list / number / tag
    string-list = "[" string *("," string) "]" / string
    test       = identifier arguments
    test-list  = "(" test *("," test) ")"

A hostile script cannot make the parser recurse without bound or read without end: the
script size and the nesting of blocks and of tests are limited (Pigeonhole's defaults), each
with its own error.  The only exception that leaves parse() is SieveError.
"""

from __future__ import annotations

from vdeliver.sieve import lexer
from vdeliver.sieve.errors import SieveError, SieveSyntaxError
from vdeliver.sieve.lexer import EOF, IDENTIFIER, NUMBER, SPECIAL, STRING, TAG, Token
from vdeliver.sieve.tree import Argument, Command, Number, Script, StringList, Tag, Test

MAX_SCRIPT_SIZE = 1 << 20  # bytes (Pigeonhole's sieve_max_script_size default: 1M)
MAX_BLOCK_NESTING = 32
MAX_TEST_NESTING = 32
MAX_STRING_LIST = 10000  # strings in one list


def parse(script: str | bytes, *, max_size: int = MAX_SCRIPT_SIZE) -> Script:
    """The tree of a whole script; SieveError (with a line) if it is not Sieve."""
    if isinstance(script, bytes):
        if len(script) > max_size:
            raise SieveError(0, f"script is too large (more than {max_size} bytes)")
        try:
            text = script.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = script.count(b"\n", 0, exc.start) + 1
            raise SieveSyntaxError(line, "the script is not valid UTF-8") from None
    else:
        text = script
        if len(text.encode("utf-8", "surrogatepass")) > max_size:
            raise SieveError(0, f"script is too large (more than {max_size} bytes)")
    return _Parser(lexer.tokenize(text)).script()


class _Parser:
    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.pos = 0

    # -- token access -----------------------------------------------------------------------

    def _peek(self) -> Token:
        return self.tokens[self.pos]

    def _next(self) -> Token:
        token = self.tokens[self.pos]
        if token.kind != EOF:
            self.pos += 1
        return token

    def _is(self, kind: str, value: object = None) -> bool:
        token = self.tokens[self.pos]
        return token.kind == kind and (value is None or token.value == value)

    # -- the grammar ------------------------------------------------------------------------

    def script(self) -> Script:
        commands = self._commands(depth=0)
        token = self._peek()
        if token.kind != EOF:
            raise SieveSyntaxError(token.line, f"expected a command, but found {token.describe()}")
        return Script(commands)

    def _commands(self, depth: int) -> tuple[Command, ...]:
        commands: list[Command] = []
        while self._is(IDENTIFIER):
            commands.append(self._command(depth))
        return tuple(commands)

    def _command(self, depth: int) -> Command:
        name_token = self._next()
        name = str(name_token.value)
        arguments, tests, test_list = self._arguments(depth=0)
        token = self._peek()
        if token.kind == SPECIAL and token.value == ";":
            self._next()
            return Command(name, arguments, tests, test_list, None, name_token.line)
        if token.kind == SPECIAL and token.value == "{":
            if depth + 1 > MAX_BLOCK_NESTING:
                raise SieveSyntaxError(token.line, f"blocks nested more than {MAX_BLOCK_NESTING} deep")
            self._next()
            block = self._commands(depth + 1)
            end = self._next()
            if not (end.kind == SPECIAL and end.value == "}"):
                raise SieveSyntaxError(end.line, f"expected a command or '}}' to end the block of '{name}' "
                                                 f"(line {token.line}), but found {end.describe()}")
            return Command(name, arguments, tests, test_list, block, name_token.line)
        raise SieveSyntaxError(token.line, f"expected ';' to end the command '{name}' or '{{' to start its block, "
                                           f"but found {token.describe()}")

    def _arguments(self, depth: int) -> tuple[tuple[Argument, ...], tuple[Test, ...], bool]:
        arguments: list[Argument] = []
        while True:
            token = self._peek()
            if token.kind == TAG:
                self._next()
                arguments.append(Tag(str(token.value), token.line))
            elif token.kind == NUMBER:
                self._next()
                arguments.append(Number(int(token.value), token.line))
            elif token.kind == STRING or (token.kind == SPECIAL and token.value == "["):
                arguments.append(self._string_list())
            else:
                break
        token = self._peek()
        if token.kind == IDENTIFIER:
            return tuple(arguments), (self._test(depth + 1),), False
        if token.kind == SPECIAL and token.value == "(":
            return tuple(arguments), self._test_list(depth + 1), True
        return tuple(arguments), (), False

    def _string_list(self) -> StringList:
        token = self._next()
        if token.kind == STRING:
            return StringList((str(token.value),), False, token.line)
        values: list[str] = []
        while True:
            item = self._next()
            if item.kind != STRING:
                where = "after '['" if not values else "after ','"
                raise SieveSyntaxError(item.line, f"expected a string {where} in a string list, "
                                                  f"but found {item.describe()}")
            values.append(str(item.value))
            if len(values) > MAX_STRING_LIST:
                raise SieveSyntaxError(item.line, f"string list longer than {MAX_STRING_LIST}")
            sep = self._next()
            if sep.kind == SPECIAL and sep.value == "]":
                return StringList(tuple(values), True, token.line)
            if not (sep.kind == SPECIAL and sep.value == ","):
                raise SieveSyntaxError(sep.line, f"expected ',' or ']' in a string list, but found {sep.describe()}")

    def _test(self, depth: int) -> Test:
        token = self._next()
        if token.kind != IDENTIFIER:
            raise SieveSyntaxError(token.line, f"expected a test, but found {token.describe()}")
        if depth > MAX_TEST_NESTING:
            raise SieveSyntaxError(token.line, f"tests nested more than {MAX_TEST_NESTING} deep")
        arguments, tests, test_list = self._arguments(depth)
        return Test(str(token.value), arguments, tests, test_list, token.line)

    def _test_list(self, depth: int) -> tuple[Test, ...]:
        self._next()  # "("
        tests = [self._test(depth)]
        while True:
            sep = self._next()
            if sep.kind == SPECIAL and sep.value == ")":
                return tuple(tests)
            if not (sep.kind == SPECIAL and sep.value == ","):
                raise SieveSyntaxError(sep.line, f"expected ',' or ')' in a test list, but found {sep.describe()}")
            tests.append(self._test(depth))

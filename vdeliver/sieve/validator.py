"""The validator: a parsed tree -> the checked form the interpreter runs (RFC 5228 sections 3-5).

Every command and test has one signature in SIGNATURES: its positional arguments, the tags
it takes (each in a group of which at most one may be given, with the value a tag takes),
whether it takes a test, a test list or a block, and the extension `require` must name.
Adding an extension adds rows here and in EXTENSIONS; the checking code does not change.

Rules beyond the signatures: `require` only at the top of the script; `elsif` and `else`
only after `if`/`elsif`; a comparator other than i;octet and i;ascii-casemap must be
required as `comparator-NAME`; extensions that send mail (issue 18) are named and refused.
Errors come out as SieveError with the line of the command, test or argument at fault;
all of them are collected (the first one raises with the others in `.errors`).

About 650 lines on purpose: the signature table and the checks that read it (arguments,
tags, require, comparators, variables, include) are one pass over one tree with one error
list; split, each part would need the same pass state.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from vdeliver.flags import valid_special_use
from vdeliver.sieve.compiled import Compiled, Node
from vdeliver.sieve.errors import SieveError
from vdeliver.sieve.headers import redirect_address
from vdeliver.sieve.parser import parse
from vdeliver.sieve.tree import Argument, Command, Number, Script, StringList, Tag, Test

# Extensions `require` accepts, and those it names but refuses for now.
EXTENSIONS = frozenset({
    "fileinto", "envelope", "comparator-i;octet", "comparator-i;ascii-casemap", "comparator-i;ascii-numeric",
    "copy", "relational", "subaddress", "variables", "encoded-character", "imap4flags", "environment", "index",
    "mailbox", "date", "ihave", "body", "include", "mime", "foreverypart", "extracttext", "regex", "spamtest",
    "spamtestplus", "virustest", "special-use", "editheader", "reject", "ereject", "duplicate", "vacation",
    "vacation-seconds", "enotify", "fcc",
})
# RFC 5235 3.2: spamtestplus brings the spamtest test; RFC 6131: vacation-seconds brings vacation.
IMPLIES = {"spamtestplus": ("spamtest",), "vacation-seconds": ("vacation",)}
NOT_YET = {
    "notify": "the old draft; require \"enotify\" (RFC 5435)",
}
COMPARATORS = ("i;octet", "i;ascii-casemap", "i;ascii-numeric")
RELATIONS = ("gt", "ge", "lt", "le", "eq", "ne")
MAX_ACTIONS_DEFAULT = 32


@dataclass(frozen=True, slots=True)
class TagSpec:
    group: str  # tags of one group exclude each other
    value: str | None = None  # None (a flag), "string", "strings", "number"
    extension: str | None = None


@dataclass(frozen=True, slots=True)
class Signature:
    positional: tuple[str, ...] = ()  # "string" (one string), "strings" (a string list), "number"
    tags: dict[str, TagSpec] = field(default_factory=dict)
    tests: str = "none"  # "none", "one", "list"
    block: bool = False
    extension: str | None = None
    required_groups: tuple[str, ...] = ()
    optional_first: bool = False  # the first positional argument may be left out (imap4flags' variable)
    optional_last: bool = False  # the last positional argument may be left out (None; deleteheader's patterns)


_COMPARATOR = {"comparator": TagSpec("comparator", "string")}
_MATCH = {
    "is": TagSpec("match"), "contains": TagSpec("match"), "matches": TagSpec("match"),
    "value": TagSpec("match", "string", "relational"), "count": TagSpec("match", "string", "relational"),
    "regex": TagSpec("match", None, "regex"),
}
_ADDRESS_PART = {
    "all": TagSpec("address-part"), "localpart": TagSpec("address-part"), "domain": TagSpec("address-part"),
    "user": TagSpec("address-part", None, "subaddress"), "detail": TagSpec("address-part", None, "subaddress"),
}
_COPY = {"copy": TagSpec("copy", None, "copy")}
_FLAGS = {"flags": TagSpec("flags", "strings", "imap4flags")}
_INDEX = {"index": TagSpec("index", "number", "index"), "last": TagSpec("last", None, "index")}
# RFC 5703 section 4: :mime and its options (the options need :mime; rules_5703 checks it)
_MIME = {"mime": TagSpec("mime", None, "mime"), "anychild": TagSpec("anychild", None, "mime")}
_MIME_OPTIONS = {"type": TagSpec("mime-option", None, "mime"), "subtype": TagSpec("mime-option", None, "mime"),
                 "contenttype": TagSpec("mime-option", None, "mime"),
                 "param": TagSpec("mime-option", "strings", "mime")}
MAX_LOOP_NESTING = 4  # foreverypart loops in one another (Pigeonhole's SIEVE_MAX_LOOP_DEPTH)
_MODIFIERS = {  # RFC 5229 section 4: one per precedence group
    "lower": TagSpec("case"), "upper": TagSpec("case"), "lowerfirst": TagSpec("first"),
    "upperfirst": TagSpec("first"), "quotewildcard": TagSpec("quote"), "length": TagSpec("length"),
    "quoteregex": TagSpec("quote", None, "regex"), "encodeurl": TagSpec("encodeurl", None, "enotify"),
}

# RFC 8580: a copy of what vacation or notify sends, stored in a folder.
_FCC = {
    "fcc": TagSpec("fcc", "string", "fcc"), "create": TagSpec("create", None, "mailbox"),
    "flags": TagSpec("flags", "strings", "imap4flags"), "specialuse": TagSpec("specialuse", "string", "special-use"),
}

SIGNATURES: dict[tuple[str, str], Signature] = {
    # commands
    ("command", "require"): Signature(("strings",)),
    ("command", "if"): Signature(tests="one", block=True),
    ("command", "elsif"): Signature(tests="one", block=True),
    ("command", "else"): Signature(block=True),
    ("command", "stop"): Signature(),
    ("command", "keep"): Signature(tags=dict(_FLAGS)),
    ("command", "discard"): Signature(),
    ("command", "fileinto"): Signature(("string",), {**_COPY, **_FLAGS, "create": TagSpec("create", None, "mailbox"),
                                                     "specialuse": TagSpec("specialuse", "string", "special-use")},
                                       extension="fileinto"),
    ("command", "set"): Signature(("string", "string"), dict(_MODIFIERS), extension="variables"),
    ("command", "setflag"): Signature(("string", "strings"), extension="imap4flags", optional_first=True),
    ("command", "addflag"): Signature(("string", "strings"), extension="imap4flags", optional_first=True),
    ("command", "removeflag"): Signature(("string", "strings"), extension="imap4flags", optional_first=True),
    ("command", "redirect"): Signature(("string",), dict(_COPY)),
    ("command", "error"): Signature(("string",), extension="ihave"),
    ("command", "reject"): Signature(("string",), extension="reject"),
    ("command", "notify"): Signature(("string",), {  # RFC 5435
        "from": TagSpec("from", "string"), "importance": TagSpec("importance", "string"),
        "options": TagSpec("options", "strings"), "message": TagSpec("message", "string"), **_FCC},
        extension="enotify"),
    ("command", "vacation"): Signature(("string",), {  # RFC 5230, 6131
        "days": TagSpec("period", "number"), "seconds": TagSpec("period", "number", "vacation-seconds"),
        "subject": TagSpec("subject", "string"), "from": TagSpec("from", "string"),
        "addresses": TagSpec("addresses", "strings"), "mime": TagSpec("mime"), "handle": TagSpec("handle", "string"),
        **_FCC}, extension="vacation"),
    ("command", "ereject"): Signature(("string",), extension="ereject"),
    ("command", "include"): Signature(("string",), {
        "personal": TagSpec("location"), "global": TagSpec("location"), "once": TagSpec("once"),
        "optional": TagSpec("optional")}, extension="include"),
    ("command", "return"): Signature(extension="include"),
    ("command", "global"): Signature(("strings",), extension="include"),
    ("command", "foreverypart"): Signature(tags={"name": TagSpec("name", "string")}, block=True,
                                           extension="foreverypart"),
    ("command", "break"): Signature(tags={"name": TagSpec("name", "string")}, extension="foreverypart"),
    ("command", "extracttext"): Signature(("string",), {**_MODIFIERS, "first": TagSpec("first-n", "number")},
                                          extension="extracttext"),
    ("command", "addheader"): Signature(("string", "string"), {"last": TagSpec("last")}, extension="editheader"),
    ("command", "deleteheader"): Signature(("string", "strings"), {
        **_COMPARATOR, **_MATCH, "index": TagSpec("index", "number"), "last": TagSpec("last")},
        extension="editheader", optional_last=True),
    # tests
    ("test", "true"): Signature(),
    ("test", "false"): Signature(),
    ("test", "not"): Signature(tests="one"),
    ("test", "allof"): Signature(tests="list"),
    ("test", "anyof"): Signature(tests="list"),
    ("test", "exists"): Signature(("strings",), dict(_MIME)),
    ("test", "size"): Signature(("number",), {"over": TagSpec("size"), "under": TagSpec("size")},
                                required_groups=("size",)),
    ("test", "header"): Signature(("strings", "strings"), {**_COMPARATOR, **_MATCH, **_INDEX, **_MIME,
                                                            **_MIME_OPTIONS}),
    ("test", "address"): Signature(("strings", "strings"), {**_COMPARATOR, **_MATCH, **_ADDRESS_PART, **_INDEX,
                                                             **_MIME}),
    ("test", "envelope"): Signature(("strings", "strings"), {**_COMPARATOR, **_MATCH, **_ADDRESS_PART},
                                    extension="envelope"),
    ("test", "string"): Signature(("strings", "strings"), {**_COMPARATOR, **_MATCH}, extension="variables"),
    ("test", "environment"): Signature(("string", "strings"), {**_COMPARATOR, **_MATCH}, extension="environment"),
    ("test", "mailboxexists"): Signature(("strings",), extension="mailbox"),
    ("test", "specialuse_exists"): Signature(("string", "strings"), extension="special-use", optional_first=True),
    ("test", "ihave"): Signature(("strings",), extension="ihave"),
    ("test", "valid_notify_method"): Signature(("strings",), extension="enotify"),
    ("test", "notify_method_capability"): Signature(("string", "string", "strings"), {**_COMPARATOR, **_MATCH},
                                                    extension="enotify"),
    ("test", "duplicate"): Signature((), {  # RFC 7352
        "handle": TagSpec("handle", "string"), "header": TagSpec("id", "string"), "uniqueid": TagSpec("id", "string"),
        "seconds": TagSpec("seconds", "number"), "last": TagSpec("last")}, extension="duplicate"),
    ("test", "body"): Signature(("strings",), {**_COMPARATOR, **_MATCH, "raw": TagSpec("transform"),
                                              "content": TagSpec("transform", "strings"), "text": TagSpec("transform")},
                                extension="body"),
    ("test", "date"): Signature(("string", "string", "strings"), {
        **_COMPARATOR, **_MATCH, **_INDEX, "zone": TagSpec("zone", "string"), "originalzone": TagSpec("zone")},
        extension="date"),
    ("test", "currentdate"): Signature(("string", "strings"), {**_COMPARATOR, **_MATCH,
                                                                "zone": TagSpec("zone", "string")}, extension="date"),
    ("test", "hasflag"): Signature(("strings", "strings"), {**_COMPARATOR, **_MATCH}, extension="imap4flags",
                                   optional_first=True),
    ("test", "spamtest"): Signature(("string",), {**_COMPARATOR, **_MATCH,
                                                  "percent": TagSpec("percent", None, "spamtestplus")},
                                    extension="spamtest"),
    ("test", "virustest"): Signature(("string",), {**_COMPARATOR, **_MATCH}, extension="virustest"),
}


def unusable(name: str) -> str | None:
    """Why an extension of EXTENSIONS cannot be used here (regex without google-re2), or None."""
    if name == "regex":
        from vdeliver.sieve import regex

        return regex.unavailable()
    return None


def _is_variable_name(name: str) -> bool:
    return bool(name) and (name[0] == "_" or (name[0].isascii() and name[0].isalpha())) and all(
        c == "_" or (c.isascii() and c.isalnum()) for c in name)


_ENCODED = re.compile(r"\$\{(hex|unicode):([\s0-9a-fA-F]*)\}", re.IGNORECASE)


def _encoded_character(m: re.Match[str]) -> str:
    digits = m.group(2).split()
    if m.group(1).lower() == "hex":
        try:
            return bytes(int(d, 16) for d in digits).decode("utf-8", "replace")  # as Pigeonhole: not an error
        except ValueError:
            raise ValueError(f"invalid hex pair in encoded character '{m.group(0)}'") from None
    out = []
    for d in digits:
        code = int(d, 16)
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            raise ValueError(f"invalid Unicode character in '{m.group(0)}'")
        out.append(chr(code))
    return "".join(out)


# Resolves an include: (":personal" or ":global" location without the colon, name) -> the
# script's source, or None when there is no such script.
Resolver = Callable[[str, str], "bytes | None"]
MAX_INCLUDE_DEPTH = 10  # Pigeonhole's sieve_include_max_nesting_depth
MAX_INCLUDES = 255  # Pigeonhole's sieve_include_max_includes: scripts in one include tree


def compile_script(script: str | bytes, *, resolve: Resolver | None = None, max_size: int = 1 << 20) -> Compiled:
    """Parse and validate; SieveError (with every error found in `.errors`) if it cannot run.
    `resolve` finds the scripts `include` names (none without it)."""
    return validate(parse(script, max_size=max_size), resolve=resolve, max_size=max_size)


def validate(script: Script, *, resolve: Resolver | None = None, max_size: int = 1 << 20,
             _tree: _IncludeTree | None = None) -> Compiled:
    tree = _tree if _tree is not None else _IncludeTree(resolve, max_size)
    v = _Validator(tree)
    commands = v.commands(script.commands, top=True)
    v.extracttext_needs()
    if v.errors:
        first = v.errors[0]
        error = SieveError(first.line, first.message)
        error.errors = v.errors
        raise error
    return Compiled(commands, frozenset(v.required), tree.compiled)


class _IncludeTree:
    """What one compilation shares across the scripts it includes: the compiled ones, the
    chain being compiled (a script in it again is a cycle), and the resolver."""

    def __init__(self, resolve: Resolver | None, max_size: int) -> None:
        self.resolve = resolve
        self.max_size = max_size
        self.compiled: dict[tuple[str, str], Compiled] = {}
        self.missing: set[tuple[str, str]] = set()
        self.chain: list[tuple[str, str]] = []

    def include(self, key: tuple[str, str], optional: bool) -> str:
        """Compile the included script once; "" or why it cannot be included."""
        if key in self.chain:
            return f"circular include of {key[0]} script '{key[1]}'"
        if key in self.compiled or (optional and key in self.missing):
            return ""
        if len(self.chain) >= MAX_INCLUDE_DEPTH:
            return f"includes nested more than {MAX_INCLUDE_DEPTH} deep"
        if len(self.compiled) >= MAX_INCLUDES:
            return f"more than {MAX_INCLUDES} scripts included"
        source = self.resolve(*key) if self.resolve is not None else None
        if source is None:
            if optional:
                self.missing.add(key)
                return ""
            return f"included {key[0]} script '{key[1]}' does not exist"
        self.chain.append(key)
        try:
            self.compiled[key] = validate(parse(source, max_size=self.max_size), _tree=self)
        except SieveError as exc:
            where = "; ".join(str(e) for e in exc.errors)
            return f"failed to compile included {key[0]} script '{key[1]}': {where}"
        finally:
            self.chain.pop()
        return ""


def _special_use_flags(name: str, tags: dict[str, object], args: tuple[object, ...]) -> list[str]:
    if name == "fileinto" and isinstance(tags.get("specialuse"), str):
        return [str(tags["specialuse"])]
    if name == "specialuse_exists" and args and isinstance(args[-1], list):
        return [str(f) for f in args[-1]]
    return []


def valid_script_name(name: str) -> bool:
    """A script name as ManageSieve allows it (RFC 5804 1.6), and one that stays in its
    directory: not empty, no '/', no control characters, at most 255 characters."""
    return 0 < len(name) <= 255 and "/" not in name and name not in (".", "..") and not any(
        ord(c) < 32 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in name)


class _Validator:
    def __init__(self, tree: _IncludeTree) -> None:
        self.errors: list[SieveError] = []
        self.required: set[str] = set()
        self.tree = tree
        self.require_lines: dict[str, int] = {}
        self.loops: list[str | None] = []  # the names of the foreverypart loops around (None: unnamed)

    def error(self, line: int, message: str) -> None:
        self.errors.append(SieveError(line, message))

    # -- commands ------------------------------------------------------------------------------

    def commands(self, commands: tuple[Command, ...], top: bool = False) -> tuple[Node, ...]:
        out: list[Node] = []
        requires_allowed = top
        previous = ""
        for cmd in commands:
            if cmd.name == "require":
                if not requires_allowed:
                    self.error(cmd.line, "require commands can only be placed at top level at the beginning "
                                         "of the file")
                    continue
                self._require(cmd)
                previous = "require"
                continue
            requires_allowed = False
            if cmd.name in ("elsif", "else") and previous not in ("if", "elsif"):
                self.error(cmd.line, f"the {cmd.name} command must follow an if or elsif command")
            block = cmd.block
            if self._ihave_unsupported(cmd):
                block = ()  # RFC 5463: never run, so never checked (it may use what we lack)
            node = self.node("command", cmd.name, cmd.arguments, cmd.tests, cmd.test_list, block, cmd.line)
            if node is not None:
                out.append(node)
            previous = cmd.name
        return tuple(out)

    def _ihave_unsupported(self, cmd: Command) -> bool:
        """For `if ihave [...]`: the extensions asked for are all supported (then they are
        available from here on, as in Pigeonhole) or not (then the block is never run)."""
        if cmd.name not in ("if", "elsif") or len(cmd.tests) != 1 or cmd.tests[0].name != "ihave":
            return False
        if "ihave" not in self.required:
            return False  # the test itself is refused by node()
        names = [v for a in cmd.tests[0].arguments if isinstance(a, StringList) for v in a.values]
        if all(n in EXTENSIONS and unusable(n) is None for n in names):
            self.required.update(names + [i for n in names for i in IMPLIES.get(n, ())])
            return False
        return True

    def _require(self, cmd: Command) -> None:
        if cmd.tests or cmd.block is not None or len(cmd.arguments) != 1 or not isinstance(cmd.arguments[0],
                                                                                            StringList):
            self.error(cmd.line, "require takes one string list of extension names")
            return
        for name in cmd.arguments[0].values:
            if name in EXTENSIONS and (why := unusable(name)) is not None:
                self.error(cmd.line, why)
            elif name in EXTENSIONS:
                self.required.update((name, *IMPLIES.get(name, ())))
                self.require_lines.setdefault(name, cmd.line)
            elif name in NOT_YET:
                self.error(cmd.line, f"extension '{name}' is not supported by vdeliver yet ({NOT_YET[name]})")
            else:
                self.error(cmd.line, f"unknown extension '{name}'")

    # -- one command or test ----------------------------------------------------------------------

    def node(self, kind: str, name: str, arguments: tuple[Argument, ...], tests: tuple[Test, ...],
             test_list: bool, block: tuple[Command, ...] | None, line: int) -> Node | None:
        sig = SIGNATURES.get((kind, name))
        if sig is None:
            self.error(line, f"unknown {kind} '{name}'")
            return None
        if sig.extension is not None and sig.extension not in self.required:
            self.error(line, f"{kind} '{name}' needs require \"{sig.extension}\"")
            return None
        tags, args = self._arguments(kind, name, sig, arguments, line)
        sub = self._tests(kind, name, sig, tests, test_list, line)
        body: tuple[Node, ...] | None = None
        if sig.block and block is None:
            self.error(line, f"the {name} command needs a block")
        elif not sig.block and block is not None:
            self.error(line, f"the {name} command takes no block")
        elif block is not None:
            loop = name == "foreverypart"
            if loop:
                self.loops.append(str(tags["name"]) if "name" in tags else None)
            body = self.commands(block)
            if loop:
                self.loops.pop()
        if name in ("foreverypart", "break", "extracttext") or "mime" in sig.tags:
            self.rules_5703(kind, name, tags, args, line)
        return Node(name, line, tags, args, sub, body)

    def rules_5703(self, kind: str, name: str, tags: dict[str, object], args: tuple[object, ...],
                   line: int) -> None:
        """RFC 5703: break and extracttext inside a foreverypart loop (break :name inside one of
        that name), loops nested at most MAX_LOOP_NESTING deep, :mime's options with :mime, and
        extracttext into a variable a script may set."""
        if name == "foreverypart" and len(self.loops) + 1 > MAX_LOOP_NESTING:
            self.error(line, f"the nested foreverypart loop exceeds the nesting limit (<= {MAX_LOOP_NESTING} levels)")
        elif name == "break" and "name" in tags and str(tags["name"]) not in self.loops:
            self.error(line, f"the break command is not placed inside a foreverypart loop named '{tags['name']}'")
        elif name in ("break", "extracttext") and not self.loops:
            self.error(line, f"the {name} command is not placed inside a foreverypart loop")
        if name == "extracttext" and args and not _is_variable_name(str(args[0])):
            self.error(line, "cannot assign to match variable" if str(args[0]).isdigit()
                       else f"invalid variable name '{args[0]}'")
        if "mime" not in tags:
            for option in ("anychild", "type", "subtype", "contenttype", "param"):
                if option in tags:
                    self.error(line, f"the :{option} tag for the {name} {kind} cannot be specified without "
                                     "the :mime tag")

    def extracttext_needs(self) -> None:
        """RFC 5703 section 7: extracttext needs foreverypart and variables."""
        if "extracttext" not in self.required:
            return
        line = self.require_lines.get("extracttext", 0)
        for needed in ("foreverypart", "variables"):
            if needed not in self.required:
                error = SieveError(line, f"the extracttext extension cannot be used without the {needed} extension")
                at = next((i for i, e in enumerate(self.errors) if e.line > line), len(self.errors))
                self.errors.insert(at, error)
                return

    def _arguments(self, kind: str, name: str, sig: Signature, arguments: tuple[Argument, ...],
                   line: int) -> tuple[dict[str, object], tuple[object, ...]]:
        tags: dict[str, object] = {}
        groups: dict[str, str] = {}
        positional: list[Argument] = []
        items = list(arguments)
        i = 0
        while i < len(items):
            arg = items[i]
            i += 1
            if not isinstance(arg, Tag):
                positional.append(arg)
                continue
            if positional:
                self.error(arg.line, f"tag ':{arg.name}' after the positional arguments of {kind} '{name}'")
                continue
            spec = sig.tags.get(arg.name)
            if spec is None:
                self.error(arg.line, f"unknown tag ':{arg.name}' for {kind} '{name}'")
                continue
            if spec.extension is not None and spec.extension not in self.required:
                self.error(arg.line, f"tag ':{arg.name}' needs require \"{spec.extension}\"")
                continue
            if spec.group in groups:
                self.error(arg.line, f"tag ':{arg.name}' cannot be combined with ':{groups[spec.group]}'")
                continue
            groups[spec.group] = arg.name
            value: object = True
            if spec.value is not None:
                if i >= len(items) or isinstance(items[i], Tag):
                    self.error(arg.line, f"tag ':{arg.name}' needs a {spec.value.replace('strings', 'string list')}")
                    continue
                value = self._value(items[i], spec.value, f"tag ':{arg.name}'")
                i += 1
            tags[arg.name] = value
        for group in sig.required_groups:
            if group not in groups:
                self.error(line, f"{kind} '{name}' needs one of " +
                           ", ".join(f"':{t}'" for t, s in sig.tags.items() if s.group == group))
        shape = sig.positional
        if sig.optional_first and len(positional) == len(shape) - 1:
            shape = shape[1:]
        elif sig.optional_last and len(positional) == len(shape) - 1:
            shape = shape[:-1]
        if len(positional) != len(shape):
            self.error(line, f"{kind} '{name}' takes {len(sig.positional)} positional argument(s), "
                             f"not {len(positional)}")
            return tags, ()
        args = tuple(self._value(a, want, f"{kind} '{name}'") for a, want in zip(positional, shape, strict=True))
        if sig.optional_last and len(shape) < len(sig.positional):
            args = (*args, None)  # None: left out (deleteheader without value patterns)
        elif sig.optional_first and shape is not sig.positional:
            args = (None, *args)  # None: the default (imap4flags' internal variable)
        elif sig.optional_first and sig.extension == "imap4flags" and "variables" not in self.required:
            self.error(line, f"{kind} '{name}' takes a variable name only when \"variables\" is required")
        self._check_tags(kind, name, tags, line)
        if "regex" in tags and args and args[-1] is not None:
            self._check_regex(tags, args[-1], positional[-1].line)
        if name in ("addheader", "deleteheader") and args:
            self._editheader(name, args, positional)
        if name == "set" and args and not self._variable_name(str(args[0])):
            self.error(line, f"invalid variable name '{args[0]}'")
        if name == "global" and args:
            if "variables" not in self.required:
                self.error(line, "the global command needs require \"variables\"")
            for var in args[0] if isinstance(args[0], list) else []:
                if not _is_variable_name(str(var)):
                    self.error(line, f"invalid variable name '{var}'")
        for flag in _special_use_flags(name, tags, args):
            if not ("variables" in self.required and "${" in flag) and not valid_special_use(flag):
                self.error(line, f"invalid special-use flag '{flag}'")
        if name == "vacation" and isinstance(tags.get("from"), str):
            sender = str(tags["from"])
            if not ("variables" in self.required and "${" in sender) and redirect_address(sender)[1]:
                self.error(line, f"specified :from address '{sender}' is invalid for vacation action")
        if name == "notify" and args:
            self._notify(tags, args, line)
        if name in ("vacation", "notify") and "fcc" not in tags:
            for tag in ("create", "flags", "specialuse"):
                if tag in tags:
                    self.error(line, f"the :{tag} tag of the {name} command needs :fcc (RFC 8580)")
        if name == "include" and args:
            self._include(tags, str(args[0]), line)
        if name == "redirect" and args and not ("variables" in self.required and "${" in str(args[0])):
            why = redirect_address(str(args[0]))[1]
            if why:
                self.error(line, f"specified redirect address '{args[0]}' is invalid: {why}")
        return tags, args

    def _editheader(self, name: str, args: tuple[object, ...], positional: list[Argument]) -> None:
        """RFC 5293: a constant field name must be one (1*ftext), and a constant added value
        at most MAX_HEADER_SIZE bytes (one built from variables is checked when it runs)."""
        from vdeliver.sieve import headers

        field, line = str(args[0]), positional[0].line
        constant = "variables" not in self.required or "${" not in field
        why = headers.field_name_error(field) if constant else ""
        if why:
            self.error(line, f"{name} command: specified field name '{field[:80]}' is {why}")
        if name == "addheader" and len(args) > 1:
            value, line = str(args[1]), positional[1].line
            if ("variables" not in self.required or "${" not in value) and headers.value_too_large(value):
                size = len(value.encode("utf-8", "surrogatepass"))
                self.error(line, f"addheader command: specified header value '{value[:80]}' is too large "
                                 f"({size} bytes)")

    def _variable_name(self, name: str) -> bool:
        if "include" in self.required and name[:7].lower() == "global.":
            return _is_variable_name(name[7:])  # RFC 6609 3.5: the "global" namespace
        return _is_variable_name(name)

    def _notify(self, tags: dict[str, object], args: tuple[object, ...], line: int) -> None:
        """RFC 5435 / 5436's checks of the constant parts of a notify command."""
        from vdeliver.sieve import notify

        def constant(text: str) -> bool:
            return not ("variables" in self.required and "${" in text)

        uri = str(args[0])
        if constant(uri):
            try:
                notify.parse(uri)
            except ValueError as exc:
                self.error(line, f"notify command: {exc}")
        importance = tags.get("importance")
        if isinstance(importance, str) and constant(importance) and importance not in ("1", "2", "3"):
            self.error(line, f"invalid :importance value for notify command: {importance}")
        for option in tags.get("options") or []:  # type: ignore[attr-defined]
            if constant(str(option)) and not notify.valid_option(str(option)):
                self.error(line, f"notify command: invalid option name specified in option '{option}'")
        sender = tags.get("from")
        if isinstance(sender, str) and constant(sender) and redirect_address(sender)[1]:
            self.error(line, f"notify command: specified :from address '{sender}' is invalid")

    def _include(self, tags: dict[str, object], name: str, line: int) -> None:
        if "variables" in self.required and "${" in name:
            self.error(line, "the include command needs a constant script name, not one with variables")
            return
        if not valid_script_name(name):
            self.error(line, f"invalid script name '{name}'")
            return
        location = "global" if "global" in tags else "personal"
        why = self.tree.include((location, name), bool(tags.get("optional")))
        if why:
            self.error(line, why)

    def _value(self, arg: Argument, want: str, what: str) -> object:
        if want == "number":
            if isinstance(arg, Number):
                return arg.value
            self.error(arg.line, f"{what} needs a number")
            return 0
        if not isinstance(arg, StringList):
            self.error(arg.line, f"{what} needs a {'string list' if want == 'strings' else 'string'}")
            return "" if want == "string" else []
        values = [self._decode(v, arg.line) for v in arg.values]
        if want == "string":
            if arg.bracketed and len(values) != 1:
                self.error(arg.line, f"{what} needs a single string, not a list")
            return values[0]
        return values

    def _decode(self, value: str, line: int) -> str:
        """RFC 5228 section 2.4.2.4: `${hex: 41 42}` and `${unicode: 263a}` in any string, once
        "encoded-character" is required."""
        if "encoded-character" not in self.required or "${" not in value:
            return value
        try:
            return _ENCODED.sub(_encoded_character, value)
        except ValueError as exc:
            self.error(line, str(exc))
            return value

    def _check_tags(self, kind: str, name: str, tags: dict[str, object], line: int) -> None:
        if "last" in tags and "index" not in tags and name not in ("addheader", "duplicate"):
            self.error(line, f"the :last tag for the {name} {kind} cannot be given without :index")
        index = tags.get("index")
        if isinstance(index, int) and index < 1 and name != "deleteheader":  # deleteheader :index 0: all
            self.error(line, ":index counts from 1")
        comparator = tags.get("comparator")
        if isinstance(comparator, str):
            if comparator not in COMPARATORS or (comparator == "i;ascii-numeric"
                                                 and f"comparator-{comparator}" not in self.required):
                self.error(line, f"unknown comparator '{comparator}'")
            elif comparator == "i;ascii-numeric" and ("contains" in tags or "matches" in tags):
                self.error(line, "comparator 'i;ascii-numeric' supports only :is and the relational match types")
        for tag in ("value", "count"):
            relation = tags.get(tag)
            if isinstance(relation, str) and relation.lower() not in RELATIONS:
                self.error(line, f"':{tag}' needs one of {', '.join(RELATIONS)}, not '{relation}'")

    def _check_regex(self, tags: dict[str, object], keys: object, line: int) -> None:
        """:regex: the comparator can do it, and each key that is a constant (no variable in
        it) compiles, as in Pigeonhole; a key built from variables is checked when it runs."""
        from vdeliver.sieve import regex, variables

        comparator = str(tags.get("comparator", "i;ascii-casemap"))
        if comparator not in regex.COMPARATORS:
            self.error(line, "regex match type only supports i;octet and i;ascii-casemap comparators")
            return
        for key in keys if isinstance(keys, list) else [keys]:
            if "variables" in self.required and variables.expand(str(key), {}, []) != key:
                continue
            try:
                regex.check(str(key), comparator)
            except regex.RegexError as exc:
                self.error(line, f"invalid regular expression '{str(key)[:128]}' for regex match: {exc}")

    def _tests(self, kind: str, name: str, sig: Signature, tests: tuple[Test, ...], test_list: bool,
               line: int) -> tuple[Node, ...]:
        if sig.tests == "none":
            if tests:
                self.error(line, f"{kind} '{name}' takes no test")
            return ()
        if sig.tests == "one" and (test_list or len(tests) != 1):
            self.error(line, f"{kind} '{name}' needs one test")
            return ()
        if sig.tests == "list" and not test_list:
            self.error(line, f"{kind} '{name}' needs a test list in ( )")
            return ()
        out: list[Node] = []
        for t in tests:
            node = self.node("test", t.name, t.arguments, t.tests, t.test_list, None, t.line)
            if node is not None:
                out.append(node)
        return tuple(out)

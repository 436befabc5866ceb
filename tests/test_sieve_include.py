"""include (RFC 6609): :personal and :global scripts, :once, :optional, return, global
variables; cycles, depth and names refused; each case compared with Pigeonhole's sieve-test,
whose personal and global script directories hold the same scripts."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import IS_ROOT
from tests.sieve_oracle import Pigeonhole
from vdeliver.sieve.errors import SieveError
from vdeliver.sieve.interpreter import Envelope, Message, Result, run
from vdeliver.sieve.validator import MAX_INCLUDE_DEPTH, compile_script

MESSAGE = b"From: alice@example.org\r\nTo: fred@example.org\r\nSubject: hello world\r\n\r\nbody\r\n"
ENVELOPE = Envelope("alice@example.org", "fred@example.org")

Scripts = dict[str, bytes]


def compile_with(main: bytes, personal: Scripts, global_: Scripts | None = None) -> object:
    def resolve(location: str, name: str) -> bytes | None:
        return (personal if location == "personal" else global_ or {}).get(name)

    return compile_script(main, resolve=resolve)


def result_of(main: bytes, personal: Scripts, global_: Scripts | None = None) -> Result:
    compiled = compile_with(main, personal, global_)
    return run(compiled, Message.from_bytes(MESSAGE), ENVELOPE)  # type: ignore[arg-type]


def stores(r: Result) -> list[str]:
    return r.stores()


def test_personal_and_global_includes_run_in_place() -> None:
    r = result_of(b'require ["include", "fileinto"];\ninclude "a";\ninclude :global "b";\nfileinto "C";',
                  {"a": b'require "fileinto";\nfileinto "A";'}, {"b": b'require "fileinto";\nfileinto "B";'})
    assert stores(r) == ["A", "B", "C"]


def test_return_ends_only_the_included_script() -> None:
    r = result_of(b'require ["include", "fileinto"];\ninclude "a";\nfileinto "After";',
                  {"a": b'require ["include", "fileinto"];\nfileinto "A";\nreturn;\nfileinto "Never";'})
    assert stores(r) == ["A", "After"]
    top = result_of(b'require ["include", "fileinto"];\nfileinto "A";\nreturn;\nfileinto "Never";', {})
    assert stores(top) == ["A"]  # in the main script, return is stop


def test_stop_in_an_included_script_ends_everything() -> None:
    r = result_of(b'require ["include", "fileinto"];\ninclude "a";\nfileinto "Never";',
                  {"a": b'require "fileinto";\nfileinto "A";\nstop;'})
    assert stores(r) == ["A"]


def test_global_variables_are_shared_and_others_are_not() -> None:
    main = (b'require ["include", "variables", "fileinto"];\nglobal "folder";\nset "folder" "Shared";\n'
            b'set "mine" "Private";\ninclude "a";\nfileinto "${result}";\nfileinto "${global.folder}";')
    personal = {"a": b'require ["include", "variables", "fileinto"];\nglobal "folder";\n'
                     b'fileinto "${folder}-${mine}";\nset "global.result" "From-a";'}
    r = result_of(main, personal)
    assert [a.mailbox for a in r.actions] == ["Shared-", "", "Shared"]  # ${result} is a's own, so ""


def test_once_and_optional() -> None:
    r = result_of(b'require ["include", "fileinto"];\ninclude :once "a";\ninclude :once "a";\n'
                  b'include :optional "missing";\ninclude "b";\ninclude "b";',
                  {"a": b'require ["include", "copy", "fileinto"];\nfileinto :copy "A";',
                   "b": b'require ["include", "copy", "fileinto"];\nfileinto :copy "B";'})
    assert [a.mailbox for a in r.actions] == ["A", "B"]  # the same fileinto twice is one action


@pytest.mark.parametrize(("main", "personal", "message"), [
    (b'require "include";\ninclude "missing";', {}, "included personal script 'missing' does not exist"),
    (b'require "include";\ninclude :global "x";', {"x": b"keep;"}, "included global script 'x' does not exist"),
    (b'require "include";\ninclude "a";', {"a": b'require "include";\ninclude "b";',
                                          "b": b'require "include";\ninclude "a";'}, "circular include"),
    (b'require "include";\ninclude "self";', {"self": b'require "include";\ninclude "self";'}, "circular include"),
    (b'require "include";\ninclude "a";', {"a": b"bogus;"}, ("failed to compile included personal script 'a': "
                                                             "line 1: unknown command 'bogus'")),
    (b'require "include";\ninclude "../etc/passwd";', {}, "invalid script name"),
    (b'require ["include", "variables"];\nset "n" "a";\ninclude "${n}";', {"a": b"keep;"}, "constant script name"),
    (b'include "a";', {"a": b"keep;"}, "needs require \"include\""),
    (b'require "include";\nreturn "x";', {}, "takes 0 positional"),
    (b'require "include";\nglobal "x";', {}, "needs require \"variables\""),
    (b'require ["include", "variables"];\nglobal "1x";', {}, "invalid variable name"),
    (b'require "include";\ninclude :personal :global "a";', {"a": b"keep;"}, "cannot be combined"),
])
def test_refused(main: bytes, personal: Scripts, message: str) -> None:
    with pytest.raises(SieveError, match=message):
        compile_with(main, personal)


def test_depth_is_limited() -> None:
    chain = {f"s{i}": b'require "include";\ninclude "s%d";' % (i + 1) for i in range(MAX_INCLUDE_DEPTH + 2)}
    chain[f"s{MAX_INCLUDE_DEPTH + 2}"] = b"keep;"
    with pytest.raises(SieveError, match=f"nested more than {MAX_INCLUDE_DEPTH} deep"):
        compile_with(b'require "include";\ninclude "s0";', chain)


def test_an_include_tree_that_runs_too_long_hits_the_cpu_limit() -> None:
    """Each level includes the next 8 times (no cycle, no :once): 8**8 runs of the last one."""
    levels = {f"l{i}": b'require "include";\n' + b'include "l%d";\n' % (i + 1) * 8 for i in range(8)}
    levels["l8"] = b"if header :contains \"subject\" \"x\" { keep; }"
    compiled = compile_with(b'require "include";\ninclude "l0";', levels)
    with pytest.raises(SieveError, match="of CPU time"):
        run(compiled, Message.from_bytes(MESSAGE), ENVELOPE, max_cpu_time=0.2)  # type: ignore[arg-type]


# -- the same as Pigeonhole ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle() -> Iterator[tuple[Pigeonhole, Path]]:
    from tests.helpers import world_tmpdir

    scripts = world_tmpdir("vdeliver-include-")
    for sub in ("personal", "global"):
        (scripts / sub).mkdir()
    oracle = Pigeonhole.start(f"plugin {{\n  sieve = file:{scripts}/personal;active={scripts}/active.sieve\n"
                              f"  sieve_global = {scripts}/global\n}}\n")
    try:
        yield oracle, scripts
    finally:
        oracle.close()
        shutil.rmtree(scripts, ignore_errors=True)


CORPUS: list[tuple[bytes, Scripts, Scripts]] = [
    (b'require ["include", "fileinto"];\ninclude "a";\ninclude :global "b";\nfileinto "C";',
     {"a": b'require "fileinto";\nfileinto "A";'}, {"b": b'require "fileinto";\nfileinto "B";'}),
    (b'require ["include", "fileinto"];\ninclude "r";\nfileinto "After";',
     {"r": b'require ["include", "fileinto"];\nfileinto "R";\nreturn;\nfileinto "Never";'}, {}),
    (b'require ["include", "fileinto"];\ninclude "s";\nfileinto "Never";', {"s": b'require "fileinto";\n'
                                                                              b'fileinto "S";\nstop;'}, {}),
    (b'require ["include", "variables", "fileinto"];\nglobal "f";\nset "f" "G";\nset "l" "L";\ninclude "v";',
     {"v": b'require ["include", "variables", "fileinto"];\nglobal "f";\nfileinto "${f}-${l}";'}, {}),
    (b'require ["include", "variables", "fileinto"];\nset "global.f" "NS";\ninclude "n";',
     {"n": b'require ["include", "variables", "fileinto"];\nfileinto "${global.f}";'}, {}),
    (b'require ["include", "fileinto", "copy"];\ninclude :once "c";\ninclude :once "c";\ninclude :optional "no";',
     {"c": b'require ["fileinto", "copy"];\nfileinto :copy "Once";'}, {}),
    (b'require "include";\ninclude "missing";', {}, {}),
    (b'require "include";\ninclude "x1";', {"x1": b'require "include";\ninclude "x2";',
                                           "x2": b'require "include";\ninclude "x1";'}, {}),
    (b'require "include";\ninclude "bad";', {"bad": b"keep;\nbogus;"}, {}),
    (b'require "include";\ninclude :global "onlyhere";', {"onlyhere": b"discard;"}, {}),
    (b'require ["include", "fileinto"];\nif header :contains "subject" "hello" { include "h"; }\nkeep;',
     {"h": b'require "fileinto";\nfileinto "Hello";'}, {}),
    (b'require ["include", "variables"];\nkeep;\nglobal "late";', {}, {}),
    (b'require "include";\ninclude "a/b";', {}, {}),
    (b'require ["include", "imap4flags", "fileinto"];\naddflag "\\\\Seen";\ninclude "fl";',
     {"fl": b'require ["imap4flags", "fileinto"];\nfileinto "F";\nkeep;'}, {}),
]


@pytest.mark.peers
@pytest.mark.parametrize(("main", "personal", "global_"), CORPUS, ids=[f"corpus{i}" for i in range(len(CORPUS))])
def test_same_as_pigeonhole(oracle: tuple[Pigeonhole, Path], main: bytes, personal: Scripts,
                            global_: Scripts) -> None:
    pigeonhole, scripts = oracle
    for sub in ("personal", "global"):
        for old in (scripts / sub).iterdir():
            old.unlink()
    for sub, table in (("personal", personal), ("global", global_)):
        for name, text in table.items():
            if "/" in name:
                continue
            path = scripts / sub / f"{name}.sieve"
            path.write_bytes(text)
            path.chmod(0o644)
    for sub in ("personal", "global"):  # Pigeonhole compiles into the script's directory
        if IS_ROOT:
            os.chmod(scripts / sub, 0o777)
    theirs = pigeonhole.run(main, MESSAGE, sender="alice@example.org", recipient="fred@example.org")
    try:
        ours = result_of(main, personal, global_)
    except SieveError as exc:
        assert not theirs.ok, f"Pigeonhole accepts what we refuse ({exc}):\n{theirs.output}"
        return
    assert theirs.ok, f"Pigeonhole refuses what we accept:\n{theirs.output}"
    assert ours.stores() == theirs.stores(), theirs.output
    assert ours.implicit_keep == theirs.implicit_keep, theirs.output
    flags = {a.mailbox or "INBOX": sorted(f.lower() for f in a.flags) for a in ours.actions if a.type != "redirect"}
    if ours.implicit_keep:
        flags["INBOX"] = sorted(f.lower() for f in ours.implicit_flags)
    assert {k: v for k, v in flags.items() if v} == {k: v for k, v in theirs.store_flags().items() if v}, theirs.output


# -- a sequence of scripts (sieve_before, the user's, sieve_after) -----------------------------------

SEQUENCES: list[list[bytes]] = [
    # spam filing first: a fileinto cancels the keep, so the user's script does not run
    [b'require "fileinto";\nif header :contains "subject" "hello" { fileinto "Junk"; }',
     b'require "fileinto";\nfileinto "User";'],
    # nothing matched: the keep stands, the user's script runs
    [b'require "fileinto";\nif header :contains "subject" "nomatch" { fileinto "Junk"; }',
     b'require "fileinto";\nfileinto "User";'],
    # an explicit keep in the first only means "go on": no INBOX copy from it
    [b"keep;", b'require "fileinto";\nfileinto "User";'],
    # :copy keeps the keep in effect, so the next one runs too
    [b'require ["fileinto", "copy"];\nfileinto :copy "Archive";', b'require "fileinto";\nfileinto "User";'],
    [b"discard;", b'require "fileinto";\nfileinto "User";'],
    [b"stop;", b'require "fileinto";\nfileinto "User";'],
    [b'require "fileinto";\nfileinto "A";\nkeep;', b'require "fileinto";\nfileinto "B";'],
    [b'require "imap4flags";\naddflag "\\\\Seen";', b"keep;"],
    [b"keep;", b"keep;", b'require ["fileinto", "copy"];\nfileinto :copy "Last";'],
    [b'redirect "x@example.net";', b"keep;"],
]


@pytest.mark.parametrize("scripts", SEQUENCES, ids=[f"sequence{i}" for i in range(len(SEQUENCES))])
def test_a_sequence_runs_as_pigeonhole_runs_it(oracle: tuple[Pigeonhole, Path], scripts: list[bytes]) -> None:
    from vdeliver.sieve.interpreter import run_sequence

    pigeonhole, _dirs = oracle
    theirs = pigeonhole.run(scripts[-1], MESSAGE, sender="alice@example.org", recipient="fred@example.org",
                            before=scripts[:-1])
    assert theirs.ok, theirs.output
    ours = run_sequence([compile_script(s) for s in scripts], Message.from_bytes(MESSAGE), ENVELOPE)
    assert ours.stores() == theirs.stores(), theirs.output
    assert [a.address for a in ours.actions if a.type == "redirect"] == theirs.redirects(), theirs.output


def test_sieve_test_resolves_includes(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    (tmp_path / "main.sieve").write_bytes(b'require ["include", "fileinto"];\ninclude "lists";\n'
                                          b'include :global "spam";')
    (tmp_path / "lists.sieve").write_bytes(b'require "fileinto";\nfileinto "Lists";')
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "spam.sieve").write_bytes(b'require "fileinto";\nfileinto "Junk";')
    (tmp_path / "m.eml").write_bytes(MESSAGE)
    base = [sys.executable, "-m", "vdeliver", "sieve-test", "--json"]
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([*base, "--global-dir", str(tmp_path / "g"), str(tmp_path / "main.sieve"),
                           str(tmp_path / "m.eml")], capture_output=True, check=False, cwd=root)
    assert done.returncode == 0, done
    assert [a["mailbox"] for a in json.loads(done.stdout)["actions"]] == ["Lists", "Junk"]
    done = subprocess.run([*base, str(tmp_path / "main.sieve"), str(tmp_path / "m.eml")], capture_output=True,
                          check=False, cwd=root)
    out = json.loads(done.stdout)
    assert done.returncode == 1 and out["status"] == "compile-error"
    assert out["errors"][0]["message"] == "included global script 'spam' does not exist"

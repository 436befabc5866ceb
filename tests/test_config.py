"""The TOML configuration: defaults, validation naming file/line/key, the fast reader."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from vdeliver import config
from vdeliver.config import ConfigError


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "vdeliver.toml"
    p.write_text(text)
    return str(p)


def test_defaults_are_the_papers_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VDELIVER_CONFIG", raising=False)
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "missing.toml"))
    cfg = config.load()
    assert cfg.mbox_path == "/var/spool/vbox/{domain}/{user}"
    assert cfg.maildir_path == "/home/vmail-users/{domain}/{user}/Maildir"
    assert cfg.format == "mbox" and cfg.mbox_escape == "mboxo" and cfg.return_path is True


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(str(tmp_path / "nope.toml"))
    assert info.value.status.exit_code() == 75
    assert "nope.toml" in info.value.status.text()


def test_env_variable_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VDELIVER_CONFIG", write(tmp_path, 'format = "maildir"\n'))
    assert config.load().format == "maildir"


@pytest.mark.parametrize(
    ("text", "line", "key", "words"),
    [
        ('format = "mbox"\nformatt = "x"\n', 2, "formatt", "unknown key"),
        ('\n\nformat = "mdir"\n', 3, "format", "must be one of"),
        ("lock_timeout = -1\n", 1, "lock_timeout", "negative"),
        ('lock_timeout = "60"\n', 1, "lock_timeout", "whole number"),
        ("return_path = 1\n", 1, "return_path", "true or false"),
        ('mbox_path = "relative/{user}"\n', 1, "mbox_path", "absolute"),
        ('mbox_path = "/var/{domain}"\n', 1, "mbox_path", "{user}"),
        ('mbox_path = "/var/{host}/{user}"\n', 1, "mbox_path", "braces"),
        ('maildir_path = "/x/../{user}"\n', 1, "maildir_path", ".."),
        ('recipient_delimiter = "/"\n', 1, "recipient_delimiter", "cannot"),
        ("[bogus]\nx = 1\n", 1, "[bogus]", "unknown table"),
        # Arrays force the full TOML reader; line numbers must still be found.
        ('\nmbox_escape = "mbox"\n[lmtp]\nx = [1, 2]\n', 2, "mbox_escape", "must be one of"),
    ],
)
def test_errors_name_file_line_and_key(tmp_path: Path, text: str, line: int, key: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    msg = info.value.status.text()
    assert f"{path}:{line}:" in msg and key in msg and words in msg
    assert "\n" not in msg


def test_invalid_toml_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, "format = \n"))
    assert "invalid TOML" in info.value.status.text()


def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_bytes(b'format = "\xff"\n')
    with pytest.raises(ConfigError, match="UTF-8"):
        config.load(str(p))


def test_tables_are_kept_for_other_components(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, '[accounts]\ndatabase = "/tmp/a.sqlite"\n'))
    assert cfg.table("accounts") == {"database": "/tmp/a.sqlite"}
    assert cfg.table("lmtp") == {}
    assert cfg.where("accounts", "database").endswith(":2: [accounts] database")


SIMPLE_CASES = [
    'format = "maildir"',
    "lock_timeout = 30  # seconds",
    "return_path = false",
    "# comment only\n\n  \n",
    "x = 'literal \\ backslash'",
    "[accounts]\ndatabase = \"/a\"\n[lmtp]\nsocket = '/b'",
    "n = -5\nm = +7\nz = 0",
    "key-with_dash = true",
]


@pytest.mark.parametrize("text", SIMPLE_CASES)
def test_fast_reader_accepts_the_flat_subset(text: str) -> None:
    got = config.parse_simple(text)
    assert got is not None
    assert got[0] == tomllib.loads(text)


@pytest.mark.parametrize("text", ['a = "esc\\n"', "a = [1]", "a.b = 1", "a = 1.5", "a = 0x10", "a = 1_000",
                                  '"q" = 1', "a = 1\na = 2", "[a.b]", "[[a]]", 'a = """x"""', "a = 01",
                                  "a = inf", "a = 1979-05-27"])
def test_fast_reader_declines_the_rest(text: str) -> None:
    assert config.parse_simple(text) is None


_key = st.text(alphabet="abcxyz_-019", min_size=1, max_size=6)
_value = st.one_of(
    st.booleans().map(lambda b: "true" if b else "false"),
    st.integers(-(10**12), 10**12).map(str),
    st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=12).map(lambda s: '"' + s + '"'),
    st.text(max_size=12).map(lambda s: "'" + s + "'"),
    st.text(alphabet="0123456789+-._xe\"'[]{} #=", min_size=1, max_size=8),
)
_line = st.one_of(
    st.tuples(_key, _value, st.sampled_from(["", " # c", "\t#x", " "])).map(lambda t: f"{t[0]} = {t[1]}{t[2]}"),
    _key.map(lambda k: f"[{k}]"),
    st.sampled_from(["", "# comment", "   ", "\t"]),
    st.text(max_size=15),
)


@given(st.lists(_line, max_size=8))
@example(["\r"])  # a CR that ends no line: the fast reader took it for an empty file
@example(["a = 1\r", "b = 2"])
def test_fast_reader_agrees_with_tomllib(lines: list[str]) -> None:
    text = "\n".join(lines)
    fast = config.parse_simple(text)
    if fast is None:
        return  # the full reader decides
    assert fast[0] == tomllib.loads(text)


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "vdeliver.toml"
    cfg = config.load(str(example))
    assert cfg.format in ("mbox", "maildir")

"""`spamtest`, `spamtestplus` and `virustest` (RFC 5235): the RFC's examples, the value mapping
(0 not tested, 1..10, :percent 0..100, virustest 0..5), :count, the three status types,
the [sieve] settings and `sieve-test --config`, and the same values as Pigeonhole's
sieve-test given the same settings."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sieve_oracle import Pigeonhole
from vdeliver.config import ConfigError, build
from vdeliver.sieve import delivery, spamtest
from vdeliver.sieve.errors import SieveError
from vdeliver.sieve.interpreter import Envelope, Message, Result, run
from vdeliver.sieve.spamtest import ScanConfig, SpamConfig
from vdeliver.sieve.validator import compile_script

ROOT = Path(__file__).resolve().parent.parent
ENVELOPE = Envelope("alice@example.org", "fred@example.com")
NUMERIC = '"relational", "comparator-i;ascii-numeric"'


def message(*fields: str) -> bytes:
    return ("From: a@example.org\r\nSubject: s\r\n" + "".join(f + "\r\n" for f in fields) + "\r\nbody\r\n").encode()


def sa(score: str, required: str = "5.0", verdict: str = "Yes") -> str:
    return f"X-Spam-Status: {verdict}, score={score} required={required} tests=BAYES_99,\r\n\tHTML_MESSAGE autolearn=no"


def result_of(script: str, msg: bytes, spam: SpamConfig | None = None) -> Result:
    return run(compile_script(script.encode()), Message.from_bytes(msg), ENVELOPE, spam=spam)


def values(msg: bytes, spam: SpamConfig | None = None) -> tuple[str, str, str]:
    """(spamtest, spamtest :percent, virustest) as the tests see them."""
    script = ('require ["spamtestplus", "virustest", "variables", "fileinto"];\n'
              'if spamtest :matches "*" { set "s" "${0}"; }\nif spamtest :percent :matches "*" { set "p" "${0}"; }\n'
              'if virustest :matches "*" { set "v" "${0}"; }\nfileinto "${s}|${p}|${v}";\n')
    s, p, v = result_of(script, msg, spam).stores()[0].split("|")
    return s, p, v


# -- RFC 5235's examples ---------------------------------------------------------------------------

RFC_3_2_1 = f'''require ["spamtest", "fileinto", {NUMERIC}];
if spamtest :value "eq" :comparator "i;ascii-numeric" "0"
{{
    fileinto "INBOX.unclassified";
}}
elsif spamtest :value "ge" :comparator "i;ascii-numeric" "3"
{{
    fileinto "INBOX.spam-trap";
}}
'''
RFC_3_2_2 = f'''require ["spamtestplus", "fileinto", {NUMERIC}];
if spamtest :value "eq"
            :comparator "i;ascii-numeric" "0"
{{
    fileinto "INBOX.unclassified";
}}
elsif spamtest :percent :value "eq"
               :comparator "i;ascii-numeric" "0"
{{
    fileinto "INBOX.not-spam";
}}
elsif spamtest :percent :value "lt"
               :comparator "i;ascii-numeric" "37"
{{
    fileinto "INBOX.spam-trap";
}}
else
{{
    discard;
}}
'''
RFC_3_2_2_COUNT = RFC_3_2_2.replace('if spamtest :value "eq"\n', 'if spamtest :percent :count "eq"\n', 1)
RFC_3_3 = f'''require ["virustest", "fileinto", {NUMERIC}];
if virustest :value "eq" :comparator "i;ascii-numeric" "0"
{{
    fileinto "INBOX.unclassified";
}}
if virustest :value "eq" :comparator "i;ascii-numeric" "4"
{{
    fileinto "INBOX.quarantine";
}}
elsif virustest :value "eq" :comparator "i;ascii-numeric" "5"
{{
    discard;
}}
'''


def test_rfc_3_2_1() -> None:
    assert result_of(RFC_3_2_1, message()).stores() == ["INBOX.unclassified"]
    assert result_of(RFC_3_2_1, message(sa("0.5"))).stores() == ["INBOX"]  # 1 + 9 x 0.1 = 1
    assert result_of(RFC_3_2_1, message(sa("1.2"))).stores() == ["INBOX.spam-trap"]  # 1 + 9 x 0.24 = 3


@pytest.mark.parametrize("script", [RFC_3_2_2, RFC_3_2_2_COUNT])
def test_rfc_3_2_2(script: str) -> None:
    assert result_of(script, message()).stores() == ["INBOX.unclassified"]
    assert result_of(script, message(sa("-2.0", verdict="No"))).stores() == ["INBOX.not-spam"]
    assert result_of(script, message(sa("1.8"))).stores() == ["INBOX.spam-trap"]  # 36 %
    r = result_of(script, message(sa("1.85")))  # 37 %
    assert [a.type for a in r.actions] == ["discard"]


def test_rfc_3_3() -> None:
    assert result_of(RFC_3_3, message()).stores() == ["INBOX.unclassified"]
    assert result_of(RFC_3_3, message("X-Virus-Status: Clean")).stores() == ["INBOX"]
    r = result_of(RFC_3_3, message("X-Virus-Status: Infected (Eicar-Test-Signature)"))
    assert [a.type for a in r.actions] == ["discard"]


# -- the value mapping ---------------------------------------------------------------------------------

MAPPING = [
    ((), ("0", "0", "0")),  # no verdict: not tested
    ((sa("0.0"),), ("1", "0", "0")),
    ((sa("-3.1", verdict="No"),), ("1", "0", "0")),  # below zero: tested and clear
    ((sa("2.5"),), ("5", "50", "0")),  # 1 + 9 x 0.5 = 5.5
    ((sa("4.9"),), ("9", "98", "0")),
    ((sa("5.0"),), ("10", "100", "0")),  # at the required score: certainly spam
    ((sa("27.3"),), ("10", "100", "0")),
    ((sa("3", "0.0"),), ("0", "0", "0")),  # a highest score of 0: not tested
    ((sa("abc"),), ("0", "0", "0")),  # not a number
    ((sa("123456"),), ("0", "0", "0")),  # six digits: not a Pigeonhole decimal
    ((sa("2,5"),), ("5", "50", "0")),  # a comma is a radix point
    (("X-Spam-Status: garbage",), ("0", "0", "0")),  # the expression does not match
    (("X-Virus-Status: Clean",), ("0", "0", "1")),
    (("X-Virus-Status: Infected (Worm)",), ("0", "0", "5")),
    (("X-Virus-Status: Unknown",), ("0", "0", "0")),
    (("X-Virus-Status: clean",), ("0", "0", "0")),  # text values are compared as they are
]


@pytest.mark.parametrize(("fields", "expected"), MAPPING)
def test_the_value_mapping(fields: tuple[str, ...], expected: tuple[str, str, str]) -> None:
    assert values(message(*fields)) == expected


def test_the_first_field_counts() -> None:
    assert values(message(sa("1.0"), sa("5.0")))[0] == "2"


def test_count_is_1_when_tested_and_0_when_not() -> None:
    script = ('require ["spamtestplus", "virustest", "relational", "fileinto"];\n'
              'if spamtest :count "eq" "1" { fileinto "s"; }\nif spamtest :percent :count "eq" "0" { fileinto "p0"; }\n'
              'if virustest :count "eq" "0" { fileinto "v0"; }\n')
    assert result_of(script, message(sa("1.0"))).stores() == ["s", "v0"]
    assert result_of(script, message()).stores() == ["p0", "v0"]


def _config(**kw: object) -> SpamConfig:
    return SpamConfig(spamtest=ScanConfig(**kw))  # type: ignore[arg-type]


def test_strlen_and_max_value() -> None:
    spam = _config(status_header="X-Spam-Level", status_type="strlen", max_value=5.0)
    assert values(message("X-Spam-Level: ***"), spam)[:2] == ("6", "60")
    assert values(message("X-Spam-Level: ********"), spam)[:2] == ("10", "100")
    assert values(message("X-Spam-Level: "), spam)[:2] == ("1", "0")  # empty: length 0
    assert values(message("X-Spam-Level: **+"), spam)[:2] == ("0", "0")  # not one character repeated


def test_score_without_an_expression() -> None:
    spam = _config(status_header="X-Spam-Score", max_value=10.0)
    assert values(message("X-Spam-Score: 7"), spam)[:2] == ("7", "70")
    assert values(message("X-Spam-Score: 7 points"), spam)[:2] == ("0", "0")


def test_text_values() -> None:
    texts = ("Unsure", "No", "", "", "", "Maybe", "", "", "", "", "Yes")
    spam = _config(status_header="X-Spam-Flag", status_type="text", text_values=texts)
    assert values(message("X-Spam-Flag: Yes"), spam)[:2] == ("10", "100")
    assert values(message("X-Spam-Flag: Maybe"), spam)[:2] == ("5", "50")
    assert values(message("X-Spam-Flag: No"), spam)[:2] == ("1", "10")
    assert values(message("X-Spam-Flag: Unsure"), spam)[:2] == ("0", "0")  # value 0: not tested (RFC 5235)
    assert values(message("X-Spam-Flag: Other"), spam)[:2] == ("0", "0")


def test_not_configured_is_not_tested() -> None:
    assert values(message(sa("9.0")), _config())[:2] == ("0", "0")


def test_a_broken_expression_fails_the_run() -> None:
    with pytest.raises(SieveError, match="line 2: spamtest: the configuration is wrong"):
        result_of('require "spamtest";\nif spamtest "1" { stop; }', message(sa("1")),
                  _config(status_header="X-Spam-Status: (", max_value=5.0))


@pytest.mark.parametrize(("script", "line", "text"), [
    ('require "spamtest";\nif spamtest :percent "50" { stop; }', 2, 'needs require "spamtestplus"'),
    ('if spamtest "1" { stop; }', 1, 'needs require "spamtest"'),
    ('require "spamtest";\nif virustest "1" { stop; }', 2, 'needs require "virustest"'),
    ('require "virustest";\nif virustest :percent "1" { stop; }', 2, "unknown tag ':percent'"),
    ('require "spamtest";\nif spamtest ["1", "2"] { stop; }', 2, "single string"),
    ('require "spamtest";\nif spamtest "1" "2" { stop; }', 2, "positional"),
])
def test_compile_errors(script: str, line: int, text: str) -> None:
    with pytest.raises(SieveError) as info:
        compile_script(script.encode())
    assert info.value.line == line and text in info.value.message


# -- configuration ---------------------------------------------------------------------------------------


def test_sieve_settings() -> None:
    cfg = build({"sieve": {"spamtest_status_header": "X-Spam-Score", "spamtest_max_value": 15,
                           "virustest_status_type": "text", "virustest_status_header": "X-Virus: (.*)",
                           "virustest_text_value1": "ok", "virustest_text_value5": "bad"}})
    spam = delivery.settings(cfg).spam
    assert spam is not None
    assert spam.spamtest == ScanConfig("X-Spam-Score", "score", "", 15.0, ("",) * 11)
    assert spam.virustest.text_values == ("", "ok", "", "", "", "bad")
    assert values(message("X-Spam-Score: 7.5", "X-Virus: bad"), spam) == ("5", "50", "5")
    assert delivery.settings(build({})).spam is None  # the defaults, spamtest.DEFAULT, built when a test runs


@pytest.mark.parametrize(("table", "text"), [
    ({"spamtest_status_type": "stars"}, "spamtest_status_type must be one of"),
    ({"spamtest_status_header": "X-Spam: [z-a]"}, "spamtest_status_header is not"),
    ({"virustest_max_header": "X-V ; x"}, "virustest_max_header is not"),
    ({"spamtest_max_value": -1}, "must not be negative"),
    ({"spamtest_text_value11": "x"}, "unknown key"),
])
def test_bad_settings(table: dict[str, object], text: str) -> None:
    with pytest.raises(ConfigError, match=text):
        delivery.settings(build({"sieve": table}))


def test_sieve_test_takes_the_configuration(tmp_path: Path) -> None:
    (tmp_path / "vdeliver.toml").write_text('[sieve]\nspamtest_status_header = "X-Spam-Score"\n'
                                           "spamtest_max_value = 10\n")
    (tmp_path / "s.sieve").write_text('require ["spamtest", "fileinto", "variables"];\n'
                                      'if spamtest :matches "*" { fileinto "score-${1}"; }\n')
    msg = message("X-Spam-Score: 8", sa("1.0")).decode()

    def tool(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "vdeliver", "sieve-test", *args, str(tmp_path / "s.sieve")],
                              input=msg, capture_output=True, text=True, cwd=ROOT, timeout=60)
        return done.stdout + done.stderr

    assert "store message in folder: score-8" in tool("--config", str(tmp_path / "vdeliver.toml"))
    assert "store message in folder: score-2" in tool()  # the default: SpamAssassin's X-Spam-Status
    (tmp_path / "bad.toml").write_text('[sieve]\nspamtest_status_type = "x"\n')
    assert "spamtest_status_type must be one of" in tool("--config", str(tmp_path / "bad.toml"))


# -- against Pigeonhole ----------------------------------------------------------------------------------


def pigeonhole_config(spam: SpamConfig) -> str:
    """The plugin settings that tell Pigeonhole what `spam` tells us."""
    lines = ["sieve_extensions = +spamtest +spamtestplus +virustest +regex"]
    for name, test in (("spamtest", spam.spamtest), ("virustest", spam.virustest)):
        lines += [f"sieve_{name}_status_type = {test.status_type}",
                  f"sieve_{name}_status_header = {test.status_header}"]
        if test.max_header:
            lines.append(f"sieve_{name}_max_header = {test.max_header}")
        if test.max_value is not None:
            lines.append(f"sieve_{name}_max_value = {test.max_value}")
        lines += [f"sieve_{name}_text_value{i}= {t}" for i, t in enumerate(test.text_values) if t]
    return "plugin {\n" + "".join(f"  {line}\n" for line in lines) + "}\n"


STRLEN = SpamConfig(ScanConfig("X-Spam-Level", "strlen", max_value=6.0), spamtest.CLAMAV)


@pytest.fixture(scope="module")
def oracles() -> Iterator[dict[str, Pigeonhole]]:
    started = {"default": Pigeonhole.start(pigeonhole_config(spamtest.DEFAULT)),
               "strlen": Pigeonhole.start(pigeonhole_config(STRLEN))}
    yield started
    for oracle in started.values():
        oracle.close()


ORACLE_MESSAGES = [
    (), (sa("0.0"),), (sa("-1.5", verdict="No"),), (sa("2.5"),), (sa("4.9"),), (sa("5.0"),), (sa("12.25", "6.5"),),
    (sa("1.999"),), (sa("3", "0.0"),), (sa("abc"),), (sa("2,5"),), ("X-Spam-Status: nonsense",),
    ("X-Virus-Status: Clean",), ("X-Virus-Status: Infected (x)",), ("X-Virus-Status: Dunno",),
    ("X-Spam-Level: ***",), ("X-Spam-Level: ******",), ("X-Spam-Level: **********",), ("X-Spam-Level: **-",),
]
ORACLE_SCRIPT = ('require ["spamtestplus", "virustest", "variables", "fileinto", ' + NUMERIC + '];\n'
                 'if spamtest :matches "*" { set "s" "${0}"; }\nif spamtest :percent :matches "*" { set "p" "${0}"; }\n'
                 'if virustest :matches "*" { set "v" "${0}"; }\n'
                 'if spamtest :value "ge" :comparator "i;ascii-numeric" "5" { set "hi" "hi"; }\n'
                 'fileinto "${s}|${p}|${v}|${hi}";\n')


@pytest.mark.peers
@pytest.mark.parametrize("config", ["default", "strlen"])
@pytest.mark.parametrize("fields", ORACLE_MESSAGES)
def test_values_as_pigeonhole(oracles: dict[str, Pigeonhole], config: str, fields: tuple[str, ...]) -> None:
    msg = message(*fields)
    theirs = oracles[config].run(ORACLE_SCRIPT.encode(), msg)
    assert theirs.ok, theirs.output
    ours = result_of(ORACLE_SCRIPT, msg, spamtest.DEFAULT if config == "default" else STRLEN).stores()
    assert theirs.stores() == ours, theirs.output


@pytest.mark.peers
@pytest.mark.parametrize("script", [
    'require "spamtest";\nif spamtest :percent "50" { stop; }',
    'require "spamtestplus";\nif spamtest :percent "50" { stop; }',
    'require "spamtestplus";\nif spamtest "5" { stop; }',
    'require "spamtest";\nif spamtest ["1", "2"] { stop; }',
    'require "virustest";\nif virustest :percent "1" { stop; }',
    'require ["virustest", "regex"];\nif virustest :regex "^[0-5]$" { stop; }',
    'if spamtest "1" { stop; }',
])
def test_verdicts_as_pigeonhole(oracles: dict[str, Pigeonhole], script: str) -> None:
    theirs = oracles["default"].run(script.encode())
    try:
        compile_script(script.encode())
    except SieveError as exc:
        assert not theirs.ok, f"Pigeonhole accepts what we refuse ({exc}):\n{theirs.output}"
        assert exc.line in [n for n, _ in theirs.errors], (exc, theirs.errors)
    else:
        assert theirs.ok, theirs.output

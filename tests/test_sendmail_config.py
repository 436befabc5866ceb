"""The shipped sendmail configuration: .mc files compile cleanly, and the real
sendmail routes every kind of map entry as intended (`sendmail -C out.cf -bt`).

What the traps in the paper's configuration look like, checked here:
- the procmail mailer must be defined after OSTYPE(debian) and must never get
  the `m` flag (one run per recipient, so one $h per domain);
- the LOCAL_RULE_0 rule needs a literal TAB, or sendmail drops it and the
  address silently falls through to esmtp;
- every hosted domain needs its own @domain catch-all, or unknown addresses
  leak (root@hosted-domain must never reach the machine's root mailbox);
- the incoming process must not know the hosted domains as local (no class w file).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sendmail_harness import (
    EXAMPLES,
    IN_MC,
    MAILSCANNER_MC,
    MAPS,
    OUT_MC,
    Site,
    compile_mc,
    need_m4,
    need_sendmail,
)
from vdeliver import config as config_mod

pytestmark = pytest.mark.peers

MC_FILES = sorted(EXAMPLES.glob("*.mc"))


def _compiled(mc: Path) -> str:
    need_m4()
    text, warnings = compile_mc(mc)
    assert warnings == [], f"m4 warned on {mc.name}: {warnings}"
    return text


def _line(cf: str, prefix: str) -> str:
    found = [line for line in cf.splitlines() if line.startswith(prefix)]
    assert len(found) == 1, f"expected one line starting {prefix!r}, found {found}"
    return found[0]


def _map_lines(name: str) -> list[tuple[str, str]]:
    """(key, value) of a map source, skipping comments and blank lines as makemap does."""
    out = []
    for line in (MAPS / name).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        out.append((key.strip(), value.strip()))
    return out


# -- every .mc compiles -------------------------------------------------------------


def test_the_two_processes_and_the_mailscanner_variant_ship() -> None:
    assert {IN_MC.name, OUT_MC.name, MAILSCANNER_MC.name} <= {p.name for p in MC_FILES}


@pytest.mark.parametrize("mc", MC_FILES, ids=[p.name for p in MC_FILES])
def test_mc_compiles_without_warnings(mc: Path) -> None:
    cf = _compiled(mc)
    assert cf.startswith("#"), "m4 produced no .cf"
    assert "\nV10/Berkeley\n" in cf


def test_out_mailer_runs_vdeliver_as_vmail_one_recipient_per_run() -> None:
    cf = _compiled(OUT_MC)
    start = cf.index("\nMprocmail,")
    mailer = cf[start : cf.index("A=", start)]
    # The launcher: absolute interpreter inside, no environment needed (issue 15).
    assert "P=/usr/local/libexec/vdeliver, U=vmail:vmail," in mailer
    flags = re.search(r"F=(\w+)", mailer)
    assert flags is not None and flags.group(1) == "DFMl0"
    assert "m" not in flags.group(1), "the m flag folds several recipients into one run"
    args = cf[cf.index("A=", start) :].split("\n", 1)[0]
    assert args == "A=vdeliver -t -Y -a $h -a $u"
    # local_procmail keeps the real procmail for the machine's own accounts.
    local = cf[cf.index("\nMlocal,") :].split("\n\n", 1)[0]
    assert "P=/usr/bin/procmail" in local and "A=procmail -t -Y -a $h -d $u" in local


def test_local_rule_0_has_its_literal_tab() -> None:
    rule = [line for line in OUT_MC.read_text().splitlines() if line.startswith("R$* < @ $* .virtuser.")]
    assert len(rule) == 1
    lhs, tab, rhs = rule[0].partition("\t")
    assert tab and lhs == "R$* < @ $* .virtuser. > $*" and rhs == "$#procmail $@ $2 $: $1 < @ $2 >"
    cf = _compiled(OUT_MC)
    parse_local = cf[cf.index("SParseLocal=98") :].split("\n\n", 2)[1]
    assert parse_local.strip() == rule[0]


def test_out_uses_its_own_maps_and_the_shared_queue() -> None:
    cf = _compiled(OUT_MC)
    assert _line(cf, "F{VirtHost}") == "F{VirtHost}/etc/mail/virtuserdomains"
    assert _line(cf, "Kvirtuser ") == "Kvirtuser hash /etc/mail/virtusertable"
    assert _line(cf, "Kaccess ") == "Kaccess hash -T<TMPF> -o /etc/mail/access_out"
    assert _line(cf, "Fw").startswith("Fw/etc/mail/local-host-names")
    assert _line(cf, "O QueueDirectory=") == "O QueueDirectory=/var/spool/mqueue"
    assert _line(cf, "Qmqueue") == "Qmqueue, P=/var/spool/mqueue, F=f, r=1, R=8, I=2m"
    assert _line(cf, "O PidFile=") == "O PidFile=/run/sendmail/mta/sendmail_out.pid"


@pytest.mark.parametrize(
    ("mc", "queue"),
    [(IN_MC, "/var/spool/mqueue"), (MAILSCANNER_MC, "/var/spool/mqueue.in")],
    ids=["plain", "mailscanner"],
)
def test_in_queues_only_splits_envelopes_and_only_relays(mc: Path, queue: str) -> None:
    cf = _compiled(mc)
    assert _line(cf, "O DeliveryMode=") == "O DeliveryMode=queueonly"
    assert _line(cf, "O QueueDirectory=") == f"O QueueDirectory={queue}"
    assert _line(cf, "Qmqueue") == f"Qmqueue, P={queue}, F=f, r=1, R=8, I=2m"
    assert _line(cf, "Kaccess ") == "Kaccess hash -T<TMPF> /etc/mail/access.in"
    assert _line(cf, "O PidFile=") == "O PidFile=/run/sendmail/mta/sendmail_in.pid"
    assert not [line for line in cf.splitlines() if line.startswith("Fw")], "no class w file in the incoming process"
    assert "Kvirtuser" not in cf and "Mprocmail" not in cf


# -- the map sources ----------------------------------------------------------------


def _domains() -> list[str]:
    return [k for k, _ in _map_lines("virtuserdomains")]


def test_maps_cover_every_kind_of_entry() -> None:
    table = dict(_map_lines("virtusertable"))
    domains = _domains()
    assert domains == ["away.com", "home.com"]
    for d in domains:
        assert f"@{d}" in table, f"{d} needs its own catch-all"
        assert f"fred@{d}" in table, "both domains share the user name fred"
    for key, value in table.items():
        if value.endswith(".virtuser."):
            assert value.rsplit("@", 1)[1].removesuffix(".virtuser.") in domains, key
    assert table["@away.com"].startswith("error:5.1.1:550")
    assert table["@home.com"].endswith("@home.com.virtuser.")
    assert table["dino@away.com"].startswith("error:5.2.1:550")
    access = dict(_map_lines("access.in"))
    for d in domains:
        assert access[f"To:{d}"] == "RELAY"
    assert access["To:dino@away.com"].startswith("ERROR:5.2.1:550")
    names = [k for k, _ in _map_lines("local-host-names")]
    assert not set(names) & set(domains), "hosted domains must not be in class w"


def test_example_vdeliver_toml_documents_every_key_with_its_default() -> None:
    text = (EXAMPLES / "vdeliver.toml").read_text()
    assert config_mod.parse_simple(text) == ({}, {}), "as shipped, the file must mean all defaults"
    shown = {}
    for line in text.splitlines():
        m = re.match(r"^#(\w+) = (.*)$", line)
        if m:
            shown[m.group(1)] = m.group(2)
    assert set(shown) == set(config_mod.SCHEMA), "every key of SCHEMA, and only those"
    uncommented = "\n".join(f"{k} = {v}" for k, v in shown.items())
    cfg = config_mod.build(*config_mod.parse_simple(uncommented))  # type: ignore[misc]
    for key, (default, _kind, _allowed) in config_mod.SCHEMA.items():
        assert getattr(cfg, key) == default, key
        # each key has a comment just above it saying what it means
        before = text[: text.index(f"#{key} = ")].rstrip("\n").rsplit("\n", 1)[-1]
        assert before.startswith(("# ", "#user = ")), key


# -- address tests with the real sendmail ------------------------------------------


@pytest.fixture(scope="module")
def out_site() -> Iterator[tuple[Site, Path]]:
    need_sendmail()
    site = Site.create()
    try:
        site.install_maps()
        cf = site.compile(OUT_MC, "out")
        yield site, cf
    finally:
        site.close()


PROCMAIL = "$# procmail $@ {d} $: {u} < @ {d} >"


def _spaced(s: str) -> str:
    return s.replace(".", " . ").replace("+", " + ")


def _vdeliver(domain: str, user: str) -> str:
    return PROCMAIL.format(d=_spaced(domain), u=_spaced(user))


ROUTES = [
    # the shared user name: two domains, two deliveries, each with its own $h
    ("fred@away.com", _vdeliver("away.com", "fred")),
    ("fred@home.com", _vdeliver("home.com", "fred")),
    ("Fred@Home.COM", _vdeliver("home.com", "fred")),
    # +detail survives for fred@away.com (%3 in the table)
    ("fred+lists@away.com", _vdeliver("away.com", "fred+lists")),
    # alias to a local mailbox (in the other domain)
    ("info@away.com", _vdeliver("home.com", "wilma")),
    ("postmaster@away.com", _vdeliver("away.com", "fred")),
    # alias to an off-site address, and a forward: both leave by SMTP
    ("sales@away.com", "$# esmtp $@ partner . example . $: orders < @ partner . example . >"),
    ("barney@home.com", "$# esmtp $@ bedrock . example . $: barney < @ bedrock . example . >"),
    # disabled account and unknown users are refused
    ("dino@away.com", "$# error $@ 5 . 2 . 1 $: 550 Mailbox disabled"),
    ("nobody@away.com", "$# error $@ 5 . 1 . 1 $: 550 User unknown"),
    # root of a hosted domain never reaches the machine's own root mailbox
    ("root@away.com", "$# error $@ 5 . 1 . 1 $: 550 User unknown"),
    ("root@home.com", _vdeliver("home.com", "wilma")),
    ("anything@home.com", _vdeliver("home.com", "wilma")),
    # the pseudo-domain itself goes straight to vdeliver
    ("wilma@home.com.virtuser.", _vdeliver("home.com", "wilma")),
    # the machine's own names are still local accounts (local_procmail)
    ("root@mail.vdeliver.test", "$# local $: root"),
    ("root", "$# local $: root"),
]


def test_address_routing(out_site: tuple[Site, Path]) -> None:
    site, cf = out_site
    got = site.address_test(cf, [a for a, _ in ROUTES])
    wrong = {a: (got[a], want) for a, want in ROUTES if got[a] != want}
    assert not wrong, "\n".join(f"{a}: got {g!r}, want {w!r}" for a, (g, w) in wrong.items())


def test_hosted_root_never_local(out_site: tuple[Site, Path]) -> None:
    site, cf = out_site
    users = ["root", "postmaster", "mailer-daemon", "daemon", "nobody", "www-data", "vmail", "mail"]
    addresses = [f"{u}@{d}" for u in users for d in ("away.com", "home.com")]
    got = site.address_test(cf, addresses)
    for a in addresses:
        assert not got[a].startswith("$# local"), f"{a} -> {got[a]}"
        assert got[a].startswith(("$# procmail", "$# error")), f"{a} -> {got[a]}"


def test_catch_alls_keep_root_safe_even_with_the_papers_class_w() -> None:
    """The paper also put the hosted domains into local-host-names (class w).  Then
    an address missing from the virtusertable reaches the machine's account of the
    same name; the per-domain catch-alls are what stops it."""
    need_sendmail()
    with Site.create() as site:
        site.install_maps(**{"local-host-names": "mail.vdeliver.test\nlocalhost\naway.com\nhome.com\n"})
        cf = site.compile(OUT_MC, "out")
        got = site.address_test(cf, ["root@away.com", "root@home.com"])
        assert got["root@away.com"] == "$# error $@ 5 . 1 . 1 $: 550 User unknown"
        assert got["root@home.com"] == _vdeliver("home.com", "wilma")
        # the same without the catch-alls: the leak
        table = "".join(
            line + "\n" for line in (MAPS / "virtusertable").read_text().splitlines() if not line.startswith("@")
        )
        site.install_maps(None, virtusertable=table)
        got = site.address_test(cf, ["root@away.com", "root@home.com"])
        assert got == {"root@away.com": "$# local $: root", "root@home.com": "$# local $: root"}


def test_local_rule_with_spaces_is_ignored(out_site: tuple[Site, Path]) -> None:
    """The trap: spaces instead of the TAB make sendmail drop the rule silently."""
    site, _ = out_site
    broken = OUT_MC.read_text().replace("$*\t$#procmail", "$*    $#procmail")
    cf = site.compile(broken, "out-spaces")
    res = site.sendmail(cf, "-bt", input=b"3,0 fred@away.com\n")
    out = (res.stdout + res.stderr).decode(errors="replace")
    assert "tab expected" in out or "invalid rewrite line" in out
    assert "$# procmail" not in out


def test_virtusertable_built_by_makemap_is_read(out_site: tuple[Site, Path]) -> None:
    site, cf = out_site
    res = site.sendmail(cf, "-bt", input=b"/map virtuser fred@home.com\n/map virtuser @away.com\n", check=True)
    out = res.stdout.decode()
    assert "fred@home.com.virtuser." in out
    assert "error:5.1.1:550 User unknown" in out


def test_missing_maps_defer_instead_of_misrouting() -> None:
    """The maps that route and admit hosted mail are not optional (-o): a missing
    virtusertable defers (ruleset 0 exits 75) instead of sending hosted mail out
    by SMTP, and a missing access.in answers 451 instead of "Relaying denied"."""
    need_sendmail()
    with Site.create() as site:
        site.install_maps()
        (site.etc / "virtusertable.db").unlink()
        (site.etc / "access.in.db").unlink()
        out_cf = site.compile(OUT_MC, "out")
        res = site.sendmail(out_cf, "-bt", input=b"3,0 fred@away.com\n")
        out = res.stdout.decode(errors="replace")
        assert "status 75" in out, out
        in_cf = site.compile(IN_MC, "in")
        res = site.sendmail(in_cf, "-bt", input=b"check_rcpt <fred@away.com>\n")
        out = res.stdout.decode(errors="replace")
        assert "451" in out and "status 75" in out, out


def test_sendmail_refuses_map_files_in_unsafe_directories() -> None:
    """Why the harness keeps sites out of /tmp, and why /etc/mail must stay 0755:
    sendmail will not read class and map files from a world-writable directory
    (with -o it would silently do without them; without -o it refuses to run)."""
    need_sendmail()
    site = Site.create()
    try:
        site.install_maps()
        cf = site.compile(OUT_MC, "out")
        site.etc.chmod(0o777)
        res = site.sendmail(cf, "-bt", input=b"3,0 fred@away.com\n")
        out = (res.stdout + res.stderr).decode(errors="replace")
        assert "writable directory" in out.lower(), out
        assert "$# procmail" not in out
    finally:
        site.etc.chmod(0o755)
        site.close()


def test_compile_mc_reports_m4_errors(tmp_path: Path) -> None:
    """The check above is only worth something if m4's complaints reach us."""
    need_m4()
    bad = tmp_path / "bad.mc"
    bad.write_text("include(`/usr/share/sendmail/cf/m4/cf.m4')dnl\nFEATURE(`no_such_feature')dnl\n")
    with pytest.raises(RuntimeError, match="no_such_feature"):
        compile_mc(bad)


@pytest.mark.parametrize("mc", MC_FILES, ids=[p.name for p in MC_FILES])
def test_every_mc_trusts_debians_smmta_owned_maps(mc: Path) -> None:
    # Debian's /etc/mail is smmta:smmsp and its makemap chowns each .db to smmta: without
    # TrustedUser=smmta sendmail calls every map "unsafe" (-bi exits 70, hosted mail leaves by SMTP).
    cf = _compiled(mc)
    assert "\nO TrustedUser=smmta\n" in cf

"""Real sendmail through the socket maps (examples/sendmail_*-socketmap.mc).

- `sendmail -bt`: every address routes exactly as with the compiled map files,
  and every access lookup of both processes gives the same answer.
- A full SMTP delivery through both sendmail processes with no map files at all,
  with the database (a private PostgreSQL cluster) stopped in the middle: keys
  the server has seen still route (stale answers), a recipient it has not seen
  stays queued (TEMP), and is delivered by the queue run after the database is back.
"""

from __future__ import annotations

import smtplib
import time
from pathlib import Path

import pytest

from tests.helpers import Account, MailRoot
from tests.pg import start_cluster
from tests.sendmail_harness import HOSTNAME, IN_MC, OUT_MC, Site, read_qf, vdeliver_mailer
from tests.socketmap_harness import Client, generated_maps, populate, running_server, server_log, write_config

pytestmark = pytest.mark.peers

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SOCK_IN_MC = EXAMPLES / "sendmail_in-socketmap.mc"
SOCK_OUT_MC = EXAMPLES / "sendmail_out-socketmap.mc"
PROD_IN = "/run/vdeliver/socketmap-in.sock"
PROD_OUT = "/run/vdeliver/socketmap-out.sock"

ADDRESSES = [
    "fred@away.com", "Fred@Away.COM", "fred+folder@away.com", "dino@away.com", "sleepy@away.com",
    "single@away.com", "multi@away.com", "keeper@away.com", "info@away.com", "sales@away.com",
    "team@away.com", "nobody@away.com", "fred@home.com", "wilma@home.com", "anyone@home.com",
    "fred@alias.org", "nobody@alias.org", "x@empty.net", "someone@remote.example", "root",
]
ACCESS_KEYS = [
    "To:fred@away.com", "To:dino@away.com", "To:nobody@away.com", "To:away.com", "To:home.com",
    "To:fred@alias.org", "To:alias.org", "To:remote.example", "Connect:127.0.0.1", "Connect:10.1.2.3",
]


def map_test(site: Site, cf: Path, lookups: list[tuple[str, str]]) -> list[str]:
    """`/map NAME KEY` in sendmail -bt: what the map answers, as sendmail saw it."""
    script = "".join(f"/map {m} {k}\n" for m, k in lookups)
    out = site.sendmail(cf, "-bt", input=script.encode(), check=True).stdout.decode(errors="replace")
    found = [line.strip() for line in out.splitlines() if "map_lookup" in line]
    # A miss is "no match (0)" from a hash map and "no match (68)" (EX_NOTFOUND) from a socket map.
    return [line.split(" no match (")[0] + " no match" if " no match (" in line else line for line in found]




def socket_dir(site: Site) -> Path:
    # sendmail refuses a socket below a group/world-writable directory, like a map file.
    path = site.base / "socketmap"
    path.mkdir(mode=0o755, exist_ok=True)
    return path


def test_bt_routes_equal_the_map_files(site: Site) -> None:
    base = socket_dir(site)
    config = write_config(base, f'database = "{base}/accounts.sqlite"')
    populate(config)
    texts = generated_maps(config)
    site.install_maps(None, virtusertable=texts["virtusertable"], virtuserdomains=texts["virtuserdomains"],
                      access_in=texts["access.in"], access_out=texts["access_out"])
    files_out = site.compile(OUT_MC, "out-files")
    files_in = site.compile(IN_MC, "in-files")
    sock_out = site.compile(SOCK_OUT_MC, "out-sock", replace={PROD_OUT: str(base / "out.sock")})
    sock_in = site.compile(SOCK_IN_MC, "in-sock", replace={PROD_IN: str(base / "in.sock")})
    for cf in (sock_out, sock_in):
        text = cf.read_text()
        assert "virtusertable" not in text.replace("virtusertable.m4", "") or "socket" in text
        assert " -o " not in "".join(line for line in text.splitlines() if "socket" in line)

    with running_server(config):
        by_files = site.address_test(files_out, ADDRESSES)
        by_socket = site.address_test(sock_out, ADDRESSES)
        assert by_socket == by_files
        lookups = [("access", k) for k in ACCESS_KEYS] + [("virtuser", a.lower()) for a in ADDRESSES]
        for files_cf, sock_cf in ((files_out, sock_out), (files_in, sock_in)):
            assert map_test(site, sock_cf, lookups) == map_test(site, files_cf, lookups)
        relay_in = map_test(site, sock_in, [("access", "To:fred@away.com")])
        relay_out = map_test(site, sock_out, [("access", "To:fred@away.com")])
    # What the routes are (so that "equal" is not "equally broken").
    assert by_socket["fred@away.com"].startswith("$# procmail $@ away . com $: fred")
    assert by_socket["fred@alias.org"].startswith("$# procmail $@ away . com $: fred")
    assert by_socket["nobody@away.com"].startswith("$# error")
    assert by_socket["dino@away.com"].startswith("$# error")
    assert by_socket["anyone@home.com"].startswith("$# procmail $@ home . com $: wilma")
    assert by_socket["sales@away.com"].startswith("$# esmtp $@ partner . example")
    assert by_socket["someone@remote.example"].startswith("$# esmtp $@ remote . example")
    assert "RELAY" in relay_in[0] and "RELAY" not in "".join(relay_out)
    assert "Traceback" not in server_log(config)


def check_rcpt(site: Site, cf: Path, addresses: list[str]) -> dict[str, str]:
    """`check_rcpt` in sendmail -bt for a client on another machine (not a local relay client)."""
    script = ".D{client_addr}192.0.2.9\n.D{client_name}client.example\n"
    script += "".join(f"check_rcpt <{a}>\n" for a in addresses)
    out = site.sendmail(cf, "-bt", input=script.encode(), check=True).stdout.decode(errors="replace")
    results = [line.split("returns:", 1)[1].strip() for line in out.splitlines()
               if line.startswith("check_rcpt") and "returns:" in line]
    assert len(results) == len(addresses), out
    return dict(zip(addresses, results, strict=True))


def test_incoming_socketmap_sendmail_relays_hosted_users_for_a_remote_client(site: Site) -> None:
    """With no map file at all, the incoming sendmail still relays for the hosted domains: class R
    (the relay decision, taken from the domain alone) is loaded from the socket map, as class
    {VirtHost} is in the outgoing one.  Without it every hosted user got "550 Relaying denied"
    from any client but the local ones (found by scripts/hubs-demo --mail)."""
    base = socket_dir(site)
    config = write_config(base, f'database = "{base}/accounts.sqlite"')
    populate(config)
    sock_in = site.compile(SOCK_IN_MC, "in-sock", replace={PROD_IN: str(base / "in.sock")})
    assert not (site.etc / "relay-domains").exists()
    with running_server(config):
        got = check_rcpt(site, sock_in, ["fred@away.com", "info@away.com", "fred@alias.org", "anyone@home.com",
                                         "nobody@away.com", "dino@away.com", "x@partner.example"])
    unknown = "$# error $@ 5 . 1 . 1 $: 550 User unknown"
    assert got == {
        "fred@away.com": "RELAY", "info@away.com": "RELAY", "fred@alias.org": "RELAY", "anyone@home.com": "RELAY",
        "nobody@away.com": unknown, "dino@away.com": "$# error $@ 5 . 2 . 1 $: 550 Mailbox disabled",
        "x@partner.example": '$# error $@ 5 . 7 . 1 $: "550 Relaying denied"',
    }, got
    assert "Traceback" not in server_log(config)


MESSAGE = b"From: sender@remote.example\r\nSubject: socketmap\r\n\r\nHello through the socket maps.\r\n"


def wait_until_answering(sock: Path, timeout: float = 20) -> None:
    """Until the server has reconnected (it retries in the background, and fails fast meanwhile)."""
    client = Client(str(sock))
    try:
        deadline = time.monotonic() + timeout
        while client.ask("virtuser", f"probe-{time.monotonic()}@away.com").status != "NOTFOUND":
            assert time.monotonic() < deadline, "the server did not reconnect to the database"
            time.sleep(0.2)
    finally:
        client.close()


def _queued(site: Site) -> list[str]:
    return sorted(str(r).strip("<>") for qf in site.queue_files() for r in read_qf(qf)["recipients"])


@pytest.mark.slow
def test_smtp_delivery_without_map_files_survives_a_database_outage(
        site: Site, vmail: Account, mailroot: MailRoot) -> None:
    cluster = start_cluster("smdown")
    try:
        base = socket_dir(site)
        dsn = cluster.create_database("smdown")
        config = write_config(base, f'dsn = "{dsn}"', "ttl = 1\nnegative_ttl = 1\ndb_timeout = 2")
        populate(config)
        for domain, user in (("away.com", "fred"), ("home.com", "wilma"), ("home.com", "fred")):
            mailroot.add_mbox(domain, user)
        mailroot.write_config(lock_timeout=1, hostname=HOSTNAME)
        # No map files: nothing but the compiled .cf and the (empty) system aliases.
        (site.etc / "aliases").write_text("")
        # The harness points ALIAS_FILE at the site's aliases; put the socket back as the second map.
        aliases = f"define(`ALIAS_FILE', `{site.etc}/aliases,socket:-d5 unix:{base}/out.sock')dnl\n"
        assert f"define(`ALIAS_FILE', `/etc/mail/aliases,socket:-d5 unix:{PROD_OUT}')" in SOCK_OUT_MC.read_text()
        out_cf = site.compile(SOCK_OUT_MC, "out", replace={PROD_OUT: str(base / "out.sock"),
                                                           **vdeliver_mailer(mailroot.config)}, defines=aliases)
        with running_server(config):
            site.newaliases(out_cf)
            _in_cf, port, _ = site.serve(SOCK_IN_MC, "in", replace={PROD_IN: str(base / "in.sock")})
            assert not [p.name for p in site.etc.iterdir()
                        if p.name.split(".")[0] in ("virtusertable", "virtuserdomains", "access", "access_out")]

            def send(rcpts: list[str]) -> dict[str, tuple[int, bytes]]:
                with smtplib.SMTP("127.0.0.1", port, local_hostname="client.remote.example", timeout=30) as smtp:
                    return smtp.sendmail("sender@remote.example", rcpts, MESSAGE)

            def copies(domain: str, user: str) -> int:
                return (mailroot.vbox / domain / user).read_bytes().count(b"Hello through the socket maps.")

            # 1. Database up: the incoming process relays for hosted users only, refuses the rest;
            #    anyone@home.com reaches wilma through the catch-all (so `@home.com` is now cached).
            refused = send(["fred@away.com", "dino@away.com", "nobody@away.com", "anyone@home.com"])
            assert sorted(refused) == ["dino@away.com", "nobody@away.com"]
            assert all(code == 550 for code, _ in refused.values())
            site.wait_queue(2)
            run = site.run_queue(out_cf)
            assert run.returncode == 0, run.stderr
            assert site.queue_files() == []
            assert copies("away.com", "fred") == 1 and copies("home.com", "wilma") == 1

            # 2. Mail for fred@away.com (seen) and fred@home.com (never looked up by the outgoing
            #    process) is queued...
            assert send(["fred@away.com", "fred@home.com"]) == {}
            site.wait_queue(2)
            # ... and the database goes away before the outgoing process runs the queue.
            cluster.stop()
            time.sleep(1.2)  # past the 1 s TTL: what the server knows is now stale
            run = site.run_queue(out_cf)
            assert copies("away.com", "fred") == 2  # routed by a stale answer
            # fred@home.com was never asked: TEMP, and the address is deferred although its
            # fallback `@home.com` (the catch-all, to wilma) has a stale answer: sendmail would
            # use that answer, so the server fails the rest of the chain (server.FallbackChain).
            assert _queued(site) == ["fred@home.com"]
            assert copies("home.com", "wilma") == 1 and copies("home.com", "fred") == 0
            log = server_log(config)
            assert "serving cached answer" in log and "no cached answer, deferring" in log
            # The incoming process, asked about an address it has not seen, says "try later".
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refusal:
                send(["info@away.com"])
            assert refusal.value.recipients["info@away.com"][0] == 451

            # 3. The database is back: the next queue run delivers the deferred message.
            cluster.start()
            wait_until_answering(base / "out.sock")
            run = site.run_queue(out_cf)
            assert run.returncode == 0, run.stderr
            assert site.queue_files() == []
            assert copies("home.com", "fred") == 1 and copies("home.com", "wilma") == 1

            # 4. A forward with several targets: virtuser -> generated alias (map Alias1) -> both.
            assert send(["team@away.com"]) == {}
            site.wait_queue(1)
            for _ in range(3):  # r=1 puts the second target of the expansion in its own queue file
                run = site.run_queue(out_cf)
                assert run.returncode == 0, run.stderr
                if not site.queue_files():
                    break
            assert site.queue_files() == []
            assert copies("away.com", "fred") == 3 and copies("home.com", "fred") == 2
            assert "database answers again" in server_log(config)
            assert "Traceback" not in server_log(config)
    finally:
        cluster.destroy()


def test_a_bounce_to_an_srs_address_routes_back_to_the_sender(site: Site) -> None:
    """[sieve] srs_domain: sendmail -bt through the socket maps sends a bounce to one of our
    SRS0 addresses on to the original sender, lets it in at the incoming access check, and
    refuses a forged one as an unknown address."""
    from vdeliver import srs

    base = socket_dir(site)
    secret = base / "srs-secret"
    secret.write_bytes(b"a secret for the srs end to end test\n")
    secret.chmod(0o600)  # read as root, before the server becomes vmail
    config = write_config(base, f'database = "{base}/accounts.sqlite"')
    config.write_text(config.read_text() + f'\n[sieve]\nsrs_domain = "srs.hub.example"\nsrs_secret_file = "{secret}"\n')
    populate(config)
    sock_out = site.compile(SOCK_OUT_MC, "out-sock", replace={PROD_OUT: str(base / "out.sock")})
    sock_in = site.compile(SOCK_IN_MC, "in-sock", replace={PROD_IN: str(base / "in.sock")})
    bounce = srs.forward("alice@partner.example", "srs.hub.example", srs.read_secret(str(secret)))
    forged = bounce.replace("=partner.example=", "=evil.example=")
    with running_server(config):
        routes = site.address_test(sock_out, [bounce.lower(), forged.lower()])
        access = map_test(site, sock_in, [("access", f"To:{bounce.lower()}"), ("access", f"To:{forged.lower()}")])
    assert routes[bounce.lower()].startswith("$# esmtp $@ partner . example . $: alice < @ partner . example"), routes
    assert "partner" not in routes[forged.lower()], routes  # no way back: the incoming check refuses it
    assert "RELAY" in access[0] and "RELAY" not in access[1], access
    assert "Traceback" not in server_log(config)


def test_incoming_socketmap_sendmail_takes_srs_bounces_and_refuses_forged_ones_at_rcpt(site: Site) -> None:
    """[sieve] srs_domain: a bounce from a client on another machine to one of our SRS0 addresses
    is accepted at RCPT by the incoming sendmail (the SRS domain is in class R, map `R`), while a
    forged, stale or SRS1 address, or any other user at the SRS domain, is refused at RCPT with a
    5xx: never accepted and bounced later (backscatter).  Before, every bounce of a redirected
    message was "550 Relaying denied": the SRS domain was in no relay class."""
    from vdeliver import srs

    base = socket_dir(site)
    secret = base / "srs-secret"
    secret.write_bytes(b"a secret for the srs end to end test\n")
    secret.chmod(0o600)
    config = write_config(base, f'database = "{base}/accounts.sqlite"')
    config.write_text(config.read_text() + f'\n[sieve]\nsrs_domain = "srs.hub.example"\nsrs_secret_file = "{secret}"\n')
    populate(config)
    sock_in = site.compile(SOCK_IN_MC, "in-sock", replace={PROD_IN: str(base / "in.sock")})
    key = srs.read_secret(str(secret))
    bounce = srs.forward("alice@partner.example", "srs.hub.example", key)
    forged = bounce.replace("=partner.example=", "=evil.example=")
    stale = srs.forward("alice@partner.example", "srs.hub.example", key, now=time.time() - 40 * 86400)
    srs1 = "SRS1=abcd=other.example==efgh=AB=partner.example=alice@srs.hub.example"
    shouted = bounce.upper()  # the hash is compared without case (sendmail may fold the key)
    with running_server(config):
        got = check_rcpt(site, sock_in, [bounce, shouted, forged, stale, srs1, "postmaster@srs.hub.example",
                                         "fred@away.com"])
    assert got[bounce] == "RELAY" and got[shouted] == "RELAY", got
    for refused in (forged, stale, srs1, "postmaster@srs.hub.example"):
        assert got[refused].startswith("$# error $@ 5 . 1 . 1 $: 550"), (refused, got)
    assert got["fred@away.com"] == "RELAY", got
    assert "Traceback" not in server_log(config)

"""Webmail on the same accounts, in a real browser (issue 19): Roundcube with its managesieve plugin
in front of a private Dovecot (IMAP and ManageSieve, SQL auth from the vdeliver database), set up
from `vmailctl dovecot-config` and `vmailctl webmail-config` only, and driven by a headless
Chromium as a user would (tests/webmail_harness.py).  Once with a Maildir user, once with an mbox
user:

1. the user logs in and sees what vdeliver delivered (CLI and LMTP): subjects listed, an 8-bit
   message with encoded headers opened and rendered right;
2. makes a folder, a filter (subject contains "invoice": flag it, then move it to "Invoices") and
   an out-of-office reply bounded by dates;
3. the next deliveries obey them: the invoices are in "Invoices", flagged; one vacation reply per
   sender reaches the SMTP sink, none to a list;
4. edits the filter to a sub-folder with a UTF-8 name (the script names it with the format's
   hierarchy separator, and vdeliver finds it), then switches the filter off: mail goes to the
   INBOX again;
5. a suspended account cannot log in and is told why; a wrong password is refused.

A screenshot of each step goes to the test's output directory (VDELIVER_WEBMAIL_SHOTS to choose
it: docs/img holds those of a documented run).  Select these tests with `-m webmail`.
"""

from __future__ import annotations

import datetime
import imaplib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.dovecot_harness import bad_log_lines
from tests.helpers import Account
from tests.webmail_harness import Browser, WebmailSite
from vdeliver.sieve.delivery import _mutf7 as mutf7

pytestmark = [pytest.mark.peers, pytest.mark.webmail, pytest.mark.slow]

USERS = {"maildir": ("fred@home.com", "fred pass"), "mbox": ("wilma@home.com", "wilma pass")}
SEPARATOR = {"maildir": ".", "mbox": "/"}  # Dovecot's hierarchy separator of each format
SUSPENDED = ("sue@home.com", "sue pass")
REASON = "Unpaid invoice <42>: see https://billing.example"
SUB = "Büro"  # a sub-folder of Invoices with a UTF-8 name

ENCODED = ("From: =?UTF-8?Q?J=C3=BCrgen_M=C3=BCller?= <jm@example.org>\n"
           "To: {to}\nSubject: =?UTF-8?B?R3LDvMOfZSBhdXMgS8O2bG4=?=\n"  # "Grüße aus Köln"
           "Message-ID: <encoded@example.org>\nMIME-Version: 1.0\n"
           "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
           "Hallo, schöne Grüße vom Rhein.\n").format
PLAIN = "From: Alice <alice@example.org>\nTo: {to}\nSubject: {subject}\nMessage-ID: <{mid}@example.org>\n\n{body}\n"


def plain(to: str, subject: str, mid: str, body: str = "Hello.", extra: str = "") -> bytes:
    return (extra + PLAIN.format(to=to, subject=subject, mid=mid, body=body)).encode()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    chosen = os.environ.get("VDELIVER_WEBMAIL_SHOTS")
    return Path(chosen) if chosen else tmp_path / "screenshots"


@pytest.fixture(params=["maildir", "mbox"])
def hub(request: pytest.FixtureRequest, vmail: Account, shots: Path) -> Iterator[tuple[WebmailSite, str]]:
    fmt = str(request.param)
    site = WebmailSite(vmail, shots / fmt)
    try:
        site.start()
        site.add_user(*USERS[fmt], fmt)
        site.add_user(*SUSPENDED, "maildir")
        site.serve()
        yield site, fmt
    finally:
        errors = site.roundcube.errors() if site.roundcube else ""
        log = site.close()
    assert not bad_log_lines(log), log
    assert "PHP Fatal" not in errors, errors


@pytest.fixture
def browser(hub: tuple[WebmailSite, str], tmp_path: Path, shots: Path) -> Iterator[Browser]:
    site, fmt = hub
    assert site.roundcube is not None
    b = Browser(site.roundcube.url, shots / fmt, tmp_path / "chromium-profile")
    try:
        yield b
    finally:
        b.quit()


def wait_for(check: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s")


def script_text(site: WebmailSite, address: str) -> str:
    user, domain = address.split("@")
    link = site.root.home / domain / user / ".dovecot.sieve"
    try:
        return link.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return ""


def imap_folder(site: WebmailSite, address: str, password: str, folder: str) -> list[tuple[str, set[str]]]:
    """(subject, flags) of each message in `folder` (a UTF-8 name), read over IMAP."""
    assert site.dovecot is not None
    imap = site.dovecot.login(address, password)
    try:
        typ, _ = imap.select('"' + mutf7(folder) + '"', readonly=True)
        assert typ == "OK", folder
        typ, data = imap.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        out = []
        for item in data:
            if isinstance(item, tuple):
                flags = set(imaplib.ParseFlags(item[0]) or ())
                subject = item[1].decode().split(":", 1)[1].strip()
                out.append((subject, {f.decode() for f in flags} - {"\\Recent"}))
        return out
    except imaplib.IMAP4.error:
        return []
    finally:
        imap.logout()


# -- the steps, as a user does them ---------------------------------------------------------------


def open_folder(b: Browser, name: str) -> None:
    b.driver.get(b.base_url + "?_task=mail&_mbox=" + quote(mutf7(name)))
    b.css("#messagelist")


def listed(b: Browser) -> list[tuple[str, bool]]:
    """(text, flagged) of each row of the message list."""
    return [(row.text, "flagged" in (row.get_attribute("class") or ""))
            for row in b.driver.find_elements("css selector", "#messagelist tbody tr")]


def create_folder(b: Browser, name: str, parent: str = "") -> None:
    from selenium.webdriver.support.ui import Select

    b.driver.get(b.base_url + "?_task=settings&_action=folders")
    b.css("a.create").click()
    b.frame("preferences-frame")
    b.css("input[name=_name]").send_keys(name)
    if parent:
        Select(b.css("select[name=_parent]")).select_by_value(parent)
    b.css("button.submit").click()
    b.top()
    b.text_in("#subscription-table", name)


def select_mailbox(select: Any, name: str) -> None:
    from selenium.webdriver.support.ui import Select

    options = {o.get_attribute("value"): o for o in select.find_elements("css selector", "option")}
    value = mutf7(name)  # the form's values are IMAP names; Roundcube writes UTF-8 into the script
    assert value in options, f"{name!r} not offered: {sorted(options)}"
    Select(select).select_by_value(value)


def js_click(b: Browser, element: Any) -> None:
    b.driver.execute_script("arguments[0].click()", element)


def make_filter(b: Browser) -> None:
    from selenium.webdriver.support.ui import Select

    b.driver.get(b.base_url + "?_task=settings&_action=plugin.managesieve")
    b.css("a.create").click()
    b.frame("filter-box")
    b.css("input[name=_name]").send_keys("Invoices")
    Select(b.css("select[name='_header[0]']")).select_by_value("subject")
    Select(b.css("select[name='_rule_op[0]']")).select_by_value("contains")
    b.css("input[name='_rule_target[0][]']").send_keys("invoice")
    # First action: flag it; then a second action: move it (the order Roundcube writes them in).
    Select(b.css("select[name='_action_type[0]']")).select_by_value("addflag")
    (flagged,) = [e for e in b.driver.find_elements("css selector", "input[name='_action_flags[0][]']")
                  if e.get_attribute("value") == "\\Flagged"]
    js_click(b, flagged)
    b.css("#actionadd0").click()
    b.wait(lambda d: len(d.find_elements("css selector", "select[name^='_action_type']")) == 2, "a second action")
    Select(b.driver.find_elements("css selector", "select[name^='_action_type']")[1]).select_by_value("fileinto")
    boxes = [e for e in b.driver.find_elements("css selector", "select[name^='_action_mailbox']") if e.is_displayed()]
    select_mailbox(boxes[-1], "Invoices")
    b.shot("filter-form")
    b.css("button.submit").click()
    b.top()


def set_vacation(b: Browser, today: datetime.date) -> None:
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    b.driver.get(b.base_url + "?_task=settings&_action=plugin.managesieve-vacation")
    b.css("#vacation_subject").send_keys("Out of the office")
    b.css("#vacation_reason").send_keys("I am away until next week; your message is kept.")
    for field, day in (("#vacation_datefrom", today - datetime.timedelta(days=1)),
                       ("#vacation_dateto", today + datetime.timedelta(days=7))):
        b.css(field).send_keys(day.isoformat(), Keys.ESCAPE)
    b.css("#vacation_subject").click()  # closes the date picker
    b.wait(lambda d: not any(e.is_displayed() for e in d.find_elements("css selector", "#ui-datepicker-div")),
           "the date picker closed")
    Select(b.css("#vacation_status")).select_by_value("on")
    b.shot("vacation-form")
    (save,) = [e for e in b.driver.find_elements("css selector", "button.submit, button.btn-primary")
               if e.is_displayed()]
    save.click()


def edit_filter(b: Browser, mailbox: str | None, enabled: bool) -> None:
    b.driver.get(b.base_url + "?_task=settings&_action=plugin.managesieve")
    b.text_in("#filterslist tr", "Invoices").click()
    b.frame("filter-box")
    if mailbox is not None:
        boxes = [e for e in b.driver.find_elements("css selector", "select[name^='_action_mailbox']")
                 if e.is_displayed()]
        select_mailbox(boxes[-1], mailbox)
    switch = b.driver.find_element("css selector", "input[name=_enabled]")
    if switch.is_selected() != enabled:
        js_click(b, switch)
    b.shot("filter-edit" if enabled else "filter-off")
    b.css("button.submit").click()
    b.top()


# -- the scenario ----------------------------------------------------------------------------------


def test_a_user_reads_mail_and_makes_filters_in_webmail(hub: tuple[WebmailSite, str], browser: Browser) -> None:
    site, fmt = hub
    b = browser
    address, password = USERS[fmt]
    sep = SEPARATOR[fmt]

    # 1. What vdeliver delivered, seen in the browser.
    site.deliver_cli(address, ENCODED(to=address).encode(), "jm@example.org")
    site.deliver_lmtp(address, plain(address, "plain one", "p1"), "alice@example.org")
    b.login(address, password)
    b.text_in("#messagelist", "Grüße aus Köln")
    rows = listed(b)
    assert any("plain one" in text for text, _ in rows), rows
    assert any("Jürgen Müller" in text for text, _ in rows), rows
    b.shot("inbox")
    b.text_in("#messagelist tbody tr", "Grüße aus Köln").click()
    b.frame("messagecontframe")
    b.text_in("body", "schöne Grüße vom Rhein")
    assert "Jürgen Müller" in b.css("body").text
    b.top()
    b.shot("message")

    # 2. A folder, a filter, an out-of-office reply.
    create_folder(b, "Invoices")
    make_filter(b)
    text = wait_for(lambda: "fileinto" in script_text(site, address) and script_text(site, address),
                    "the filter saved through ManageSieve")
    assert text.index('addflag "\\\\Flagged";') < text.index('fileinto "Invoices";'), text
    b.text_in("#filterslist", "Invoices")
    b.shot("filter-saved")
    today = datetime.date.today()
    set_vacation(b, today)
    text = wait_for(lambda: "vacation" in script_text(site, address) and script_text(site, address),
                    "the vacation saved through ManageSieve")
    assert "currentdate" in text and (today + datetime.timedelta(days=7)).isoformat() in text, text
    b.shot("vacation-saved")

    # 3. The next deliveries obey them: CLI and LMTP.
    site.deliver_cli(address, plain(address, "Your invoice 42", "i42"), "alice@example.org")
    site.deliver_lmtp(address, plain(address, "Invoice 43", "i43"), "bob@example.org")
    site.deliver_lmtp(address, plain(address, "lunch?", "l1"), "alice@example.org")  # alice again: no 2nd reply
    site.deliver_cli(address, plain(address, "[dev] news", "list1", extra="List-Id: <dev.lists.example>\n"),
                     "dev-bounces@lists.example")
    in_folder = imap_folder(site, address, password, "Invoices")
    assert sorted(in_folder) == [("Invoice 43", {"\\Flagged"}), ("Your invoice 42", {"\\Flagged"})], in_folder
    open_folder(b, "Invoices")
    b.text_in("#messagelist", "Invoice 43")
    rows = listed(b)
    assert len(rows) == 2 and all(flagged for _, flagged in rows), rows
    b.shot("invoices-flagged")
    inbox = [subject for subject, _ in imap_folder(site, address, password, "INBOX")]
    assert "lunch?" in inbox and "[dev] news" in inbox and "Invoice 43" not in inbox, inbox
    replies = site.capture.wait_for(2)
    time.sleep(1)  # nothing more comes
    assert sorted(r for m in site.capture.messages for r in m.recipients) == ["alice@example.org", "bob@example.org"]
    for reply in site.capture.messages:
        assert reply.sender == "" and reply.header("Auto-Submitted") == "auto-replied"
        assert reply.header("Subject") == "Out of the office"
        assert b"I am away until next week" in reply.data
    assert len(replies) == 2

    # 4. Edit the filter to a sub-folder with a UTF-8 name, then switch it off.  An mbox folder is a
    # file and cannot hold folders (Dovecot answers \\NoInferiors): the mbox user's parent is a
    # directory made over IMAP with a trailing separator, as docs/webmail.md says.
    parent = "Invoices"
    if fmt == "mbox":
        parent = "Projects"
        assert site.dovecot is not None
        imap = site.dovecot.login(address, password)
        assert imap.create("Projects/")[0] == "OK"
        imap.logout()
    create_folder(b, SUB, parent=parent)
    target = f"{parent}{sep}{SUB}"
    edit_filter(b, target, enabled=True)
    text = wait_for(lambda: f'fileinto "{target}";' in script_text(site, address) and script_text(site, address),
                    "the edited filter")
    site.deliver_lmtp(address, plain(address, "invoice 44", "i44"), "carol@example.org")
    got = imap_folder(site, address, password, target)
    assert got == [("invoice 44", {"\\Flagged"})], (site.lmtpd.log()[-1500:] if site.lmtpd else "")
    open_folder(b, target)
    b.text_in("#messagelist", "invoice 44")
    b.shot("subfolder")
    edit_filter(b, None, enabled=False)
    wait_for(lambda: "# rule:[Invoices]\r\nif false #" in script_text(site, address)
             or "disabled" in script_text(site, address), "the filter switched off")
    site.deliver_cli(address, plain(address, "invoice 45", "i45"), "dave@example.org")
    assert ("invoice 45", set()) in imap_folder(site, address, password, "INBOX")
    open_folder(b, "INBOX")
    b.text_in("#messagelist", "invoice 45")
    b.shot("filter-off-inbox")
    b.css("a.logout").click()  # the button: a bare ?_task=logout is refused without the request token
    b.css("#rcmloginuser")

    # 5. A suspended account is told why; a wrong password is refused, with no reason.
    site.vmailctl("user", "suspend", SUSPENDED[0], "--reason", REASON)
    b.login(*SUSPENDED)
    assert b.text_in("#messagestack", REASON).text.strip() == REASON
    b.shot("suspended")
    b.login(address, "wrong password")
    b.text_in("#messagestack", "Login failed.")
    assert REASON not in b.css("#messagestack").text
    assert "_task=mail" not in b.driver.current_url
    b.shot("wrong-password")

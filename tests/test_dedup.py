"""dedup_seconds: a second copy of a message (same Message-ID and envelope sender) for the same
mailbox within the window is dropped and logged, exactly the second; a copy whose delivery
failed does not count; no Message-ID, or a store that cannot answer, means no deduplication."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.test_sieve_delivery import RAW, maildir_folder, messages
from tests.unit_helpers import RecordingLog, fail_at_call, patch_os
from vdeliver import config
from vdeliver.deliver import deliver
from vdeliver.errors import DeliveryError
from vdeliver.recipient import Recipient

WITH_ID = RAW.replace(b"\n\n", b"\nMessage-ID: <dedup-1@example.org>\n\n", 1)


def make_config(tmp_path: Path, seconds: int = 600, database: str = "") -> config.Config:
    return config.build({
        "format": "maildir", "maildir_path": f"{tmp_path}/home/{{domain}}/{{user}}/Maildir",
        "spool_dir": str(tmp_path), "log": "none", "create_mailbox": True, "dedup_seconds": seconds,
        "tracking": {"database": database or str(tmp_path / "tracking.sqlite")},
    })


def send(tmp_path: Path, cfg: config.Config, raw: bytes, sender: str = "alice@example.org", user: str = "fred",
         log: RecordingLog | None = None) -> object:
    (tmp_path / "home" / "example.org" / user).mkdir(parents=True, exist_ok=True)
    src = tmp_path / "in.eml"
    src.write_bytes(raw)
    fd = os.open(src, os.O_RDONLY)
    try:
        return deliver(cfg, Recipient("example.org", user), fd, sender, log=log)
    finally:
        os.close(fd)


def test_exactly_the_second_copy_is_dropped(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    log = RecordingLog()
    send(tmp_path, cfg, WITH_ID)
    second = send(tmp_path, cfg, WITH_ID, log=log)
    assert second.where() == "duplicate dropped (dedup_seconds)"  # type: ignore[attr-defined]
    assert any("duplicate of <dedup-1@example.org>" in text for _level, text in log.lines)
    send(tmp_path, cfg, WITH_ID, sender="bob@example.org")  # another envelope sender: another message
    send(tmp_path, cfg, WITH_ID, user="wilma")  # another mailbox
    send(tmp_path, cfg, WITH_ID.replace(b"dedup-1", b"dedup-2"))
    assert len(messages(maildir_folder(tmp_path))) == 3
    assert len(messages(tmp_path / "home" / "example.org" / "wilma" / "Maildir")) == 1


def test_off_by_default_and_without_a_message_id(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, seconds=0)
    send(tmp_path, cfg, WITH_ID)
    send(tmp_path, cfg, WITH_ID)
    cfg = make_config(tmp_path)
    send(tmp_path, cfg, RAW)
    send(tmp_path, cfg, RAW)
    assert len(messages(maildir_folder(tmp_path))) == 4
    assert not (tmp_path / "tracking.sqlite").exists()  # never asked


def test_a_failed_delivery_does_not_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_config(tmp_path)
    patch_os(monkeypatch, "fsync", fail_at_call(1, errno.ENOSPC, os.fsync))
    with pytest.raises(DeliveryError):
        send(tmp_path, cfg, WITH_ID)
    monkeypatch.undo()
    send(tmp_path, cfg, WITH_ID)  # the retry is delivered, not dropped
    assert len(messages(maildir_folder(tmp_path))) == 1


def test_a_store_that_cannot_answer_delivers(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, database=str(tmp_path / "missing" / "t.sqlite"))
    log = RecordingLog()
    send(tmp_path, cfg, WITH_ID, log=log)
    send(tmp_path, cfg, WITH_ID, log=log)
    assert len(messages(maildir_folder(tmp_path))) == 2
    assert any("the tracking store cannot answer" in text for _level, text in log.lines)

"""Fixtures shared by every test module; the helpers themselves live in helpers.py."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests.helpers import Account, MailRoot, ensure_vmail, install_vdeliver, world_tmpdir
from tests.sendmail_harness import Site, need_sendmail
from tests.sieve_oracle import Pigeonhole

settings.register_profile("ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(scope="session")
def vmail() -> Account:
    return ensure_vmail()


@pytest.fixture(scope="session")
def vdeliver_install() -> object:
    return install_vdeliver()


@pytest.fixture
def site() -> Iterator[Site]:
    """A private sendmail site (tests/sendmail_harness.py); every daemon stopped afterwards."""
    need_sendmail()
    s = Site.create()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def mailroot(vmail: Account) -> Iterator[MailRoot]:
    base = world_tmpdir()
    try:
        yield MailRoot(base, vmail)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pigeonhole() -> Iterator[Pigeonhole]:
    """Pigeonhole's sieve-test, the oracle of the Sieve tests (tests/sieve_oracle.py)."""
    oracle = Pigeonhole.start()
    yield oracle
    oracle.close()

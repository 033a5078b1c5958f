"""Integration tests run on the real local stack (`make test` starts it). A stack that is not
up fails these tests loudly; they are never skipped."""

from __future__ import annotations

import fcntl
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from cassandra.cluster import Session

from infra import stack
from infra.processes import STACK
from support.cdc_probe import LocalCdc
from tasks.adapters import postgres, scylla
from tasks.cdc.options import CdcOptions
from tasks.settings import get_settings
from tests.integration import readmodels

SETUP_LOCK = STACK / "setup.lock"


@pytest.fixture(scope="session", autouse=True)
def stack_ready() -> Iterator[None]:
    # The Prefect API URL is set by tests/conftest.py, before anything imported Prefect.
    unhealthy = [s.name for s in stack.SERVICES if not s.healthy()]
    assert not unhealthy, f"the local stack is not healthy ({unhealthy}): run `make up`"
    from flows.setup import setup_flow

    # Lanes start at once (tests/integration/lanes.py): one setup at a time, or two
    # migrations' ALTER ROLEs race ("tuple concurrently updated").
    SETUP_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with SETUP_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = setup_flow()  # applies the migrations, the oracle's views included
    assert result["connector"] == "RUNNING", result
    yield
    readmodels.close_reader()


@contextmanager
def own_keyspace(prefix: str) -> Iterator[str]:
    """A keyspace with the read-model schema and nothing else writing to it, dropped after."""
    ks = f"{prefix}_{uuid.uuid4().hex[:12]}"
    cfg = get_settings().scylla
    with scylla.session(cfg) as session:
        try:
            scylla.migrate(session, cfg.model_copy(update={"keyspace": ks}))
            yield ks
        finally:
            session.execute(f"DROP KEYSPACE IF EXISTS {ks}", timeout=120)


@pytest.fixture(scope="session")
def cql() -> Iterator[Session]:
    cfg = get_settings().scylla
    with scylla.session(cfg, cfg.keyspace) as session:
        yield session


@pytest.fixture()
def pg_app():
    with postgres.connect("app", get_settings().postgres) as conn:
        yield conn


@pytest.fixture()
def pg_admin():
    with postgres.connect("admin", get_settings().postgres) as conn:
        yield conn


@pytest.fixture(scope="session")
def cdc_consumer() -> Iterator[LocalCdc]:
    """The real CDC consumer running in a thread for the whole test session, in a group of its
    own that starts at the topics' current end. Tests wait for convergence on their own ids."""
    with LocalCdc(get_settings(), CdcOptions(report_interval_s=5)) as cdc:
        yield cdc

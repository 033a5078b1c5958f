"""Integration tests run on the real local stack (`make test` starts it). A stack that is not
up fails these tests loudly; they are never skipped."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from cassandra.cluster import Session

from infra import stack
from tasks import postgres, scylla
from tasks.settings import get_settings


@pytest.fixture(scope="session", autouse=True)
def stack_ready() -> None:
    os.environ.setdefault("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    unhealthy = [s.name for s in stack.SERVICES if not s.healthy()]
    assert not unhealthy, f"the local stack is not healthy ({unhealthy}): run `make up`"
    from flows.setup import setup_flow

    result = setup_flow()
    assert result["connector"] == "RUNNING", result


@pytest.fixture(scope="session")
def cql() -> Iterator[Session]:
    session = scylla.connect(keyspace=get_settings().scylla.keyspace)
    yield session
    scylla.close(session)


@pytest.fixture()
def pg_app():
    with postgres.connect("app") as conn:
        yield conn


@pytest.fixture()
def pg_admin():
    with postgres.connect("admin") as conn:
        yield conn


@pytest.fixture(scope="session")
def cdc_consumer() -> Iterator[None]:
    """A CDC consumer running for the whole test session in a thread, in a group of its own,
    from the start of the topics. Tests that need CDC wait for convergence on their own ids."""
    import threading
    import uuid

    from tasks.cdc import CdcConsumer, CdcOptions

    settings = get_settings()
    kafka_settings = settings.kafka.model_copy(
        update={"consumer_group": f"test-cdc-{uuid.uuid4()}"})
    session = scylla.connect(keyspace=settings.scylla.keyspace)
    consumer = CdcConsumer(scylla.ScyllaWriter(session), CdcOptions(report_interval_s=5),
                           kafka_settings)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            consumer.run()
        except BaseException as exc:  # surfaced at teardown
            errors.append(exc)

    thread = threading.Thread(target=run, name="test-cdc", daemon=True)
    thread.start()
    yield
    consumer.stop()
    thread.join(30)
    scylla.close(session)
    assert not errors, errors

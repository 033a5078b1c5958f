"""The CDC flow's start-up checks report what they cannot check, and never fail the run:
Kafka Connect busy rebalancing (409) or failing (5xx) is a TransientError, not only a
ServiceUnavailable."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from flows import cdc
from tasks.core.errors import TransientError
from tasks.settings import Settings


class _BusyConnect:
    def __init__(self, url: str) -> None:
        self.url = url

    def status(self, name: str) -> Any:
        raise TransientError(f"Kafka Connect GET /connectors/{name}/status: 409 rebalancing")


def _slot_unreadable(_settings: Any) -> Any:
    raise TransientError("reading replication slot 'cqrs_sync': the server is restarting")


def test_a_busy_kafka_connect_and_an_unreadable_slot_are_reported_not_fatal(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cdc, "KafkaConnectClient", _BusyConnect)
    monkeypatch.setattr(cdc.postgres, "slot_status", _slot_unreadable)
    log = logging.getLogger("test.check_source")
    with caplog.at_level(logging.WARNING, logger="test.check_source"):
        cdc.check_source(log, Settings())
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "cannot check the Debezium connector",
        "cannot check the replication slot",
    ]

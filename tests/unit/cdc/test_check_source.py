"""The CDC flow's start-up checks report what they cannot check, and never fail the run for
it: Kafka Connect busy rebalancing (409) or failing (5xx) is a TransientError, not only a
ServiceUnavailable. A slot gap fails it before it consumes anything."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from flows import cdc
from tasks.adapters.postgres import SlotStatus
from tasks.cdc.slot_watch import GAP_EVENT, SlotGap, SlotWatch
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
        cdc.check_source(log, Settings(), SlotWatch(1 << 30))
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "cannot check the Debezium connector",
        "cannot check the replication slot",
    ]


class _HealthyConnect:
    def __init__(self, url: str) -> None:
        self.url = url

    def status(self, name: str) -> Any:
        return None  # not registered: reported, not fatal

    def source_lsn(self, name: str) -> int | None:
        return 100


def test_a_missing_slot_fails_the_run_before_it_consumes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    emitted: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(cdc, "KafkaConnectClient", _HealthyConnect)
    monkeypatch.setattr(cdc.postgres, "slot_status", lambda s: SlotStatus("cqrs_sync", False))
    monkeypatch.setattr(cdc, "emit_prefect_event", lambda n, p: emitted.append((n, p)))
    with pytest.raises(SlotGap, match=r"'cqrs_sync' does not exist.*run a backfill"):
        cdc.check_source(logging.getLogger("test.check_source"), Settings(), SlotWatch(1 << 30))
    assert [name for name, _ in emitted] == [GAP_EVENT]

"""The gap rule and the tombstone rule (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tasks.backfill.safety import check_cdc_slot, check_snapshot_age
from tasks.core.errors import ConfigurationError


def test_gap_rule() -> None:
    check_cdc_slot({"exists": True, "active": True}, "s")
    with pytest.raises(ConfigurationError, match=r"does not exist.*gap"):
        check_cdc_slot({"exists": False}, "s")
    with pytest.raises(ConfigurationError, match="no connector is streaming"):
        check_cdc_slot({"exists": True, "active": False}, "s")


def test_snapshot_age_against_gc_grace_seconds() -> None:
    taken = datetime(2026, 1, 1, tzinfo=UTC)
    grace = {"conversation_timeline": 864_000, "sessions_by_id": 3_600}
    check_snapshot_age(taken, grace, now=taken + timedelta(seconds=3_599))
    with pytest.raises(
        ConfigurationError,
        match=r"older than .*gc_grace_seconds.*sessions_by_id.*allow_old_snapshot",
    ):
        check_snapshot_age(taken, grace, now=taken + timedelta(seconds=3_601))
    check_snapshot_age(taken, grace, now=taken + timedelta(days=30), allow=True)

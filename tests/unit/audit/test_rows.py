"""tasks.audit.rows: the inputs it refuses before it reads anything (no stack; reading itself is
tests/integration/test_quality.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest
from cassandra.cluster import Session

from tasks.audit.rows import read_model_frame
from tasks.core.errors import InvalidInput


def session(keyspace: str | None) -> Session:
    return cast(Session, SimpleNamespace(keyspace=keyspace))


@pytest.mark.parametrize(
    ("keyspace", "kwargs", "message"),
    [
        (None, {}, "no keyspace"),
        ("cqrs", {"keyspace": "bad-name"}, "invalid keyspace name"),
        ("bad name", {}, "invalid keyspace name"),
        ("cqrs", {"read_model": "users"}, "unknown read model"),
        ("cqrs", {"limit": 0}, "limit must be a positive integer"),
        ("cqrs", {"limit": True}, "limit must be a positive integer"),
    ],
)
def test_bad_input_is_refused(keyspace: str | None, kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"read_model": "sessions_by_id", "partition_keys": []} | kwargs
    with pytest.raises(InvalidInput, match=message):
        read_model_frame(session(keyspace), **args)

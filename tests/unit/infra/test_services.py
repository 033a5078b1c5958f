"""Pure parts of the local stack (infra/)."""

from __future__ import annotations

import itertools

import pytest

from infra import services


def test_kafka_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # 0xF8 encodes to "-" as the first base64 character: kafka-storage would read such an
    # id as an option. The generator must draw again rather than hand it over.
    draws = itertools.chain([b"\xf8" + bytes(15)], itertools.repeat(bytes(16)))
    monkeypatch.setattr(services.os, "urandom", lambda n: next(draws))
    cluster_id = services.kafka_cluster_id()
    assert cluster_id == "A" * 22
    assert not cluster_id.startswith("-")


def test_kafka_cluster_id_is_a_16_byte_url_safe_id() -> None:
    ids = {services.kafka_cluster_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)

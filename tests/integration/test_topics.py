"""flows.setup's topics on the real Kafka: created with ``CQRS_KAFKA_TOPIC_PARTITIONS``,
grown to it later, never shrunk (docs/operations.md, "Scaling out CDC")."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tasks.adapters import kafka
from tasks.settings import KafkaSettings, get_settings


@pytest.fixture
def own_topics() -> Iterator[KafkaSettings]:
    """Settings naming topics of this test's own (a prefix and a DLQ no one else uses)."""
    tag = uuid.uuid4().hex[:8]
    cfg = get_settings().kafka.model_copy(
        update={"topic_prefix": f"t-topics-{tag}", "dead_letter_topic": f"t-topics-{tag}.dlq"}
    )
    yield cfg
    names = [*kafka.change_topics(cfg), cfg.dead_letter_topic]
    admin = kafka.admin(cfg)  # held: its futures fail once it is collected
    for fut in admin.delete_topics(names).values():
        fut.result()


def partitions(cfg: KafkaSettings) -> dict[str, int]:
    admin = kafka.admin(cfg)
    topics = admin.list_topics(timeout=10).topics
    names = [*kafka.change_topics(cfg), cfg.dead_letter_topic]
    return {t: len(topics[t].partitions) for t in names if t in topics}


def test_topics_are_created_with_the_setting_then_grown_never_shrunk(
    own_topics: KafkaSettings,
) -> None:
    cfg = own_topics.model_copy(update={"topic_partitions": 2})
    created = kafka.ensure_topics(cfg)
    names = [*kafka.change_topics(cfg), cfg.dead_letter_topic]
    assert sorted(created) == sorted(names)
    assert partitions(cfg) == dict.fromkeys(names, 2)
    assert kafka.ensure_topics(cfg) == []  # idempotent
    assert kafka.grow_partitions(cfg) == {}

    more = cfg.model_copy(update={"topic_partitions": 5})
    assert kafka.grow_partitions(more) == dict.fromkeys(names, 2)
    assert partitions(cfg) == dict.fromkeys(names, 5)
    assert kafka.grow_partitions(more) == {}

    fewer = cfg.model_copy(update={"topic_partitions": 1})
    assert kafka.grow_partitions(fewer) == {}
    assert partitions(cfg) == dict.fromkeys(names, 5)

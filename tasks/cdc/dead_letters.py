"""The dead-letter topic: where a change that cannot be applied goes, with the reason, so that
nothing is lost and the rest of the stream goes on.

A message is dead-lettered byte for byte (key, value) with headers naming the error, its
class and the source topic, partition and offset. The consumer commits a dead-lettered
message's offset only once the topic has acknowledged the copy.
"""

from __future__ import annotations

import logging

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from tasks.adapters import kafka
from tasks.core.errors import TransientError, classify
from tasks.settings import KafkaSettings

log = logging.getLogger("cqrs_sync.dlq")

# Kafka's cap on a record here (infra/conf/kafka.properties, connect.properties): the DLQ's
# producer may send a copy of any record the change topics hold, plus its headers.
MAX_RECORD_BYTES = 16 * 1024 * 1024
_HEADER_ALLOWANCE = 64 * 1024


def dead_letter_headers(msg: Message, error: BaseException) -> list[tuple[str, str | bytes | None]]:
    return [
        ("dlq.error", str(error)[:4000].encode("utf-8", "backslashreplace")),
        ("dlq.error.class", type(error).__name__.encode()),
        ("dlq.source.topic", (msg.topic() or "").encode()),
        ("dlq.source.partition", str(msg.partition()).encode()),
        ("dlq.source.offset", str(msg.offset()).encode()),
    ]


class DeadLetters:
    """Sends messages to the dead-letter topic and waits until every copy is acknowledged."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.topic = settings.dead_letter_topic
        self.producer = Producer(
            kafka.producer_config(
                settings, **{"message.max.bytes": MAX_RECORD_BYTES + _HEADER_ALLOWANCE}
            )
        )
        self._errors: list[KafkaError] = []

    def send(self, dead: list[tuple[Message, BaseException]]) -> None:
        """Raise TransientError unless the topic took all of them (the caller retries)."""
        if not dead:
            return
        self._errors.clear()
        what = f"dead-lettering to {self.topic}"
        for msg, exc in dead:
            # Ids and positions only: an error text may quote content, which may be private.
            log.warning(
                "dead-lettering %s[%d]@%d: %s",
                msg.topic(),
                msg.partition(),
                msg.offset(),
                type(exc).__name__,
            )
            while True:
                try:
                    self.producer.produce(
                        self.topic,
                        key=msg.key(),
                        value=msg.value(),
                        headers=dead_letter_headers(msg, exc),
                        on_delivery=self._delivered,
                    )
                    break
                except BufferError:  # the local queue is full: let deliveries drain it
                    self.producer.poll(0.5)
                except KafkaException as refused:
                    raise classify(refused, what) from refused
        remaining = self.producer.flush(30)
        for err in self._errors:  # a missing topic or a refused write is not worth a retry
            classified = classify(KafkaException(err), what)
            if not isinstance(classified, TransientError):
                raise classified
        if remaining or self._errors:
            raise TransientError(
                f"{what}: {remaining or len(self._errors)} message(s) not "
                f"acknowledged: {[e.str() for e in self._errors[:1]]}"
            )

    def _delivered(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self._errors.append(err)

    def close(self) -> None:
        self.producer.flush(10)

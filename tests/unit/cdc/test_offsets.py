"""Where the consumer starts on each partition, and when it must refuse to start."""

from __future__ import annotations

from confluent_kafka import OFFSET_BEGINNING, OFFSET_INVALID, TopicPartition

from tasks.cdc.offsets import Gap, OffsetGap, start_positions

MARKS = {("t", 0): (100, 200), ("t", 1): (0, 50), ("t", 2): (10, 10)}


def committed(*offsets: int) -> list[TopicPartition]:
    return [TopicPartition("t", p, o) for p, o in enumerate(offsets)]


def test_committed_offsets_inside_the_log_are_kept_and_a_new_partition_starts_at_its_start():
    positions, gaps = start_positions(committed(150, OFFSET_INVALID, 10), MARKS)
    assert gaps == []
    assert [(tp.partition, tp.offset) for tp in positions] == [
        (0, 150),
        (1, OFFSET_BEGINNING),
        (2, 10),
    ]
    # The bounds themselves are inside: the log's first offset, and caught up at its end.
    assert start_positions(committed(100, 50, 10), MARKS)[1] == []
    assert start_positions(committed(200, 0, 10), MARKS)[1] == []


def test_an_offset_below_the_log_start_or_beyond_its_end_is_a_gap_naming_the_range():
    _, gaps = start_positions(committed(42, 51, 10), MARKS)
    assert gaps == [Gap("t", 0, 42, 100, 200), Gap("t", 1, 51, 0, 50)]
    text = str(OffsetGap("g", gaps))
    assert "t[0]: committed offset 42 but the log starts at 100: offsets 42..99" in text
    assert "t[1]: committed offset 51 is beyond the log's end 50" in text
    assert "'g'" in text and "backfill" in text

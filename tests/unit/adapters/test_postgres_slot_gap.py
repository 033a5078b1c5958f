from tasks.adapters.postgres import SlotStatus, lsn_to_int, slot_gap, slot_gap_or_suspect


def test_lsn_text_to_int_matches_debezium() -> None:
    assert lsn_to_int("0/3DFD9F8") == 0x3DFD9F8
    assert lsn_to_int("16/B374D848") == (0x16 << 32) + 0xB374D848


def test_healthy_slot_behind_debezium_offset_is_no_gap() -> None:
    slot = SlotStatus("s", True, True, "pgoutput", "reserved", 100, "0/100")
    assert slot_gap(slot, 0x200) is None


def test_missing_slot_is_a_gap() -> None:
    assert "does not exist" in (slot_gap(SlotStatus("s", exists=False), None) or "")


def test_lost_wal_is_a_gap() -> None:
    slot = SlotStatus("s", True, False, "pgoutput", "lost", None, "0/100")
    assert "lost WAL" in (slot_gap(slot, 0x100) or "")


def test_recreated_slot_past_debezium_offset_is_a_gap() -> None:
    slot = SlotStatus("s", True, True, "pgoutput", "reserved", 0, "0/9000")
    assert "recreated" in (slot_gap(slot, 0x100) or "")


def test_only_a_missing_slot_or_lost_wal_is_a_certain_gap() -> None:
    missing = SlotStatus("s", exists=False)
    lost = SlotStatus("s", True, False, "pgoutput", "lost", None, "0/100")
    past = SlotStatus("s", True, True, "pgoutput", "reserved", 0, "0/9000")
    healthy = SlotStatus("s", True, True, "pgoutput", "reserved", 100, "0/100")
    assert [g is not None for g in slot_gap_or_suspect(missing, None)] == [True, False]
    assert [g is not None for g in slot_gap_or_suspect(lost, 0x100)] == [True, False]
    assert [g is not None for g in slot_gap_or_suspect(past, 0x100)] == [False, True]
    assert slot_gap_or_suspect(healthy, 0x200) == (None, None)

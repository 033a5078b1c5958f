"""The backfill's parameters and command line: validated as a whole before any work, each bad
value named. No stack needed."""

from __future__ import annotations

import inspect
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from flows.backfill import backfill_flow, build_parser, main
from tasks.backfill.manifest import Manifest
from tasks.backfill.params import BackfillParams, validate
from tasks.backfill.plan import SnapshotFilter
from tasks.core.catalog import READ_MODELS
from tasks.core.errors import ConfigurationError

# --------------------------------------------------------------------------------------------
# Parameters


def test_defaults_are_valid_and_cover_every_read_model() -> None:
    p = validate({})
    assert set(p.read_models) == set(READ_MODELS)
    assert p.user_ids is None and p.chunk_size > 0 and p.concurrency > 0
    assert not (p.resume or p.dry_run or p.rebuild or p.no_cdc)


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"read_models": ["conversation_timeline", "nope"]}, "read_models: unknown read model"),
        ({"read_models": []}, "read_models: must name at least one"),
        ({"chunk_size": 0}, "chunk_size: Input should be greater than 0"),
        ({"chunk_size": -5}, "chunk_size: Input should be greater than 0"),
        ({"concurrency": 0}, "concurrency: Input should be greater than 0"),
        ({"readers": -1}, "readers: Input should be greater than 0"),
        ({"rate_limit_rows_per_s": 0}, "rate_limit_rows_per_s: Input should be greater than 0"),
        ({"rate_limit_rows_per_s": -100.0}, "rate_limit_rows_per_s: Input should be greater"),
        ({"user_ids": ["not-a-uuid"]}, "user_ids.0: Input should be a valid UUID"),
        ({"user_ids": [str(uuid.uuid4()), "1234"]}, "user_ids.1: Input should be a valid UUID"),
        ({"user_ids": []}, "user_ids: an empty list would select nothing"),
        ({"created_from": "2026-01-01T00:00:00"}, "created_from: Input should have timezone"),
        ({"created_from": "yesterday"}, "created_from: Input should be a valid datetime"),
        (
            {"created_from": "2026-02-01T00:00:00Z", "created_to": "2026-01-01T00:00:00Z"},
            "created_from .* must be before created_to",
        ),
        ({"rebuild": True, "resume": True}, "rebuild and resume together"),
        ({"keyspace": "drop table; --"}, "keyspace: must be a CQL identifier"),
        ({"chunk_size": "ten"}, "chunk_size: Input should be a valid integer"),
        ({"bogus": 1}, "bogus: Extra inputs are not permitted"),
    ],
)
def test_bad_parameters_name_themselves(params: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        validate(params)


def test_every_bad_parameter_is_reported_at_once() -> None:
    with pytest.raises(ConfigurationError) as err:
        validate({"chunk_size": 0, "concurrency": 0, "user_ids": ["x"]})
    text = str(err.value)
    assert all(name in text for name in ("chunk_size", "concurrency", "user_ids.0"))


def test_snapshot_dir_must_be_a_complete_snapshot(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"has no manifest\.json"):
        validate({"snapshot_dir": str(tmp_path)})
    snap = _snapshot(tmp_path)
    assert validate({"snapshot_dir": str(snap)}).snapshot_dir == snap
    with pytest.raises(ConfigurationError, match="rebuild with snapshot_dir"):
        validate({"snapshot_dir": str(snap), "rebuild": True})
    # Knowingly without CDC there are no CDC changes to lose.
    assert validate({"snapshot_dir": str(snap), "rebuild": True, "no_cdc": True}).rebuild


def test_strings_from_the_command_line_are_parsed() -> None:
    u = uuid.uuid4()
    p = validate(
        {
            "user_ids": [str(u)],
            "chunk_size": "1000",
            "rate_limit_rows_per_s": "2.5",
            "created_from": "2026-01-01T00:00:00+02:00",
            "read_models": "sessions_by_id",
        }
    )
    assert p.user_ids == (u,)
    assert p.chunk_size == 1000 and p.rate_limit_rows_per_s == 2.5
    assert p.created_from == datetime(2025, 12, 31, 22, tzinfo=UTC)
    assert p.read_models == ("sessions_by_id",)
    assert p.filter == SnapshotFilter((u,), p.created_from, None)


def test_cli_flow_and_model_have_the_same_parameters() -> None:
    flow_params = set(inspect.signature(backfill_flow.fn).parameters)
    cli = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert flow_params == set(BackfillParams.model_fields) == cli


def test_cli_rejects_bad_parameters_before_starting_a_flow(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(**_: object) -> None:
        raise AssertionError("the flow was started")

    monkeypatch.setattr("flows.backfill.backfill_flow", must_not_run)
    assert main(["--chunk-size", "0", "--user-ids", "nope"]) == 2
    err = capsys.readouterr().err
    assert "chunk_size: Input should be greater than 0" in err
    assert "user_ids.0: Input should be a valid UUID" in err


# --------------------------------------------------------------------------------------------
# Values that used to pass: each now stops the run with a message naming it


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"rate_limit_rows_per_s": float("inf")}, "rate_limit_rows_per_s: .*finite"),
        ({"rate_limit_rows_per_s": "inf"}, "rate_limit_rows_per_s: .*finite"),
        ({"rate_limit_rows_per_s": float("nan")}, "rate_limit_rows_per_s: .*finite"),
        ({"readers": 10_000}, "readers: Input should be less than or equal to"),
        ({"concurrency": 10**9}, "concurrency: Input should be less than or equal to"),
        ({"chunk_size": 10**12}, "chunk_size: Input should be less than or equal to"),
        ({"write_batch_rows": 10**6}, "write_batch_rows: Input should be less than or equal to"),
        ({"chunk_size": True}, "chunk_size: Input should be a valid integer"),
        ({"readers": False}, "readers: Input should be a valid integer"),
    ],
)
def test_unbounded_or_non_numeric_values_are_refused(params: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        validate(params)


def _snapshot(tmp_path: Path, filt: SnapshotFilter | None = None) -> Path:
    d = tmp_path / "snap"
    d.mkdir()
    (d / "manifest.json").write_text(
        json.dumps(
            {
                "snapshot_id": "s",
                "snapshot_time": datetime.now(UTC).isoformat(),
                "wal_lsn": "0/1",
                "slot": {"exists": True},
                "filter": (filt or SnapshotFilter()).to_json(),
                "read_models": list(READ_MODELS),
                "chunk_size": 10,
                "tables": {},
                "chunks": [],
                "seconds": 0.0,
                "format": 1,
            }
        )
    )
    return d


def test_snapshot_dir_with_other_filters_is_refused(tmp_path: Path) -> None:
    u = uuid.uuid4()
    d = _snapshot(tmp_path, SnapshotFilter((u,)))
    # The snapshot's own filter, given again, is fine: that is what gets loaded.
    assert validate({"snapshot_dir": str(d), "user_ids": [str(u)]}).user_ids == (u,)
    with pytest.raises(ConfigurationError, match=r"snapshot_dir .* filter"):
        validate({"snapshot_dir": str(d), "user_ids": [str(uuid.uuid4())]})
    with pytest.raises(ConfigurationError, match=r"snapshot_dir .* filter"):
        validate({"snapshot_dir": str(d), "created_from": "2026-01-01T00:00:00Z"})
    unfiltered = tmp_path / "other"
    unfiltered.mkdir()
    (unfiltered / "manifest.json").write_text(
        (d / "manifest.json")
        .read_text()
        .replace(f'"{u}"', '"00000000-0000-0000-0000-000000000001"')
    )
    with pytest.raises(ConfigurationError, match=r"snapshot_dir .* filter"):
        validate({"snapshot_dir": str(unfiltered), "user_ids": [str(u)]})


@pytest.mark.parametrize("text", ["{not json", "[]", '{"format": 1}', ""])
def test_a_corrupt_manifest_names_the_file(tmp_path: Path, text: str) -> None:
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ConfigurationError, match=r"manifest\.json"):
        validate({"snapshot_dir": str(tmp_path)})
    with pytest.raises(ConfigurationError, match=r"manifest\.json"):
        Manifest.read(tmp_path)

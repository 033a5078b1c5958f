"""The expectation suites on disk (expectations/*.json) and tasks.audit.suites: files that GX
1.x loads, that name known columns only, and that refuse to load when broken."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tasks.audit import suites
from tasks.core.catalog import KEY_COLUMNS, READ_MODELS, VALUE_COLUMNS
from tasks.core.errors import ConfigurationError

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize("read_model", READ_MODELS)
def test_suite_files_are_gx_1_suites_of_known_columns(read_model: str) -> None:
    path = suites.EXPECTATIONS_DIR / f"{read_model}.json"
    doc = json.loads(path.read_text())
    assert doc["name"] == read_model
    suite = suites.load_suite(read_model)
    assert suite.name == read_model
    assert len(suite.expectations) == len(doc["expectations"])
    known = set(KEY_COLUMNS[read_model]) | set(VALUE_COLUMNS[read_model])
    for e in doc["expectations"]:
        assert e["type"].startswith("expect_")
        kw = e["kwargs"]
        cols = kw.get("column_list") or [kw["column"]]
        assert set(cols) <= known, e
        assert e["meta"]["invariant"]
        # no expectation pins a table's full column list (columns may be added)
        assert not e["type"].startswith(("expect_table_columns", "expect_table_column_count"))
    names = suites.expectation_names(read_model)
    assert len(set(names)) == len(names)
    # the parameters the suite needs are all supplied by default
    assert suites.suite_parameters(read_model) <= set(suites.default_parameters(NOW))


def test_load_suite_returns_a_fresh_suite_each_time() -> None:
    a, b = suites.load_suite("sessions_by_id"), suites.load_suite("sessions_by_id")
    assert a is not b
    a.expectations.clear()
    assert suites.load_suite("sessions_by_id").expectations


def test_a_misnamed_or_broken_suite_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "sessions_by_id.json").write_text(json.dumps({"name": "x", "expectations": []}))
    with pytest.raises(ConfigurationError, match="suite name"):
        suites.load_suite("sessions_by_id", tmp_path)
    (tmp_path / "steps_by_turn.json").write_text("{not json")
    with pytest.raises(ConfigurationError):
        suites.load_suite("steps_by_turn", tmp_path)
    with pytest.raises(ConfigurationError, match="no expectation suite"):
        suites.load_suite("conversation_timeline", tmp_path)
    (tmp_path / "recent_conversations.json").write_text(
        json.dumps(
            {
                "name": "recent_conversations",
                "expectations": [{"type": "expect_no_such_thing", "kwargs": {}}],
            }
        )
    )
    # GX's ExpectationSuite would log and drop these; load_suite refuses them
    with pytest.raises(ConfigurationError, match=r"expectations\[0\] \(expect_no_such_thing"):
        suites.load_suite("recent_conversations", tmp_path)
    (tmp_path / "recent_conversations.json").write_text(
        json.dumps(
            {
                "name": "recent_conversations",
                "expectations": [
                    {
                        "type": "expect_column_values_to_be_in_set",
                        "kwargs": {"column": "role", "value_sett": ["human"]},
                    }
                ],
            }
        )
    )
    with pytest.raises(ConfigurationError, match="invalid expectation suite"):
        suites.load_suite("recent_conversations", tmp_path)

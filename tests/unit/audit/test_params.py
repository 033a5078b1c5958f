"""The audit and reconcile flows' parameters (tasks/audit/params.py): defaults, and every bad
value refused before any work with a message naming it. No stack needed."""

from __future__ import annotations

import uuid

import pytest

from tasks.audit.params import validate_audit, validate_reconcile
from tasks.core.catalog import READ_MODELS
from tasks.core.errors import ConfigurationError

KEY = uuid.UUID("5b0c1f3e-1c2d-4e5f-8a9b-0c1d2e3f4a5b")

# --------------------------------------------------------------------------------------------
# Audit


def test_audit_defaults() -> None:
    p = validate_audit({})
    assert p.read_models == READ_MODELS
    assert p.freshness_window_s is None and p.max_differences is None
    assert p.quality is True and p.reconcile_on_drift is False


def test_audit_none_means_the_default() -> None:
    assert validate_audit({"read_models": None, "quality": None}) == validate_audit({})


def test_audit_values_from_the_command_line_are_parsed() -> None:
    p = validate_audit(
        {
            "read_models": ["steps_by_turn", "sessions_by_id", "steps_by_turn"],
            "freshness_window_s": "2.5",
            "quality": "false",
            "reconcile_on_drift": True,
            "max_differences": "3",
        }
    )
    assert p.read_models == ("sessions_by_id", "steps_by_turn")  # catalog order, no repeats
    assert p.freshness_window_s == 2.5 and p.max_differences == 3
    assert p.quality is False and p.reconcile_on_drift is True
    assert validate_audit({"read_models": "sessions_by_id"}).read_models == ("sessions_by_id",)


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"read_models": ["sessions_by_id", "users"]}, r"read_models: unknown read model.*users"),
        ({"read_models": []}, "read_models: must name at least one"),
        ({"freshness_window_s": -1}, "freshness_window_s: Input should be greater than or equal"),
        ({"freshness_window_s": 3601}, "freshness_window_s: Input should be less than or equal"),
        ({"freshness_window_s": "nan"}, "freshness_window_s: "),
        ({"freshness_window_s": "soon"}, "freshness_window_s: Input should be a valid number"),
        ({"max_differences": -1}, "max_differences: Input should be greater than or equal to 0"),
        ({"max_differences": "many"}, "max_differences: Input should be a valid integer"),
        ({"quality": "perhaps"}, "quality: Input should be a valid boolean"),
        ({"bogus": 1}, "bogus: Extra inputs are not permitted"),
    ],
)
def test_bad_audit_parameters_name_themselves(params: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named) as err:
        validate_audit(params)
    assert str(err.value).startswith("invalid audit parameters:")


def test_every_bad_audit_parameter_is_reported_at_once() -> None:
    with pytest.raises(ConfigurationError) as err:
        validate_audit({"read_models": ["nope"], "max_differences": -1, "freshness_window_s": -2})
    text = str(err.value)
    assert all(n in text for n in ("read_models", "max_differences", "freshness_window_s"))
    assert "'nope'" in text


# --------------------------------------------------------------------------------------------
# Reconcile


def test_reconcile_defaults_with_one_target() -> None:
    p = validate_reconcile({"audit_run": "local-0123abcd"})
    assert p.audit_run == "local-0123abcd"
    assert p.partitions is None and p.read_models is None
    assert p.dry_run is False and p.max_keys is None
    assert p.partition_keys() == {}


@pytest.mark.parametrize(
    "params",
    [
        {"audit_run": "8e2b8c8e-55a6-4f8a-9c55-0c1d2e3f4a5b"},
        {"partitions": [f"sessions_by_id:{KEY}"]},
        {"partitions": f"sessions_by_id:{KEY}"},  # one, as a string
        {"read_models": ["steps_by_turn"]},
        {"read_models": "steps_by_turn", "dry_run": True, "max_keys": "10"},
    ],
)
def test_reconcile_accepts_exactly_one_target(params: dict[str, object]) -> None:
    validate_reconcile(params)


@pytest.mark.parametrize(
    ("params", "got"),
    [
        ({}, None),
        ({"dry_run": True}, None),
        ({"audit_run": "r1", "read_models": ["sessions_by_id"]}, "audit_run, read_models"),
        ({"audit_run": "r1", "partitions": [f"sessions_by_id:{KEY}"]}, "audit_run, partitions"),
        (
            {
                "audit_run": "r1",
                "partitions": [f"sessions_by_id:{KEY}"],
                "read_models": ["sessions_by_id"],
            },
            "audit_run, partitions, read_models",
        ),
    ],
)
def test_reconcile_needs_exactly_one_target(params: dict[str, object], got: str | None) -> None:
    with pytest.raises(ConfigurationError, match="name exactly one of") as err:
        validate_reconcile(params)
    if got is None:
        assert "(got" not in str(err.value)
    else:
        assert f"(got {got})" in str(err.value)


@pytest.mark.parametrize(
    ("item", "named"),
    [
        ("x", "'x': unknown read model 'x'"),
        ("sessions_by_id:not-a-uuid", "'sessions_by_id:not-a-uuid': 'not-a-uuid' is not a uuid"),
        (f"nope:{KEY}", f"'nope:{KEY}': unknown read model 'nope'"),
        ("sessions_by_id:", "'sessions_by_id:': '' is not a uuid"),
        (f":{KEY}", f"':{KEY}': unknown read model ''"),
    ],
)
def test_a_bad_partition_names_the_item(item: str, named: str) -> None:
    good = f"steps_by_turn:{KEY}"
    with pytest.raises(ConfigurationError, match="partitions: ") as err:
        validate_reconcile({"partitions": [good, item]})
    assert named in str(err.value)


def test_no_partitions_at_all_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="partitions: must name at least one"):
        validate_reconcile({"partitions": []})


def test_partition_keys_group_by_read_model() -> None:
    other = uuid.UUID(int=7)
    p = validate_reconcile(
        {
            "partitions": [
                f"sessions_by_id:{KEY}",
                f"steps_by_turn:{other}",
                f"sessions_by_id:{str(other).upper()}",
            ]
        }
    )
    assert p.partition_keys() == {"sessions_by_id": [KEY, other], "steps_by_turn": [other]}


@pytest.mark.parametrize("run", ["../etc", "/etc/passwd", "a/b", ".hidden", "", "a b", "x" * 129])
def test_a_bad_audit_run_id_is_refused(run: str) -> None:
    with pytest.raises(ConfigurationError, match=r"audit_run: .* is not an audit run id"):
        validate_reconcile({"audit_run": run})


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"read_models": ["users"]}, r"read_models: unknown read model.*users"),
        ({"read_models": []}, "read_models: must name at least one"),
        ({"max_keys": 0}, "max_keys: Input should be greater than or equal to 1"),
        ({"max_keys": "lots"}, "max_keys: Input should be a valid integer"),
        ({"dry_run": "maybe"}, "dry_run: Input should be a valid boolean"),
        ({"bogus": 1}, "bogus: Extra inputs are not permitted"),
    ],
)
def test_bad_reconcile_parameters_name_themselves(params: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named) as err:
        validate_reconcile({"audit_run": "r1", **params} if "read_models" not in params else params)
    assert str(err.value).startswith("invalid reconcile parameters:")

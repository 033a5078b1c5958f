"""Pure tests of the CDC run's options: one strict model for the flow, the command line and app
code, a consumer group of its own for a subset of read models. No stack needed."""

from __future__ import annotations

import inspect
import math

import pytest

import flows.cdc as cdc_flow_module
from tasks.cdc.options import CdcOptions
from tasks.core.catalog import READ_MODELS
from tasks.core.errors import ConfigurationError

SHARED = "cqrs-sync-cdc"


def test_keyword_construction_and_defaults() -> None:
    o = CdcOptions(report_interval_s=3600, max_messages=5)
    assert o.report_interval_s == 3600.0 and o.max_messages == 5
    assert o.read_models == READ_MODELS and isinstance(o.read_models, tuple)
    # After an outage a latency-minded consumer must not wait 10 s before retrying.
    assert o.retry_max_s == 2.0
    for name in (
        "batch_size",
        "batch_timeout_s",
        "max_messages",
        "max_seconds",
        "report_interval_s",
        "read_models",
        "retry_initial_s",
        "retry_max_s",
        "idle_exit_s",
    ):
        assert hasattr(o, name)
    with pytest.raises(Exception):  # noqa: B017 - frozen, whatever the exception class
        o.batch_size = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"report_interval_s": math.nan}, "report_interval_s: .*finite"),
        ({"report_interval_s": math.inf}, "report_interval_s: .*finite"),
        ({"max_seconds": math.inf}, "max_seconds: .*finite"),
        ({"idle_exit_s": 0}, "idle_exit_s: Input should be greater than 0"),
        ({"idle_exit_s": -1.0}, "idle_exit_s: Input should be greater than 0"),
        ({"retry_initial_s": 0}, "retry_initial_s: Input should be greater than 0"),
        ({"retry_max_s": -2.0}, "retry_max_s: Input should be greater than 0"),
        ({"retry_initial_s": 5.0, "retry_max_s": 1.0}, "retry_initial_s .* must not exceed"),
        ({"batch_size": True}, "batch_size: Input should be a valid integer"),
        ({"max_messages": False}, "max_messages: Input should be a valid integer"),
        ({"batch_size": 10**9}, "batch_size: Input should be less than or equal to"),
        ({"batch_size": "10"}, "batch_size: Input should be a valid integer"),
        ({"batch_timeout_s": 0.0}, "batch_timeout_s: Input should be greater than 0"),
        ({"read_models": []}, "read_models: must name at least one read model"),
        ({"read_models": ("conversation_timeline", "nope")}, "read_models: unknown read model"),
        ({"bogus": 1}, "bogus: Extra inputs are not permitted"),
    ],
)
def test_bad_options_name_themselves(params: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        CdcOptions(**params)  # type: ignore[arg-type]


def test_read_models_none_means_all_and_a_subset_is_canonical() -> None:
    assert CdcOptions(read_models=None).read_models == READ_MODELS  # type: ignore[arg-type]
    a = CdcOptions(read_models=["steps_by_turn", "conversation_timeline"])  # type: ignore[arg-type]
    b = CdcOptions(read_models=("conversation_timeline", "steps_by_turn", "steps_by_turn"))
    assert a.read_models == b.read_models == ("conversation_timeline", "steps_by_turn")


# --------------------------------------------------------------------------------------------
# The consumer group of a subset


def test_a_subset_gets_a_consumer_group_of_its_own() -> None:
    from tasks.cdc.options import consumer_group_for

    assert consumer_group_for(SHARED, READ_MODELS) == SHARED
    assert consumer_group_for(SHARED, READ_MODELS, "mine") == "mine"
    assert (
        consumer_group_for(SHARED, ("conversation_timeline",))
        == "cqrs-sync-cdc.conversation_timeline"
    )
    assert (
        consumer_group_for(SHARED, ("steps_by_turn", "conversation_timeline"))
        == "cqrs-sync-cdc.conversation_timeline.steps_by_turn"
    )
    assert (
        consumer_group_for(SHARED, ("conversation_timeline",), "timeline-only") == "timeline-only"
    )
    with pytest.raises(ConfigurationError, match="consumer_group 'cqrs-sync-cdc' is the shared"):
        consumer_group_for(SHARED, ("conversation_timeline",), SHARED)
    with pytest.raises(ConfigurationError, match="consumer_group ''"):
        consumer_group_for(SHARED, READ_MODELS, "")


def test_help_says_what_a_subset_does_to_the_consumer_group() -> None:
    text = " ".join(cdc_flow_module.build_parser().format_help().split())
    assert "consumer group of its own" in text
    assert "cqrs-sync-cdc.conversation_timeline" in text
    doc = " ".join((cdc_flow_module.cdc_flow.fn.__doc__ or "").split())
    assert "consumer group of its own" in doc


# --------------------------------------------------------------------------------------------
# The command line


def test_cli_flow_and_model_have_the_same_parameters() -> None:
    from tasks.cdc.options import CdcOptions as Model

    flow_params = set(inspect.signature(cdc_flow_module.cdc_flow.fn).parameters)
    cli = {a.dest for a in cdc_flow_module.build_parser()._actions if a.dest != "help"}
    assert flow_params == set(Model.model_fields) | {"consumer_group"} == cli


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--report-interval-s", "nan"], "report_interval_s: .*finite"),
        (["--idle-exit-s", "0"], "idle_exit_s: Input should be greater than 0"),
        (["--retry-initial-s", "-1"], "retry_initial_s: Input should be greater than 0"),
        (["--max-seconds", "inf"], "max_seconds: .*finite"),
        (
            ["--read-models", "conversation_timeline", "--consumer-group", SHARED],
            "consumer_group 'cqrs-sync-cdc' is the shared",
        ),
    ],
)
def test_cli_rejects_bad_options_before_starting_a_flow(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(**_: object) -> None:
        raise AssertionError("the flow was started")

    monkeypatch.setattr("flows.cdc.cdc_flow", must_not_run)
    assert cdc_flow_module.main(argv) == 2
    assert _matches(named, capsys.readouterr().err)


def _matches(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None

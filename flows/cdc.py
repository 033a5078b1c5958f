"""The CDC flow: a long-lived Prefect flow run consuming Debezium's change topics into the
Scylla read models until cancelled (Prefect UI, SIGTERM, Ctrl-C) or a bound is reached.

    python -m flows.cdc --help
    make cdc

Scale out by running more flow runs with the same consumer group: Kafka spreads the topics'
partitions over them.

Offsets are committed per consumer group, for every change of a batch. A run projecting only
some read models (--read-models) therefore gets a consumer group of its own by default: the
settings' group followed by the sorted read models, e.g. cqrs-sync-cdc.conversation_timeline.
In the shared group it would commit past changes it never applied to the other read models,
and the group's other runs would never see them: naming the shared group together with a
subset is refused.

A requested stop (SIGTERM, SIGINT, cancelling from the UI) finishes the batch in flight,
commits its offsets, ends the flow run Cancelled and the process with status 0.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any, get_args

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from prefect.runtime import flow_run
from prefect.states import Cancelled, Failed, State
from prefect.variables import Variable

from flows.cli import run_cli
from tasks.adapters import postgres, scylla
from tasks.adapters.kafka_connect import KafkaConnectClient
from tasks.cdc.consumer import CdcConsumer
from tasks.cdc.options import CdcOptions, consumer_group_for
from tasks.cdc.slot_watch import BACKFILL_ADVICE, SlotGap, SlotVerdict, SlotWatch
from tasks.core.catalog import READ_MODELS
from tasks.core.errors import CqrsSyncError
from tasks.core.metrics import LatencyRecord, MetricsReport, latency_variable
from tasks.settings import Settings, get_settings


def debezium_lsn(log: Any, s: Settings) -> int | None:
    """Debezium's last recorded LSN, or None (and a warning) when Kafka Connect cannot say."""
    try:
        return KafkaConnectClient(s.kafka.connect_url).source_lsn(s.kafka.connector_name)
    except CqrsSyncError as exc:
        log.warning("cannot read Debezium's offset: %s", exc)
        return None


def check_slot(log: Any, s: Settings, watch: SlotWatch, lsn: int | None) -> SlotVerdict | None:
    """The slot's verdict, its events emitted; a gap logged with what to do. None (and a
    warning) when the slot cannot be read: the consumer goes on and the next report retries."""
    try:
        slot = postgres.slot_status(s.postgres)
    except CqrsSyncError as exc:
        log.warning("cannot check the replication slot: %s", exc)
        return None
    verdict = watch.verdict(slot, lsn)
    for event in verdict.events:
        emit_prefect_event(event.name, event.payload)
    if verdict.gap:
        log.error("%s: %s", verdict.gap, BACKFILL_ADVICE)
    elif verdict.suspect and not watch.suspect_reported:
        watch.suspect_reported = True
        log.warning(
            "%s (or Debezium confirmed past its recorded offset); the audit finds any rows missed",
            verdict.suspect,
        )
    elif watch.lagging:
        log.warning(
            "replication slot %r holds %s bytes of WAL Debezium has not confirmed (limit %s): "
            "is the connector stuck?",
            slot.name,
            f"{verdict.lag_bytes:,}",
            f"{watch.max_lag_bytes:,}",
        )
    elif not slot.active:
        log.warning("replication slot %r exists but no connector is streaming from it", slot.name)
    return verdict


def check_source(log: Any, s: Settings, watch: SlotWatch) -> None:
    """Report, before consuming, what would make CDC silently incomplete; a slot gap stops
    the run (SlotGap) before it consumes anything. A check that cannot be made (a service
    down, Kafka Connect busy rebalancing) is reported, never fatal: the consumer itself
    waits for the services it needs."""
    connect = KafkaConnectClient(s.kafka.connect_url)
    lsn = None
    try:
        state = connect.status(s.kafka.connector_name)
        if state is None or not state.running:
            log.error("Debezium connector %r is not running: %s", s.kafka.connector_name, state)
        lsn = connect.source_lsn(s.kafka.connector_name)
    except CqrsSyncError as exc:
        log.warning("cannot check the Debezium connector: %s", exc)
    verdict = check_slot(log, s, watch, lsn)
    if verdict is not None and verdict.gap:
        raise SlotGap(f"{verdict.gap}: {BACKFILL_ADVICE}")


def emit_prefect_event(name: str, payload: dict[str, Any]) -> None:
    """What an operator must act on (a TRUNCATE refused, an offset gap) as a Prefect event,
    which automations can turn into an alert."""
    run_id = flow_run.get_id()
    emit_event(
        event=name,
        resource={"prefect.resource.id": f"cqrs-sync.cdc.{run_id or 'local'}"},
        payload=payload,
    )


def markdown(rep: MetricsReport, slot_lag: int | None) -> str:
    rows = "\n".join(f"| {tp} | {lag} |" for tp, lag in sorted(rep.lag.items()))

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    return (
        "## CDC consumer\n\n"
        "| metric | value |\n|---|---|\n"
        f"| events/s (last {rep.interval_s:.0f} s) | {rep.events_per_s:,.0f} |\n"
        f"| end-to-end latency p50 / p99 / max (ms) | {ms(rep.latency_p50_ms)} / "
        f"{ms(rep.latency_p99_ms)} / {ms(rep.latency_max_ms)} |\n"
        f"| consumer lag (messages) | {rep.total_lag} |\n"
        f"| dead-lettered (total) | {rep.dead_lettered_total} |\n"
        f"| events (total) | {rep.events_total} |\n"
        f"| replication slot lag (bytes of WAL not confirmed) | {slot_lag} |\n"
        f"| waiting for | {rep.waiting_for or '-'} |\n\n"
        f"| partition | lag |\n|---|---|\n{rows}\n"
    )


def publish_latency(log: Any, rep: MetricsReport, consumer_group: str) -> None:
    """The interval's end-to-end latency, if it applied changes, overwritten in a Prefect
    variable per consumer group: the audit reads the last measured value from any machine."""
    record = LatencyRecord.of(rep, consumer_group, time.time())
    if record is None:
        return  # nothing applied this interval: the last measured value stays
    try:
        Variable.set(latency_variable(consumer_group), record.as_json(), overwrite=True)
    except Exception as exc:  # the Prefect API down must not stop the consumer
        log.warning("latency not published: %s: %s", type(exc).__name__, exc)


def make_reporter(
    log: Any,
    settings: Settings,
    watch: SlotWatch,
    on_gap: Callable[[str], None],
    consumer_group: str | None = None,
) -> Callable[[MetricsReport], None]:
    def report(rep: MetricsReport) -> None:
        verdict = check_slot(log, settings, watch, debezium_lsn(log, settings))
        lag = None if verdict is None else verdict.lag_bytes
        if verdict is not None and verdict.gap:
            on_gap(verdict.gap)
        log.info("%s, slot lag %s bytes", rep.as_line(), lag)
        try:
            create_markdown_artifact(
                key="cdc-metrics",
                markdown=markdown(rep, lag),
                description="CDC consumer: lag, throughput, latency, DLQ",
            )
        except Exception as exc:  # the Prefect API down must not stop the consumer
            log.warning("cdc-metrics artifact not published: %s: %s", type(exc).__name__, exc)
        if consumer_group is not None:
            publish_latency(log, rep, consumer_group)

    return report


def cancellation_requested() -> bool:
    """True once the flow run is being cancelled from the UI/API (for runs not started by a
    worker, which would otherwise send SIGTERM)."""
    run_id = flow_run.get_id()
    if not run_id:
        return False
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(uuid.UUID(str(run_id))).state
    return bool(state and (state.is_cancelling() or state.is_cancelled()))


def validate(params: Mapping[str, Any]) -> tuple[CdcOptions, str]:
    """The flow's or the command line's parameters → the run's options and its consumer group,
    or a ConfigurationError naming each bad one. None means 'the default' (for read_models:
    every read model); nothing is connected to."""
    given = {k: v for k, v in params.items() if v is not None}
    group = given.pop("consumer_group", None)
    options = CdcOptions(**given)
    return options, consumer_group_for(
        get_settings().kafka.consumer_group, options.read_models, group
    )


# The flow validates its parameters itself (CdcOptions, strict), with messages naming them.
@flow(name="cdc", validate_parameters=False)
def cdc_flow(
    batch_size: int = 2000,
    batch_timeout_s: float = 0.1,
    max_messages: int | None = None,
    max_seconds: float | None = None,
    report_interval_s: float = 10.0,
    read_models: list[str] | None = None,
    retry_initial_s: float = 0.2,
    retry_max_s: float = 2.0,
    idle_exit_s: float | None = None,
    consumer_group: str | None = None,
) -> dict[str, Any] | State:
    """Consume Debezium's change topics into the Scylla read models until stopped.

    Stopped by SIGTERM/SIGINT or cancellation, the run ends Cancelled after committing the
    offsets of everything applied; a bound (max_messages, max_seconds, idle_exit_s) ends it
    Completed.

    Args:
        batch_size: messages per batch; offsets are committed once per batch.
        batch_timeout_s: how long one poll waits for a batch's first message.
        max_messages: stop after this many messages (default: never).
        max_seconds: stop after this many seconds (default: never).
        report_interval_s: how often lag, rate and latency are logged and published.
        read_models: project only these read models (default: all). A subset gets a consumer
            group of its own, e.g. cqrs-sync-cdc.conversation_timeline.
        retry_initial_s: first backoff while Scylla or Kafka is down.
        retry_max_s: longest backoff, also the most lag added after an outage ends.
        idle_exit_s: stop after this many seconds without a message (default: never).
        consumer_group: Kafka consumer group (default: the settings' group, or for a subset
            of read models a consumer group of its own; the shared group with a subset is
            refused: its commits would skip changes for the other read models).
    """
    # First statement: every parameter is validated before anything is connected to.
    options, group = validate(dict(locals()))
    log = get_run_logger()
    settings = get_settings()
    kafka_settings = settings.kafka.model_copy(update={"consumer_group": group})
    watch = SlotWatch(settings.audit.max_slot_lag_bytes)
    check_source(log, settings, watch)
    gaps: list[str] = []
    with scylla.session(settings.scylla, settings.scylla.keyspace) as session:
        consumer = CdcConsumer(
            scylla.ScyllaWriter(session, settings.scylla),
            options,
            kafka_settings,
            emit=emit_prefect_event,
        )

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info(
                "received %s: finishing the batch in flight, then stopping",
                signal.Signals(signum).name,
            )
            consumer.stop()

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Outside the main thread signals cannot be caught: the API check still stops us.
            with contextlib.suppress(ValueError):
                previous[sig] = signal.signal(sig, on_signal)
        log.info(
            "consuming %s.public.* into %s as group %r",
            kafka_settings.topic_prefix,
            list(options.read_models),
            kafka_settings.consumer_group,
        )

        def on_gap(gap: str) -> None:
            gaps.append(gap)
            consumer.stop()  # after the batch in flight, committed: nothing applied is lost

        try:
            result = consumer.run(
                report=make_reporter(log, settings, watch, on_gap, kafka_settings.consumer_group),
                should_stop=cancellation_requested,
            )
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    summary = {
        "messages": result.messages,
        "changes": result.changes,
        "mutations": result.mutations,
        "dead_lettered": result.dead_lettered,
        "batches": result.batches,
        "stopped_by": result.stopped_by,
        "consumer_group": kafka_settings.consumer_group,
    }
    log.info(
        "CDC stopped (%s) after %d messages, %d mutations, %d dead-lettered; offsets "
        "committed for everything applied",
        result.stopped_by,
        result.messages,
        result.mutations,
        result.dead_lettered,
    )
    if gaps:
        return Failed(
            message=f"stopped: {gaps[0]}: {BACKFILL_ADVICE}",
            data={**summary, "stopped_by": "slot gap"},
        )
    if result.stopped_by in ("signal", "cancelled"):
        return Cancelled(
            message=f"stopped by {result.stopped_by} after committing {result.messages} messages",
            data=summary,
        )
    return summary


def build_parser() -> argparse.ArgumentParser:
    """Options generated from CdcOptions, so the command line, the flow and app code accept
    the same parameters with the same descriptions."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.cdc",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name, info in CdcOptions.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if name == "read_models":
            parser.add_argument(
                flag,
                dest=name,
                nargs="+",
                choices=READ_MODELS,
                metavar="READ_MODEL",
                help=f"project only these read models (default: all of {list(READ_MODELS)}). "
                f"A subset gets a consumer group of its own: the settings' group and the "
                f"sorted read models, e.g. "
                f"{get_settings().kafka.consumer_group}.conversation_timeline",
            )
            continue
        kinds = {info.annotation, *get_args(info.annotation)} - {type(None)}
        convert = int if int in kinds else float
        default = info.get_default()
        shown = "default: never" if default is None else f"default: {default}"
        parser.add_argument(
            flag,
            dest=name,
            type=convert,
            help=f"{info.description or name.replace('_', ' ')} ({shown})",
        )
    parser.add_argument(
        "--consumer-group",
        dest="consumer_group",
        help="Kafka consumer group (default: the settings' group, "
        f"{get_settings().kafka.consumer_group!r}, or for a subset of read models a "
        "consumer group of its own; naming the shared group with a subset is refused)",
    )
    return parser


def run(args: dict[str, Any]) -> int:
    # The final state, not its result: a requested stop ends the run Cancelled (with the
    # summary as its data), which is an ordinary end for this process, not a failure.
    state = cdc_flow(**args, return_state=True)
    if state.is_completed() or state.is_cancelled():
        return 0
    print(f"error: the CDC flow run ended {state.type.value}: {state.message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    # Validated before a flow run is even created.
    return run_cli(build_parser(), argv, validate, run)


if __name__ == "__main__":
    sys.exit(main())

"""The CDC flow: a long-lived Prefect flow run consuming Debezium's change topics into the
Scylla read models until cancelled (Prefect UI, SIGTERM, Ctrl-C) or a bound is reached.

    python -m flows.cdc --help
    make cdc

Scale out by running more flow runs with the same consumer group: Kafka spreads the topics'
partitions over them.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import uuid
from collections.abc import Callable
from types import FrameType
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.states import Cancelled, State

from tasks import postgres, scylla
from tasks.cdc import CdcConsumer, CdcOptions
from tasks.errors import ServiceUnavailable
from tasks.kafka_connect import KafkaConnectClient
from tasks.metrics import MetricsReport
from tasks.projection import READ_MODELS
from tasks.settings import get_settings

# Retained WAL above which the slot is reported as a risk to the database's disk.
SLOT_RETAINED_WARN_BYTES = 1 << 30


def check_source(log: Any) -> None:
    """Report, before consuming, what would make CDC silently incomplete."""
    s = get_settings()
    connect = KafkaConnectClient(s.kafka.connect_url)
    debezium_lsn = None
    try:
        state = connect.status(s.kafka.connector_name)
        if state is None or not state.running:
            log.error("Debezium connector %r is not running: %s", s.kafka.connector_name, state)
        debezium_lsn = connect.source_lsn(s.kafka.connector_name)
    except ServiceUnavailable as exc:
        log.warning("cannot check the Debezium connector: %s", exc)
    try:
        slot = postgres.slot_status()
        gap = postgres.slot_gap(slot, debezium_lsn)
        if gap:
            log.error("%s. Run `python -m flows.setup` if needed, then a backfill to cover "
                      "the gap.", gap)
        elif not slot.active:
            log.warning("replication slot %r exists but no connector is streaming from it",
                        slot.name)
    except ServiceUnavailable as exc:
        log.warning("cannot check the replication slot: %s", exc)


def markdown(rep: MetricsReport, slot_retained: int | None) -> str:
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
        f"| replication slot WAL retained (bytes) | {slot_retained} |\n\n"
        f"| partition | lag |\n|---|---|\n{rows}\n"
    )


def make_reporter(log: Any) -> Callable[[MetricsReport], None]:
    def report(rep: MetricsReport) -> None:
        retained = None
        try:
            slot = postgres.slot_status()
            retained = slot.retained_bytes
            gap = postgres.slot_gap(slot, None)
            if gap:
                log.error("%s: backfill once the connector streams again", gap)
        except ServiceUnavailable as exc:
            log.warning("slot status unavailable: %s", exc)
        if retained is not None and retained > SLOT_RETAINED_WARN_BYTES:
            log.warning("replication slot holds %.1f GiB of WAL: is the connector stuck?",
                        retained / (1 << 30))
        log.info("%s, slot WAL retained %s bytes", rep.as_line(), retained)
        create_markdown_artifact(key="cdc-metrics", markdown=markdown(rep, retained),
                                 description="CDC consumer: lag, throughput, latency, DLQ")
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


@flow(name="cdc")
def cdc_flow(
    batch_size: int = 2000,
    max_messages: int | None = None,
    max_seconds: float | None = None,
    idle_exit_s: float | None = None,
    report_interval_s: float = 10.0,
    read_models: list[str] | None = None,
    consumer_group: str | None = None,
) -> dict[str, Any] | State:
    options = CdcOptions(  # validated here, before any connection is made
        batch_size=batch_size, max_messages=max_messages, max_seconds=max_seconds,
        idle_exit_s=idle_exit_s, report_interval_s=report_interval_s,
        read_models=tuple(read_models or READ_MODELS))
    log = get_run_logger()
    settings = get_settings()
    kafka_settings = settings.kafka.model_copy(
        update={"consumer_group": consumer_group} if consumer_group else {})
    check_source(log)
    session = scylla.connect(keyspace=settings.scylla.keyspace)
    consumer = CdcConsumer(scylla.ScyllaWriter(session), options, kafka_settings)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: finishing the batch in flight, then stopping",
                 signal.Signals(signum).name)
        consumer.stop()

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Outside the main thread signals cannot be caught: the API check still stops us.
        with contextlib.suppress(ValueError):
            previous[sig] = signal.signal(sig, on_signal)
    log.info("consuming %s.public.* as group %r", kafka_settings.topic_prefix,
             kafka_settings.consumer_group)
    try:
        result = consumer.run(report=make_reporter(log), should_stop=cancellation_requested)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        scylla.close(session)
    summary = {"messages": result.messages, "changes": result.changes,
               "mutations": result.mutations, "dead_lettered": result.dead_lettered,
               "batches": result.batches, "stopped_by": result.stopped_by}
    log.info("CDC stopped (%s) after %d messages, %d mutations, %d dead-lettered; offsets "
             "committed for everything applied", result.stopped_by, result.messages,
             result.mutations, result.dead_lettered)
    if result.stopped_by in ("signal", "cancelled"):
        return Cancelled(message=f"stopped by {result.stopped_by} after committing "
                         f"{result.messages} messages", data=summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.cdc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=2000,
                        help="messages per batch (offsets are committed per batch)")
    parser.add_argument("--max-messages", type=int, help="stop after this many messages")
    parser.add_argument("--max-seconds", type=float, help="stop after this many seconds")
    parser.add_argument("--idle-exit-s", type=float,
                        help="stop after this many seconds without a message")
    parser.add_argument("--report-interval-s", type=float, default=10.0,
                        help="how often lag, rate and latency are logged and published")
    parser.add_argument("--read-models", nargs="+", choices=READ_MODELS,
                        help="project only these read models (default: all)")
    parser.add_argument("--consumer-group", help="Kafka consumer group (default from settings)")
    a = parser.parse_args(argv)
    cdc_flow(batch_size=a.batch_size, max_messages=a.max_messages, max_seconds=a.max_seconds,
             idle_exit_s=a.idle_exit_s, report_interval_s=a.report_interval_s,
             read_models=a.read_models, consumer_group=a.consumer_group)


if __name__ == "__main__":
    main()

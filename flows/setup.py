"""Set-up flow: apply the write-model and read-model schemas (idempotent, recorded) and
register the Debezium connector, then report the connector's and the slot's state.

    python -m flows.setup
"""

from __future__ import annotations

import argparse

from prefect import flow, get_run_logger, task

from tasks.adapters import kafka, postgres, scylla
from tasks.adapters.kafka_connect import ConnectorState, register_connector
from tasks.core.errors import retry_if_transient
from tasks.settings import get_settings

# Each task reads the settings itself: they hold secrets, which are no task input for
# Prefect to hash or record.


@task(retries=5, retry_delay_seconds=3, retry_condition_fn=retry_if_transient)
def apply_postgres_schema() -> list[str]:
    return postgres.migrate(get_settings().postgres)


@task(retries=5, retry_delay_seconds=3, retry_condition_fn=retry_if_transient)
def apply_scylla_schema() -> list[str]:
    cfg = get_settings().scylla
    with scylla.session(cfg) as session:
        return scylla.migrate(session, cfg)


@task(retries=5, retry_delay_seconds=3, retry_condition_fn=retry_if_transient)
def create_topics() -> list[str]:
    return kafka.ensure_topics(get_settings().kafka)


@task(retries=5, retry_delay_seconds=3, retry_condition_fn=retry_if_transient)
def grow_topic_partitions() -> dict[str, int]:
    return kafka.grow_partitions(get_settings().kafka)


@task(retries=5, retry_delay_seconds=3, retry_condition_fn=retry_if_transient)
def register_debezium_connector() -> ConnectorState:
    return register_connector(get_settings())


@flow(name="setup", log_prints=False)
def setup_flow(register_connector: bool = True) -> dict[str, object]:
    log = get_run_logger()
    settings = get_settings()
    pg = apply_postgres_schema()
    log.info("Postgres migrations applied now: %s", pg or "none (up to date)")
    cql = apply_scylla_schema()
    log.info("Scylla migrations applied now: %s", cql or "none (up to date)")
    result: dict[str, object] = {"postgres": pg, "scylla": cql}
    if register_connector:
        log.info("Kafka topics created now: %s", create_topics() or "none (all exist)")
        wanted = settings.kafka.topic_partitions
        for topic, before in grow_topic_partitions().items():
            log.warning(
                "topic %s grown from %d to %d partitions (CQRS_KAFKA_TOPIC_PARTITIONS): some "
                "keys now land in other partitions, which the versions make safe",
                topic,
                before,
                wanted,
            )
        state = register_debezium_connector()
        slot = postgres.slot_status(settings.postgres)
        log.info(
            "connector %s: %s, tasks %s; slot %s exists=%s active=%s retained=%s bytes",
            state.name,
            state.connector_state,
            state.task_states,
            slot.name,
            slot.exists,
            slot.active,
            slot.retained_bytes,
        )
        result["connector"] = state.connector_state
        result["slot_active"] = slot.active
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.setup", description=__doc__)
    parser.add_argument(
        "--no-connector",
        action="store_true",
        help="apply schemas only; do not register the Debezium connector",
    )
    args = parser.parse_args()
    print(setup_flow(register_connector=not args.no_connector))
    print(f"topics: {[get_settings().kafka.topic(t) for t in ('sessions', 'human_turns')]} ...")


if __name__ == "__main__":
    main()

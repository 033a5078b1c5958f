"""The flows refuse what would silently lose or resurrect data, on the real stack: a CDC subset
committing in the shared consumer group, bad CDC options, a snapshot older than the read
models' gc_grace_seconds or taken against another replication slot; and an ordinary stop of
the CDC process is an ordinary exit."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions

from flows.backfill import backfill_flow
from flows.cdc import cdc_flow
from tasks.adapters import kafka, postgres, scylla
from tasks.adapters.kafka_connect import KafkaConnectClient
from tasks.core.errors import ConfigurationError
from tasks.settings import get_settings
from tests.integration.conftest import own_keyspace

CFG = get_settings()

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------
# Kafka consumer groups


def committed(group: str) -> dict[tuple[str, int], int]:
    """The offsets a consumer group has committed (nothing for a group that never did)."""
    client = kafka.admin(CFG.kafka)
    futures = client.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
    result = futures[group].result(timeout=30)
    return {(tp.topic, tp.partition): tp.offset for tp in result.topic_partitions if tp.offset >= 0}


def delete_groups(*groups: str) -> None:
    client = kafka.admin(CFG.kafka)
    for future in client.delete_consumer_groups(list(groups), request_timeout=30).values():
        with contextlib.suppress(Exception):  # a group that never existed: nothing to clean
            future.result(timeout=30)


@pytest.fixture()
def shared_group(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A 'shared' CDC group of this test's own, so nothing here moves the real group."""
    group = f"test-shared-{uuid.uuid4().hex[:10]}"
    monkeypatch.setattr(get_settings().kafka, "consumer_group", group)
    yield group
    delete_groups(group, f"{group}.conversation_timeline")


def test_a_subset_of_read_models_commits_in_a_group_of_its_own(shared_group: str) -> None:
    result = cdc_flow(read_models=["conversation_timeline"], max_messages=1, max_seconds=60)
    assert isinstance(result, dict) and result["messages"] >= 1
    own = f"{shared_group}.conversation_timeline"
    assert committed(own), f"the subset committed nothing in {own}"
    assert committed(shared_group) == {}, "the subset committed in the shared group"


def test_a_subset_in_the_shared_group_is_refused_before_consuming(shared_group: str) -> None:
    with pytest.raises(ConfigurationError, match=r"is the shared CDC group.*subset"):
        cdc_flow(
            read_models=["conversation_timeline"],
            consumer_group=shared_group,
            max_messages=1,
            max_seconds=60,
        )
    assert committed(shared_group) == {}


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"report_interval_s": math.nan}, "report_interval_s: .*finite"),
        ({"idle_exit_s": 0}, "idle_exit_s: Input should be greater than 0"),
        ({"retry_initial_s": -1.0}, "retry_initial_s: Input should be greater than 0"),
        ({"batch_size": True}, "batch_size: Input should be a valid integer"),
        ({"read_models": []}, "read_models: must name at least one"),
        ({"max_seconds": math.inf}, "max_seconds: .*finite"),
    ],
)
def test_bad_cdc_options_fail_before_anything_is_touched(
    params: dict[str, Any], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def touched(*_: object, **__: object) -> None:
        raise AssertionError("a service was used before the options were validated")

    monkeypatch.setattr(postgres, "slot_status", touched)
    monkeypatch.setattr(scylla, "connect", touched)
    monkeypatch.setattr(KafkaConnectClient, "status", touched)
    with pytest.raises(ConfigurationError, match=named):
        cdc_flow(**{"max_messages": 1, "max_seconds": 30, **params})


# --------------------------------------------------------------------------------------------
# Loading an existing snapshot


@pytest.fixture(scope="module")
def fs_keyspace() -> Iterator[str]:
    with own_keyspace("fstest") as ks:
        yield ks


def _snapshot(root: Path, keyspace: str) -> tuple[str, Path]:
    """A fresh, complete snapshot of a user nobody has (no rows: quick, and loads nothing)."""
    user = str(uuid.uuid4())
    result = backfill_flow(user_ids=[user], snapshot_root=str(root), keyspace=keyspace)
    return user, Path(result["snapshot_dir"])


def test_a_snapshot_older_than_gc_grace_seconds_is_refused(
    fs_keyspace: str, tmp_path: Path
) -> None:
    user, directory = _snapshot(tmp_path, fs_keyspace)
    taken_before = time.monotonic()  # the snapshot was taken before its flow returned
    with scylla.session(CFG.scylla) as session:
        try:
            session.execute(
                f"ALTER TABLE {fs_keyspace}.conversation_timeline WITH gc_grace_seconds = 1"
            )
            # Until the snapshot is surely older than the table's gc_grace_seconds (1 s).
            time.sleep(max(0.0, taken_before + 1.2 - time.monotonic()))
            for params in (
                {"snapshot_dir": str(directory)},
                {"resume": True, "user_ids": [user], "snapshot_root": str(tmp_path)},
            ):
                with pytest.raises(
                    ConfigurationError,
                    match=r"older than gc_grace_seconds of conversation_timeline",
                ):
                    backfill_flow(keyspace=fs_keyspace, **params)
            # Said explicitly, it is loaded.
            done = backfill_flow(
                snapshot_dir=str(directory), keyspace=fs_keyspace, allow_old_snapshot=True
            )
            assert done["snapshot_dir"] == str(directory)
        finally:
            session.execute(
                f"ALTER TABLE {fs_keyspace}.conversation_timeline WITH gc_grace_seconds = 864000"
            )


def test_a_fresh_snapshot_against_the_same_slot_loads(fs_keyspace: str, tmp_path: Path) -> None:
    _, directory = _snapshot(tmp_path, fs_keyspace)
    done = backfill_flow(snapshot_dir=str(directory), keyspace=fs_keyspace)
    assert done["snapshot_dir"] == str(directory)


def test_a_slot_recreated_after_the_snapshot_is_refused(
    fs_keyspace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, directory = _snapshot(tmp_path, fs_keyspace)
    # A slot recreated since starts past Debezium's last offset: what slot_gap detects.
    with monkeypatch.context() as m:
        m.setattr(KafkaConnectClient, "source_lsn", lambda *_: 1)
        with pytest.raises(ConfigurationError, match=r"was recreated.*snapshot"):
            backfill_flow(snapshot_dir=str(directory), keyspace=fs_keyspace)
    # The manifest recorded a slot position the current slot has not reached: another slot.
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["slot"]["confirmed_flush_lsn"] = "FFFF/0"
    path.write_text(json.dumps(manifest))
    with pytest.raises(ConfigurationError, match=r"not the slot the snapshot was taken against"):
        backfill_flow(snapshot_dir=str(directory), keyspace=fs_keyspace)


def test_a_corrupt_manifest_is_named(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"format": 1, "chunks": [')
    with pytest.raises(ConfigurationError, match=r"manifest\.json"):
        backfill_flow(snapshot_dir=str(tmp_path))


# --------------------------------------------------------------------------------------------
# Stopping the CDC process


def _flow_run_of(group: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["cdc"])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=50,
        )
    mine = [r for r in runs if r.parameters.get("consumer_group") == group]
    return mine[0] if mine else None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_requested_stop_exits_0_and_the_run_ends_cancelled(
    sig: signal.Signals, tmp_path: Path
) -> None:
    group = f"test-stop-{uuid.uuid4().hex[:10]}"
    env = {
        **os.environ,
        "PREFECT_API_URL": os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api"),
    }
    out = (tmp_path / "cdc.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cdc", "--consumer-group", group, "--report-interval-s", "1"],
        cwd=ROOT,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 180
        while not committed(group):  # it consumed (from the topics' start) and committed
            assert proc.poll() is None, (tmp_path / "cdc.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the CDC process never committed offsets"
            time.sleep(0.5)
        proc.send_signal(sig)
        rc = proc.wait(timeout=90)
        log = (tmp_path / "cdc.log").read_text()
        assert rc == 0, log[-3000:]
        run = _flow_run_of(group)
        assert run is not None and run.state is not None, log[-3000:]
        assert run.state.is_cancelled(), (run.state, log[-3000:])
        assert committed(group)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
        delete_groups(group)

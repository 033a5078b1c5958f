"""CDC scale-out benchmark (not a test): one backlog drained by 1, 2, 3... consumer processes
in one consumer group, on the same topics, against the same stack (issue #13, "scale-out
measured, not only claimed").

    .venv/bin/python -m bench.cdc_scale [--members 1 2 3] [--turns 100000] [--batch-size 2000]

Each human turn is two change events (the turn and its session's header). The backlog is
written once, in bulk by SQL, and the run waits until Debezium has published all of it; then
for each member count a new group starts at the backlog's first offsets and that many
processes (``python -m bench.cdc_scale --member``, each a ``CdcConsumer`` as the CDC flow runs
it) drain it. Every count re-applies the same changes with the same versions, so each does
the same work in Scylla.

Measured per count: the drain time, from the moment every member that can get partitions
holds some (the first member starts alone; the others join as their processes come up) to
the last offset committed, and the events committed in between; events/s; each member's
CPU while it ran (``time.process_time`` around ``run``) and events; and the stack's CPU
meanwhile (Cassandra, Kafka, Connect, Postgres). The partition count caps the members that
get work (``CQRS_KAFKA_TOPIC_PARTITIONS`` when ``flows.setup`` creates the topics).

Results: bench/results/cdc-scale.json (this run, and the previous run's figures as
``previous``) and cdc-scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from bench.cdc import commit_offsets, cpu_by_part, end_offsets, write_backlog
from bench.history import save_with_previous
from support.cdc_probe import members_with_partitions
from tasks.adapters import kafka, scylla
from tasks.cdc.consumer import CdcConsumer
from tasks.cdc.options import CdcOptions
from tasks.settings import Settings, get_settings

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
STACK_PARTS = ("cassandra", "kafka", "kafka connect + debezium", "postgres")


# ----------------------------------------------------------------------------- one member


def member(group: str, batch_size: int, idle_exit_s: float) -> dict[str, Any]:
    """A consumer process of ``group``: drains until the parent stops it (SIGTERM), then
    reports its CPU and counts."""
    settings = get_settings()
    options = CdcOptions(batch_size=batch_size, report_interval_s=5.0, idle_exit_s=idle_exit_s)
    with scylla.session(settings.scylla, settings.scylla.keyspace) as session:
        ks = settings.kafka.model_copy(update={"consumer_group": group})
        consumer = CdcConsumer(scylla.ScyllaWriter(session, settings.scylla), options, ks)
        # The parent stops the members once the group has committed the whole backlog.
        signal.signal(signal.SIGTERM, lambda *_: consumer.stop())
        cpu0, t0 = time.process_time(), time.monotonic()
        result = consumer.run()
        cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
    return {
        "messages": result.messages,
        "mutations": result.mutations,
        "cpu_s": round(cpu, 3),
        "run_s": round(wall, 3),
        "stopped_by": result.stopped_by,
    }


# ----------------------------------------------------------------------------- the group


def committed(settings: Settings, group: str, tps: list[TopicPartition]) -> int:
    c = Consumer(kafka.consumer_config(settings.kafka, **{"group.id": group}))
    try:
        return sum(max(tp.offset, 0) for tp in c.committed(tps, timeout=10))
    finally:
        c.close()


def drain(
    settings: Settings,
    members: int,
    start: dict[tuple[str, int], int],
    end: dict[tuple[str, int], int],
    batch_size: int,
) -> dict[str, Any]:
    group = f"bench-scale-{members}-{uuid.uuid4().hex[:8]}"
    commit_offsets(settings, group, start)
    tps = [TopicPartition(t, p) for (t, p) in start]
    first, last = sum(start.values()), sum(end.values())
    cmd = [sys.executable, "-m", "bench.cdc_scale", "--member", group, "--batch-size"]
    cmd += [str(batch_size)]
    cpu0 = cpu_by_part()
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(members)
    ]
    wanted = min(members, len(tps) // max(1, len(kafka.change_topics(settings.kafka))))
    began = done = None
    began_at = first
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        now_committed = committed(settings, group, tps)
        now = time.monotonic()
        # The clock starts once every member that can get partitions has them: the first
        # member starts alone and the others join as their processes come up.
        if (
            began is None
            and now_committed > first
            and members_with_partitions(settings.kafka, group) >= wanted
        ):
            began, began_at = now, now_committed
        if now_committed >= last:
            done = now
            break
        time.sleep(0.1)
    cpu1 = cpu_by_part()
    for p in procs:
        p.send_signal(signal.SIGTERM)
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        outs.append(json.loads(out.strip().splitlines()[-1]))
    if began is None or done is None:
        raise RuntimeError(
            f"{members} members did not drain the backlog with all of them working (the "
            f"backlog may be too small for them to join in time: raise --turns): {outs}"
        )
    seconds = done - began
    events = last - began_at
    member_cpu = sum(o["cpu_s"] for o in outs)
    messages = sum(o["messages"] for o in outs)
    stack_cpu = {k: round(cpu1.get(k, 0.0) - cpu0.get(k, 0.0), 2) for k in STACK_PARTS}
    return {
        "members": members,
        "members_with_work": sum(1 for o in outs if o["messages"]),
        "events": events,
        "seconds": round(seconds, 2),
        "events_per_s": round(events / seconds),
        "consumer_cpu_us_per_event": round(member_cpu / messages * 1e6, 1),
        "consumer_cpu_share_of_a_core": round(member_cpu / seconds, 2),
        "stack_cpu_s": stack_cpu,
        "stack_cpu_share_of_a_core": round(sum(stack_cpu.values()) / seconds, 2),
        "per_member": outs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench.cdc_scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--members", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--turns", type=int, default=100_000, help="backlog: 2 events a turn")
    ap.add_argument("--batch-size", type=int, default=2000)
    # Only a safety net: a rebalance can stall a member for seconds, so members are stopped
    # by the parent, not by idling.
    ap.add_argument("--idle-exit-s", type=float, default=120.0, help=argparse.SUPPRESS)
    ap.add_argument("--member", metavar="GROUP", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS / "cdc-scale.json")
    a = ap.parse_args()
    if a.member:
        print(json.dumps(member(a.member, a.batch_size, a.idle_exit_s)), flush=True)
        return

    settings = get_settings()
    partitions = len(end_offsets(settings)) // max(1, len(kafka.change_topics(settings.kafka)))
    start = end_offsets(settings)
    events = write_backlog(settings, a.turns)
    deadline = time.monotonic() + 600
    while sum((end := end_offsets(settings)).values()) - sum(start.values()) < events:
        if time.monotonic() > deadline:
            raise RuntimeError("Debezium did not publish the backlog within 600 s")
        time.sleep(1)
    print(f"backlog: {sum(end.values()) - sum(start.values()):,} events published", flush=True)
    runs = []
    for n in a.members:
        r = drain(settings, n, start, end, a.batch_size)
        runs.append(r)
        print(
            f"{n} member(s), {r['members_with_work']} with work: {r['events_per_s']:,} events/s, "
            f"consumer {r['consumer_cpu_us_per_event']} µs/event, stack "
            f"{r['stack_cpu_share_of_a_core']} of a core",
            flush=True,
        )
    result = {
        "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "partitions_per_topic": partitions,
        "turns": a.turns,
        "batch_size": a.batch_size,
        "runs": runs,
    }
    print(save_with_previous(a.out, result, markdown))


def markdown(r: dict[str, Any], previous: dict[str, Any] | None) -> str:
    before = {p["members"]: p for p in (previous or {}).get("runs", [])}
    lines = [
        "# CDC scale-out (python -m bench.cdc_scale)",
        "",
        f"{r['at']}, {r['machine']['cpus']} CPUs; one backlog of {r['turns']:,} turns "
        f"({r['runs'][0]['events']:,} events measured) drained by each member count in a new "
        f"group; {r['partitions_per_topic']} partitions per topic; batches of "
        f"{r['batch_size']}.",
        "",
        "| members (with work) | events/s | vs 1 member | consumer µs/event | consumers' "
        "share of a core | stack's share of a core | events/s before |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    one = r["runs"][0]["events_per_s"]
    for x in r["runs"]:
        was = before.get(x["members"])
        lines.append(
            f"| {x['members']} ({x['members_with_work']}) | {x['events_per_s']:,} | "
            f"{x['events_per_s'] / one:.2f} | {x['consumer_cpu_us_per_event']} | "
            f"{x['consumer_cpu_share_of_a_core']} | {x['stack_cpu_share_of_a_core']} | "
            f"{'-' if was is None else format(was['events_per_s'], ',')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

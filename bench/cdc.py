"""CDC benchmark (not a test): end-to-end latency at fixed write rates, the highest rate the
whole path sustains, and the consumer's rate draining a backlog against a bare scylla-driver
loop writing the same mutations with the same prepared statements.

    .venv/bin/python -m bench.cdc [--rates 200 1000 2000 3000] [--seconds 20] [--backlog 50000]
                                    [--soak-seconds 600] [--soak-rate 2000] [--warm-up-s 60]

Needs the local stack with the connector registered (`make schemas`). Results go to
bench/results/cdc.json (this run and the previous one) and cdc.md, the tables also on stdout.
``--backlog 0`` skips the backlog run. Each rate reports CPU µs per event of every part of the
path and the slope of the consumer's lag while writing (flat: about 0).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cassandra.concurrent import execute_concurrent
from confluent_kafka import Consumer, TopicPartition

from bench.history import save_with_previous
from bench.proc import proc_stat
from support import cdc_probe
from tasks.adapters import kafka, postgres, scylla
from tasks.cdc.consumer import CdcConsumer
from tasks.cdc.options import CdcOptions
from tasks.core.debezium import decode_message
from tasks.core.metrics import MetricsReport, percentile
from tasks.core.projection import project
from tasks.settings import Settings, get_settings

RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- load


def paced_writer(settings: Settings, rate_events: int, seconds: float, user: str, out: Any) -> None:
    """Write at a fixed rate of change events: each human turn insert is 2 events (the turn
    and the session header the trigger updates). Commits every 10 ms."""
    sessions = [uuid.uuid4() for _ in range(500)]
    turns_per_s = rate_events / 2
    with postgres.connect("app", settings.postgres) as conn:
        with conn.transaction():
            for s in sessions:
                conn.execute(
                    "INSERT INTO sessions (id, user_id, title) VALUES (%s, %s, 'b')",
                    (s, uuid.UUID(user)),
                )
        start = time.monotonic()
        written, i = 0, 0
        while (now := time.monotonic()) - start < seconds:
            due = int((now - start) * turns_per_s) - written
            if due > 0:
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO human_turns (id, session_id, content) VALUES (%s, %s, %s)",
                        [
                            (uuid.uuid4(), sessions[(i + k) % len(sessions)], f"m{i + k}")
                            for k in range(due)
                        ],
                    )
                conn.commit()
                written += due
                i += due
            time.sleep(0.01)
        out.put(written * 2 / (time.monotonic() - start))
        # Stay alive, connection open, while the parent reads the CPU time of this process
        # and of its Postgres backend.
        time.sleep(1.0)


def write_backlog(settings: Settings, turns: int) -> int:
    """A backlog written in bulk by SQL (each turn also updates its session: 2 events).
    As the app role, which may not create a temporary table (migration 0014)."""
    tag = f"backlog {uuid.uuid4().hex[:8]} "
    with postgres.connect("admin", settings.postgres) as conn:
        conn.execute("SET ROLE cqrs_app")
        n_sessions = max(1, turns // 20)
        conn.execute(
            "INSERT INTO sessions (id, user_id, title) SELECT gen_random_uuid(), "
            "gen_random_uuid(), %s || g FROM generate_series(1, %s) g",
            (tag, n_sessions),
        )
        conn.execute(
            "INSERT INTO human_turns (id, session_id, content) SELECT gen_random_uuid(), bs.id, "
            "'backlog turn ' || g FROM generate_series(1, %s) g JOIN "
            "(SELECT id, row_number() OVER () AS n FROM sessions WHERE title LIKE %s) bs "
            "ON bs.n = 1 + g %% %s",
            (turns, tag + "%", n_sessions),
        )
        conn.commit()
    return n_sessions + 2 * turns


# ----------------------------------------------------------------------------- consumer


def end_offsets(settings: Settings) -> dict[tuple[str, int], int]:
    c = Consumer(kafka.consumer_config(settings.kafka, **{"group.id": f"bench-{uuid.uuid4()}"}))
    try:
        return {
            (tp.topic, tp.partition): tp.offset
            for tp in cdc_probe.end_offsets(c, kafka.change_topics(settings.kafka))
        }
    finally:
        c.close()


def commit_offsets(settings: Settings, group: str, offsets: dict[tuple[str, int], int]) -> None:
    c = Consumer(kafka.consumer_config(settings.kafka, **{"group.id": group}))
    c.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False)
    c.close()


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_consumer(
    settings: Settings,
    group: str,
    options: CdcOptions,
    reports: list[MetricsReport],
    rss: list[float] | None = None,
    samples: list[tuple[float, float]] | None = None,
) -> Any:
    with scylla.session(settings.scylla, settings.scylla.keyspace) as session:
        ks = settings.kafka.model_copy(update={"consumer_group": group})
        consumer = CdcConsumer(scylla.ScyllaWriter(session, settings.scylla), options, ks)
        return consumer, consumer.run(report=_reporter(consumer, reports, rss, samples))


def _reporter(
    consumer: CdcConsumer,
    reports: list[MetricsReport],
    rss: list[float] | None,
    samples: list[tuple[float, float]] | None,
) -> Callable[[MetricsReport], None]:
    """The consumer's report callback: keeps the reports (and the RSS, and with ``samples``
    every event's latency) for the results."""
    if samples is not None:
        # Keep every (time, latency) too: the whole run's percentiles, not per interval.
        record = consumer.metrics.record_batch

        def record_and_keep(messages: int, changes: int, dead: int, ts: list[int]) -> None:
            now = time.time()
            samples.extend((now, (now * 1e6 - t) / 1000) for t in ts)
            record(messages, changes, dead, ts)

        consumer.metrics.record_batch = record_and_keep  # type: ignore[method-assign,assignment]

    def report(rep: MetricsReport) -> None:
        reports.append(rep)
        if rss is not None:
            rss.append(rss_mib())

    return report


# Which process is which part of the path, by command line.
_PARTS = (
    ("ConnectDistributed", "kafka connect + debezium"),
    ("kafka.Kafka", "kafka"),
    ("CassandraDaemon", "cassandra"),
    ("prefect", "prefect server"),
    ("postgres", "postgres"),
)


def cpu_by_part() -> dict[str, float]:
    """CPU seconds used so far by each part of the path (processes alive now): the stack's
    services, this process (the consumer) and its children (the load writer)."""
    me = os.getpid()
    out: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = proc_stat(entry.name)
        except OSError:
            continue
        part = (
            "consumer (bench process)"
            if stat.pid == me
            else "load writer"
            if stat.ppid == me
            else next((name for key, name in _PARTS if key in cmd), None)
        )
        if part:
            out[part] = out.get(part, 0.0) + stat.cpu_s
    return out


def fixed_rate(
    settings: Settings, rate: int, seconds: float, report_s: float = 1.0, keep_samples: bool = True
) -> dict[str, Any]:
    """Write ``rate`` events/s for ``seconds`` with a consumer running. ``keep_samples``
    keeps every event's latency for whole-run percentiles; a long soak does not (a million
    samples would grow the very process whose memory it watches), and reports the
    per-interval percentiles instead."""
    group = f"bench-rate-{uuid.uuid4().hex[:8]}"
    commit_offsets(settings, group, end_offsets(settings))
    reports: list[MetricsReport] = []
    rss: list[float] = []
    samples: list[tuple[float, float]] = []
    q: mp.Queue[float] = mp.Queue()
    writer = mp.Process(target=paced_writer, args=(settings, rate, seconds, str(uuid.uuid4()), q))
    opts = CdcOptions(report_interval_s=report_s, max_seconds=seconds + 15, idle_exit_s=5)
    t = threading.Thread(
        target=lambda: run_consumer(
            settings, group, opts, reports, rss, samples if keep_samples else None
        )
    )
    t.start()
    time.sleep(2)  # joined the group, partitions assigned
    writer.start()
    started = time.time()
    time.sleep(min(2.0, seconds / 4))  # past the start-up
    cpu0, cpu_t0 = cpu_by_part(), time.monotonic()
    achieved = q.get()
    cpu1 = cpu_by_part()  # the writer is still alive: it exits after reporting
    cpu_span = time.monotonic() - cpu_t0
    writer.join()
    t.join()
    # Latency of the steady part: skip the first report (warm-up) and the drain at the end.
    steady = [r for r in reports[1:] if r.events > 0]
    p50s = [r.latency_p50_ms for r in steady if r.latency_p50_ms is not None]
    p99s = [r.latency_p99_ms for r in steady if r.latency_p99_ms is not None]
    lag_at_end_of_writes = max(
        (r.total_lag for r in steady[: int(seconds / report_s) - 1]), default=0
    )
    # Whole-run percentiles of commit → applied, after a 2 s warm-up.
    steady_lat = sorted(ms for at, ms in samples if at >= started + 2)
    shares = {k: (cpu1[k] - cpu0.get(k, 0.0)) / cpu_span for k in sorted(cpu1)}
    writing = [r.total_lag for r in reports[1 : max(2, int(seconds / report_s) - 1)]]
    return {
        "target_events_per_s": rate,
        "overall_p50_ms": round(percentile(steady_lat, 0.5), 1) if steady_lat else None,
        "overall_p99_ms": round(percentile(steady_lat, 0.99), 1) if steady_lat else None,
        "samples": len(steady_lat),
        "achieved_write_events_per_s": round(achieved, 1),
        "median_interval_p50_ms": round(percentile(sorted(p50s), 0.5), 1) if p50s else None,
        "worst_interval_p99_ms": round(max(p99s), 1) if p99s else None,
        "max_lag_events": lag_at_end_of_writes,
        "kept_up": bool(p99s) and max(p99s) < 1000 and lag_at_end_of_writes < rate,
        # Share of one core each part used while the writer ran (from /proc).
        "cpu_share_of_a_core": {k: round(v, 2) for k, v in shares.items()},
        # The same as CPU µs per change event written (issue #13: per-unit costs).
        "cpu_us_per_event": {
            k: round(v * 1e6 / achieved, 1) if achieved else None for k, v in shares.items()
        },
        # Least-squares slope of the lag over the reports while writing: ~0 when it is flat.
        "lag_slope_events_per_min": lag_slope(writing, report_s),
        # Process RSS (the consumer; the writer is another process) at each report.
        "rss_mib_first_last_max": [round(rss[0], 1), round(rss[-1], 1), round(max(rss), 1)]
        if rss
        else None,
        # One value per report: is the lag (or the memory) growing over the run?
        "lag_per_report": [r.total_lag for r in reports],
        "rss_mib_per_report": [round(x, 1) for x in rss],
    }


def warm_up(settings: Settings, seconds: float) -> None:
    """Unmeasured traffic at 1000 events/s for ``seconds`` (0: none). Right after `make up`
    the services' JIT compilers take a large share of a core under the first minutes of
    traffic: without this the first rate measures mostly compilation, not the path
    (docs/operations.md, "Idle cost and latency")."""
    if seconds:
        fixed_rate(settings, 1000, seconds, keep_samples=False)


def lag_slope(lags: list[int], interval_s: float) -> float | None:
    """Least-squares slope of ``lags`` (one per ``interval_s``), in events per minute."""
    if len(lags) < 3:
        return None
    n = len(lags)
    mean_x, mean_y = (n - 1) / 2, sum(lags) / n
    var = sum((i - mean_x) ** 2 for i in range(n))
    cov = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(lags))
    return round(cov / var * 60 / interval_s, 1)


def backlog(settings: Settings, turns: int) -> dict[str, Any]:
    group = f"bench-backlog-{uuid.uuid4().hex[:8]}"
    start_offsets = end_offsets(settings)
    commit_offsets(settings, group, start_offsets)
    events = write_backlog(settings, turns)
    # Wait until Debezium has published the whole backlog.
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        ends = end_offsets(settings)
        if sum(ends.values()) - sum(start_offsets.values()) >= events:
            break
        time.sleep(1)
    total = sum(ends.values()) - sum(start_offsets.values())

    # 1. Our consumer draining it.
    reports: list[MetricsReport] = []
    t0 = time.perf_counter()
    _consumer, result = run_consumer(
        settings,
        group,
        CdcOptions(max_messages=total, report_interval_s=5, batch_size=5000),
        reports,
    )
    consumer_s = time.perf_counter() - t0

    # 2. The same messages decoded and projected outside the clock, then written by a bare
    #    execute_concurrent loop with the same prepared statements and concurrency.
    c = Consumer(kafka.consumer_config(settings.kafka, **{"group.id": f"bench-{uuid.uuid4()}"}))
    c.assign([TopicPartition(t, p, o) for (t, p), o in start_offsets.items()])
    mutations = []
    seen = 0
    while seen < total:
        for msg in c.consume(5000, 1.0):
            if msg.error():
                continue
            seen += 1
            ev = decode_message(msg.topic() or "", msg.key(), msg.value())
            if ev.change is not None:
                mutations.extend(project(ev.change))
    c.close()
    with scylla.session(settings.scylla, settings.scylla.keyspace) as session:
        writer = scylla.ScyllaWriter(session, settings.scylla)
        bound = writer.bound(mutations)
        t0 = time.perf_counter()
        execute_concurrent(
            session, bound, concurrency=writer.concurrency, raise_on_first_error=True
        )
        bare_s = time.perf_counter() - t0
    return {
        "events": total,
        "mutations": result.mutations,
        "consumer_seconds": round(consumer_s, 2),
        "consumer_events_per_s": round(total / consumer_s),
        "consumer_mutations_per_s": round(result.mutations / consumer_s),
        "bare_loop_seconds": round(bare_s, 2),
        "bare_loop_mutations_per_s": round(len(bound) / bare_s),
        # Same backlog, wall time: the consumer decodes, projects, compacts and writes; the
        # bare loop only writes the backlog's (uncompacted) mutations.
        "ratio_consumer_to_bare": round(bare_s / consumer_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cdc",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rates", type=int, nargs="+", default=[200, 1000, 2000, 3000, 4000])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument(
        "--backlog",
        type=int,
        default=50_000,
        help="turns written as a backlog (2 change events each)",
    )
    parser.add_argument(
        "--soak-seconds",
        type=float,
        default=0,
        help="also run at --soak-rate this long, sampling consumer memory",
    )
    parser.add_argument("--soak-rate", type=int, default=2000, help="events/s of the soak")
    parser.add_argument("--out", type=Path, default=RESULTS / "cdc.json", help="results file")
    parser.add_argument(
        "--warm-up-s",
        type=float,
        default=60,
        help="an unmeasured run at 1000 events/s first (0: none), so that the JVMs' JIT "
        "compilers have compiled the path before the first measured rate",
    )
    args = parser.parse_args()
    if args.warm_up_s < 0:
        parser.error(f"--warm-up-s must be >= 0, got {args.warm_up_s}")
    settings = get_settings()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "machine": f"{platform.node()} {os.cpu_count()} cores",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "warm_up_s": args.warm_up_s,
    }
    warm_up(settings, args.warm_up_s)
    out["fixed_rate"] = []
    for rate in args.rates:
        res = fixed_rate(settings, rate, args.seconds)
        print(res, flush=True)
        out["fixed_rate"].append(res)
    if args.backlog:
        out["backlog"] = backlog(settings, args.backlog)
        print(out["backlog"], flush=True)
    if args.soak_seconds:
        out["soak"] = fixed_rate(
            settings, args.soak_rate, args.soak_seconds, report_s=10.0, keep_samples=False
        )
        print(out["soak"], flush=True)
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(save_with_previous(args.out, out, markdown))


_CONSUMER = "consumer (bench process)"
_STACK = ("kafka", "kafka connect + debezium", "cassandra")


def _rate_row(r: dict[str, Any]) -> str:
    us = r.get("cpu_us_per_event", {})
    stack = sum(r["cpu_share_of_a_core"].get(k, 0.0) for k in _STACK)
    p50 = r["overall_p50_ms"] if r["overall_p50_ms"] is not None else r["median_interval_p50_ms"]
    p99 = r["overall_p99_ms"] if r["overall_p99_ms"] is not None else r["worst_interval_p99_ms"]
    return (
        f"| {r['target_events_per_s']} | {r['achieved_write_events_per_s']} | {p50} | {p99} | "
        f"{r['max_lag_events']} | {r.get('lag_slope_events_per_min')} | {r['kept_up']} | "
        f"{us.get(_CONSUMER, '-')} | {round(stack, 2)} |"
    )


def markdown(current: dict[str, Any], previous: dict[str, Any] | None) -> str:
    """The run as tables: each fixed rate (and the soak), the backlog, and the previous run's
    figures beside this one's."""
    head = (
        "| target events/s | achieved | p50 ms | p99 ms | max lag | lag slope /min | kept up "
        "| consumer µs/event | Kafka + Connect + Cassandra (cores) |\n"
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|"
    )
    lines = [
        "# CDC end to end (python -m bench.cdc)",
        "",
        f"{current['started']}, {current['machine']}, after "
        f"{current.get('warm_up_s', 0):g} s of unmeasured warm-up at 1000 events/s. "
        "Each rate: a paced writer of human turns "
        "(2 change events each) for the run's seconds, a consumer in a new group; latency is "
        "commit → applied. The soak reports per 10 s interval (its p50 and p99 are the median "
        "and the worst of the intervals').",
        "",
        head,
        *(_rate_row(r) for r in current["fixed_rate"]),
    ]
    if "soak" in current:
        lines += ["", "Soak:", "", head, _rate_row(current["soak"])]
    if "backlog" in current:
        b = current["backlog"]
        lines += [
            "",
            f"Backlog of {b['events']} events: consumer {b['consumer_events_per_s']} events/s "
            f"({b['consumer_mutations_per_s']} mutations/s), bare execute_concurrent "
            f"{b['bare_loop_mutations_per_s']} mutations/s, consumer/bare speed ratio "
            f"{b['ratio_consumer_to_bare']}.",
        ]
    if previous:
        before = {r["target_events_per_s"]: r for r in previous.get("fixed_rate", [])}
        lines += [
            "",
            f"Against the previous run ({previous.get('started')}):",
            "",
            "| target events/s | p50 ms now / before | consumer µs/event now / before "
            "| kept up now / before |",
            "|---:|---|---|---|",
        ]
        for r in current["fixed_rate"]:
            b = before.get(r["target_events_per_s"])
            if b is None:
                continue
            us_now = r.get("cpu_us_per_event", {}).get(_CONSUMER)
            share = b["cpu_share_of_a_core"].get(_CONSUMER)
            rate = b["achieved_write_events_per_s"]
            us_before = b.get("cpu_us_per_event", {}).get(_CONSUMER) or (
                round(share * 1e6 / rate, 1) if share is not None and rate else None
            )
            lines.append(
                f"| {r['target_events_per_s']} | {r['overall_p50_ms']} / {b['overall_p50_ms']} "
                f"| {us_now} / {us_before} | {r['kept_up']} / {b['kept_up']} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

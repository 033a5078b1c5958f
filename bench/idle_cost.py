"""Idle cost against latency (not a test): the stack's CPU at rest and the end-to-end
latency at 200 events/s for several values of Debezium's ``poll.interval.ms`` (issue #13,
"idle cost").

    .venv/bin/python -m bench.idle_cost [--poll-ms 5 25 50 100] [--rest-s 60] [--rate-s 30]

Debezium's task sleeps ``poll.interval.ms`` between looks at its queue while nothing is in
it, so the value trades idle wake-ups for latency (a change waits up to one interval before
the task hands it to Kafka). For each value the connector's config is updated in place (the
task restarts), the stack settles, and then:

- at rest: CPU of each service over ``--rest-s`` seconds, from /proc, as a share of a core;
- under load: bench.cdc's fixed-rate run at 200 events/s for ``--rate-s`` seconds (p50/p99
  of commit -> applied, and each part's CPU).

The connector's own config is put back at the end, also after a failure. Needs the local
stack with the connector registered (``make schemas``) and a quiet machine. Results:
bench/results/idle-cost.json (this run and the previous one) and idle-cost.md.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.cdc import cpu_by_part, fixed_rate, warm_up
from bench.history import save_with_previous
from tasks.adapters.kafka_connect import KafkaConnectClient, connector_config
from tasks.settings import get_settings

RESULTS = Path(__file__).resolve().parent / "results"
SERVICES = ("cassandra", "kafka", "kafka connect + debezium", "postgres", "prefect server")


def at_rest(seconds: float) -> dict[str, float]:
    """Each service's share of a core over ``seconds`` with nothing written."""
    before, t0 = cpu_by_part(), time.monotonic()
    time.sleep(seconds)
    after, span = cpu_by_part(), time.monotonic() - t0
    return {k: round((after.get(k, 0.0) - before.get(k, 0.0)) / span, 3) for k in SERVICES}


def measure(poll_ms: int, rest_s: float, rate_s: float, settle_s: float) -> dict[str, Any]:
    settings = get_settings()
    name = settings.kafka.connector_name
    client = KafkaConnectClient(settings.kafka.connect_url)
    config = connector_config(settings) | {"poll.interval.ms": str(poll_ms)}
    client.put_config(name, config)
    client.wait_running(name, timeout=120)
    time.sleep(settle_s)
    rest = at_rest(rest_s)
    load = fixed_rate(settings, 200, rate_s, keep_samples=True)
    share = load["cpu_share_of_a_core"]
    return {
        "poll_interval_ms": poll_ms,
        "at_rest_share_of_a_core": rest,
        "at_rest_total": round(sum(rest.values()), 3),
        "p50_ms": load["overall_p50_ms"],
        "p99_ms": load["overall_p99_ms"],
        "samples": load["samples"],
        "at_200_share_of_a_core": share,
        "kafka_connect_cassandra_at_200": round(
            sum(share.get(k, 0.0) for k in ("kafka", "kafka connect + debezium", "cassandra")), 2
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench.idle_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--poll-ms", type=int, nargs="+", default=[5, 25, 50, 100])
    ap.add_argument("--rest-s", type=float, default=60.0)
    ap.add_argument("--rate-s", type=float, default=30.0)
    ap.add_argument("--settle-s", type=float, default=15.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "idle-cost.json")
    ap.add_argument(
        "--warm-up-s", type=float, default=60.0, help="unmeasured 1000 events/s first (0: none)"
    )
    a = ap.parse_args()
    if a.warm_up_s < 0:
        ap.error(f"--warm-up-s must be >= 0, got {a.warm_up_s}")
    settings = get_settings()
    client = KafkaConnectClient(settings.kafka.connect_url)
    runs = []
    warm_up(settings, a.warm_up_s)
    try:
        for ms in a.poll_ms:
            r = measure(ms, a.rest_s, a.rate_s, a.settle_s)
            runs.append(r)
            print(
                f"poll {ms} ms: at rest {r['at_rest_total']} of a core "
                f"({r['at_rest_share_of_a_core']}); 200 ev/s p50 {r['p50_ms']} ms, p99 "
                f"{r['p99_ms']} ms; Kafka+Connect+Cassandra {r['kafka_connect_cassandra_at_200']}",
                flush=True,
            )
    finally:
        client.put_config(settings.kafka.connector_name, connector_config(settings))
        client.wait_running(settings.kafka.connector_name, timeout=120)
    result = {
        "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpus": os.cpu_count(),
        "configured_poll_interval_ms": connector_config(settings).get("poll.interval.ms"),
        "rest_s": a.rest_s,
        "rate_s": a.rate_s,
        "runs": runs,
    }
    print(save_with_previous(a.out, result, markdown))


def markdown(r: dict[str, Any], previous: dict[str, Any] | None) -> str:
    before = {p["poll_interval_ms"]: p for p in (previous or {}).get("runs", [])}
    lines = [
        "# Idle cost against latency (python -m bench.idle_cost)",
        "",
        f"{r['at']}, {r['cpus']} CPUs; at rest over {r['rest_s']:.0f} s, then 200 events/s "
        f"for {r['rate_s']:.0f} s; the connector is configured with poll.interval.ms = "
        f"{r['configured_poll_interval_ms']}.",
        "",
        "| poll.interval.ms | stack at rest (share of a core) | of which Connect | p50 ms | "
        "p99 ms | Kafka + Connect + Cassandra at 200 ev/s | at rest before |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["runs"]:
        was = before.get(x["poll_interval_ms"])
        lines.append(
            f"| {x['poll_interval_ms']} | {x['at_rest_total']} | "
            f"{x['at_rest_share_of_a_core']['kafka connect + debezium']} | {x['p50_ms']} | "
            f"{x['p99_ms']} | {x['kafka_connect_cassandra_at_200']} | "
            f"{'-' if was is None else was['at_rest_total']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Dual-write benchmark (not a test): what the Scylla step costs a user-facing call, and what
it buys in staleness.

    .venv/bin/python -m bench.dual_write [--calls 2000] [--staleness-samples 200]
                                          [--deadline-ms 50] [--keep]

1. latency: ``record_human_turn`` dual-written vs the same call with the policy off
   (Postgres only), interleaved call by call so both see the same load; p50/p99 of the whole
   call and of its Postgres and Scylla parts. After each call (outside the timing) the turn is
   looked up in ``conversation_timeline``: a dual-written turn that succeeded must be there
   (staleness 0 by construction; the check counts exceptions). Then the same request the
   step sent (``ScyllaWriter.batch_request`` of the call's mutations, bound outside the
   timing) is sent again with a bare ``session.execute``: the floor the step is compared to
   (issue #13: step p50 <= 1.3x bare p50).
2. staleness of the CDC path: with a CDC consumer running in-process from the topics' end,
   Postgres-only calls are followed by polling the read model every millisecond until the turn
   shows up: the time from the call's return until it is visible.

Results go to bench/results/dual_write.json and a markdown table on stdout. Needs the local
stack with the connector registered (`make schemas`). Other users of the shared stack load it
too: the figures are for this machine at this moment, not a capacity statement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cassandra.cluster import Session
from cassandra.query import PreparedStatement

from bench.history import save_with_previous
from support.cdc_probe import LocalCdc
from tasks.adapters import scylla
from tasks.adapters.scylla import ScyllaWriter
from tasks.core.metrics import percentile
from tasks.core.timestamps import cql_timestamp, sub_millis
from tasks.core.write_policy import DualWritePolicy, Operation
from tasks.dual_write import service as dw
from tasks.settings import Settings, get_settings

RESULTS = Path(__file__).resolve().parent / "results"
SESSIONS_PER_PATH = 10


def stats(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    if not v:
        return {}
    return {
        "n": len(v),
        "p50": percentile(v, 0.50),
        "p90": percentile(v, 0.90),
        "p99": percentile(v, 0.99),
        "max": v[-1],
        "mean": statistics.fmean(v),
    }


class Lookup:
    """Is one turn in conversation_timeline? A single-row read by full primary key."""

    def __init__(self, cql: Session) -> None:
        self.cql = cql
        self.stmt: PreparedStatement = cql.prepare(
            "SELECT turn_id FROM conversation_timeline "
            "WHERE session_id = ? AND created_at = ? AND created_at_micros = ? AND turn_id = ?"
        )

    def visible(self, r: dw.WriteResult) -> bool:
        turn = r.rows["human_turns"][0]
        created = cql_timestamp(turn["created_at"])
        micros = sub_millis(turn["created_at"].microsecond)
        return (
            self.cql.execute(self.stmt, (r.session_id, created, micros, turn["id"])).one()
            is not None
        )


def latency_phase(
    dual: dw.DualWriteDeps, pg_only: dw.DualWriteDeps, lookup: Lookup, calls: int, warmup: int
) -> dict[str, Any]:
    user = uuid.uuid4()
    paths = {"dual-write": dual, "postgres-only": pg_only}
    sessions = {
        name: [
            dw.create_session(user, f"bench {name}", deps=dual).session_id
            for _ in range(SESSIONS_PER_PATH)
        ]
        for name in paths
    }
    wall: dict[str, list[float]] = {p: [] for p in paths}
    pg_ms: dict[str, list[float]] = {p: [] for p in paths}
    scylla_ms: list[float] = []
    failed: list[str] = []
    visible_now = {p: 0 for p in paths}
    missing_after_success = 0
    bare_ms: list[float] = []
    bare_after_commit_ms: list[float] = []
    bare = ScyllaWriter(lookup.cql, get_settings().scylla)
    pending = None  # the last dual-written request, bound, for the next Postgres-only call
    for i in range(warmup + calls):
        for name, deps in paths.items():
            sid = sessions[name][i % SESSIONS_PER_PATH]
            t0 = time.perf_counter()
            r = dw.record_human_turn(sid, f"bench message {i} on the {name} path", deps=deps)
            elapsed = (time.perf_counter() - t0) * 1000
            if name == "postgres-only" and pending is not None:
                # The same request again, right after a commit as the step runs: every commit
                # wakes Debezium, Kafka and Postgres' walsender on the same two cores.
                t1 = time.perf_counter()
                lookup.cql.execute(pending)
                if i >= warmup:
                    bare_after_commit_ms.append((time.perf_counter() - t1) * 1000)
                pending = None
            if name == "dual-write" and r.read_model_updated:
                pending = bare.batch_request(r.mutations)  # same statements, same stamps
            if i < warmup:
                continue
            seen = lookup.visible(r)  # right after the return, outside the timing
            visible_now[name] += seen
            wall[name].append(elapsed)
            pg_ms[name].append(r.postgres_ms)
            if name == "dual-write":
                if r.read_model_updated:
                    scylla_ms.append(r.scylla_ms or 0.0)
                    missing_after_success += not seen
                    t1 = time.perf_counter()
                    lookup.cql.execute(pending)
                    bare_ms.append((time.perf_counter() - t1) * 1000)
                else:
                    failed.append(r.error or "?")
    return {
        "sessions": [str(s) for ss in sessions.values() for s in ss],
        "call_ms": {p: stats(v) for p, v in wall.items()},
        "postgres_ms": {p: stats(v) for p, v in pg_ms.items()},
        "scylla_step_ms": stats(scylla_ms),
        "bare_execute_ms": stats(bare_ms),
        "bare_execute_after_commit_ms": stats(bare_after_commit_ms),
        "dual_write_failures": len(failed),
        "dual_write_failure_examples": sorted(set(failed))[:3],
        "visible_right_after_call": visible_now,
        "dual_written_but_not_visible": missing_after_success,
    }


def staleness_phase(
    settings: Settings,
    dual: dw.DualWriteDeps,
    pg_only: dw.DualWriteDeps,
    lookup: Lookup,
    samples: int,
    timeout_s: float = 30.0,
) -> dict[str, Any]:
    user = uuid.uuid4()
    sid_cdc = dw.create_session(user, "bench staleness cdc", deps=dual).session_id
    sid_dual = dw.create_session(user, "bench staleness dual", deps=dual).session_id
    cdc_ms: list[float] = []
    dual_ms: list[float] = []
    not_seen = 0
    with LocalCdc(settings):
        # The first change waits for the new consumer group's partition assignment: not CDC
        # latency, so it is not counted.
        for i in range(samples + 1):
            r = dw.record_human_turn(sid_cdc, f"staleness sample {i}", deps=pg_only)
            returned = time.perf_counter()
            while not lookup.visible(r):
                if time.perf_counter() - returned > timeout_s:
                    not_seen += 1
                    break
                time.sleep(0.001)
            else:
                if i > 0:
                    cdc_ms.append((time.perf_counter() - returned) * 1000)
            d = dw.record_human_turn(sid_dual, f"staleness sample {i}", deps=dual)
            returned = time.perf_counter()
            if d.read_model_updated:
                # By construction: if the first read has it, the staleness is 0.
                dual_ms.append(
                    0.0 if lookup.visible(d) else (time.perf_counter() - returned) * 1000
                )
    return {
        "sessions": [str(sid_cdc), str(sid_dual)],
        "cdc_ms": stats(cdc_ms),
        "cdc_not_visible_within_s": {"timeout_s": timeout_s, "count": not_seen},
        "dual_write_ms": stats(dual_ms),
        "dual_write_nonzero": sum(1 for v in dual_ms if v > 0),
    }


def markdown(out: dict[str, Any]) -> str:
    lat, st = out["latency"], out["staleness"]

    def row(name: str, s: dict[str, float], extra: str = "") -> str:
        return (
            f"| {name} | {s.get('p50', float('nan')):.2f} | {s.get('p99', float('nan')):.2f} "
            f"| {s.get('max', float('nan')):.2f} | {extra} |"
        )

    d, p = lat["call_ms"]["dual-write"], lat["call_ms"]["postgres-only"]
    step_over_bare = lat["scylla_step_ms"]["p50"] / lat["bare_execute_ms"]["p50"]
    after_commit = lat.get("bare_execute_after_commit_ms", {})
    step_over_after = lat["scylla_step_ms"]["p50"] / after_commit.get("p50", float("nan"))
    return "\n".join(
        [
            f"### Dual-write, {out['config']['calls']} calls per path, deadline "
            f"{out['config']['deadline_ms']} ms\n",
            "| measure (ms) | p50 | p99 | max | note |",
            "|---|---|---|---|---|",
            row(
                "call, dual-write", d, f"{lat['dual_write_failures']} Scylla steps failed/timed out"
            ),
            row("call, Postgres only", p),
            row("  Postgres part, dual-write", lat["postgres_ms"]["dual-write"]),
            row("  Scylla step (projection + write), when it succeeded", lat["scylla_step_ms"]),
            row(
                "  bare session.execute of the same request",
                lat["bare_execute_ms"],
                f"step/bare p50 {step_over_bare:.2f}x",
            ),
            row(
                "  the same, right after a Postgres-only call's commit",
                after_commit,
                f"step/bare p50 {step_over_after:.2f}x",
            ),
            f"| cost of the Scylla step (p50 / p99 difference) | {d['p50'] - p['p50']:.2f} | "
            f"{d['p99'] - p['p99']:.2f} | | |",
            row(
                "staleness, dual-write",
                st["dual_write_ms"],
                f"{st['dual_write_nonzero']} non-zero; "
                f"{lat['dual_written_but_not_visible']} dual-written turns missing right after "
                f"the call",
            ),
            row(
                "staleness, CDC path (return → visible)",
                st["cdc_ms"],
                f"{st['cdc_not_visible_within_s']['count']} not visible within "
                f"{st['cdc_not_visible_within_s']['timeout_s']:.0f} s",
            ),
            f"\nVisible right after the call (latency phase): {lat['visible_right_after_call']}",
        ]
    )


def cleanup(deps: dw.DualWriteDeps, session_ids: list[str]) -> None:
    # Left to CDC (policy off for deletes): no point spending the benchmark's own deadline.
    for sid in session_ids:
        dw.delete_session(sid, deps=deps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.dual_write",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--calls", type=int, default=2000, help="measured calls per path")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--staleness-samples", type=int, default=200)
    ap.add_argument("--deadline-ms", type=float, default=DualWritePolicy().deadline_ms)
    ap.add_argument("--keep", action="store_true", help="keep the benchmark's sessions")
    ap.add_argument("--out", type=Path, default=RESULTS / "dual_write.json", help="results file")
    args = ap.parse_args(argv)

    policy = DualWritePolicy(deadline_ms=args.deadline_ms)
    settings = get_settings()
    with (
        contextlib.closing(dw.connect_deps(settings, policy, pool_size=2)) as dual,
        scylla.session(settings.scylla, settings.scylla.keyspace) as cql,
    ):
        pg_only = dual.with_policy(policy.model_copy(update={op.value: False for op in Operation}))
        lookup = Lookup(cql)
        started = datetime.now(UTC).isoformat()
        latency = latency_phase(dual, pg_only, lookup, args.calls, args.warmup)
        staleness = staleness_phase(settings, dual, pg_only, lookup, args.staleness_samples)
        out = {
            "benchmark": "dual_write",
            "started_at": started,
            "config": {
                "calls": args.calls,
                "warmup": args.warmup,
                "staleness_samples": args.staleness_samples,
                "deadline_ms": args.deadline_ms,
                "operation": "record_human_turn",
                "sessions_per_path": SESSIONS_PER_PATH,
            },
            "host": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "latency": latency,
            "staleness": staleness,
        }
        if not args.keep:
            cleanup(pg_only, latency["sessions"] + staleness["sessions"])
    out = json.loads(json.dumps(out, default=str))  # datetimes and UUIDs as text
    print(save_with_previous(args.out, out, with_previous))
    return 0


def with_previous(out: dict[str, Any], previous: dict[str, Any] | None) -> str:
    """The run's table, then its p50s beside the previous results file's (a regression
    shows; machines differ between sessions, so compare ratios rather than milliseconds)."""
    md = markdown(out)
    if previous is None:
        return md + "\n"
    lines = ["\n| p50 (ms) | now | previous | now/previous |", "|---|---|---|---|"]
    for label, path in [
        ("call, dual-write", ("call_ms", "dual-write")),
        ("call, Postgres only", ("call_ms", "postgres-only")),
        ("Scylla step", ("scylla_step_ms",)),
        ("bare execute", ("bare_execute_ms",)),
        ("bare execute after a commit", ("bare_execute_after_commit_ms",)),
    ]:
        now_s, prev_s = out["latency"], previous.get("latency", {})
        for key in path:
            now_s, prev_s = now_s.get(key, {}), prev_s.get(key, {})
        now, prev = now_s.get("p50"), prev_s.get("p50")
        ratio = f"{now / prev:.2f}x" if now and prev else "-"
        prev_text = f"{prev:.2f}" if prev else "-"
        lines.append(f"| {label} | {now:.2f} | {prev_text} | {ratio} |")
    return md + "\n" + "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

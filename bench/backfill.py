"""Backfill benchmark (not a test): rows/s and peak RSS of the snapshot stage, the load stage
and the whole backfill flow, and, on the same rows, `cqlsh COPY FROM` loading
conversation_timeline from a CSV, for a reference rate.

    .venv/bin/python -m bench.backfill [--turns 1000000] [--turns-per-session 20]
        [--sessions-per-user 5] [--steps-per-agent-turn 1] [--chunk-size 50000]
        [--readers 4] [--concurrency 128] [--workers 1] [--methods cql sstable] [--keep]

Needs the local stack (`make schemas`) and PREFECT_API_URL for the flow stage. Results go to
bench/results/backfill-<turns>.json and a markdown table on stdout.

Isolation on a shared stack: the generated rows live in a Postgres schema of their own
(tables made LIKE the write model's, indexes included), reached through ``search_path``
(PGOPTIONS) by the stage processes. That schema is not in the Debezium publication, so a
million generated rows do not flood CDC, and dropping it is instant. Loads go to keyspaces
of their own, dropped at the end (unless --keep).

Each stage runs in a subprocess of its own, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from psycopg import sql

from bench.history import save_with_previous
from bench.proc import proc_stat
from tasks.adapters import postgres, scylla
from tasks.settings import PostgresSettings, ScyllaSettings, get_settings

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
TABLES = ("sessions", "human_turns", "agent_turns", "steps")


# ----------------------------------------------------------------------------- data


def generate(
    schema: str,
    turns: int,
    turns_per_session: int,
    sessions_per_user: int,
    steps_per_agent_turn: int,
    settings: PostgresSettings,
) -> dict[str, int]:
    """N turns across sessions and users, in SQL (generate_series) as the admin role. Turns
    alternate human/agent; session headers are set as the write model's triggers would."""
    sessions = -(-turns // turns_per_session)
    users = -(-sessions // sessions_per_user)
    s = sql.Identifier(schema)
    with postgres.connect("admin", settings) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(s))
        for t in TABLES:
            conn.execute(
                sql.SQL("CREATE TABLE {}.{} (LIKE public.{} INCLUDING ALL)").format(
                    s, sql.Identifier(t), sql.Identifier(t)
                )
            )
        conn.execute(
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                s, sql.Identifier(settings.reader_user)
            )
        )
        conn.execute(
            sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(
                s, sql.Identifier(settings.reader_user)
            )
        )
        conn.execute(sql.SQL("SET search_path = {}").format(s))
        conn.execute(
            "CREATE TEMP TABLE bench_users AS SELECT row_number() OVER () AS u, "
            "gen_random_uuid() AS id FROM generate_series(1, %s)",
            (users,),
        )
        # Session n: T turns, turn k at created_at + 30 s * k; the last one is the header's.
        conn.execute(
            """
            CREATE TEMP TABLE bench_sessions AS
            SELECT n, gen_random_uuid() AS id, u.id AS user_id,
                   now() - interval '90 days' + (n * interval '37 seconds') AS created_at,
                   least(%(t)s, %(turns)s - (n - 1) * %(t)s) AS nturns
              FROM generate_series(1, %(sessions)s) n
              JOIN bench_users u ON u.u = 1 + (n - 1) %% %(users)s""",
            {"t": turns_per_session, "turns": turns, "sessions": sessions, "users": users},
        )

        def content(k: str) -> str:  # ~150 characters, no quotes or commas (cqlsh's CSV)
            return (
                f"'turn ' || {k} || ' of session ' || s.n || ' ' || "
                f"repeat(md5(s.id::text || {k}), 4)"
            )

        conn.execute(f"""
            INSERT INTO sessions (id, user_id, title, created_at, updated_at, last_message,
                                  last_message_at, turn_count)
            SELECT s.id, s.user_id, 'session ' || s.n, s.created_at, clock_timestamp(),
                   left({content("s.nturns")}, 500),
                   s.created_at + s.nturns * interval '30 seconds', s.nturns
              FROM bench_sessions s""")
        for table, parity, extra_cols, extra_vals in (
            ("human_turns", 1, "", ""),
            ("agent_turns", 0, ", model", ", 'bench-model'"),
        ):
            conn.execute(f"""
                INSERT INTO {table} (id, session_id, content{extra_cols}, created_at, updated_at)
                SELECT gen_random_uuid(), s.id, {content("k")}{extra_vals},
                       s.created_at + k * interval '30 seconds', clock_timestamp()
                  FROM bench_sessions s, generate_series(1, s.nturns) k
                 WHERE k % 2 = {parity}""")
        conn.execute(
            """
            INSERT INTO steps (id, agent_turn_id, session_id, kind, payload, created_at,
                               updated_at)
            SELECT gen_random_uuid(), a.id, a.session_id, 'tool',
                   jsonb_build_object('step', j, 'tool', 'search', 'q', md5(a.id::text)),
                   a.created_at + j * interval '1 millisecond', clock_timestamp()
              FROM agent_turns a, generate_series(1, %s) j""",
            (steps_per_agent_turn,),
        )
        counts = {
            t: conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(t))
            ).fetchone()[0]  # type: ignore[index]
            for t in TABLES
        }
        conn.execute(
            sql.SQL("ANALYZE {}.sessions, {}.human_turns, {}.agent_turns, {}.steps").format(
                s, s, s, s
            )
        )
        conn.commit()
    return counts


def drop_schema(schema: str, settings: PostgresSettings) -> None:
    with postgres.connect("admin", settings, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


# ----------------------------------------------------------------------------- stages


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def stage_snapshot(cfg: dict[str, Any]) -> dict[str, Any]:
    from tasks.backfill.snapshot import take_snapshot

    manifest, directory = take_snapshot(
        cfg["root"],
        settings=get_settings().postgres,
        chunk_size=cfg["chunk_size"],
        readers=cfg["readers"],
    )
    assert directory is not None
    size = sum(f.stat().st_size for f in directory.rglob("*.parquet"))
    return {
        "rows": manifest.rows,
        "seconds": manifest.seconds,
        "rows_per_s": manifest.rows / manifest.seconds,
        "chunks": len(manifest.chunks),
        "parquet_mib": round(size / 2**20, 1),
        "snapshot_dir": str(directory),
    }


def stage_load(cfg: dict[str, Any]) -> dict[str, Any]:
    from tasks.backfill.load import load_snapshot

    settings = get_settings()
    with scylla.session(settings.scylla) as session:
        r = load_snapshot(
            cfg["snapshot_dir"],
            session,
            settings.scylla,
            sstable=settings.sstable,
            keyspace=cfg["keyspace"],
            concurrency=cfg["concurrency"],
            workers=cfg["workers"],
            method=cfg["method"],
        )
    timeline = [p for p in r.pairs if p.read_model == "conversation_timeline"]
    t_rows, t_secs = sum(p.rows_written for p in timeline), sum(p.seconds for p in timeline)
    return {
        "rows_read": r.rows_read,
        "rows_written": r.rows_written,
        "seconds": r.seconds,
        "rows_per_s": r.rows_read / r.seconds,
        "writes_per_s": r.rows_written / r.seconds,
        "timeline_rows": t_rows,
        "timeline_seconds": t_secs,
        "timeline_rows_per_s": t_rows / t_secs if t_secs else 0.0,
    }


def stage_flow(cfg: dict[str, Any]) -> dict[str, Any]:
    from flows.backfill import backfill_flow

    started = time.monotonic()
    r = backfill_flow(
        snapshot_root=cfg["root"],
        keyspace=cfg["keyspace"],
        rebuild=True,
        chunk_size=cfg["chunk_size"],
        readers=cfg["readers"],
        concurrency=cfg["concurrency"],
        workers=cfg["workers"],
        method=cfg["method"],
    )
    seconds = time.monotonic() - started
    return {
        "rows": r["rows_read"],
        "rows_written": r["rows_written"],
        "seconds": seconds,
        "rows_per_s": r["rows_read"] / seconds,
        "snapshot_seconds": r["snapshot_seconds"],
        "load_seconds": r["load_seconds"],
    }


STAGES = {"snapshot": stage_snapshot, "load": stage_load, "flow": stage_flow}


def cassandra_cpu_s() -> float | None:
    """CPU seconds the local Cassandra has used so far (user + system), from /proc."""
    try:
        return proc_stat(int((ROOT / ".stack" / "run" / "cassandra.pid").read_text())).cpu_s
    except (OSError, ValueError):
        return None


def run_measured(
    cmd: list[str], cwd: Path, env: dict[str, str] | None = None
) -> tuple[int, str, dict[str, Any]]:
    """Run a command; (exit code, its output, what it cost): wall time, its own CPU and peak
    RSS (wait4: the process and the workers it waited for), and Cassandra's CPU meanwhile."""
    cass0, started = cassandra_cpu_s(), time.monotonic()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        output = out.read()
    cass1 = cassandra_cpu_s()
    cost = {
        "wall_seconds": round(time.monotonic() - started, 3),
        "client_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "cassandra_cpu_s": None if cass0 is None or cass1 is None else round(cass1 - cass0, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
    }
    return proc.returncode, output, cost


def run_stage(name: str, cfg: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    rc, output, cost = run_measured(
        [sys.executable, "-m", "bench.backfill", "--stage", name, "--config", json.dumps(cfg)],
        ROOT,
        env,
    )
    if rc != 0:
        raise RuntimeError(f"stage {name} failed:\n{output[-3000:]}")
    result = dict(json.loads(output.strip().splitlines()[-1]))
    # The stage's own peak (the parent) and its workers' (wait4 gives the largest).
    return {**result, **cost, "peak_rss_mib": max(result["peak_rss_mib"], cost["peak_rss_mib"])}


# ----------------------------------------------------------------------------- cqlsh


def timeline_csv(snapshot_dir: str, path: Path) -> int:
    """conversation_timeline rows of the snapshot's turns, as cqlsh COPY FROM reads them."""
    n = 0
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        for table, role in (("human_turns", "human"), ("agent_turns", "agent")):
            for file in sorted((Path(snapshot_dir) / table).glob("*.parquet")):
                for batch in pq.ParquetFile(file).iter_batches(batch_size=10_000):
                    cols = batch.to_pydict()
                    for i in range(batch.num_rows):
                        at = cols["created_at"][i]
                        out.writerow(
                            [
                                cols["session_id"][i],
                                f"{at:%Y-%m-%d %H:%M:%S}.{at.microsecond // 1000:03d}+0000",
                                at.microsecond % 1000,
                                cols["id"][i],
                                role,
                                cols["content"][i],
                                cols["model"][i] if role == "agent" else "",
                            ]
                        )
                        n += 1
    return n


def cqlsh_copy(csv_path: Path, keyspace: str, rows: int, cfg: ScyllaSettings) -> dict[str, Any]:
    cqlsh = Path(sys.executable).parent / "cqlsh"
    cmd = [
        str(cqlsh),
        cfg.contact_points[0],
        str(cfg.port),
        "--request-timeout",
        "60",
        "-e",
        f"COPY {keyspace}.conversation_timeline (session_id, created_at, created_at_micros, "
        f"turn_id, role, content, model) FROM '{csv_path}' WITH HEADER=false",
    ]
    rc, output, cost = run_measured(cmd, csv_path.parent)
    # "N rows imported from 1 files in 0 day, 0 hour, 1 minute, and 2.5 seconds" (or, in
    # other versions, "in 62.5 seconds")
    m = re.search(r"(\d+) rows imported from \d+ files? in (.*?)seconds", output)
    if m is None or int(m.group(1)) != rows:
        raise RuntimeError(f"cqlsh COPY did not import {rows} rows:\n{output[-2000:]}")
    parts = [float(x) for x in re.findall(r"[\d.]+", m.group(2))]
    copy_s = sum(v * f for v, f in zip(reversed(parts), (1, 60, 3600, 86400), strict=False))
    return {"rows": rows, "seconds": copy_s, "rows_per_s": rows / copy_s, "exit_code": rc, **cost}


# ----------------------------------------------------------------------------- main


def markdown(r: dict[str, Any]) -> str:
    def cpu(stage: dict[str, Any], rows: int, key: str) -> str:
        v = stage.get(key)
        return "-" if v is None or not rows else f"{v * 1e6 / rows:.0f}"

    snap, cq = r["snapshot"], r["cqlsh"]
    rows = [
        (
            "snapshot (Postgres → Parquet)",
            snap["rows"],
            snap["seconds"],
            snap["rows_per_s"],
            snap["peak_rss_mib"],
            snap,
        )
    ]
    for method, m in r["methods"].items():
        load, flow = m["load"], m["flow"]
        rows += [
            (
                f"{method}: load (Parquet → projection → Cassandra), source rows",
                load["rows_read"],
                load["seconds"],
                load["rows_per_s"],
                load["peak_rss_mib"],
                load,
            ),
            (
                f"{method}: whole backfill flow (rebuild: truncate + snapshot + load)",
                flow["rows"],
                flow["seconds"],
                flow["rows_per_s"],
                flow["peak_rss_mib"],
                flow,
            ),
            (
                f"{method}: load, conversation_timeline only",
                load["timeline_rows"],
                load["timeline_seconds"],
                load["timeline_rows_per_s"],
                None,
                None,
            ),
        ]
    rows.append(
        (
            "cqlsh COPY FROM, conversation_timeline",
            cq["rows"],
            cq["seconds"],
            cq["rows_per_s"],
            cq["peak_rss_mib"],
            cq,
        )
    )
    lines = [
        "| stage | rows | seconds | rows/s | peak RSS (MiB) | client CPU µs/row | "
        "Cassandra CPU µs/row |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {a} | {b:,} | {c:.2f} | {d:,.0f} | {'-' if e is None else e} | "
        f"{'-' if st is None else cpu(st, b, 'client_cpu_s')} | "
        f"{'-' if st is None else cpu(st, b, 'cassandra_cpu_s')} |"
        for a, b, c, d, e, st in rows
    ]
    for method, m in r["methods"].items():
        cpu_ratio = load_cpu_vs_cqlsh(r, method)
        lines.append(
            f"\n{method}: whole backfill / cqlsh COPY FROM: "
            f"**{m['ratio_flow_vs_cqlsh']:.2f}x**; conversation_timeline load / "
            f"cqlsh COPY FROM: **{m['ratio_timeline_vs_cqlsh']:.2f}x**; load client CPU per "
            f"written row / COPY's per row: **{'-' if cpu_ratio is None else f'{cpu_ratio:.2f}x'}**"
        )
    return "\n".join(lines)


def load_cpu_vs_cqlsh(r: dict[str, Any], method: str) -> float | None:
    """The issue's measure of the loader's cost: client CPU per row written by the load
    stage over ``cqlsh COPY FROM``'s per row, in the same run."""
    load, cq = r["methods"][method]["load"], r["cqlsh"]
    if not (load.get("client_cpu_s") and cq.get("client_cpu_s")):
        return None
    return float((load["client_cpu_s"] / load["rows_written"]) / (cq["client_cpu_s"] / cq["rows"]))


def with_previous(r: dict[str, Any], previous: dict[str, Any] | None) -> str:
    """The run's table, then its headline figures beside the previous results file's (a
    regression shows; the machine drifts, so the ratios to COPY in one run say more than
    rows/s across runs)."""
    md = markdown(r)
    if previous is None:
        return md + "\n"

    def figures(run: dict[str, Any]) -> dict[str, float | None]:
        out: dict[str, float | None] = {"cqlsh COPY rows/s": run["cqlsh"]["rows_per_s"]}
        for method, m in run.get("methods", {}).items():
            out[f"{method} load rows/s"] = m["load"]["rows_per_s"]
            out[f"{method} whole flow rows/s"] = m["flow"]["rows_per_s"]
            out[f"{method} whole flow / COPY"] = m["ratio_flow_vs_cqlsh"]
            out[f"{method} load CPU per row / COPY's"] = load_cpu_vs_cqlsh(run, method)
        return out

    now, before = figures(r), figures(previous)
    lines = ["\n| figure | now | previous | now/previous |", "|---|---:|---:|---:|"]
    for name, value in now.items():
        prev = before.get(name)
        ratio = f"{value / prev:.2f}x" if value and prev else "-"
        lines.append(
            f"| {name} | {'-' if value is None else f'{value:,.2f}'} | "
            f"{'-' if prev is None else f'{prev:,.2f}'} | {ratio} |"
        )
    return md + "\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench.backfill",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--turns", type=int, default=1_000_000)
    ap.add_argument("--turns-per-session", type=int, default=20)
    ap.add_argument("--sessions-per-user", type=int, default=5)
    ap.add_argument("--steps-per-agent-turn", type=int, default=1)
    ap.add_argument("--chunk-size", type=int, default=50_000)
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--workers", type=int, default=1, help="loader processes")
    ap.add_argument(
        "--methods",
        nargs="+",
        choices=("cql", "sstable"),
        default=["cql", "sstable"],
        help="load methods to measure",
    )
    ap.add_argument("--keep", action="store_true", help="keep the schema, keyspaces, files")
    ap.add_argument("--out", type=Path, help="results file (bench/results/backfill-TURNS.json)")
    ap.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.stage:  # a child process: one stage, one JSON line
        result = STAGES[a.stage](json.loads(a.config))
        print(json.dumps({**result, "peak_rss_mib": round(_peak_rss_mib(), 1)}))
        return

    tag = uuid.uuid4().hex[:8]
    schema, ks_cqlsh = f"bench_backfill_{tag}", f"bench_cqlsh_{tag}"
    keyspaces = {m: f"bench_bf_{m}_{tag}" for m in a.methods}
    work = Path(tempfile.mkdtemp(prefix=f"bench-backfill-{tag}-"))
    env = {**os.environ, "PGOPTIONS": f"-c search_path={schema}"}
    settings = get_settings()
    with scylla.session(settings.scylla) as session:
        try:
            for name in (*keyspaces.values(), ks_cqlsh):
                scylla.migrate(session, settings.scylla.model_copy(update={"keyspace": name}))
            t0 = time.monotonic()
            counts = generate(
                schema,
                a.turns,
                a.turns_per_session,
                a.sessions_per_user,
                a.steps_per_agent_turn,
                settings.postgres,
            )
            gen_s = time.monotonic() - t0
            print(f"generated {counts} in {gen_s:.1f} s (schema {schema})", file=sys.stderr)
            cfg = {
                "root": str(work / "snapshots"),
                "chunk_size": a.chunk_size,
                "readers": a.readers,
                "concurrency": a.concurrency,
                "workers": a.workers,
            }
            snap = run_stage("snapshot", cfg, env)
            print(f"snapshot: {snap}", file=sys.stderr)
            csv_rows = timeline_csv(snap["snapshot_dir"], work / "timeline.csv")
            cq = cqlsh_copy(work / "timeline.csv", ks_cqlsh, csv_rows, settings.scylla)
            print(f"cqlsh: {cq}", file=sys.stderr)
            methods: dict[str, Any] = {}
            for method, ks in keyspaces.items():
                mcfg = {**cfg, "keyspace": ks, "method": method}
                load = run_stage("load", {**mcfg, "snapshot_dir": snap["snapshot_dir"]}, env)
                print(f"{method} load: {load}", file=sys.stderr)
                whole = run_stage("flow", {**mcfg, "root": str(work / f"flow-{method}")}, env)
                print(f"{method} flow: {whole}", file=sys.stderr)
                methods[method] = {
                    "load": load,
                    "flow": whole,
                    "ratio_timeline_vs_cqlsh": load["timeline_rows_per_s"] / cq["rows_per_s"],
                    # The measure: the whole backfill (source rows/s) against cqlsh.
                    "ratio_flow_vs_cqlsh": whole["rows_per_s"] / cq["rows_per_s"],
                }
            result = {
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "params": vars(a) | {"stage": None, "config": None, "out": None},
                "rows": counts,
                "generate_seconds": round(gen_s, 2),
                "snapshot": snap,
                "cqlsh": cq,
                "methods": methods,
            }
            out = a.out or RESULTS / f"backfill-{a.turns}.json"
            result = json.loads(json.dumps(result, default=str))
            print(save_with_previous(out, result, with_previous))
        finally:
            if not a.keep:
                for name in (*keyspaces.values(), ks_cqlsh):
                    session.execute(f"DROP KEYSPACE IF EXISTS {name}", timeout=120)
                drop_schema(schema, settings.postgres)
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

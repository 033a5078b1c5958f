"""Audit benchmark (not a test): what the key-level diff of tasks/audit/diff.py costs against
the floor of reading the same data, clean and with 0.1% drift, and whether its memory stays
flat as the read models grow.

    .venv/bin/python -m bench.audit [--rows 100000 1000000] [--drift 0.001] [--window-s 1]
        [--turns-per-session 20] [--sessions-per-user 5] [--steps-per-agent-turn 1] [--keep]

``--rows``: read-model rows in total across the four read models. With T turns, 20 turns a
session and one step an agent turn, the read models hold T (conversation_timeline) + T/2
(steps_by_turn) + 2 x T/20 (recent_conversations, sessions_by_id) = 1.6 T rows, so T is
``rows / 1.6``. Results go to bench/results/audit.json and .md, the table to stdout.

For each size, in one run:

1. generate the write model in a Postgres schema of its own (bench.backfill.generate: not in
   the Debezium publication), create the audit views of schemas/postgres/0010 in it, take a
   snapshot and load it (cql) into a keyspace of its own;
2. the floor, each in a child process: (a) a bare parallel token-range scan of the read
   models' raw columns in Cassandra (tasks.audit.scan.scan, the audit's concurrency, fetch
   size and ranges, no CAST or function), (b) a bare SELECT of the same columns from the
   write-model tables, streamed through a server-side cursor and dropped; each alone, and
   both at once (two children), after one unmeasured warm-up of both;
3. the audit of the four read models as flows/audit.py runs it (tasks.audit.diff.first_pass
   of each, one model after the other, Postgres and Cassandra at once within each; then one
   ``recheck`` of them all), clean, in a child process;
4. 0.1% of each read model's rows drifted directly in Cassandra (rows deleted, a value
   overwritten with a newer USING TIMESTAMP, extra rows with no source, new partitions and
   existing ones), the audit again, and its differences checked against exactly the keys
   injected (kind, key, and for a stale row the column).

Wall time, CPU (the child's own, from wait4; Cassandra's and the Postgres backend's from
/proc, same machine) and peak RSS (ru_maxrss of the child) for every measured process. The
audit's freshness-window wait (the re-check of extra rows waits ``--window-s`` once, for all
read models) is idle time, reported apart and also taken out in a second ratio.

Isolation as bench.backfill: the children reach the bench schema through ``search_path``
(PGOPTIONS); schema, keyspaces and snapshot files are dropped at the end unless --keep.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from psycopg import sql

from bench.backfill import ROOT, _peak_rss_mib, cassandra_cpu_s, drop_schema, generate
from bench.proc import proc_stat
from tasks.adapters import postgres, scylla
from tasks.core import catalog
from tasks.core.catalog import READ_MODELS
from tasks.settings import PostgresSettings, get_settings

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS_SEEN: set[str] = set()  # the audit settings every child ran with
MIGRATION = ROOT / "schemas" / "postgres" / "0010_audit_fingerprints.sql"
ROWS_PER_TURN = 1.6  # timeline 1 + steps 1/2 + two session-header models 2/20 (defaults)

# The write-model columns each audit view reads (schemas/postgres/0010): the floor's SELECT.
SOURCE_COLUMNS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "recent_conversations": (
        (
            "sessions",
            (
                *("user_id", "created_at", "id", "title", "last_message", "last_message_at"),
                *("turn_count", "updated_at"),
            ),
        ),
    ),
    "conversation_timeline": (
        ("human_turns", ("session_id", "created_at", "id", "content", "updated_at")),
        ("agent_turns", ("session_id", "created_at", "id", "content", "model", "updated_at")),
    ),
    "sessions_by_id": (
        (
            "sessions",
            (
                *("id", "user_id", "title", "created_at", "last_message", "last_message_at"),
                *("turn_count", "updated_at"),
            ),
        ),
    ),
    "steps_by_turn": (
        (
            "steps",
            ("agent_turn_id", "created_at", "id", "session_id", "kind", "payload", "updated_at"),
        ),
    ),
}

# The value a "stale" drift overwrites, per read model (a column that is not the version's).
DRIFT_COLUMN = {
    "recent_conversations": "title",
    "conversation_timeline": "content",
    "sessions_by_id": "last_message",
    "steps_by_turn": "payload",
}


# ----------------------------------------------------------------------------- setup


def create_views(schema: str, settings: PostgresSettings) -> None:
    """The CREATE VIEW statements of migration 0010, in the bench schema (a view binds to
    the tables of the schema it is created in; the functions stay in public)."""
    text = re.sub(r"--[^\n]*", "", MIGRATION.read_text())
    views = [s.strip() for s in text.split(";") if s.strip().startswith("CREATE VIEW")]
    assert len(views) == len(READ_MODELS), views
    s = sql.Identifier(schema)
    with postgres.connect("admin", settings) as conn:
        conn.execute(sql.SQL("SET search_path = {}, public").format(s))
        for v in views:
            conn.execute(v)  # type: ignore[call-overload]
        conn.execute(
            sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(
                s, sql.Identifier(settings.reader_user)
            )
        )


def reader(schema: str, settings: PostgresSettings) -> Any:
    conn = postgres.connect("reader", settings, autocommit=True)
    conn.execute(sql.SQL("SET search_path = {}, public").format(sql.Identifier(schema)))
    return conn


def pg_backend_cpu_s(conn: Any) -> float | None:
    try:
        return proc_stat(conn.info.backend_pid).cpu_s
    except OSError:
        return None


# ----------------------------------------------------------------------------- stages


def stage_snapshot(cfg: dict[str, Any]) -> dict[str, Any]:
    from tasks.backfill.snapshot import take_snapshot

    manifest, directory = take_snapshot(
        cfg["root"], settings=get_settings().postgres, require_slot=False
    )
    assert directory is not None
    return {"rows": manifest.rows, "seconds": manifest.seconds, "snapshot_dir": str(directory)}


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
            method="cql",
        )
    return {"rows_read": r.rows_read, "rows_written": r.rows_written, "seconds": r.seconds}


def stage_audit(cfg: dict[str, Any]) -> dict[str, Any]:
    """The four read models audited as flows/audit.py does: the first pass of each (checksums
    of both sides at once, then the differing buckets), two models at a time, then one
    re-check of what live traffic may explain, after one freshness-window wait for all."""
    from tasks.audit.diff import first_passes, recheck

    settings = get_settings()
    sc = settings.scylla.model_copy(update={"keyspace": cfg["keyspace"]})
    slept = [0.0]

    def sleep(s: float) -> None:
        slept[0] += s
        time.sleep(s)

    started = time.perf_counter()
    n = settings.audit.parallel_read_models
    conns = [postgres.connect("reader", settings.postgres, autocommit=True) for _ in range(n)]
    conn = conns[0]
    with conn:
        pg0 = sum(pg_backend_cpu_s(c) or 0.0 for c in conns)
        with scylla.session(sc) as session:
            results = first_passes(conns, session, sc, list(READ_MODELS), settings.audit)
            first_s = time.perf_counter() - started
            t = time.perf_counter()
            recheck(
                results, conn, session, sc, settings.audit, window_s=cfg["window_s"], sleep=sleep
            )
            recheck_s = time.perf_counter() - t
        pg1 = sum(pg_backend_cpu_s(c) or 0.0 for c in conns)
    for c in conns[1:]:
        c.close()
    models = {
        r.read_model: {
            "bucket_bits": r.bucket_bits,
            "rows_expected": r.rows_expected,
            "rows_actual": r.rows_actual,
            "mismatched_buckets": r.mismatched_buckets,
            "drilled_rows": r.drilled_rows,
            "rechecked": r.rechecked,
            "settled_by_recheck": r.settled_by_recheck,
            "differences": {k: r.count(k) for k in ("missing", "extra", "stale")},
            "seconds": {k: round(v, 3) for k, v in r.seconds.items()},
            "found": [[d.kind, list(d.key.values()), list(d.columns)] for d in r.differences],
        }
        for r in results
    }
    return {
        "seconds": time.perf_counter() - started,
        "first_pass_seconds": first_s,
        "recheck_seconds": recheck_s,
        "window_wait_s": slept[0],
        "postgres_backend_cpu_s": None if pg0 is None or pg1 is None else round(pg1 - pg0, 2),
        "models": models,
    }


def stage_scan(cfg: dict[str, Any]) -> dict[str, Any]:
    """The Cassandra floor: the raw columns of each read model over the audit's token ranges,
    with tasks.audit.scan.scan at the audit's concurrency and fetch size; rows dropped."""
    from tasks.audit.fingerprints import shape
    from tasks.audit.scan import Buckets, bucket_bits, ensure_profile, scan, scan_parts
    from tasks.core.cql import check_keyspace

    settings = get_settings()
    a, ks = settings.audit, check_keyspace(cfg["keyspace"])
    rows: dict[str, int] = {}
    started = time.perf_counter()
    with scylla.session(settings.scylla) as session:
        profile = ensure_profile(
            session, settings.scylla.read_consistency_level, settings.scylla.request_timeout_s
        )
        for rm in READ_MODELS:
            sh, hint = shape(rm), cfg["rows_hint"][rm]
            buckets = Buckets(bucket_bits(hint, a.rows_per_bucket, a.max_bucket_bits))
            parts = scan_parts(buckets, hint, a.fetch_size, a.scan_concurrency)
            pk = sh.partition_column
            stmt = session.prepare(
                f"SELECT {', '.join(sh.columns)} FROM {ks}.{rm} "
                f"WHERE token({pk}) >= ? AND token({pk}) <= ?"
            )
            n = 0
            for page in scan(
                session,
                stmt,
                buckets.ranges(parts),
                concurrency=a.scan_concurrency,
                fetch_size=a.fetch_size,
                profile=profile,
                what=f"floor scan of {ks}.{rm}",
            ):
                n += len(page)
            rows[rm] = n
    return {"seconds": time.perf_counter() - started, "rows": rows}


def stage_select(cfg: dict[str, Any]) -> dict[str, Any]:
    """The Postgres floor: the columns the audit views read, from the write-model tables,
    through a server-side cursor (5,000 rows a fetch); rows fetched and dropped."""
    settings = get_settings()
    rows: dict[str, int] = {}
    started = time.perf_counter()
    with postgres.connect("reader", settings.postgres) as conn:
        pg0 = pg_backend_cpu_s(conn)
        for rm in READ_MODELS:
            n = 0
            for table, cols in SOURCE_COLUMNS[rm]:
                query = sql.SQL("SELECT {} FROM {}").format(
                    sql.SQL(", ").join(map(sql.Identifier, cols)), sql.Identifier(table)
                )
                with conn.cursor(name=f"floor_{table}") as cur:
                    cur.itersize = 5000
                    cur.execute(query)
                    while batch := cur.fetchmany(5000):
                        n += len(batch)
            rows[rm] = n
        pg1 = pg_backend_cpu_s(conn)
        conn.rollback()
    return {
        "seconds": time.perf_counter() - started,
        "rows": rows,
        "postgres_backend_cpu_s": None if pg0 is None or pg1 is None else round(pg1 - pg0, 2),
    }


STAGES = {
    "snapshot": stage_snapshot,
    "load": stage_load,
    "audit": stage_audit,
    "scan": stage_scan,
    "select": stage_select,
}


# ----------------------------------------------------------------------------- children


def stage_cmd(name: str, cfg: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "bench.audit", "--stage", name, "--config", json.dumps(cfg)]


def run_children(named: dict[str, list[str]], env: dict[str, str]) -> dict[str, Any]:
    """Run these commands at once. Returns the wall time until the last one ended, the
    work window (first stage start to last stage end: interpreter start-up, imports and
    exit left out), Cassandra's CPU meanwhile, and per child its JSON result with its own
    CPU and peak RSS (wait4) and its start-up and exit overheads."""
    cass0, started, spawned = cassandra_cpu_s(), time.monotonic(), time.time()
    children: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    with contextlib.ExitStack() as files:
        procs: dict[int, tuple[str, subprocess.Popen[str], Any]] = {}
        for name, cmd in named.items():
            out = files.enter_context(tempfile.TemporaryFile("w+"))
            p = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
            )
            procs[p.pid] = (name, p, out)
        while procs:
            pid, status, usage = os.wait4(-1, 0)
            if pid not in procs:
                continue
            reaped = time.time()
            name, p, out = procs.pop(pid)
            p.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            output = out.read()
            if p.returncode != 0:
                failed.append(f"{name} failed ({p.returncode}):\n{output[-3000:]}")
                continue
            result = dict(json.loads(output.strip().splitlines()[-1]))
            SETTINGS_SEEN.add(json.dumps(result.get("audit_settings"), sort_keys=True))
            children[name] = {
                **result,
                "process_seconds": round(reaped - spawned, 3),
                "startup_s": round(result["work_started"] - spawned, 3),
                "exit_s": round(reaped - result["work_ended"], 3),
                "client_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
                "peak_rss_mib": max(result["peak_rss_mib"], round(usage.ru_maxrss / 1024, 1)),
            }
    cass1 = cassandra_cpu_s()
    if failed:
        raise RuntimeError("\n".join(failed))
    window = max(c["work_ended"] for c in children.values()) - min(
        c["work_started"] for c in children.values()
    )
    return {
        "wall_seconds": round(time.monotonic() - started, 3),
        "work_seconds": round(window, 3),
        "cassandra_cpu_s": None if cass0 is None or cass1 is None else round(cass1 - cass0, 2),
        "children": children,
    }


def run_one(name: str, cfg: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """One child: its result, work seconds, process wall time, CPU, Cassandra CPU, RSS."""
    r = run_children({name: stage_cmd(name, cfg)}, env)
    return {
        **r["children"][name],
        "wall_seconds": r["wall_seconds"],
        "work_seconds": r["work_seconds"],
        "cassandra_cpu_s": r["cassandra_cpu_s"],
    }


def _rss(r: dict[str, Any]) -> float:
    return max(c["peak_rss_mib"] for c in r.get("children", {"": r}).values())


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median work time, with every run's work time and the largest RSS."""
    ordered = sorted(runs, key=lambda r: r["work_seconds"])
    mid = dict(ordered[(len(ordered) - 1) // 2])
    mid["runs_work_seconds"] = [r["work_seconds"] for r in runs]
    mid["max_peak_rss_mib"] = max(_rss(r) for r in runs)
    return mid


# ----------------------------------------------------------------------------- drift


def _cql_value(value: str, cql_type: str) -> Any:
    if cql_type == "uuid":
        return uuid.UUID(value)
    if cql_type in ("timestamp", "int"):
        return int(value)  # a timestamp: milliseconds since the epoch, as the view renders
    return value


def _typed(key: tuple[str, ...] | list[str], types: list[str]) -> list[Any]:
    return [_cql_value(v, t) for v, t in zip(key, types, strict=True)]


def _extra_key(i: int, like: tuple[str, ...], types: list[str]) -> list[str]:
    """A key no source row has, shaped as ``like``: new uuids, a timestamp in 2020; every
    other one (where the table has clustering columns) in ``like``'s partition."""
    out = [
        str(uuid.uuid4()) if t == "uuid" else str(1_600_000_000_000 + i) if t == "timestamp" else v
        for v, t in zip(like, types, strict=True)
    ]
    if len(types) > 1 and i % 2:
        out[0] = like[0]
    return out


def _extra_values(i: int, types: list[str]) -> list[Any]:
    out: list[Any] = []
    for t in types:
        if t == "uuid":
            out.append(uuid.uuid4())
        elif t == "timestamp":
            out.append(1_600_000_000_000)
        elif t == "int":
            out.append(1)
        else:
            out.append(f"extra {i}")
    return out


def drift_model(
    conn: Any, session: Any, keyspace: str, rm: str, fraction: float, now_us: int
) -> list[list[Any]]:
    """Drift ``fraction`` of one read model's rows (at least 3), a third of each kind."""
    table = catalog.TABLES[rm]
    names = [c.name for c in table.key]
    key_types = [c.cql_type for c in table.key]
    cols = [c.name for c in (*table.key, *table.values)]
    view = sql.Identifier(f"audit_{rm}")
    (total,) = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(view)).fetchone()
    n = max(3, round(total * fraction))
    n_missing = n_stale = n // 3
    picked = conn.execute(
        sql.SQL("SELECT {} FROM {} ORDER BY random() LIMIT %s").format(
            sql.SQL(", ").join(map(sql.Identifier, names)), view
        ),
        (n,),
    ).fetchall()
    where = " AND ".join(f"{k} = ?" for k in names)
    col = DRIFT_COLUMN[rm]
    delete = session.prepare(f"DELETE FROM {keyspace}.{rm} WHERE {where}")
    update = session.prepare(
        f"UPDATE {keyspace}.{rm} USING TIMESTAMP ? SET {col} = ? WHERE {where}"
    )
    insert = session.prepare(
        f"INSERT INTO {keyspace}.{rm} ({', '.join(cols)}) "
        f"VALUES ({', '.join('?' * len(cols))}) USING TIMESTAMP ?"
    )
    out: list[list[Any]] = []
    for k in picked[:n_missing]:
        session.execute(delete, _typed(k, key_types))
        out.append(["missing", list(k), []])
    for i, k in enumerate(picked[n_missing : n_missing + n_stale]):
        session.execute(update, [now_us, f"drift {i}", *_typed(k, key_types)])
        out.append(["stale", list(k), [col]])
    for i, k in enumerate(picked[n_missing + n_stale :]):
        new_key = _extra_key(i, k, key_types)
        values = _extra_values(i, [c.cql_type for c in table.values])
        session.execute(insert, [*_typed(new_key, key_types), *values, now_us])
        out.append(["extra", new_key, []])
    return out


def inject_drift(
    schema: str, keyspace: str, fraction: float, session: Any, settings: PostgresSettings
) -> dict[str, dict[str, list[list[Any]]]]:
    """Drift ``fraction`` of each read model's rows in Cassandra, a third each: rows deleted
    (missing), a value overwritten with a newer write time (stale), rows with no source
    (extra). Returns, per read model, what the audit should report: [kind, key as text,
    columns]."""
    now_us = int(time.time() * 1e6) + 1_000_000
    with reader(schema, settings) as conn:
        return {
            rm: {"keys": drift_model(conn, session, keyspace, rm, fraction, now_us)}
            for rm in READ_MODELS
        }


def check_drift(
    injected: dict[str, dict[str, list[list[Any]]]], audit: dict[str, Any]
) -> dict[str, Any]:
    """Per read model and kind: injected, found, missed (injected, not reported) and false
    (reported, not injected, or with other columns)."""
    out: dict[str, Any] = {}
    for rm in READ_MODELS:
        want = {(k, tuple(key), tuple(c)) for k, key, c in injected[rm]["keys"]}
        got = {(k, tuple(key), tuple(c)) for k, key, c in audit["models"][rm]["found"]}
        missed, false = sorted(want - got), sorted(got - want)
        per: dict[str, Any] = {}
        for kind in ("missing", "stale", "extra"):
            per[kind] = {
                "injected": sum(1 for w in want if w[0] == kind),
                "reported": sum(1 for g in got if g[0] == kind),
                "missed": sum(1 for m in missed if m[0] == kind),
                "false": sum(1 for f in false if f[0] == kind),
            }
        out[rm] = {**per, "missed_keys": missed[:10], "false_keys": false[:10]}
    return out


# ----------------------------------------------------------------------------- one size


def measure_size(rows: int, a: argparse.Namespace, session: Any) -> dict[str, Any]:
    settings = get_settings()
    turns = round(rows / ROWS_PER_TURN)
    tag = f"{uuid.uuid4().hex[:8]}_{rows}"
    schema, keyspace = f"bench_audit_{tag}", f"bench_audit_{tag}"
    work = Path(tempfile.mkdtemp(prefix=f"bench-audit-{tag}-"))
    env = {**os.environ, "PGOPTIONS": f"-c search_path={schema},public"}

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} {rows:,}] {msg}", file=sys.stderr, flush=True)

    try:
        scylla.migrate(session, settings.scylla.model_copy(update={"keyspace": keyspace}))
        t0 = time.monotonic()
        counts = generate(
            schema,
            turns,
            a.turns_per_session,
            a.sessions_per_user,
            a.steps_per_agent_turn,
            settings.postgres,
        )
        create_views(schema, settings.postgres)
        gen_s = time.monotonic() - t0
        log(f"generated {counts} in {gen_s:.1f} s (schema {schema})")
        snap = run_one("snapshot", {"root": str(work / "snapshots")}, env)
        log(f"snapshot {snap['rows']:,} rows in {snap['wall_seconds']:.1f} s")
        load = run_one("load", {"snapshot_dir": snap["snapshot_dir"], "keyspace": keyspace}, env)
        log(f"loaded {load['rows_written']:,} rows in {load['wall_seconds']:.1f} s")
        shutil.rmtree(work, ignore_errors=True)  # the Parquet files are not needed any more
        from tasks.audit.diff import estimate_rows

        with reader(schema, settings.postgres) as conn:
            hint = {rm: estimate_rows(conn, rm) for rm in READ_MODELS}
            model_rows = {
                rm: conn.execute(
                    sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(f"audit_{rm}"))
                ).fetchone()[0]  # type: ignore[index]
                for rm in READ_MODELS
            }
        log(f"read-model rows {model_rows} (total {sum(model_rows.values()):,})")

        scan_cfg: dict[str, Any] = {"keyspace": keyspace, "rows_hint": hint}
        select_cfg: dict[str, Any] = {}
        audit_cfg = {"keyspace": keyspace, "window_s": a.window_s}
        both = {"scan": stage_cmd("scan", scan_cfg), "select": stage_cmd("select", select_cfg)}
        run_children(both, env)  # warm-up: caches on both sides, not measured
        log("warmed up")
        runs: dict[str, list[dict[str, Any]]] = {"scan": [], "select": [], "both": [], "clean": []}
        for i in range(a.repeat):  # interleaved, so a slow spell of the machine hits all
            runs["scan"].append(run_one("scan", scan_cfg, env))
            runs["select"].append(run_one("select", select_cfg, env))
            runs["both"].append(run_children(both, env))
            runs["clean"].append(run_one("audit", audit_cfg, env))
            log(
                f"run {i + 1}: floor scan {runs['scan'][-1]['work_seconds']:.2f} s, select "
                f"{runs['select'][-1]['work_seconds']:.2f} s, both at once "
                f"{runs['both'][-1]['work_seconds']:.2f} s; clean audit "
                f"{runs['clean'][-1]['work_seconds']:.2f} s (work; process "
                f"{runs['clean'][-1]['wall_seconds']:.2f} s)"
            )
        false_clean = {
            f"run {i + 1} {rm}": m["found"][:10]
            for i, r in enumerate(runs["clean"])
            for rm, m in r["models"].items()
            if m["found"]
        }
        injected = inject_drift(schema, keyspace, a.drift, session, settings.postgres)
        n_injected = sum(len(v["keys"]) for v in injected.values())
        log(f"injected {n_injected} drifted rows")
        runs["drift"] = []
        checks = []
        for i in range(a.repeat):
            runs["drift"].append(run_one("audit", audit_cfg, env))
            checks.append(check_drift(injected, runs["drift"][-1]))
            log(f"run {i + 1}: drift audit {runs['drift'][-1]['work_seconds']:.2f} s")
        for rs in (runs["clean"], runs["drift"]):
            for r in rs:
                for m in r["models"].values():
                    m["found"] = len(m["found"])  # keys are checked above, not kept
        floor_scan, floor_select = median_run(runs["scan"]), median_run(runs["select"])
        floor_both, clean, drift = (median_run(runs[k]) for k in ("both", "clean", "drift"))
        concurrent = floor_both["work_seconds"]
        total = floor_scan["work_seconds"] + floor_select["work_seconds"]

        def ratios(r: dict[str, Any]) -> dict[str, float]:
            busy = r["work_seconds"] - r["window_wait_s"]
            return {
                "vs_concurrent_floor": round(r["work_seconds"] / concurrent, 3),
                "vs_sum_floor": round(r["work_seconds"] / total, 3),
                "no_wait_vs_concurrent_floor": round(busy / concurrent, 3),
                "no_wait_vs_sum_floor": round(busy / total, 3),
            }

        exact = all(
            not c["missed_keys"] and not c["false_keys"] for ch in checks for c in ch.values()
        )
        return {
            "rows": rows,
            "turns": turns,
            "write_model_rows": counts,
            "read_model_rows": model_rows,
            "generate_seconds": round(gen_s, 2),
            "snapshot": snap,
            "load": load,
            "floor": {
                "scan": floor_scan,
                "select": floor_select,
                "sum_seconds": round(total, 3),
                "concurrent": floor_both,
            },
            "audit_clean": {**clean, "ratios": ratios(clean), "false_differences": false_clean},
            "audit_drift": {
                **drift,
                "ratios": ratios(drift),
                "injected": n_injected,
                "check": checks[0],
                "checks_identical": all(c == checks[0] for c in checks),
                "exact": exact,
            },
            "schema": schema,
            "keyspace": keyspace,
        }
    finally:
        if not a.keep:
            session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=120)
            drop_schema(schema, settings.postgres)
            shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- report


def markdown(r: dict[str, Any]) -> str:
    def num(v: float | None, fmt: str = ".1f") -> str:
        return "-" if v is None else format(v, fmt)

    lines = [
        "Seconds are the work (stage start to end in the child: connect, query, scan; "
        "interpreter start-up, imports and exit left out), the median of "
        f"{r['params']['repeat']} runs; the process's wall time beside it. CPU: the client "
        "process (wait4), Cassandra and the Postgres backend (/proc). Peak RSS: the child's "
        "ru_maxrss, largest over the runs.",
        "",
        "| rows | measure | work s | process s | client CPU s | Cassandra CPU s "
        "| Postgres backend CPU s | peak RSS MiB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in r["sizes"]:
        f = s["floor"]
        both = f["concurrent"]
        both_row = {
            "work_seconds": both["work_seconds"],
            "wall_seconds": both["wall_seconds"],
            "client_cpu_s": sum(c["client_cpu_s"] for c in both["children"].values()),
            "cassandra_cpu_s": both["cassandra_cpu_s"],
            "postgres_backend_cpu_s": both["children"]["select"].get("postgres_backend_cpu_s"),
            "max_peak_rss_mib": both["max_peak_rss_mib"],
        }
        entries = [
            ("floor: Cassandra token-range scan, raw columns", f["scan"]),
            ("floor: Postgres SELECT, server-side cursor", f["select"]),
            ("floor: both at once (two children)", both_row),
            ("audit, clean", s["audit_clean"]),
            (f"audit, {s['audit_drift']['injected']} rows drifted", s["audit_drift"]),
        ]
        for name, st in entries:
            lines.append(
                f"| {s['rows']:,} | {name} | {st['work_seconds']:.2f} | "
                f"{st['wall_seconds']:.2f} | {num(st.get('client_cpu_s'))} | "
                f"{num(st.get('cassandra_cpu_s'))} | {num(st.get('postgres_backend_cpu_s'))} | "
                f"{st['max_peak_rss_mib']} |"
            )
    lines += [
        "",
        "| rows | floor sum s | audit / concurrent floor (clean; drift) | audit / floor sum "
        "(clean; drift) | drift audit without its freshness-window wait: / concurrent; / sum "
        "| drift found exactly |",
        "|---:|---:|---|---|---|---|",
    ]
    for s in r["sizes"]:
        c, d = s["audit_clean"]["ratios"], s["audit_drift"]["ratios"]
        lines.append(
            f"| {s['rows']:,} | {s['floor']['sum_seconds']:.2f} | "
            f"{c['vs_concurrent_floor']:.2f}; {d['vs_concurrent_floor']:.2f} | "
            f"{c['vs_sum_floor']:.2f}; {d['vs_sum_floor']:.2f} | "
            f"{d['no_wait_vs_concurrent_floor']:.2f}; {d['no_wait_vs_sum_floor']:.2f} | "
            f"{'yes' if s['audit_drift']['exact'] else 'NO'} |"
        )
    lines += [
        "",
        "Per read model (the median run): `ModelAudit.seconds` of the first pass (scan: the "
        "Cassandra scan; checksums: until the Postgres aggregate was in too; drill-down: the "
        "differing buckets read on both sides). The re-check is one for all models: its "
        "seconds (and the freshness-window wait in them) are the audit's, after the table.",
        "",
        "| rows | audit | read model | scan / checksums / drill-down s "
        "| mismatched buckets | drilled rows | missing / stale / extra |",
        "|---:|---|---|---|---:|---:|---|",
    ]
    for s in r["sizes"]:
        for label, key in (("clean", "audit_clean"), ("drift", "audit_drift")):
            for rm, m in s[key]["models"].items():
                sec = m["seconds"]
                d = m["differences"]
                lines.append(
                    f"| {s['rows']:,} | {label} | {rm} | {sec.get('scylla_scan', 0):.2f} / "
                    f"{sec.get('checksums', 0):.2f} / {sec.get('drill_down', 0):.2f} | "
                    f"{m['mismatched_buckets']} | {m['drilled_rows']} | "
                    f"{d['missing']} / {d['stale']} / {d['extra']} |"
                )
    lines.append("")
    for s in r["sizes"]:
        for label, key in (("clean", "audit_clean"), ("drift", "audit_drift")):
            a = s[key]
            lines.append(
                f"- {s['rows']:,} {label}: first pass {a['first_pass_seconds']:.2f} s, re-check "
                f"{a['recheck_seconds']:.2f} s (of which the freshness-window wait "
                f"{a['window_wait_s']:.2f} s)"
            )
    lines += ["", "Drift check (kind: injected / reported / missed / false), first run:", ""]
    for s in r["sizes"]:
        for rm, c in s["audit_drift"]["check"].items():
            kinds = "; ".join(
                f"{k} {c[k]['injected']} / {c[k]['reported']} / {c[k]['missed']} / {c[k]['false']}"
                for k in ("missing", "stale", "extra")
            )
            lines.append(f"- {s['rows']:,} {rm}: {kinds}")
        if s["audit_clean"]["false_differences"]:
            lines.append(f"- {s['rows']:,}: CLEAN AUDIT REPORTED DIFFERENCES")
    lines += ["", "Targets:", ""]
    lines += [f"- {k}: {v}" for k, v in r["targets"].items()]
    return "\n".join(lines)


def settings_line(a: dict[str, Any]) -> str:
    keys = ("rows_per_bucket", "max_bucket_bits", "scan_concurrency", "fetch_size")
    return ", ".join(f"{k}={a[k]}" for k in keys)


def targets(sizes: list[dict[str, Any]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for s in sizes:
        c, d = s["audit_clean"]["ratios"], s["audit_drift"]["ratios"]
        out[f"clean audit / floor at {s['rows']:,} (≤ 1.3)"] = (
            f"{c['vs_concurrent_floor']:.2f} against the concurrent floor, "
            f"{c['vs_sum_floor']:.2f} against the sum"
        )
        out[f"drift audit / floor at {s['rows']:,} (≤ 1.6)"] = (
            f"{d['vs_concurrent_floor']:.2f} against the concurrent floor, "
            f"{d['vs_sum_floor']:.2f} against the sum; without the freshness-window wait "
            f"{d['no_wait_vs_concurrent_floor']:.2f} / {d['no_wait_vs_sum_floor']:.2f}"
        )
    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        for key in ("audit_clean", "audit_drift"):
            h, lo_ = hi[key]["max_peak_rss_mib"], lo[key]["max_peak_rss_mib"]
            out[f"{key} peak RSS at {hi['rows']:,} / at {lo['rows']:,} (within ±20%)"] = (
                f"{h / lo_:.2f} ({h} / {lo_} MiB)"
            )
    return out


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench.audit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--drift", type=float, default=0.001, help="fraction of rows drifted")
    ap.add_argument("--window-s", type=float, default=1.0, help="the audit's freshness window")
    ap.add_argument("--turns-per-session", type=int, default=20)
    ap.add_argument("--sessions-per-user", type=int, default=5)
    ap.add_argument("--steps-per-agent-turn", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measure (median)")
    ap.add_argument("--keep", action="store_true", help="keep the schemas, keyspaces")
    ap.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.stage:  # a child process: one stage, one JSON line
        started = time.time()
        result = STAGES[a.stage](json.loads(a.config))
        result["audit_settings"] = get_settings().audit.model_dump()
        ended = time.time()
        result |= {"work_started": started, "work_ended": ended, "work_seconds": ended - started}
        print(json.dumps({**result, "peak_rss_mib": round(_peak_rss_mib(), 1)}, default=str))
        return

    settings = get_settings()
    sizes = []
    with scylla.session(settings.scylla) as session:
        for rows in a.rows:
            sizes.append(measure_size(rows, a, session))
    result = {
        "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "params": vars(a) | {"stage": None, "config": None},
        "audit_settings": settings.audit.model_dump(),
        "sizes": sizes,
    }
    result["targets"] = targets(sizes)
    # Every child must have run with the settings recorded here (an edit of the defaults
    # while the benchmark runs would mix two configurations in one result).
    expected = json.dumps(result["audit_settings"], sort_keys=True)
    result["settings_consistent"] = all(seen == expected for seen in SETTINGS_SEEN)
    if not result["settings_consistent"]:
        print("WARNING: the audit settings changed during the run", file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "audit.json").write_text(json.dumps(result, indent=2, default=str))
    md = markdown(result)
    (RESULTS / "audit.md").write_text(
        f"# Audit benchmark ({result['when']}, {os.cpu_count()} CPUs)\n\n"
        f"`python -m bench.audit --rows {' '.join(map(str, a.rows))} --repeat {a.repeat}`; "
        f"AuditSettings: {settings_line(result['audit_settings'])}"
        f"{'' if result['settings_consistent'] else ' (CHANGED DURING THE RUN)'}\n\n{md}\n"
    )
    print(md)


if __name__ == "__main__":
    main()

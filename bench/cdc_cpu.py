"""CDC CPU-path benchmark (not a test; no stack): the Python CPU the consumer spends per change
event, stage by stage, on realistic Debezium envelopes (JsonConverter, schemas.enable=false).

    .venv/bin/python -m bench.cdc_cpu [--events 20000] [--runs 5] [--batch 500]
                                      [--baseline] [--profile] [--out PATH]

The messages are generated up front (a deterministic mix of conversations: session inserts and
header updates with their before images, human and agent turns, steps with JSON payloads, a
few TOASTed updates and deletes), then fed through the consumer's own per-message path:

- decode: ``decode_message`` (JSON, envelope checks, row normalization);
- project: ``project`` of the decoded change into the consumer's read models;
- add: ``ChangeBatch.add``, the real per-message call (decode + project + bookkeeping);
- compact: ``ChangeBatch.compact`` per batch of ``--batch`` messages;
- bind: the real ``ScyllaWriter`` binding a compacted batch (``bound`` then ``requests``:
  CQL text, prepared-statement lookup, the driver's serializers, replica-set grouping) against
  an offline session, so no server is needed.

Each figure is CPU time (``time.process_time``) per event, the median of ``--runs`` runs.
Results go to bench/results/cdc-cpu-path.json and .md; the previous file's figures are kept as
``previous`` and its ``baseline`` (``--baseline`` makes this run the new baseline), and the
ratio per stage is printed so a regression shows. ``--profile`` also writes a cProfile of
``ChangeBatch.add`` + compact + bind (cdc-cpu-path.prof and its text summary).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import platform
import pstats
import random
import statistics
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from confluent_kafka import Message

from support.offline_scylla import OfflineSession
from tasks.adapters.scylla import ScyllaWriter
from tasks.cdc.batch import ChangeBatch
from tasks.core.catalog import READ_MODELS
from tasks.core.debezium import decode_message
from tasks.core.projection import PLACEHOLDER_TEXT, Change, project
from tasks.settings import ScyllaSettings

RESULTS: Final = Path(__file__).resolve().parent / "results"
KEYSPACE: Final = "bench"
STAGES: Final = ("decode", "project", "add", "compact", "bind", "total")

# ----------------------------------------------------------------------------- messages


def _ts(dt: datetime) -> str:
    """A timestamptz as Debezium's ZonedTimestamp writes it: ISO-8601 in UTC, trailing zeros of
    the fraction dropped (a whole second has none)."""
    text = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if dt.microsecond:
        text += f".{dt.microsecond:06d}".rstrip("0")
    return text + "Z"


_TEXT: Final = (
    "the plan is to read the file then call the search tool and summarize what it found "
    "for the user with a short list of next steps and a code sample in python émigré 東京"
)
_WORDS: Final = _TEXT.split()


@dataclass
class Generator:
    """Conversations as the app writes them, as Debezium publishes them."""

    rng: random.Random
    now: datetime
    lsn: int = 24_000_000
    tx: int = 700

    def text(self, lo: int, hi: int) -> str:
        n = self.rng.randint(lo, hi)
        return " ".join(self.rng.choice(_WORDS) for _ in range(n))

    def tick(self) -> datetime:
        self.now += timedelta(microseconds=self.rng.randint(50, 5_000))
        return self.now

    def envelope(
        self, table: str, op: str, before: dict[str, Any] | None, after: dict[str, Any] | None
    ) -> tuple[str, bytes]:
        self.lsn += self.rng.randint(100, 4_000)
        self.tx += 1
        commit_us = (self.now - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
        source = {
            "version": "3.6.1.Final",
            "connector": "postgresql",
            "name": "cqrs",
            "ts_ms": commit_us // 1000,
            "ts_us": commit_us,
            "ts_ns": commit_us * 1000,
            "snapshot": "false",
            "db": "cqrs",
            "sequence": f'["{self.lsn - 100}","{self.lsn}"]',
            "schema": "public",
            "table": table,
            "txId": self.tx,
            "lsn": self.lsn,
            "xmin": None,
        }
        env = {
            "before": before,
            "after": after,
            "source": source,
            "op": op,
            "ts_ms": commit_us // 1000 + 12,
            "ts_us": commit_us + 12_000,
            "ts_ns": (commit_us + 12_000) * 1000,
            "transaction": None,
        }
        # Jackson's output: compact, UTF-8, non-ASCII as is.
        data = json.dumps(env, separators=(",", ":"), ensure_ascii=False).encode()
        return f"cqrs.public.{table}", data

    def payload(self) -> str:
        kind = self.rng.random()
        if kind < 0.5:
            obj: Any = {
                "tool": self.rng.choice(["search", "read_file", "run_python", "fetch"]),
                "args": {"query": self.text(3, 12), "limit": self.rng.randint(1, 50)},
                "call_id": str(uuid.UUID(int=self.rng.getrandbits(128))),
            }
        elif kind < 0.85:
            obj = {
                "output": self.text(20, 200),
                "exit_code": 0,
                "truncated": self.rng.random() < 0.1,
                "files": [f"src/{self.text(1, 1)}.py" for _ in range(self.rng.randint(0, 4))],
            }
        else:
            obj = {
                "hits": [
                    {"title": self.text(3, 8), "url": f"https://example.org/{i}", "rank": i}
                    for i in range(self.rng.randint(1, 6))
                ],
                "took_ms": self.rng.randint(1, 900),
            }
        return json.dumps(obj, ensure_ascii=False)  # jsonb as Debezium sends it: text

    def conversation(self, out: list[tuple[str, bytes]]) -> None:
        sid, user = (
            uuid.UUID(int=self.rng.getrandbits(128)),
            uuid.UUID(int=self.rng.getrandbits(128)),
        )
        created = self.tick()
        session: dict[str, Any] = {
            "id": str(sid),
            "user_id": str(user),
            "title": self.text(2, 8),
            "created_at": _ts(created),
            "updated_at": _ts(created),
            "last_message": "",
            "last_message_at": None,
            "turn_count": 0,
        }
        out.append(self.envelope("sessions", "c", None, session))
        steps: list[dict[str, Any]] = []
        turns: list[tuple[str, dict[str, Any]]] = []
        for _ in range(self.rng.randint(1, 4)):
            for role in ("human_turns", "agent_turns"):
                at = self.tick()
                turn = {
                    "id": str(uuid.UUID(int=self.rng.getrandbits(128))),
                    "session_id": str(sid),
                    "content": self.text(5, 40) if role == "human_turns" else self.text(40, 400),
                    "created_at": _ts(at),
                    "updated_at": _ts(at),
                }
                if role == "agent_turns":
                    turn["model"] = self.rng.choice(["gpt-x", "claude-y", "local-7b"])
                out.append(self.envelope(role, "c", None, turn))
                turns.append((role, turn))
                # The trigger's header update: REPLICA IDENTITY FULL gives the before image.
                old = dict(session)
                session = session | {
                    "updated_at": _ts(self.tick()),
                    "last_message": turn["content"][:200],
                    "last_message_at": turn["created_at"],
                    "turn_count": session["turn_count"] + 1,
                }
                out.append(self.envelope("sessions", "u", old, session))
                if role == "agent_turns":
                    for _ in range(self.rng.randint(0, 4)):
                        at = self.tick()
                        step = {
                            "id": str(uuid.UUID(int=self.rng.getrandbits(128))),
                            "agent_turn_id": turn["id"],
                            "session_id": str(sid),
                            "kind": self.rng.choice(["tool_call", "tool_result", "thought"]),
                            "payload": self.payload(),
                            "created_at": _ts(at),
                            "updated_at": _ts(at),
                        }
                        out.append(self.envelope("steps", "c", None, step))
                        steps.append(step)
        # Now and then: a streamed agent turn rewritten (its old content TOASTed and unchanged
        # in a title-only session rename), a step deleted, or the whole session deleted.
        r = self.rng.random()
        if r < 0.10 and turns:
            role, turn = turns[-1]
            new = turn | {
                "content": turn["content"] + self.text(5, 30),
                "updated_at": _ts(self.tick()),
            }
            out.append(self.envelope(role, "u", turn, new))
        elif r < 0.15:
            old = dict(session)
            session = session | {"title": self.text(2, 6), "updated_at": _ts(self.tick())}
            toasted = session | {"last_message": PLACEHOLDER_TEXT}
            out.append(self.envelope("sessions", "u", old, toasted))
        elif r < 0.20 and steps:
            out.append(self.envelope("steps", "d", steps[-1], None))
        elif r < 0.23:
            for step in steps:
                out.append(self.envelope("steps", "d", step, None))
            for role, turn in turns:
                out.append(self.envelope(role, "d", turn, None))
            out.append(self.envelope("sessions", "d", session, None))


def messages(n: int, seed: int = 13) -> list[Message]:
    gen = Generator(random.Random(seed), datetime(2026, 11, 28, 7, 0, tzinfo=UTC))
    raw: list[tuple[str, bytes]] = []
    while len(raw) < n:
        gen.conversation(raw)
    key = b'{"id":"k"}'
    return [
        Message(topic=topic, partition=0, offset=i, key=key, value=value)
        for i, (topic, value) in enumerate(raw[:n])
    ]


# ----------------------------------------------------------------------------- offline writer


def offline_writer() -> ScyllaWriter:
    return ScyllaWriter(OfflineSession(KEYSPACE), ScyllaSettings(), keyspace=KEYSPACE)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- stages


def one_run(msgs: list[Message], batch: int, writer: ScyllaWriter) -> dict[str, float]:
    """CPU seconds of each stage over all messages, batch by batch as the consumer goes (what
    one batch allocates is dropped before the next, so the collector sees what it would)."""
    read_models = READ_MODELS
    clock = time.process_time
    seconds = dict.fromkeys(("decode", "project", "add", "compact", "bind"), 0.0)
    dead = 0
    for i in range(0, len(msgs), batch):
        part = msgs[i : i + batch]
        t0 = clock()
        changes = [decode_message(m.topic() or "", m.key(), m.value()).change for m in part]
        t1 = clock()
        for ch in changes:
            if ch is not None:
                project(ch, read_models)
        t2 = clock()
        b = ChangeBatch()
        for m in part:
            b.add(m, read_models)
        t3 = clock()
        b.compact()
        t4 = clock()
        writer.requests(writer.bound(b.mutations))
        t5 = clock()
        dead += len(b.dead)
        for stage, dt in zip(seconds, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            seconds[stage] += dt
    if dead:
        raise SystemExit(f"{dead} generated messages were dead-lettered: fix the generator")
    seconds["total"] = seconds["add"] + seconds["compact"] + seconds["bind"]
    return seconds


def measure(msgs: list[Message], runs: int, batch: int) -> dict[str, Any]:
    writer = offline_writer()
    one_run(msgs[: min(len(msgs), 2_000)], batch, writer)  # warm caches, prepare statements
    per_run = [one_run(msgs, batch, writer) for _ in range(runs)]
    us = {s: round(statistics.median(r[s] for r in per_run) / len(msgs) * 1e6, 2) for s in STAGES}
    spread = {
        s: [
            round(min(r[s] for r in per_run) / len(msgs) * 1e6, 2),
            round(max(r[s] for r in per_run) / len(msgs) * 1e6, 2),
        ]
        for s in STAGES
    }
    sizes = [len(m.value() or b"") for m in msgs]
    mix: dict[str, int] = {}
    for m in msgs:
        ev = decode_message(m.topic() or "", m.key(), m.value())
        if ev.change is not None:
            k = f"{ev.change.table}:{ev.change.op}"
            mix[k] = mix.get(k, 0) + 1
    mutations = sum(len(project(ch, READ_MODELS)) for ch in _changes(msgs))
    return {
        "us_per_event_median": us,
        "us_per_event_min_max": spread,
        "events": len(msgs),
        "runs": runs,
        "batch": batch,
        "mutations_per_event": round(mutations / len(msgs), 3),
        "mean_event_bytes": round(statistics.mean(sizes)),
        "mix": dict(sorted(mix.items())),
    }


def _changes(msgs: list[Message]) -> list[Change]:
    out = []
    for m in msgs:
        ev = decode_message(m.topic() or "", m.key(), m.value())
        if ev.change is not None:
            out.append(ev.change)
    return out


def profile(msgs: list[Message], batch: int, out: Path) -> str:
    """cProfile of the real path (add, compact, bind); the top of it as text."""
    writer = offline_writer()
    one_run(msgs[:1_000], batch, writer)
    prof = cProfile.Profile()
    prof.enable()
    for i in range(0, len(msgs), batch):
        b = ChangeBatch()
        for m in msgs[i : i + batch]:
            b.add(m, READ_MODELS)
        writer.requests(writer.bound(b.compact().mutations))
    prof.disable()
    prof.dump_stats(out.with_suffix(".prof"))
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(30)
    out.with_suffix(".prof.txt").write_text(text.getvalue())
    return text.getvalue()


# ----------------------------------------------------------------------------- report


def _table(current: dict[str, float], others: dict[str, dict[str, float]]) -> list[str]:
    names = list(others)
    head = "| stage | µs/event now | " + " | ".join(f"{n} µs | now/{n}" for n in names) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(names))]
    for s in STAGES:
        row = f"| {s} | {current[s]:.2f} |"
        for n in names:
            old = others[n].get(s)
            ratio = f"{current[s] / old:.2f}x" if old else "-"
            row += f" {old if old is not None else '-'} | {ratio} |"
        lines.append(row)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=500, help="messages per consumer batch")
    parser.add_argument("--baseline", action="store_true", help="make this run the baseline")
    parser.add_argument("--label", default="", help="a note kept with the figures")
    parser.add_argument("--profile", action="store_true", help="also write a cProfile")
    parser.add_argument("--out", type=Path, default=RESULTS / "cdc-cpu-path.json")
    args = parser.parse_args()

    msgs = messages(args.events)
    gc.freeze()  # the generated messages live all run: keep them out of the collector's scans
    result = measure(msgs, args.runs, args.batch)
    result["label"] = args.label
    result["at"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    result["python"] = platform.python_version()
    previous: dict[str, Any] = {}
    if args.out.exists():
        previous = json.loads(args.out.read_text())
    baseline = result if args.baseline else previous.get("baseline")
    doc = {"current": result, "previous": previous.get("current"), "baseline": baseline}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")

    now = result["us_per_event_median"]
    others = {
        name: d["us_per_event_median"]
        for name, d in (("previous", doc["previous"]), ("baseline", baseline))
        if d is not None and d is not result
    }
    lines = [
        "# CDC CPU path (python -m bench.cdc_cpu)",
        "",
        f"{result['events']} events ({result['mean_event_bytes']} bytes mean, "
        f"{result['mutations_per_event']} mutations each before compaction), consumer batches "
        f"of {result['batch']}, CPU µs per event, median of {result['runs']} runs; Python "
        f"{result['python']}, {result['at']}{', ' + args.label if args.label else ''}. "
        "`add` = decode + project as `ChangeBatch.add` runs them; total = add + compact + bind.",
        "",
        *_table(now, others),
        "",
        f"Mix: {result['mix']}",
    ]
    if baseline is not None and baseline is not result:
        lines[-2:-2] = ["", f"Baseline: {baseline.get('label') or ''} {baseline['at']}."]
    md = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(md)
    print(md)
    if args.profile:
        text = profile(msgs, args.batch, args.out.parent / "cdc-cpu-path")
        print("\n".join(text.splitlines()[:45]))


if __name__ == "__main__":
    main()

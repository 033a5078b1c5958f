"""A realistic conversation data set, generated in SQL into the write model (demo support).

Users, their sessions, alternating human and agent turns and the agent's steps (tool calls,
tool results, answers) with JSON payloads, written into the write model's own tables by the
admin role in a few INSERT ... SELECT statements per batch: the write model's triggers run as
for any writer, so every row gets its version (``updated_at``) and every session its header
(last message, turn count), and Debezium captures each change. Each call makes a new data set
(new ids), so it can be run again and again on the same database.

Batches of sessions commit one by one, so Debezium streams the first while the next is
written. About 23 rows per session: 1 session, 2 to 20 turns (11 on average), 1 to 3 steps
per agent turn.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tasks.adapters import postgres
from tasks.settings import PostgresSettings

TABLES = ("sessions", "human_turns", "agent_turns", "steps")
ROWS_PER_SESSION = 23  # 1 + 11 turns + 11 steps on average (see the generation below)
SESSIONS_PER_USER = 4  # on average; some users have many sessions, most a few
SESSIONS_PER_BATCH = 2_000  # ~46,000 rows per transaction

TOPICS = (
    "a trip to Lisbon",
    "a Python import error",
    "a birthday dinner menu",
    "a marathon training plan",
    "a Postgres query plan",
    "a cover letter",
    "the quarterly budget",
    "a Kafka consumer group",
    "a vegetable garden",
    "a job interview",
    "a sourdough starter",
    "a flaky CI pipeline",
)
QUESTIONS = (
    "Can you help me with {topic}?",
    "What is the first thing to check about {topic}?",
    "Give me three options for {topic}, with their trade-offs.",
    "How long does {topic} usually take?",
    "Could you summarise what we said about {topic} so far?",
    "What would you do differently about {topic}?",
)
ANSWERS = (
    "Sure. For {topic}, start with the constraints: time, budget and what must not change. "
    "Then pick the smallest step that tells you whether you are on the right path.",
    "Three options for {topic}: the quick one, the thorough one and the one in between. "
    "The quick one is usually enough unless the stakes are high.",
    "From what you said, the likely cause with {topic} is the order of the steps. "
    "Try the second step first and compare the result.",
    "In short: {topic} takes a week of steady work, less if the groundwork is done.",
)
TOOLS = ("search", "calculator", "calendar", "code_interpreter", "weather")
MODELS = ("agent-large-2", "agent-small-2", "agent-reasoning-1")


@dataclass(frozen=True)
class DataSet:
    """What one call generated: its users (the backfill's filter), rows per table, time."""

    user_ids: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return sum(self.counts.values())


def _sql_array(values: tuple[str, ...]) -> str:
    quoted = ", ".join("'" + v.replace("'", "''") + "'" for v in values)
    return f"ARRAY[{quoted}]::text[]"


def _pick(array: str, hash_expr: str) -> str:
    """An element of ``array`` chosen by a hash (stable for a row, varied across rows)."""
    return f"({array})[1 + abs({hash_expr}) % cardinality({array})]"


def generate(rows: int, settings: PostgresSettings) -> DataSet:
    """About ``rows`` rows across the four tables, for new users, in the public tables."""
    if rows < ROWS_PER_SESSION:
        raise ValueError(f"rows must be at least {ROWS_PER_SESSION}, got {rows}")
    sessions = max(1, rows // ROWS_PER_SESSION)
    users = max(1, sessions // SESSIONS_PER_USER)
    started = time.monotonic()
    topics, questions, answers = _sql_array(TOPICS), _sql_array(QUESTIONS), _sql_array(ANSWERS)
    tools, models = _sql_array(TOOLS), _sql_array(MODELS)
    topic = f"({topics})[1 + s.topic]"
    # No query below takes parameters (the integers are inlined), so '%' is SQL's modulo.
    with postgres.connect("admin", settings) as conn:
        # Live across the batches' commits; dropped at the end.
        conn.execute(
            "CREATE TEMP TABLE demo_sessions (n int PRIMARY KEY, id uuid, user_id uuid, "
            "topic int, created_at timestamptz, nturns int)"
        )
        # A few power users hold many sessions (random()^2 skews towards the first users);
        # sessions start over the last 30 days, with 2 to 20 turns each. A session starts at
        # least 21 minutes ago: its last turn comes at most 20 min 40 s after its start, and a
        # turn in the future fails the audit's "not in the future" expectations.
        conn.execute(f"""
            WITH u AS (SELECT array_agg(gen_random_uuid()) AS ids
                         FROM generate_series(1, {users}))
            INSERT INTO demo_sessions
            SELECT n, gen_random_uuid(), u.ids[1 + floor({users} * random() ^ 2)::int],
                   n % {len(TOPICS)}, now() - interval '21 minutes' - interval '30 days' * random(),
                   2 + (random() * 18)::int
              FROM generate_series(1, {sessions}) n, u""")
        conn.commit()
        for first in range(1, sessions + 1, SESSIONS_PER_BATCH):
            batch = f"s.n BETWEEN {first} AND {first + SESSIONS_PER_BATCH - 1}"
            conn.execute(f"""
                INSERT INTO sessions (id, user_id, title, created_at)
                SELECT s.id, s.user_id, initcap({topic}), s.created_at
                  FROM demo_sessions s WHERE {batch}""")
            # Turn k of a session: human when k is odd, agent when even, 1 to 1.7 min apart.
            conn.execute(f"""
                CREATE TEMP TABLE demo_turns ON COMMIT DROP AS
                SELECT gen_random_uuid() AS id, s.id AS session_id, k % 2 = 1 AS human,
                       s.created_at + k * interval '1 minute' + random() * interval '40 s'
                           AS created_at,
                       replace(CASE WHEN k % 2 = 1
                                    THEN {_pick(questions, "hashtext(s.id::text || k)")}
                                    ELSE {_pick(answers, "hashtext(s.id::text || k)")} END,
                               '{{topic}}', {topic}) AS content,
                       {_pick(models, "hashtext(s.user_id::text)")} AS model,
                       {topic} AS topic
                  FROM demo_sessions s, generate_series(1, s.nturns) k
                 WHERE {batch}""")
            conn.execute(
                "INSERT INTO human_turns (id, session_id, content, created_at) "
                "SELECT id, session_id, content, created_at FROM demo_turns WHERE human"
            )
            conn.execute(
                "INSERT INTO agent_turns (id, session_id, content, model, created_at) "
                "SELECT id, session_id, content, model, created_at FROM demo_turns "
                "WHERE NOT human"
            )
            # 1 to 3 steps per agent turn: the answer, after a tool call and its result.
            conn.execute(f"""
                INSERT INTO steps (id, agent_turn_id, session_id, kind, payload, created_at)
                SELECT gen_random_uuid(), t.id, t.session_id, x.kind,
                       CASE x.kind
                         WHEN 'tool_call' THEN jsonb_build_object(
                              'tool', x.tool, 'args', jsonb_build_object('query', t.topic))
                         WHEN 'tool_result' THEN jsonb_build_object(
                              'tool', x.tool, 'hits', abs(hashtext(t.id::text)) % 50,
                              'latency_ms', 20 + abs(hashtext(t.id::text)) % 900)
                         ELSE jsonb_build_object(
                              'tokens', 40 + abs(hashtext(t.id::text)) % 400,
                              'finish_reason', 'stop')
                       END,
                       t.created_at - interval '5 s' + j * interval '1 s'
                  FROM demo_turns t,
                       LATERAL (SELECT (CASE abs(hashtext(t.id::text || 's')) % 3
                                          WHEN 0 THEN ARRAY['answer']
                                          WHEN 1 THEN ARRAY['tool_call', 'answer']
                                          ELSE ARRAY['tool_call', 'tool_result', 'answer']
                                        END) AS kinds) c,
                       generate_series(1, cardinality(c.kinds)) j,
                       LATERAL (SELECT c.kinds[j] AS kind,
                                       {_pick(tools, "hashtext(t.id::text || 't')")} AS tool) x
                 WHERE NOT t.human""")
            conn.commit()
        user_ids = [
            r[0] for r in conn.execute("SELECT DISTINCT user_id FROM demo_sessions").fetchall()
        ]
        conn.execute("""
            CREATE TEMP TABLE demo_counts AS
            SELECT (SELECT count(*) FROM demo_sessions) AS sessions,
                   (SELECT count(*) FROM human_turns h JOIN demo_sessions s
                       ON h.session_id = s.id) AS human_turns,
                   (SELECT count(*) FROM agent_turns a JOIN demo_sessions s
                       ON a.session_id = s.id) AS agent_turns,
                   (SELECT count(*) FROM steps x JOIN demo_sessions s
                       ON x.session_id = s.id) AS steps""")
        row = conn.execute("SELECT * FROM demo_counts").fetchone()
        conn.execute("DROP TABLE demo_sessions, demo_counts")
        conn.commit()
    counts = dict(zip(TABLES, (int(v) for v in row or (0, 0, 0, 0)), strict=True))
    return DataSet(sorted(str(u) for u in user_ids), counts, round(time.monotonic() - started, 2))

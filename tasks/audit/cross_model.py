"""Cross-model checks of the read models on the Scylla side: what one read model says about
another, which no single expectation suite can see (issue #11, deliverable 3; run on the audit's
sampled keys by tasks/audit/sampled_quality.py). Plain functions.

- ``header_turn_count``: a session's ``turn_count`` in sessions_by_id equals the number of its
  rows in conversation_timeline;
- ``recent_turn_count``: the session's row in recent_conversations (found by the header's
  user_id and created_at) exists and its ``turn_count`` equals that number too;
- ``step_turn_in_timeline``: for every session a turn's steps name (steps_by_turn.session_id),
  that session's timeline has the turn as an agent turn (turn_id == agent_turn_id, role
  'agent').

Under live CDC traffic a header and its timeline can be a moment apart: a failure is a
candidate, which the audit re-checks once after its freshness window
(:func:`cross_model_failures` on :func:`recheck_keys` of the failures). Facts are read with
plain queries, a chunk of keys at a time (memory does not grow with the number of keys), and
judged by pure functions.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from tasks.core.cql import check_keyspace
from tasks.core.errors import classify
from tasks.core.write_policy import as_uuid

if TYPE_CHECKING:
    from cassandra.cluster import Session

LOOKUP_CHUNK: Final = 64  # keys looked up at once
STEP_PAGE: Final = 1000  # rows per page when reading the session ids of a turn's steps

HEADER_TURN_COUNT: Final = "header_turn_count"
RECENT_TURN_COUNT: Final = "recent_turn_count"
STEP_TURN_IN_TIMELINE: Final = "step_turn_in_timeline"
SESSION_CHECKS: Final = (HEADER_TURN_COUNT, RECENT_TURN_COUNT)


@dataclass(frozen=True)
class CrossModelFailure:
    check: str  # one of the check names above
    key: dict[str, str]  # the keys it concerns, as text (session_id, user_id, agent_turn_id)
    detail: str  # the two values that disagree

    def __str__(self) -> str:
        keys = ", ".join(f"{k}={v}" for k, v in self.key.items())
        return f"{self.check} ({keys}): {self.detail}"


# --------------------------------------------------------------------------------------------
# Pure parts: what the facts read from Scylla mean


@dataclass(frozen=True, slots=True)
class SessionFacts:
    session_id: uuid.UUID
    timeline_rows: int
    header_found: bool
    header_turn_count: int | None = None
    user_id: uuid.UUID | None = None
    recent_found: bool | None = None  # None: not looked up (no user_id/created_at to find it)
    recent_turn_count: int | None = None


@dataclass(frozen=True, slots=True)
class StepFacts:
    agent_turn_id: uuid.UUID
    session_id: uuid.UUID  # a session the turn's steps name
    timeline_roles: tuple[str | None, ...]  # roles of that timeline's rows with this turn_id


def session_failures(facts: SessionFacts) -> list[CrossModelFailure]:
    key = {"session_id": str(facts.session_id)}
    rows = facts.timeline_rows
    if not facts.header_found:
        # No header and no turns: a session this pass knows nothing of (deleted, say).
        if not rows:
            return []
        detail = f"sessions_by_id has no row, conversation_timeline has {rows} rows"
        return [CrossModelFailure(HEADER_TURN_COUNT, key, detail)]
    out = []
    if facts.header_turn_count != rows:
        detail = (
            f"sessions_by_id.turn_count = {facts.header_turn_count}, "
            f"conversation_timeline has {rows} rows"
        )
        out.append(CrossModelFailure(HEADER_TURN_COUNT, key, detail))
    if facts.recent_found is None:
        return out
    recent_key = {"user_id": str(facts.user_id), **key}
    if not facts.recent_found:
        detail = f"recent_conversations has no row, conversation_timeline has {rows} rows"
        out.append(CrossModelFailure(RECENT_TURN_COUNT, recent_key, detail))
    elif facts.recent_turn_count != rows:
        detail = (
            f"recent_conversations.turn_count = {facts.recent_turn_count}, "
            f"conversation_timeline has {rows} rows"
        )
        out.append(CrossModelFailure(RECENT_TURN_COUNT, recent_key, detail))
    return out


def step_failures(facts: StepFacts) -> list[CrossModelFailure]:
    if "agent" in facts.timeline_roles:
        return []
    key = {"agent_turn_id": str(facts.agent_turn_id), "session_id": str(facts.session_id)}
    if not facts.timeline_roles:
        found = "no row with that turn_id"
    else:
        found = f"the turn with role {', '.join(map(repr, facts.timeline_roles))}"
    detail = (
        f"steps_by_turn.session_id = {facts.session_id}, "
        f"conversation_timeline of that session has {found}"
    )
    return [CrossModelFailure(STEP_TURN_IN_TIMELINE, key, detail)]


def recheck_keys(
    failures: Iterable[CrossModelFailure],
) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """The (session_ids, agent_turn_ids) to pass to :func:`cross_model_failures` again to
    re-check ``failures``."""
    sessions: dict[uuid.UUID, None] = {}
    turns: dict[uuid.UUID, None] = {}
    for f in failures:
        if f.check in SESSION_CHECKS:
            sessions[uuid.UUID(f.key["session_id"])] = None
        elif f.check == STEP_TURN_IN_TIMELINE:
            turns[uuid.UUID(f.key["agent_turn_id"])] = None
    return list(sessions), list(turns)


def cross_keys(
    samples: Mapping[str, Sequence[Any]], recent_sessions: Iterable[Any], limit: int
) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """The keys the cross-model checks take from a sample: sessions sampled in sessions_by_id
    or conversation_timeline, then sessions seen in the sampled recent_conversations rows; and
    the sampled agent turns of steps_by_turn; at most ``limit`` of each, in that order."""
    sessions = dict.fromkeys(
        as_uuid(k, "session_id")
        for k in (
            *samples.get("sessions_by_id", ()),
            *samples.get("conversation_timeline", ()),
            *recent_sessions,
        )
    )
    turns = dict.fromkeys(as_uuid(k, "agent_turn_id") for k in samples.get("steps_by_turn", ()))
    return list(sessions)[:limit], list(turns)[:limit]


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------------------------
# Reading


def _cell(row: Any, name: str, index: int) -> Any:
    """A column of a row, whatever the session's row factory (dicts, named tuples, tuples)."""
    return row[name] if isinstance(row, Mapping) else row[index]


def _prepare(session: Session, cql: str) -> Any:
    try:
        return session.prepare(cql)
    except Exception as exc:
        raise classify(exc, f"preparing {cql!r}") from exc


def _each(
    session: Session,
    stmt: Any,
    params: Sequence[tuple[Any, ...]],
    what: str,
    keep: Callable[[Iterable[Any]], Any] = list,
) -> list[Any]:
    """``keep`` of the rows of ``stmt`` for each parameter tuple, LOOKUP_CHUNK statements in
    flight. ``keep`` iterates the rows page by page (the driver fetches the next page as it
    goes), so what it keeps, not the partition, sizes the memory used."""
    from tasks.adapters.scylla import execute_windowed

    out: list[Any] = []
    try:
        for chunk in chunks(params, LOOKUP_CHUNK):
            out.extend(
                keep(rs) for rs in execute_windowed(session, ((stmt, p) for p in chunk), len(chunk))
            )
    except Exception as exc:
        raise classify(exc, what) from exc
    return out


def _session_facts(session: Session, ks: str, ids: Sequence[uuid.UUID]) -> Iterator[SessionFacts]:
    header = _prepare(
        session,
        f"SELECT user_id, created_at, turn_count FROM {ks}.sessions_by_id WHERE session_id = ?",
    )
    count = _prepare(
        session, f"SELECT COUNT(*) FROM {ks}.conversation_timeline WHERE session_id = ?"
    )
    recent = _prepare(
        session,
        f"SELECT turn_count FROM {ks}.recent_conversations "
        "WHERE user_id = ? AND created_at = ? AND session_id = ?",
    )
    for chunk in chunks(ids, LOOKUP_CHUNK):
        args = [(s,) for s in chunk]
        headers = _each(session, header, args, "reading sessions_by_id")
        counts = _each(session, count, args, "counting conversation_timeline rows")
        findable = [
            (_cell(h[0], "user_id", 0), _cell(h[0], "created_at", 1), s)
            for s, h in zip(chunk, headers, strict=True)
            if h and _cell(h[0], "user_id", 0) and _cell(h[0], "created_at", 1)
        ]
        recents = dict(
            zip(
                (a[2] for a in findable),
                _each(session, recent, findable, "reading recent_conversations"),
                strict=True,
            )
        )
        for s, h, c in zip(chunk, headers, counts, strict=True):
            rows = int(_cell(c[0], "count", 0))
            if not h:
                yield SessionFacts(s, rows, header_found=False)
                continue
            r = recents.get(s)
            yield SessionFacts(
                s,
                rows,
                header_found=True,
                header_turn_count=_cell(h[0], "turn_count", 2),
                user_id=_cell(h[0], "user_id", 0),
                recent_found=None if r is None else bool(r),
                recent_turn_count=_cell(r[0], "turn_count", 0) if r else None,
            )


def _step_facts(session: Session, ks: str, turns: Sequence[uuid.UUID]) -> Iterator[StepFacts]:
    step_sessions = _prepare(
        session, f"SELECT session_id FROM {ks}.steps_by_turn WHERE agent_turn_id = ?"
    )
    step_sessions.fetch_size = STEP_PAGE  # a turn may have many steps: page, keep the distinct
    # Filtering inside one partition (turn_id follows created_at in the clustering key).
    roles = _prepare(
        session,
        f"SELECT role FROM {ks}.conversation_timeline "
        "WHERE session_id = ? AND turn_id = ? ALLOW FILTERING",
    )
    for chunk in chunks(turns, LOOKUP_CHUNK):
        pairs: dict[tuple[uuid.UUID, uuid.UUID], None] = {}
        distinct = _each(
            session,
            step_sessions,
            [(t,) for t in chunk],
            "reading steps_by_turn",
            keep=lambda rows: dict.fromkeys(_cell(r, "session_id", 0) for r in rows),
        )
        for t, session_ids in zip(chunk, distinct, strict=True):
            for s in session_ids:
                if s is not None:  # a null session_id is its suite's finding
                    pairs[(s, t)] = None
        found = _each(session, roles, list(pairs), "reading conversation_timeline turns")
        for (s, t), rows in zip(pairs, found, strict=True):
            yield StepFacts(t, s, tuple(_cell(r, "role", 0) for r in rows))


def cross_model_failures(
    session: Session,
    keyspace: str,
    session_ids: Sequence[uuid.UUID],
    agent_turn_ids: Sequence[uuid.UUID],
) -> list[CrossModelFailure]:
    """The cross-model checks (module docstring) for these sessions and agent turns."""
    ks = check_keyspace(keyspace)
    sessions = list(dict.fromkeys(as_uuid(k, "session_id") for k in session_ids))
    turns = list(dict.fromkeys(as_uuid(k, "agent_turn_id") for k in agent_turn_ids))
    failures: list[CrossModelFailure] = []
    for sf in _session_facts(session, ks, sessions):
        failures.extend(session_failures(sf))
    for tf in _step_facts(session, ks, turns):
        failures.extend(step_failures(tf))
    return failures

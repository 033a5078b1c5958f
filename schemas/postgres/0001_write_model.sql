-- The write model: what the app writes. Every table carries `updated_at`, the row's version,
-- which becomes the `USING TIMESTAMP` of every Scylla cell derived from the row.

CREATE TABLE sessions (
    id              uuid PRIMARY KEY,
    user_id         uuid        NOT NULL,
    title           text        NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Derived on the write side by triggers (0002), in the same transaction as the turn write,
    -- so that each read-model row depends on exactly one source row and cell-level
    -- last-write-wins by row version stays exact.
    last_message    text        NOT NULL DEFAULT '',
    last_message_at timestamptz,
    turn_count      integer     NOT NULL DEFAULT 0
);
CREATE INDEX sessions_user_idx ON sessions (user_id, created_at DESC);

CREATE TABLE human_turns (
    id         uuid PRIMARY KEY,
    session_id uuid        NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    content    text        NOT NULL CHECK (content <> ''),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX human_turns_session_idx ON human_turns (session_id, created_at);

CREATE TABLE agent_turns (
    id         uuid PRIMARY KEY,
    session_id uuid        NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    content    text        NOT NULL DEFAULT '',
    model      text        NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX agent_turns_session_idx ON agent_turns (session_id, created_at);

CREATE TABLE steps (
    id            uuid PRIMARY KEY,
    agent_turn_id uuid        NOT NULL REFERENCES agent_turns (id) ON DELETE CASCADE,
    session_id    uuid        NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    kind          text        NOT NULL,
    payload       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX steps_turn_idx ON steps (agent_turn_id, created_at);

-- Deletes and key changes must carry the old row so the projection can find the read-model
-- rows to remove (their partition and clustering keys are not the primary key here).
-- FULL costs WAL volume on update; the alternative, a lookup table of read-model keys,
-- costs a read per delete on the consumer side and a second source of truth.
ALTER TABLE sessions    REPLICA IDENTITY FULL;
ALTER TABLE human_turns REPLICA IDENTITY FULL;
ALTER TABLE agent_turns REPLICA IDENTITY FULL;
ALTER TABLE steps       REPLICA IDENTITY FULL;

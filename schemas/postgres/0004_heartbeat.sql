-- Debezium's heartbeat.action.query writes here, so the replication slot advances even when
-- the captured tables are idle while other databases on the server write WAL (PITFALLS #1).
-- The table is published (pgoutput must see a change to confirm an LSN) but not captured into
-- a topic: the connector's table.include.list leaves it out.
CREATE TABLE cqrs_heartbeat (
    id      integer PRIMARY KEY,
    beat_at timestamptz NOT NULL
);
INSERT INTO cqrs_heartbeat VALUES (1, now());
ALTER PUBLICATION cqrs_sync ADD TABLE cqrs_heartbeat;
GRANT SELECT, UPDATE ON cqrs_heartbeat TO cqrs_debezium;

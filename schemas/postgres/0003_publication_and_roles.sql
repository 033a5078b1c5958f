-- The publication Debezium reads (the connector runs with publication.autocreate.mode=disabled,
-- so its role needs no ownership of the tables).
CREATE PUBLICATION cqrs_sync FOR TABLE sessions, human_turns, agent_turns, steps;

-- Least-privilege roles. Passwords are set by the migration runner from the environment
-- (never stored here): see tasks/migrate.py.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cqrs_debezium') THEN
        CREATE ROLE cqrs_debezium WITH LOGIN REPLICATION;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cqrs_reader') THEN
        CREATE ROLE cqrs_reader WITH LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cqrs_app') THEN
        CREATE ROLE cqrs_app WITH LOGIN;
    END IF;
END $$;

GRANT USAGE ON SCHEMA public TO cqrs_debezium, cqrs_reader, cqrs_app;
-- Debezium: read the captured tables (for its snapshot and REPLICA IDENTITY lookups).
GRANT SELECT ON sessions, human_turns, agent_turns, steps TO cqrs_debezium;
-- Snapshot and audit: read only. pg_read_all_settings lets it see wal_level; slots are
-- visible to every role through pg_replication_slots.
GRANT SELECT ON sessions, human_turns, agent_turns, steps TO cqrs_reader;
-- The app: write the four tables, nothing else.
GRANT SELECT, INSERT, UPDATE, DELETE ON sessions, human_turns, agent_turns, steps TO cqrs_app;

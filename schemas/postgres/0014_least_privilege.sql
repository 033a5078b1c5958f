-- Least privilege (docs/security.md, "Least privilege"). Each role may do what its path needs
-- and nothing more; tests/integration/test_least_privilege.py proves each line both ways.
--
-- The app writes the source columns only. The derived columns (every table's `updated_at`,
-- the row version; the session header `last_message`, `last_message_at`, `turn_count`) are
-- written by triggers alone: a BEFORE trigger assigning NEW.updated_at needs no column
-- privilege (Postgres checks the statement's target columns, not what a trigger changes),
-- but the header trigger runs its own UPDATE of `sessions`, so it runs as cqrs_derived, a
-- role that cannot log in and may write exactly those columns (SECURITY DEFINER, with a
-- pinned search_path so that no object of a caller's choosing is resolved in its place:
-- pg_temp, searched first unless named, comes last).
-- A later migration that redefines one of these functions with CREATE OR REPLACE must
-- repeat SECURITY DEFINER and SET search_path: CREATE OR REPLACE resets both.

-- Objects: nobody but the owner creates anything in public (already so on PostgreSQL 15 and
-- later, not on earlier servers); no temporary tables for the login roles either, so the
-- reader and Debezium write nothing at all.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
DO $$
BEGIN
    EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
END $$;

-- The role the derived-column functions run as.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cqrs_derived') THEN
        CREATE ROLE cqrs_derived NOLOGIN;
    END IF;
END $$;
GRANT USAGE ON SCHEMA public TO cqrs_derived;
-- SELECT for the header's recount and for locating rows; UPDATE of the derived columns only.
GRANT SELECT ON sessions, human_turns, agent_turns, steps TO cqrs_derived;
GRANT UPDATE (last_message, last_message_at, turn_count, updated_at) ON sessions TO cqrs_derived;
GRANT UPDATE (updated_at) ON human_turns, agent_turns, steps TO cqrs_derived;

-- The app: read and delete rows of the four tables; insert and update their source columns.
-- Revoking the table-level privileges also revokes any column-level ones, so the grants
-- below are the whole of what the app may write. A column added later is the app's only
-- once a migration grants it. `id` can be inserted but never changed.
REVOKE ALL ON sessions, human_turns, agent_turns, steps FROM cqrs_app;
GRANT SELECT, DELETE ON sessions, human_turns, agent_turns, steps TO cqrs_app;
GRANT INSERT (id, user_id, title, created_at),
      UPDATE (user_id, title, created_at) ON sessions TO cqrs_app;
GRANT INSERT (id, session_id, content, created_at),
      UPDATE (session_id, content, created_at) ON human_turns TO cqrs_app;
GRANT INSERT (id, session_id, content, model, created_at),
      UPDATE (session_id, content, model, created_at) ON agent_turns TO cqrs_app;
GRANT INSERT (id, agent_turn_id, session_id, kind, payload, created_at),
      UPDATE (agent_turn_id, session_id, kind, payload, created_at) ON steps TO cqrs_app;

-- The reader and Debezium: SELECT on the published tables (0003) and nothing else; restated
-- so that a grant added by hand on an existing server is taken back.
REVOKE ALL ON sessions, human_turns, agent_turns, steps FROM cqrs_reader, cqrs_debezium;
GRANT SELECT ON sessions, human_turns, agent_turns, steps TO cqrs_reader, cqrs_debezium;
-- Debezium's heartbeat.action.query (`UPDATE cqrs_heartbeat SET beat_at = now() WHERE id =
-- 1`) needs SELECT for its WHERE and UPDATE of beat_at, nothing more.
REVOKE ALL ON cqrs_heartbeat FROM cqrs_debezium;
GRANT SELECT, UPDATE (beat_at) ON cqrs_heartbeat TO cqrs_debezium;
REVOKE ALL ON cqrs_heartbeat, schema_migrations FROM cqrs_app, cqrs_reader;

-- The header functions run as cqrs_derived. Trigger functions need no EXECUTE privilege to
-- fire; nobody may call them, or the header refresh, directly.
ALTER FUNCTION cqrs_turn_changed() OWNER TO cqrs_derived;
ALTER FUNCTION cqrs_turn_changed()
    SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp;
ALTER FUNCTION cqrs_refresh_session_header(uuid) OWNER TO cqrs_derived;
ALTER FUNCTION cqrs_refresh_session_header(uuid)
    SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp;
REVOKE EXECUTE ON FUNCTION cqrs_turn_changed(), cqrs_refresh_session_header(uuid),
    cqrs_touch_updated_at(), cqrs_note_deleted_version() FROM PUBLIC;

-- The version floor (0011) let any role that could update a row stamp it with a version of
-- its choosing, far in the future, which no later write could then overtake (last write
-- wins by version). It is now honoured only for a role that may write `updated_at`: the
-- owner, and cqrs_derived inside cqrs_new_version below. For the app the floor is ignored
-- and the row gets its ordinary version (clock, or the previous version + 1 µs). Unchanged
-- otherwise from 0011.
CREATE OR REPLACE FUNCTION cqrs_touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    floor_us text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        -- Static statements per table (plans are cached); a live row found here makes the
        -- insert fail on the primary key anyway.
        IF TG_TABLE_NAME = 'sessions' THEN
            PERFORM 1 FROM sessions WHERE id = NEW.id FOR KEY SHARE;
        ELSIF TG_TABLE_NAME = 'human_turns' THEN
            PERFORM 1 FROM human_turns WHERE id = NEW.id FOR KEY SHARE;
        ELSIF TG_TABLE_NAME = 'agent_turns' THEN
            PERFORM 1 FROM agent_turns WHERE id = NEW.id FOR KEY SHARE;
        ELSIF TG_TABLE_NAME = 'steps' THEN
            PERFORM 1 FROM steps WHERE id = NEW.id FOR KEY SHARE;
        END IF;
        NEW.updated_at := clock_timestamp();
        floor_us := current_setting('cqrs.deleted_version_us', true);
        IF floor_us IS NOT NULL AND floor_us <> '' THEN
            NEW.updated_at := greatest(NEW.updated_at, timestamptz 'epoch'
                                       + (floor_us::bigint + 2) * interval '1 microsecond');
        END IF;
    ELSE
        NEW.updated_at := greatest(clock_timestamp(), OLD.updated_at + interval '1 microsecond');
        floor_us := current_setting('cqrs.version_floor_us', true);
        IF floor_us IS NOT NULL AND floor_us <> ''
           AND has_column_privilege(TG_RELID, 'updated_at', 'UPDATE') THEN
            NEW.updated_at := greatest(NEW.updated_at, timestamptz 'epoch'
                                       + (floor_us::bigint + 1) * interval '1 microsecond');
        END IF;
    END IF;
    RETURN NEW;
END $$;

-- Reconcile's "give the source row a new version" (docs/decisions.md, "Reconcile gives a
-- shadowed row a new version"), which used to run `UPDATE <table> SET updated_at =
-- updated_at` as the app. The app may not write `updated_at`, so it calls this instead: a
-- new version for one row of one of the four tables, above `p_above_us` if given. Static
-- statements per table: the table name never becomes SQL. True if the row exists.
CREATE FUNCTION cqrs_new_version(p_table text, p_id uuid, p_above_us bigint DEFAULT NULL)
RETURNS boolean LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    -- Always set: a floor the caller set beforehand must not apply here.
    PERFORM set_config('cqrs.version_floor_us', coalesce(p_above_us::text, ''), true);
    CASE p_table
        WHEN 'sessions' THEN
            UPDATE sessions SET updated_at = updated_at WHERE id = p_id;
        WHEN 'human_turns' THEN
            UPDATE human_turns SET updated_at = updated_at WHERE id = p_id;
        WHEN 'agent_turns' THEN
            UPDATE agent_turns SET updated_at = updated_at WHERE id = p_id;
        WHEN 'steps' THEN
            UPDATE steps SET updated_at = updated_at WHERE id = p_id;
        ELSE
            RAISE EXCEPTION 'cqrs_new_version: % is not a table of the write model', p_table
                USING ERRCODE = 'invalid_parameter_value';
    END CASE;
    GET DIAGNOSTICS n = ROW_COUNT;
    -- The floor applies to this row only, not to the caller's later writes.
    PERFORM set_config('cqrs.version_floor_us', '', true);
    RETURN n > 0;
END $$;
ALTER FUNCTION cqrs_new_version(text, uuid, bigint) OWNER TO cqrs_derived;
REVOKE EXECUTE ON FUNCTION cqrs_new_version(text, uuid, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs_new_version(text, uuid, bigint) TO cqrs_app;

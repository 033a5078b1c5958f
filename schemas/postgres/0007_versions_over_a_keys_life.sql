-- Versions must increase over a key's whole life, deletes included (docs/decisions.md,
-- "Versions over a key's whole life"). A delete's tombstone is stamped with the deleted
-- row's version + 1 µs (tasks/projection.py, tombstone_version); a row inserted again with
-- that key must get a version above it. Two ways it could not, both closed here:
--
-- 1. Re-insert in the deleting transaction: the row's updated_at may run ahead of the clock
--    (updates within one microsecond push it by 1 µs each), so clock_timestamp() alone can
--    be at or below it. Every delete notes the newest version it removed in a
--    transaction-local setting, and an insert in the same transaction is stamped at least
--    2 µs above it.
-- 2. Re-insert racing the delete: a BEFORE INSERT trigger runs before the insert waits on the
--    deleting transaction's lock on the unique index, so it would stamp a time before that
--    delete even happened to commit. The trigger now first waits for any transaction that
--    is deleting the key (FOR KEY SHARE conflicts with a delete), and stamps after.

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
    END IF;
    RETURN NEW;
END $$;

CREATE FUNCTION cqrs_note_deleted_version() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    deleted_us bigint := (extract(epoch FROM OLD.updated_at) * 1000000)::bigint;
    floor_us   text   := current_setting('cqrs.deleted_version_us', true);
BEGIN
    IF floor_us IS NULL OR floor_us = '' OR deleted_us > floor_us::bigint THEN
        PERFORM set_config('cqrs.deleted_version_us', deleted_us::text, true);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER sessions_deleted_version    AFTER DELETE ON sessions
    FOR EACH ROW EXECUTE FUNCTION cqrs_note_deleted_version();
CREATE TRIGGER human_turns_deleted_version AFTER DELETE ON human_turns
    FOR EACH ROW EXECUTE FUNCTION cqrs_note_deleted_version();
CREATE TRIGGER agent_turns_deleted_version AFTER DELETE ON agent_turns
    FOR EACH ROW EXECUTE FUNCTION cqrs_note_deleted_version();
CREATE TRIGGER steps_deleted_version       AFTER DELETE ON steps
    FOR EACH ROW EXECUTE FUNCTION cqrs_note_deleted_version();

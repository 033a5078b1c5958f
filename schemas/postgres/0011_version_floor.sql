-- Reconcile (tasks/audit/reconcile.py) repairs a read-model row that a newer write shadows: a
-- tombstone, or cells written with a time above the source row's version. Rewriting the same
-- version cannot win there, so it gives the source row a new version above the shadowing
-- write (docs/decisions.md, "Reconcile gives a shadowed row a new version"), which CDC then
-- carries like any update. Usually the clock is already past that write; when it is not (a
-- writer with a clock ahead), the transaction-local setting cqrs.version_floor_us lifts the
-- new version above it. Versions still only grow: the floor is a lower bound.

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
        IF floor_us IS NOT NULL AND floor_us <> '' THEN
            NEW.updated_at := greatest(NEW.updated_at, timestamptz 'epoch'
                                       + (floor_us::bigint + 1) * interval '1 microsecond');
        END IF;
    END IF;
    RETURN NEW;
END $$;

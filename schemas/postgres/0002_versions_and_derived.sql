-- Row versions: `updated_at` strictly increases on every update of a row, in microseconds,
-- even for two updates inside one clock tick; it is the write time of the derived cells.
CREATE FUNCTION cqrs_touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.updated_at := clock_timestamp();
    ELSE
        NEW.updated_at := greatest(clock_timestamp(), OLD.updated_at + interval '1 microsecond');
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER sessions_version    BEFORE INSERT OR UPDATE ON sessions    FOR EACH ROW EXECUTE FUNCTION cqrs_touch_updated_at();
CREATE TRIGGER human_turns_version BEFORE INSERT OR UPDATE ON human_turns FOR EACH ROW EXECUTE FUNCTION cqrs_touch_updated_at();
CREATE TRIGGER agent_turns_version BEFORE INSERT OR UPDATE ON agent_turns FOR EACH ROW EXECUTE FUNCTION cqrs_touch_updated_at();
CREATE TRIGGER steps_version       BEFORE INSERT OR UPDATE ON steps       FOR EACH ROW EXECUTE FUNCTION cqrs_touch_updated_at();

-- The session header (last message, turn count) is derived from turns on the write side, so
-- the read models `recent_conversations` and `sessions_by_id` are projections of one
-- `sessions` row each. The preview is capped: read models hold previews, not transcripts.
CREATE FUNCTION cqrs_refresh_session_header(p_session_id uuid) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_content text;
    v_at      timestamptz;
    v_count   integer;
BEGIN
    SELECT t.content, t.created_at INTO v_content, v_at
      FROM (SELECT content, created_at, id FROM human_turns WHERE session_id = p_session_id
            UNION ALL
            SELECT content, created_at, id FROM agent_turns WHERE session_id = p_session_id) t
     ORDER BY t.created_at DESC, t.id DESC
     LIMIT 1;
    SELECT (SELECT count(*) FROM human_turns WHERE session_id = p_session_id)
         + (SELECT count(*) FROM agent_turns WHERE session_id = p_session_id)
      INTO v_count;
    UPDATE sessions
       SET last_message    = coalesce(left(v_content, 500), ''),
           last_message_at = v_at,
           turn_count      = v_count
     WHERE id = p_session_id
       AND (last_message, last_message_at, turn_count)
           IS DISTINCT FROM (coalesce(left(v_content, 500), ''), v_at, v_count);
END $$;

CREATE FUNCTION cqrs_turn_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM cqrs_refresh_session_header(OLD.session_id);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') AND (TG_OP = 'INSERT' OR NEW.session_id <> OLD.session_id) THEN
        PERFORM cqrs_refresh_session_header(NEW.session_id);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER human_turns_header AFTER INSERT OR UPDATE OR DELETE ON human_turns
    FOR EACH ROW EXECUTE FUNCTION cqrs_turn_changed();
CREATE TRIGGER agent_turns_header AFTER INSERT OR UPDATE OR DELETE ON agent_turns
    FOR EACH ROW EXECUTE FUNCTION cqrs_turn_changed();

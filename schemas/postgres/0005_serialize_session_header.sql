-- Two transactions adding turns to one session concurrently each counted the turns they
-- could see and the last writer stored its count: turn_count could end one short (seen with
-- two concurrent inserts). Taking the session row's lock first serializes the refresh per
-- session. FOR NO KEY UPDATE, not FOR UPDATE: the turn inserts already hold FOR KEY SHARE on
-- the session through the foreign key, and FOR UPDATE would deadlock against that.
CREATE OR REPLACE FUNCTION cqrs_refresh_session_header(p_session_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_content text;
    v_at      timestamptz;
    v_count   integer;
BEGIN
    PERFORM 1 FROM sessions WHERE id = p_session_id FOR NO KEY UPDATE;
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

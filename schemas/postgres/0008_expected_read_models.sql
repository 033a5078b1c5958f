-- What each read model should hold, derived from the write model a second time, in SQL: an
-- oracle that shares no code with the Python projection, so a projection bug cannot hide in
-- the comparison that should catch it. Tests compare the read models with these views; an
-- audit can do the same (the reader role may select them).
--
-- Columns are named and typed like the Cassandra tables (schemas/scylla/0001):
-- - timestamps truncated to the millisecond a CQL `timestamp` keeps (always toward the past,
--   as a CQL timestamp read back is), `created_at_micros` the microseconds below it (0-999);
-- - a human turn has no model: NULL, as the read model never writes that cell;
-- - `payload` is JSON text in the canonical form the projection writes: keys sorted by code
--   point, no whitespace, non-ASCII kept, and numbers as Python's json module prints what it
--   parsed from jsonb's text (see cqrs_canonical_json).

-- A JSON number with a fraction as Python's repr of the nearest double prints it. jsonb prints
-- numbers in plain decimal (never with an exponent), and Python reads such text as an int
-- unless it has a '.', so only those reach here. float8's shortest round-trip text (any
-- extra_float_digits > 0) has the same digits as Python's repr; only the layout differs:
-- Python writes a fixed point number with at least one fractional digit for decimal
-- exponents -4..15 and d.ddde±XX otherwise.
CREATE FUNCTION cqrs_python_float_repr(number text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
SET extra_float_digits = 1 AS $$
DECLARE
    shortest text;
    parts    text[];
    minus     text;
    all_digits text;
    zeros  integer;
    digits   text;
    exponent integer;
BEGIN
    BEGIN
        shortest := number::float8::text;
    EXCEPTION WHEN numeric_value_out_of_range THEN
        -- Beyond the doubles: Python's float() gives ±inf (json prints Infinity) or ±0.0.
        IF abs(number::numeric) >= 1 THEN
            RETURN CASE WHEN number LIKE '-%' THEN '-Infinity' ELSE 'Infinity' END;
        END IF;
        RETURN CASE WHEN number LIKE '-%' THEN '-0.0' ELSE '0.0' END;
    END;
    parts := regexp_match(shortest, '^(-?)([0-9]+)(?:\.([0-9]+))?(?:e([-+][0-9]+))?$');
    IF parts IS NULL THEN
        RAISE EXCEPTION 'unexpected float8 text % for %', shortest, number;
    END IF;
    minus := parts[1];
    all_digits := parts[2] || coalesce(parts[3], '');
    IF ltrim(all_digits, '0') = '' THEN
        RETURN minus || '0.0';
    END IF;
    zeros := length(all_digits) - length(ltrim(all_digits, '0'));
    digits := rtrim(ltrim(all_digits, '0'), '0');
    -- The power of ten of the first significant digit.
    exponent := length(parts[2]) - 1 - zeros + coalesce(parts[4]::integer, 0);
    IF exponent >= 16 OR exponent < -4 THEN
        RETURN minus || left(digits, 1)
            || CASE WHEN length(digits) > 1 THEN '.' || substr(digits, 2) ELSE '' END
            || 'e' || CASE WHEN exponent < 0 THEN '-' ELSE '+' END
            || CASE WHEN abs(exponent) < 10 THEN '0' ELSE '' END || abs(exponent);
    END IF;
    IF exponent < 0 THEN
        RETURN minus || '0.' || repeat('0', -exponent - 1) || digits;
    END IF;
    RETURN minus || rpad(left(digits, exponent + 1), exponent + 1, '0') || '.'
        || coalesce(nullif(substr(digits, exponent + 2), ''), '0');
END $$;

-- json.dumps(json.loads(v::text), sort_keys=True, separators=(',', ':'), ensure_ascii=False).
-- Strings: to_json(text) escapes exactly what Python does (", \, \b \f \n \r \t, other
-- control characters as \u00xx in lower case) and keeps the rest as is. Keys: COLLATE "C"
-- compares UTF-8 bytes, whose order is the code-point order Python sorts by (jsonb's own
-- order puts shorter keys first).
CREATE FUNCTION cqrs_canonical_json(v jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    result text;
BEGIN
    CASE jsonb_typeof(v)
    WHEN 'object' THEN
        SELECT '{' || coalesce(string_agg(to_json(key)::text || ':' || cqrs_canonical_json(value),
                                          ',' ORDER BY key COLLATE "C"), '') || '}'
          INTO result FROM jsonb_each(v);
        RETURN result;
    WHEN 'array' THEN
        SELECT '[' || coalesce(string_agg(cqrs_canonical_json(elem), ',' ORDER BY n), '') || ']'
          INTO result FROM jsonb_array_elements(v) WITH ORDINALITY AS e(elem, n);
        RETURN result;
    WHEN 'number' THEN
        result := v::text;
        RETURN CASE WHEN strpos(result, '.') > 0 THEN cqrs_python_float_repr(result)
                    ELSE result END;
    ELSE
        RETURN v::text;  -- strings (escaped as above), true, false, null
    END CASE;
END $$;

-- CQL timestamps keep milliseconds. date_trunc on a timestamptz works in the session's time
-- zone; at UTC it is the same instant whatever the session's setting.
CREATE FUNCTION cqrs_cql_timestamp(t timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN date_trunc('milliseconds', t AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';

-- The microseconds below the millisecond (0-999): the seconds field in µs is never negative.
CREATE FUNCTION cqrs_cql_micros(t timestamptz) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN (extract(microseconds FROM t AT TIME ZONE 'UTC')::bigint % 1000)::integer;

CREATE VIEW expected_recent_conversations AS
SELECT user_id,
       cqrs_cql_timestamp(created_at)      AS created_at,
       id                                  AS session_id,
       title,
       last_message,
       cqrs_cql_timestamp(last_message_at) AS last_message_at,
       turn_count
  FROM sessions;

CREATE VIEW expected_conversation_timeline AS
SELECT session_id,
       cqrs_cql_timestamp(created_at) AS created_at,
       cqrs_cql_micros(created_at)    AS created_at_micros,
       id                             AS turn_id,
       'human'::text                  AS role,
       content,
       NULL::text                     AS model
  FROM human_turns
UNION ALL
SELECT session_id,
       cqrs_cql_timestamp(created_at),
       cqrs_cql_micros(created_at),
       id,
       'agent'::text,
       content,
       model
  FROM agent_turns;

CREATE VIEW expected_sessions_by_id AS
SELECT id                                  AS session_id,
       user_id,
       title,
       cqrs_cql_timestamp(created_at)      AS created_at,
       last_message,
       cqrs_cql_timestamp(last_message_at) AS last_message_at,
       turn_count
  FROM sessions;

CREATE VIEW expected_steps_by_turn AS
SELECT agent_turn_id,
       cqrs_cql_timestamp(created_at) AS created_at,
       cqrs_cql_micros(created_at)    AS created_at_micros,
       id                             AS step_id,
       session_id,
       kind,
       cqrs_canonical_json(payload)   AS payload
  FROM steps;

-- Like the tables (0003): the reader role (snapshot, audit) reads, nothing else.
GRANT SELECT ON expected_recent_conversations, expected_conversation_timeline,
                expected_sessions_by_id, expected_steps_by_turn TO cqrs_reader;

-- The audit's expected side (docs/decisions.md, "The audit buckets by token, computed in
-- Postgres"). For each read model a view gives, per expected row (schemas/postgres/0008):
--
-- - token: Cassandra's Murmur3Partitioner token of the row's partition key, which the audit
--   buckets both sides by, so the Scylla side scans the same buckets as token ranges;
-- - version_us: the source row's version (updated_at in µs), which the row's cells carry as
--   their write time in Scylla; source_id: the source row's id (indexed: a re-check reads
--   single rows by it);
-- - every column of the read model (catalog order: partition key, clustering key, values) as
--   the text the audit compares: uuids in their canonical text, timestamps as milliseconds
--   since the epoch (what a CQL timestamp keeps), ints in decimal, text as is;
-- - fingerprint: the first 64 bits of the MD5 of the length-prefixed columns and the version,
--   as a signed bigint. The audit computes the same from what it scans in Scylla, and the
--   per-bucket sums of both sides are compared (data-diff's checksum, computed server-side).
--
-- Nothing here uses the Python projection: a projection bug shows up as a difference.

-- Debian's postgresql-<major>-hll (installed by the local stack) provides MurmurHash3 x64 128
-- with Cassandra's seed: hll_hash_bytea(bytes, 0) is the partitioner's token of a key whose
-- serialized form is those bytes (a uuid's 16 bytes: uuid_send).
CREATE EXTENSION IF NOT EXISTS hll;
-- hll_hashval is a bigint underneath; the extension only declares the cast the other way.
CREATE CAST (hll_hashval AS bigint) WITHOUT FUNCTION;

-- Murmur3Partitioner.normalize: Long.MIN_VALUE is not a token; it becomes Long.MAX_VALUE.
CREATE FUNCTION cqrs_token(k uuid) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN coalesce(nullif(hll_hash_bytea(uuid_send(k), 0)::bigint, -9223372036854775808),
                9223372036854775807);

-- A CQL timestamp's value: milliseconds since the epoch, toward the past (exact: extract
-- gives numeric since PostgreSQL 14).
CREATE FUNCTION cqrs_epoch_ms(t timestamptz) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN floor(extract(epoch FROM t) * 1000)::bigint;

CREATE FUNCTION cqrs_version_us(t timestamptz) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN (extract(epoch FROM t) * 1000000)::bigint;

-- One column in a fingerprint: its length in characters, ':' and its text; '~' for NULL.
-- The length prefix keeps ("ab", "c") and ("a", "bc") apart.
CREATE FUNCTION cqrs_fp_field(v text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN coalesce(length(v)::text || ':' || v, '~');

CREATE FUNCTION cqrs_fp_hash(t text) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN ('x' || left(md5(t), 16))::bit(64)::bigint;

CREATE VIEW audit_recent_conversations AS
SELECT token, version_us, source_id, user_id, created_at, session_id, title, last_message,
       last_message_at, turn_count,
       cqrs_fp_hash(cqrs_fp_field(user_id) || cqrs_fp_field(created_at)
                    || cqrs_fp_field(session_id) || cqrs_fp_field(title)
                    || cqrs_fp_field(last_message) || cqrs_fp_field(last_message_at)
                    || cqrs_fp_field(turn_count) || cqrs_fp_field(version_us::text))
         AS fingerprint
  FROM (SELECT cqrs_token(user_id)                   AS token,
               cqrs_version_us(updated_at)           AS version_us,
               id                                    AS source_id,
               user_id::text                         AS user_id,
               cqrs_epoch_ms(created_at)::text       AS created_at,
               id::text                              AS session_id,
               title,
               last_message,
               cqrs_epoch_ms(last_message_at)::text  AS last_message_at,
               turn_count::text                      AS turn_count
          FROM sessions) r;

CREATE VIEW audit_conversation_timeline AS
SELECT token, version_us, source_id, session_id, created_at, created_at_micros, turn_id, role,
       content, model,
       cqrs_fp_hash(cqrs_fp_field(session_id) || cqrs_fp_field(created_at)
                    || cqrs_fp_field(created_at_micros) || cqrs_fp_field(turn_id)
                    || cqrs_fp_field(role) || cqrs_fp_field(content) || cqrs_fp_field(model)
                    || cqrs_fp_field(version_us::text))
         AS fingerprint
  FROM (SELECT cqrs_token(session_id)                AS token,
               cqrs_version_us(updated_at)           AS version_us,
               id                                    AS source_id,
               session_id::text                      AS session_id,
               cqrs_epoch_ms(created_at)::text       AS created_at,
               cqrs_cql_micros(created_at)::text     AS created_at_micros,
               id::text                              AS turn_id,
               'human'::text                         AS role,
               content,
               NULL::text                            AS model
          FROM human_turns
        UNION ALL
        SELECT cqrs_token(session_id),
               cqrs_version_us(updated_at),
               id,
               session_id::text,
               cqrs_epoch_ms(created_at)::text,
               cqrs_cql_micros(created_at)::text,
               id::text,
               'agent'::text,
               content,
               model
          FROM agent_turns) r;

CREATE VIEW audit_sessions_by_id AS
SELECT token, version_us, source_id, session_id, user_id, title, created_at, last_message,
       last_message_at, turn_count,
       cqrs_fp_hash(cqrs_fp_field(session_id) || cqrs_fp_field(user_id)
                    || cqrs_fp_field(title) || cqrs_fp_field(created_at)
                    || cqrs_fp_field(last_message) || cqrs_fp_field(last_message_at)
                    || cqrs_fp_field(turn_count) || cqrs_fp_field(version_us::text))
         AS fingerprint
  FROM (SELECT cqrs_token(id)                        AS token,
               cqrs_version_us(updated_at)           AS version_us,
               id                                    AS source_id,
               id::text                              AS session_id,
               user_id::text                         AS user_id,
               title,
               cqrs_epoch_ms(created_at)::text       AS created_at,
               last_message,
               cqrs_epoch_ms(last_message_at)::text  AS last_message_at,
               turn_count::text                      AS turn_count
          FROM sessions) r;

CREATE VIEW audit_steps_by_turn AS
SELECT token, version_us, source_id, agent_turn_id, created_at, created_at_micros, step_id,
       session_id, kind, payload,
       cqrs_fp_hash(cqrs_fp_field(agent_turn_id) || cqrs_fp_field(created_at)
                    || cqrs_fp_field(created_at_micros) || cqrs_fp_field(step_id)
                    || cqrs_fp_field(session_id) || cqrs_fp_field(kind)
                    || cqrs_fp_field(payload) || cqrs_fp_field(version_us::text))
         AS fingerprint
  FROM (SELECT cqrs_token(agent_turn_id)             AS token,
               cqrs_version_us(updated_at)           AS version_us,
               id                                    AS source_id,
               agent_turn_id::text                   AS agent_turn_id,
               cqrs_epoch_ms(created_at)::text       AS created_at,
               cqrs_cql_micros(created_at)::text     AS created_at_micros,
               id::text                              AS step_id,
               session_id::text                      AS session_id,
               kind,
               cqrs_canonical_json(payload)          AS payload
          FROM steps) r;

GRANT SELECT ON audit_recent_conversations, audit_conversation_timeline,
                audit_sessions_by_id, audit_steps_by_turn TO cqrs_reader;

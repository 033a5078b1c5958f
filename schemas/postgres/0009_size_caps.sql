-- Size caps that agree (docs/decisions.md, "Size caps that agree"): every change event of a
-- row within these caps fits the 16 MiB record cap of Kafka Connect's producer, the broker
-- and the CDC consumer, so no real change can be refused for its size on the way to the
-- read models. Worst case: an update of an agent turn carries the content twice (before and
-- after images), and JSON escapes a control character as \u00XX (6 bytes for 1): 2 x 6 MiB
-- plus the other columns. A step's payload is JSON text, whose re-escaping at most doubles it.
-- The dual-write API's limits (tasks/dual_write_policy.py) stay within these.
ALTER TABLE human_turns ADD CONSTRAINT human_turns_content_size
    CHECK (octet_length(content) <= 1048576);
ALTER TABLE agent_turns ADD CONSTRAINT agent_turns_content_size
    CHECK (octet_length(content) <= 1048576);
ALTER TABLE agent_turns ADD CONSTRAINT agent_turns_model_size
    CHECK (char_length(model) <= 10000);
ALTER TABLE steps ADD CONSTRAINT steps_payload_size
    CHECK (octet_length(payload::text) <= 1048576);
ALTER TABLE steps ADD CONSTRAINT steps_kind_size
    CHECK (char_length(kind) <= 10000);
ALTER TABLE sessions ADD CONSTRAINT sessions_title_size
    CHECK (char_length(title) <= 10000);

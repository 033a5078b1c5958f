-- cqrs_python_float_repr catches an error (a PL/pgSQL EXCEPTION block: a subtransaction), which
-- PostgreSQL forbids during a parallel operation: once the write model was large enough for a
-- parallel plan (a few hundred thousand steps), the audit of steps_by_turn failed with
-- "cannot start subtransactions during a parallel operation". PostgreSQL's rule is that such
-- a function is PARALLEL UNSAFE, and so is cqrs_canonical_json, which calls it (the planner
-- reads the label of the function a query names, not of the functions inside it). Queries on
-- them run without parallel workers; nothing else changes.
ALTER FUNCTION cqrs_python_float_repr(text) PARALLEL UNSAFE;
ALTER FUNCTION cqrs_canonical_json(jsonb) PARALLEL UNSAFE;

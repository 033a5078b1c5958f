"""The audit path (docs/architecture.md): checks that the read models hold what the write model
says they should. Today: the read models' Great Expectations suites (``suites``), validation of
rows against them (``quality``) and reading rows from Scylla (``rows``); the audit and reconcile
flows, comparing Postgres's ``expected_*`` views with Scylla, come later."""

# cqrs-sync: the two commands a new user needs are `make demo` and `make test`.
SHELL := /bin/bash
PY    := .venv/bin/python
export PREFECT_API_URL ?= http://127.0.0.1:4200/api
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.stack/data/prefect-client

.PHONY: venv up down status clean schemas demo demo-stop test test-unit chaos lint bench profile cdc

venv: .venv/.installed
.venv/pyvenv.cfg:
	@command -v python3 >/dev/null || { echo "python3 (>= 3.11) is required"; exit 1; }
	@python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python >= 3.11 is required, found $$(python3 --version)"; exit 1; }
	python3 -m venv .venv
.venv/.installed: pyproject.toml .venv/pyvenv.cfg
	@# uv resolves the same versions as pip and installs them in ~45 s instead of ~95 s;
	@# compiled, or every process compiles its imports (docs/decisions.md, "The venv is
	@# installed with uv").
	$(PY) -m pip install -q uv
	$(PY) -m uv pip install -q --compile-bytecode --python $(PY) -e '.[dev]'
	@touch $@

up: venv          ## start the local stack (idempotent)
	$(PY) -m infra.stack up

down: venv        ## stop what `up` started, keep data
	$(PY) -m infra.stack down

status: venv      ## exit 0 only when every service is healthy
	$(PY) -m infra.stack status

clean: venv       ## stop and remove data and logs (the jar cache stays)
	$(PY) -m infra.stack clean

schemas: up       ## apply schemas and register the Debezium connector
	$(PY) -m flows.setup

demo: schemas     ## the main job: the whole system at work on the local stack
	$(PY) -m flows.demo

demo-stop: venv   ## cancel the demo's CDC run and stop serving the deployments (stack stays)
	$(PY) -m flows.demo --stop

test: up          ## install, start the stack, run every test
	$(PY) -m support.run_tests

test-unit: venv   ## fast pure tests, no stack (CI also runs the ones marked slow)
	$(PY) -m pytest tests/unit -m "not slow"

chaos: up         ## the fault suite: faults under a steady write load, then a clean audit (~5 min)
	$(PY) -m pytest -m chaos

PYDIRS := tasks flows deployments infra support bench tests

lint: venv        ## ruff (lint and format), mypy over every Python folder; the import rules
	$(PY) -m ruff check $(PYDIRS)
	$(PY) -m ruff format --check $(PYDIRS)
	$(PY) -m mypy $(PYDIRS)
	.venv/bin/lint-imports --no-cache --no-logo

bench: schemas    ## every benchmark, ~30 min; results in bench/results/, tables on stdout
	$(PY) -m bench.dual_write --calls 2000
	$(PY) -m bench.cdc_cpu
	$(PY) -m bench.cdc --rates 200 500 1000 2000 3000 4000 --backlog 50000 --soak-seconds 600
	$(PY) -m bench.backfill --turns 100000
	$(PY) -m bench.backfill --turns 1000000
	$(PY) -m bench.audit --rows 100000 1000000

profile: schemas  ## py-spy flame graphs of the dual-write, backfill and CDC paths, ~6 min; bench/results/profile-*
	$(PY) -m bench.profile

cdc: schemas      ## run the CDC consumer in the foreground until interrupted
	$(PY) -m flows.cdc

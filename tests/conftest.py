"""Test configuration of its own, the same with `make test` or a bare `pytest`.

Prefect reads its settings once, when it is first imported: they are set here, before any test
module or plugin imports it. Without an API URL every session would start a temporary Prefect
server of its own (slow, and flaky on a loaded machine); the tests use the local stack's
server, like the Makefile. Values already in the environment win.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("PREFECT_API_URL", "http://127.0.0.1:4200/api")
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".stack" / "data" / "prefect-client"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# Never fall back to a temporary server: a wrong or missing API URL fails loudly instead.
os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "false")


def _closed(stream: object) -> bool:
    return bool(getattr(stream, "closed", False))


def _reattach_log_streams() -> None:
    """Point handlers whose stream pytest's capture has closed at the real stderr.

    Handlers created while a test ran (Prefect's console handler, set up on the first flow
    run) keep the capture's stream; messages logged after the session (at exit: Prefect's
    services and clients shutting down) were written to that closed stream and each ended in
    a "--- Logging error ---" traceback."""
    loggers = [
        logging.getLogger(),
        *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict)),
    ]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            console = getattr(handler, "console", None)  # rich (Prefect's console handler)
            if console is not None and _closed(getattr(console, "file", None)):
                console.file = sys.__stderr__
            if isinstance(handler, logging.StreamHandler) and _closed(handler.stream):
                handler.setStream(sys.__stderr__)  # type: ignore[arg-type]


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    _reattach_log_streams()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The fault suite runs last: it restarts Postgres, Kafka and Cassandra, and connections
    other modules keep for their whole session (a dual-write session's pool) would meet the
    restart as an error that is the fault suite's, not theirs. (`make test` runs the stack's
    tests in lanes, see tests/integration/lanes.py, and the unit tests beside them:
    support/run_tests.py.)"""
    lane = config.getoption("stack_lane")
    if lane is not None:
        from tests.integration import lanes

        lanes.select(config, items, lane)
    items.sort(key=lambda item: item.get_closest_marker("chaos") is not None)


def pytest_addoption(parser: pytest.Parser) -> None:
    from tests.integration import lanes

    parser.addoption(
        "--stack-lane",
        choices=lanes.CHOICES,
        default=None,
        help="run only the stack tests of one lane (tests/integration/lanes.py); `make test` "
        "runs lanes A and B at once, then solo",
    )

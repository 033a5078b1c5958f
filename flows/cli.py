"""The flows' command lines share one shape: parse the options, validate them before any flow
run is created (a mistake is printed and the process exits with status 2, as argparse does for
its own errors), then run the flow and return its exit status."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tasks.core.errors import ConfigurationError

# Exit status for a usage error: argparse's own.
USAGE_ERROR = 2


def run_cli(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    validate: Callable[[Mapping[str, Any]], object],
    run: Callable[[dict[str, Any]], int],
) -> int:
    """Parse ``argv`` with ``parser``, keep the options given (None means "the default"),
    check them with ``validate`` (which raises ConfigurationError naming each bad one), then
    return ``run(options)``."""
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        validate(args)
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    return run(args)

"""`make test`: the stack's tests in lanes, and the unit tests beside them.

The stack's tests mostly wait on the services. They run as two pytest sessions at once, lanes A
and B (tests/integration/lanes.py: tests that touch only their own ids, keyspaces, groups and
topics), then one session alone for the tests marked `solo` (services stopped, the shared
connector changed, assertions over shared state), the fault suite last. The unit tests are
CPU-bound and need no stack: a fourth pytest runs them from the start at nice 10, so they use
the CPU the stack's tests leave idle instead of slowing them. Lane A prints as it runs; lane B's
and the unit tests' reports are printed after theirs ends (docs/decisions.md, "How `make test`
runs").

Usage: ``python -m support.run_tests [pytest arguments for the stack's tests]``. With
arguments, the stack's tests run in one session, one after another, as before the lanes (the
unit tests still beside them). The
exit status is the first non-zero one (lane A, lane B, solo, unit), so pytest's 5 ("no tests")
fails too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / ".stack" / "logs"
TMP = ROOT / ".stack" / "tmp"
UNIT_LOG = LOGS / "unit-tests.log"
LANE_B_LOG = LOGS / "stack-tests-lane-b.log"
PYTEST = [sys.executable, "-m", "pytest"]


def _lower_priority() -> None:
    os.nice(10)


def _lane(lane: str, out: IO[bytes] | None, *, cache: bool) -> subprocess.Popen[bytes]:
    """A pytest session of one lane, with a temporary directory of its own; only one session
    may use the cache plugin (both would write .pytest_cache at once)."""
    args = [*PYTEST, "tests/integration", f"--stack-lane={lane}", f"--basetemp={TMP / lane}"]
    if not cache:
        args[3:3] = ["-p", "no:cacheprovider"]
    return subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT if out else None)


def _print_log(title: str, log: Path) -> None:
    print(f"\n===== {title} (log {log.relative_to(ROOT)}) =====", flush=True)
    sys.stdout.write(log.read_text(errors="replace"))
    sys.stdout.flush()


def _stack_tests(argv: list[str]) -> list[tuple[str, int, float]]:
    """Run the stack's tests; (what, exit status, seconds) of each session."""
    if argv:
        start = time.monotonic()
        rc = subprocess.run([*PYTEST, "tests/integration", *argv], cwd=ROOT).returncode
        return [("stack tests", rc, time.monotonic() - start)]
    results = []
    start = time.monotonic()
    with LANE_B_LOG.open("wb") as b_log:
        lane_b = _lane("B", b_log, cache=False)
        try:
            rc_a = _lane("A", None, cache=True).wait()
            results.append(("lane A", rc_a, time.monotonic() - start))
        finally:
            rc_b = lane_b.wait()
    results.append(("lane B", rc_b, time.monotonic() - start))
    _print_log("stack tests, lane B (ran beside lane A)", LANE_B_LOG)
    start = time.monotonic()
    print("\n===== stack tests that need the stack to themselves (solo) =====", flush=True)
    results.append(("solo", _lane("solo", None, cache=True).wait(), time.monotonic() - start))
    return results


def main(argv: list[str]) -> int:
    LOGS.mkdir(parents=True, exist_ok=True)
    TMP.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with UNIT_LOG.open("wb") as log:
        unit = subprocess.Popen(
            [*PYTEST, "-p", "no:cacheprovider", "tests/unit"],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_lower_priority,
        )
        try:
            results = _stack_tests(argv)
        finally:
            results.append(("unit tests", unit.wait(), time.monotonic() - start))
    _print_log("unit tests (ran beside the stack's)", UNIT_LOG)
    for what, rc, seconds in results:
        print(f"run_tests: {what} exited {rc} after {seconds:.0f} s")
    return next((rc for _, rc, _ in results if rc != 0), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

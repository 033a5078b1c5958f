"""`make test`: the unit tests beside the stack's, as two pytest processes.

The stack's tests share one stack and run one after another (the fault suite last, see
tests/conftest.py); they mostly wait on the services. The unit tests are CPU-bound and need
no stack, so they run at the same time in a second pytest, at nice 10: on a 2-core machine
they use the CPU the stack's tests leave idle instead of slowing them. Their report is printed
after the stack's. pytest-xdist's ``--dist loadgroup`` was tried first and dropped: with
pytest 9.2 its group marks no longer change the node ids the scheduler reads, so it spread
the stack's tests (the fault suite too) over both workers (docs/decisions.md, "How `make
test` runs").

Usage: ``python -m support.run_tests [pytest arguments for the stack's tests]``. The exit
status is the first non-zero one of the two runs (stack first), so pytest's 5 ("no tests")
fails too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNIT_LOG = ROOT / ".stack" / "logs" / "unit-tests.log"


def _lower_priority() -> None:
    os.nice(10)


def main(argv: list[str]) -> int:
    UNIT_LOG.parent.mkdir(parents=True, exist_ok=True)
    pytest = [sys.executable, "-m", "pytest"]
    with UNIT_LOG.open("wb") as log:
        # No cache plugin in the second run: both would write .pytest_cache at once.
        unit = subprocess.Popen(
            [*pytest, "-p", "no:cacheprovider", "tests/unit"],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_lower_priority,
        )
        try:
            stack_rc = subprocess.run([*pytest, "tests/integration", *argv], cwd=ROOT).returncode
        finally:
            unit_rc = unit.wait()
    print(f"\n===== unit tests (run beside the stack's; log {UNIT_LOG.relative_to(ROOT)}) =====")
    sys.stdout.write(UNIT_LOG.read_text(errors="replace"))
    print(f"run_tests: stack's tests exited {stack_rc}, unit tests exited {unit_rc}")
    return stack_rc or unit_rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

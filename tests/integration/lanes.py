"""Which stack tests may share the stack with other stack tests, and in which lane they run.

`make test` (support/run_tests.py) runs the stack's tests as two pytest sessions at once, lanes
A and B, then one session alone for the tests marked `solo` (the fault suite last). A test is
`solo` when it stops or hangs a shared service, changes the shared connector, truncates shared
tables, or asserts over shared state (the whole keyspace, every partition's lag, the slot)
that another test's writes would move. Every other test only touches its own ids, keyspace,
consumer group or topics. Why and how the split was measured: docs/decisions.md, "How `make
test` runs".

A module whose tests are not all `solo` must be listed in exactly one lane: a new module that
is not fails the collection, naming itself, instead of being left out. The order of a lane's
list is the order its modules run in.
"""

from __future__ import annotations

from pathlib import Path

import pytest

LANES: dict[str, tuple[str, ...]] = {
    # The Prefect deployment servers (serve.py: the UI, deployments and secrets-in-logs
    # tests) run reconciles of what any failed audit found: they stay in one lane, one after
    # another, with the tests that leave rows in the shared keyspace for a while.
    "A": (
        "test_ui.py",
        "test_deployments.py",
        "test_secrets_in_logs.py",
        "test_quality.py",
        "test_sampled_quality.py",
        "test_dual_write.py",
        "test_least_privilege.py",
        "test_oracle.py",
        "test_flow_safety.py",
        "test_hostile_input.py",
        "test_catalog.py",
        "test_role_passwords.py",
        "test_secrets.py",
        "test_sstable_load.py",
        "test_slot_safety.py",
    ),
    "B": (
        "test_cdc.py",
        "test_cdc_faults.py",
        "test_scylla_adapter.py",
        "test_stack.py",
        "test_topics.py",
        "test_transport.py",
        "test_backfill.py",
    ),
}
SOLO = "solo"
CHOICES = (*LANES, SOLO)


def is_solo(item: pytest.Item) -> bool:
    return (
        item.get_closest_marker("solo") is not None or item.get_closest_marker("chaos") is not None
    )


def lane_of(item: pytest.Item) -> str:
    """The lane an item runs in under `--stack-lane`; a UsageError for an unlisted module."""
    if is_solo(item):
        return SOLO
    module = Path(str(item.path)).name
    for lane, modules in LANES.items():
        if module in modules:
            return lane
    raise pytest.UsageError(
        f"{item.nodeid}: the module {module} is in no lane of tests/integration/lanes.py "
        "(add it to LANES, or mark its tests solo)"
    )


def select(config: pytest.Config, items: list[pytest.Item], lane: str) -> None:
    """Keep the items of `lane` (in the lane's module order) and report the rest deselected."""
    stack_items = [i for i in items if "integration" in Path(str(i.path)).parts]
    lanes = {id(i): lane_of(i) for i in stack_items}  # every module checked, in any lane
    keep = [i for i in stack_items if lanes[id(i)] == lane]
    if lane != SOLO:
        order = {m: n for n, m in enumerate(LANES[lane])}
        keep.sort(key=lambda i: order[Path(str(i.path)).name])
    kept = {id(i) for i in keep}
    dropped = [i for i in items if id(i) not in kept]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep

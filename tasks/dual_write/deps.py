"""What the dual-write operations need, opened once: an ``app``-role connection pool, the
Scylla handle and the policy. App code builds them with ``connect_deps(settings)`` or uses the
process-wide ``default_deps()``, which reads the settings and the policy from the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from psycopg_pool import ConnectionPool, PoolTimeout

from tasks.core.errors import ServiceUnavailable
from tasks.core.write_policy import DualWritePolicy
from tasks.dual_write.read_model import ScyllaHandle
from tasks.settings import Settings, get_settings


@dataclass(frozen=True)
class DualWriteDeps:
    """What the operations need: an ``app``-role connection pool, the Scylla handle, the
    policy. ``with_policy`` gives the same connections under another policy."""

    pool: ConnectionPool
    scylla: ScyllaHandle
    policy: DualWritePolicy = field(default_factory=DualWritePolicy)
    pool_timeout_s: float = 5.0

    def with_policy(self, policy: DualWritePolicy) -> DualWriteDeps:
        return replace(self, policy=policy)

    def close(self) -> None:
        self.scylla.close()
        self.pool.close()


def connect_deps(
    settings: Settings,
    policy: DualWritePolicy | None = None,
    *,
    pool_size: int = 8,
    scylla: ScyllaHandle | None = None,
    wait_s: float | None = 10.0,
) -> DualWriteDeps:
    """Open a pool for the app role and a Scylla handle (connected in the background). With
    ``wait_s`` it waits that long for both, so the first calls are not needlessly left to CDC;
    a Scylla that is down does not stop the app from writing."""
    pool: ConnectionPool = ConnectionPool(
        settings.postgres.conninfo("app"),
        min_size=1,
        max_size=pool_size,
        kwargs={"autocommit": True},
        name="cqrs-dual-write",
        open=True,
    )
    handle = scylla or ScyllaHandle(
        settings.scylla, max_in_flight=(policy or DualWritePolicy()).max_in_flight
    )
    if wait_s:
        try:
            pool.wait(timeout=wait_s)
        except PoolTimeout as exc:
            pool.close()
            handle.close()
            raise ServiceUnavailable("PostgreSQL", f"no app connection in {wait_s}s") from exc
        handle.wait_ready(wait_s)
    return DualWriteDeps(pool, handle, policy or DualWritePolicy())


_default: DualWriteDeps | None = None


def default_deps() -> DualWriteDeps:
    """The process-wide deps (settings and policy from the environment), opened on first use."""
    global _default
    if _default is None:
        _default = connect_deps(get_settings())
    return _default


def close_default_deps() -> None:
    global _default
    if _default is not None:
        _default.close()
        _default = None

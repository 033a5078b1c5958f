"""The local stack without Docker: PostgreSQL (Debian's package), Kafka (KRaft, one node),
Kafka Connect with Debezium, Apache Cassandra 5.0 (the CQL peer of ScyllaDB) and a Prefect
server, all on 127.0.0.1, data and logs under ``.stack/``.

    python -m infra.stack up | down | status | clean

``up`` is idempotent: it installs what is missing, starts what is not running, waits for
each service's real health check and prints endpoints and log files. ``down`` stops only the
processes it started (pid files under ``.stack/run``) and keeps data; ``clean`` removes data.
The services are in infra/services.py and infra/postgres.py, paths and process helpers in
infra/processes.py.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

from infra.processes import (
    CONF,
    DATA,
    HOST,
    JARS,
    LOGS,
    RUN,
    STACK,
    StackError,
    alive_pid,
    java17,
    pid_file,
    port_free,
    rss_mib,
    running_pid,
    say,
    stop_pid,
    tail,
)
from infra.services import SERVICES, Service

__all__ = ["DATA", "SERVICES", "Service", "StackError", "alive_pid", "main", "status"]


def select(names: list[str] | None) -> list[Service]:
    if not names:
        return SERVICES
    unknown = set(names) - {s.name for s in SERVICES}
    if unknown:
        raise StackError(
            f"unknown service(s) {sorted(unknown)}; known: {[s.name for s in SERVICES]}"
        )
    return [s for s in SERVICES if s.name in names]


def wait_healthy(svc: Service) -> None:
    deadline = time.monotonic() + svc.startup_timeout
    while time.monotonic() < deadline:
        if svc.healthy():
            return
        if running_pid(svc.name) is None:
            raise StackError(
                f"{svc.name} exited during start-up; see {LOGS / svc.name}.log:\n"
                f"{tail(LOGS / f'{svc.name}.log')}"
            )
        time.sleep(1)
    raise StackError(
        f"{svc.name} did not become healthy in {svc.startup_timeout:.0f}s; "
        f"see {LOGS / svc.name}.log:\n{tail(LOGS / f'{svc.name}.log')}"
    )


def up(names: list[str] | None = None) -> None:
    t0 = time.monotonic()
    for d in (JARS, DATA, LOGS, RUN, CONF):
        d.mkdir(parents=True, exist_ok=True)
    java17()
    services = select(names)
    started: list[Service] = []
    # Start in dependency waves: what nothing needs first, all at once; then the rest.
    pending = list(services)
    while pending:
        wave = [s for s in pending if all(n not in {p.name for p in pending} for n in s.needs)]
        for svc in wave:
            if alive_pid(svc.name):
                say(f"{svc.name}: already running")
                continue
            busy = [p for p in svc.ports if not port_free(p)]
            if busy:
                raise StackError(
                    f"{svc.name} cannot start: port(s) {busy} on {HOST} already in "
                    f"use by another process (stop it, or `make down` if ours)"
                )
            say(f"{svc.name}: starting")
            svc.start()
            started.append(svc)
        for svc in wave:
            wait_healthy(svc)
            pending.remove(svc)
    say(
        f"stack up in {time.monotonic() - t0:.1f}s "
        f"(started: {', '.join(s.name for s in started) or 'none'})"
    )
    status(quiet=False)


def down(names: list[str] | None = None) -> None:
    for svc in reversed(select(names)):
        pid = alive_pid(svc.name)
        if pid is None:
            say(f"{svc.name}: not running")
            continue
        say(f"{svc.name}: stopping (pid {pid})")
        if svc.stop is not None:
            svc.stop(pid)
        else:
            stop_pid(svc.name, pid)
        pid_file(svc.name).unlink(missing_ok=True)


def status(quiet: bool = False) -> bool:
    all_ok = True
    for svc in SERVICES:
        pid = alive_pid(svc.name)
        ok = pid is not None and svc.healthy()
        all_ok &= ok
        state = "healthy" if ok else ("starting/unhealthy" if pid else "stopped")
        mem = f"{rss_mib(pid):7.0f} MiB" if pid else "      -    "
        print(f"  {svc.name:10} {state:19} {mem}  {svc.endpoint:38} log: {LOGS / svc.name}.log")
    return all_ok


def clean() -> None:
    down()
    for d in (DATA, LOGS, RUN, CONF):
        shutil.rmtree(d, ignore_errors=True)
    say(f"removed data and logs under {STACK} (jar cache kept in {JARS})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["up", "down", "status", "clean"])
    parser.add_argument("services", nargs="*", help="limit to these services")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up(args.services)
        elif args.command == "down":
            down(args.services)
        elif args.command == "status":
            return 0 if status() else 1
        else:
            clean()
    except StackError as exc:
        print(f"[stack] ERROR: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

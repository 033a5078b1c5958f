"""The local stack without Docker: PostgreSQL (Debian's package), Kafka (KRaft, one node),
Kafka Connect with Debezium, Apache Cassandra 5.0 (the CQL peer of ScyllaDB) and a Prefect
server, all on 127.0.0.1, data and logs under ``.stack/``.

    python -m infra.stack up | down | status | clean

``up`` is idempotent: it installs what is missing, starts what is not running, waits for
each service's real health check and prints endpoints and log files. ``down`` stops only the
processes it started (pid files under ``.stack/run``) and keeps data; ``clean`` removes data.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STACK = Path(os.environ.get("CQRS_STACK_DIR", ROOT / ".stack")).resolve()
JARS, DATA, LOGS, RUN, CONF = (STACK / d for d in ("jars", "data", "logs", "run", "conf"))
INFRA = ROOT / "infra"
HOST = "127.0.0.1"

PG_PORT = int(os.environ.get("CQRS_PG_PORT", "54329"))
KAFKA_PORT, KAFKA_CONTROLLER_PORT, CONNECT_PORT = 9092, 9093, 8083
CASSANDRA_PORT, CASSANDRA_STORAGE_PORT, CASSANDRA_JMX_PORT = 9042, 7000, 7199
PREFECT_PORT = 4200


class StackError(RuntimeError):
    """A failure a person must act on; the message says what and where."""


def say(msg: str) -> None:
    print(f"[stack] {msg}", flush=True)


# --------------------------------------------------------------------------- prerequisites


def java17() -> str:
    """Cassandra 5.0 runs only on Java 17 (24+ removed the SecurityManager it calls)."""
    candidates = [os.environ.get("CQRS_JAVA17_HOME", ""), "/usr/lib/jvm/java-17-openjdk-amd64"]
    candidates += sorted(str(p) for p in Path("/usr/lib/jvm").glob("*17*"))
    for home in candidates:
        java = Path(home) / "bin" / "java"
        if home and java.exists():
            out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
            if 'version "17' in out:
                return str(java)
    raise StackError(
        "Java 17 was not found (looked in CQRS_JAVA17_HOME and /usr/lib/jvm/*17*). "
        "Install it: apt-get install -y openjdk-17-jre-headless"
    )


def pg_bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        say("PostgreSQL server not found: installing Debian's postgresql package")
        if os.geteuid() != 0:
            raise StackError(
                "PostgreSQL is missing and installing it needs root: apt-get install -y postgresql"
            )
        run(["apt-get", "update", "-q"])
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "install", "-y", "-q", "postgresql", "postgresql-contrib"], env=env)
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not found:
            raise StackError("apt-get installed postgresql but no initdb was found")
    return found[-1].parent


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise StackError(
            f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
            f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return proc


def resolve_jars(name: str, dest: Path) -> Path:
    """Resolve one JVM service's dependency set with mvn from its pom; cached by pom hash."""
    pom = INFRA / "maven" / name / "pom.xml"
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()
    marker = dest / ".resolved"
    if marker.exists() and marker.read_text() == digest and any(dest.glob("*.jar")):
        return dest
    if not shutil.which("mvn"):
        raise StackError("mvn is not installed: apt-get install -y maven")
    say(f"resolving {name} jars with mvn (cached in ~/.m2 and {dest})")
    shutil.rmtree(dest, ignore_errors=True)
    proc = subprocess.run(
        [
            "mvn",
            "-B",
            "-q",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={dest}",
            "-DincludeScope=runtime",
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise StackError(
            f"jars for {name} failed to resolve from {pom}:\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    marker.write_text(digest)
    return dest


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


# --------------------------------------------------------------------------- processes


def pid_file(name: str) -> Path:
    return RUN / f"{name}.pid"


def alive_pid(name: str) -> int | None:
    """The pid of our own process for this service, if it runs (checked by its command line)."""
    path = pid_file(name)
    if not path.exists():
        return None
    try:
        pid = int(path.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (ValueError, OSError):
        return None
    return pid if str(STACK).encode() in cmdline or str(ROOT).encode() in cmdline else None


def spawn(
    name: str, cmd: list[str], env: dict[str, str] | None = None, user: str | None = None
) -> None:
    LOGS.mkdir(parents=True, exist_ok=True)
    log = open(LOGS / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    preexec: Callable[[], None] | None = None
    if user and os.geteuid() == 0:
        pw = pwd.getpwnam(user)

        def preexec() -> None:
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)

    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        start_new_session=True,
        preexec_fn=preexec,
        cwd=STACK,
    )
    pid_file(name).write_text(str(proc.pid))


def stop_pid(name: str, pid: int, timeout: float = 60.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or _zombie(pid):
            break
        time.sleep(0.3)
    else:
        say(f"{name} did not stop in {timeout:.0f}s: killing it")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children, in MiB."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    kids = [int(x) for x in out.split()]
    return kids + [g for k in kids for g in _children(k)]


# --------------------------------------------------------------------------- services


@dataclass
class Service:
    name: str
    ports: list[int]
    endpoint: str
    start: Callable[[], None]
    healthy: Callable[[], bool]
    startup_timeout: float = 180.0
    stop: Callable[[int], None] | None = None
    needs: list[str] = field(default_factory=list)


# -- PostgreSQL


def _pg_owner() -> str | None:
    return "postgres" if os.geteuid() == 0 else None


def pg_start() -> None:
    bindir = pg_bindir()
    pgdata, sockdir = DATA / "postgres", RUN / "pg"
    owner = _pg_owner()
    for d in (pgdata.parent, sockdir):
        d.mkdir(parents=True, exist_ok=True)
    if owner:
        # Postgres refuses to run as root: the cluster belongs to the postgres user, which
        # must be able to traverse the path down to it.
        pw = pwd.getpwnam(owner)
        for d in (pgdata.parent, sockdir):
            os.chown(d, pw.pw_uid, pw.pw_gid)
        for parent in [STACK, *STACK.parents]:
            if parent == Path("/"):
                break
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)
    as_owner = ["runuser", "-u", owner, "--"] if owner else []
    if not (pgdata / "PG_VERSION").exists():
        say("initialising the Postgres cluster")
        pwfile = RUN / "pg.pw"
        pwfile.write_text(os.environ.get("CQRS_PG_ADMIN_PASSWORD", "postgres-local") + "\n")
        if owner:
            pw = pwd.getpwnam(owner)
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        try:
            run(
                [
                    *as_owner,
                    str(bindir / "initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    "postgres",
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                ]
            )
        finally:
            pwfile.unlink()
        conf = (INFRA / "conf" / "postgresql.conf").read_text()
        conf = conf.replace("@PORT@", str(PG_PORT)).replace("@SOCKDIR@", str(sockdir))
        (pgdata / "postgresql.auto.conf").write_text(conf)
        (pgdata / "pg_hba.conf").write_text((INFRA / "conf" / "pg_hba.conf").read_text())
    spawn("postgres", [str(bindir / "postgres"), "-D", str(pgdata)], user=owner)


def pg_healthy() -> bool:
    bindir = pg_bindir()
    ok = subprocess.run([str(bindir / "pg_isready"), "-h", HOST, "-p", str(PG_PORT), "-q"])
    if ok.returncode != 0:
        return False
    # Create the project database once the server answers.
    import psycopg

    admin = (
        f"host={HOST} port={PG_PORT} dbname=postgres user=postgres "
        f"password={os.environ.get('CQRS_PG_ADMIN_PASSWORD', 'postgres-local')}"
    )
    db = os.environ.get("CQRS_PG_DATABASE", "cqrs")
    with psycopg.connect(admin, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone():
            conn.execute(f'CREATE DATABASE "{db}"')
        level = conn.execute("SHOW wal_level").fetchone()
        if not level or level[0] != "logical":
            raise StackError(f"Postgres runs with wal_level={level}, Debezium needs 'logical'")
    return True


def pg_stop(pid: int) -> None:
    owner = _pg_owner()
    as_owner = ["runuser", "-u", owner, "--"] if owner else []
    subprocess.run(
        [
            *as_owner,
            str(pg_bindir() / "pg_ctl"),
            "-D",
            str(DATA / "postgres"),
            "-m",
            "fast",
            "-w",
            "stop",
        ],
        capture_output=True,
    )
    stop_pid("postgres", pid, timeout=30)


# -- Kafka


def _log4j2(name: str) -> Path:
    path = CONF / f"log4j2-{name}.properties"
    path.write_text((INFRA / "conf" / "log4j2.properties").read_text())
    return path


def kafka_cluster_id() -> str:
    """A random Kafka cluster id that never starts with "-".

    The id is 16 random bytes in URL-safe base64, so one in 64 would start with "-", which
    kafka-storage's argument parser takes for an option (a CI run failed that way). Kafka's
    own Uuid.randomUuid() avoids such ids too; passing it as --cluster-id=... is a second guard.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def kafka_start() -> None:
    java = java17()
    cp = str(resolve_jars("kafka", JARS / "kafka")) + "/*"
    logdir = DATA / "kafka"
    props = CONF / "kafka.properties"
    props.write_text(
        (INFRA / "conf" / "kafka.properties").read_text().replace("@LOGDIR@", str(logdir))
    )
    if not (logdir / "meta.properties").exists():
        cluster_id = kafka_cluster_id()
        say(f"formatting Kafka storage (cluster id {cluster_id})")
        run(
            [
                java,
                "-cp",
                cp,
                f"-Dlog4j2.configurationFile={_log4j2('kafka-tools')}",
                "kafka.tools.StorageTool",
                "format",
                f"--cluster-id={cluster_id}",
                "-c",
                str(props),
            ]
        )
    spawn(
        "kafka",
        [
            java,
            "-Xms512m",
            "-Xmx1g",
            "-XX:+UseG1GC",
            f"-Dlog4j2.configurationFile={_log4j2('kafka')}",
            f"-Dcqrs.stack={STACK}",
            "-cp",
            cp,
            "kafka.Kafka",
            str(props),
        ],
    )


def kafka_healthy() -> bool:
    from confluent_kafka.admin import AdminClient

    try:
        # log_level 0: "connection refused" while the broker starts is the expected answer,
        # not something to print every 50 ms.
        md = AdminClient({"bootstrap.servers": f"{HOST}:{KAFKA_PORT}", "log_level": 0}).list_topics(
            timeout=3
        )
    except Exception:
        return False
    return bool(md.brokers)


# -- Kafka Connect with Debezium


def connect_start() -> None:
    java = java17()
    cp = str(resolve_jars("connect", JARS / "connect")) + "/*"
    plugins = JARS / "plugins"
    resolve_jars("debezium", plugins / "debezium-connector-postgres")
    props = CONF / "connect.properties"
    props.write_text(
        (INFRA / "conf" / "connect.properties").read_text().replace("@PLUGINS@", str(plugins))
    )
    spawn(
        "connect",
        [
            java,
            "-Xms256m",
            "-Xmx768m",
            "-XX:+UseG1GC",
            f"-Dlog4j2.configurationFile={_log4j2('connect')}",
            f"-Dcqrs.stack={STACK}",
            "-cp",
            cp,
            "org.apache.kafka.connect.cli.ConnectDistributed",
            str(props),
        ],
    )


def connect_healthy() -> bool:
    import httpx

    try:
        plugins = httpx.get(f"http://{HOST}:{CONNECT_PORT}/connector-plugins", timeout=3).json()
    except Exception:
        return False
    return any(p.get("class", "").endswith("PostgresConnector") for p in plugins)


# -- Cassandra


def cassandra_start() -> None:
    java = java17()
    jars = resolve_jars("cassandra", JARS / "cassandra")
    jamm = next(jars.glob("jamm-*.jar"), None)
    if jamm is None:
        raise StackError(f"the jamm agent jar is missing from {jars}")
    home = DATA / "cassandra"
    for d in ("data", "commitlog", "saved_caches", "hints", "cdc_raw", "tmp"):
        (home / d).mkdir(parents=True, exist_ok=True)
    yaml = CONF / "cassandra.yaml"
    yaml.write_text((INFRA / "conf" / "cassandra.yaml").read_text().replace("@HOME@", str(home)))
    logback = CONF / "cassandra-logback.xml"
    logback.write_text((INFRA / "conf" / "cassandra-logback.xml").read_text())
    jvm_flags = [
        line.strip()
        for line in (INFRA / "conf" / "cassandra-jvm17.options").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    spawn(
        "cassandra",
        [
            java,
            "-Xms1g",
            "-Xmx1g",
            "-Xss512k",
            "-XX:+UseG1GC",
            "-XX:+ExitOnOutOfMemoryError",
            f"-javaagent:{jamm}",
            *jvm_flags,
            f"-Dcassandra.config=file://{yaml}",
            "-Dcassandra-foreground=yes",
            f"-Dcassandra.storagedir={home}",
            f"-Dcassandra.logdir={LOGS}",
            f"-Dlogback.configurationFile={logback}",
            "-Dcassandra.skip_wait_for_gossip_to_settle=0",
            "-Dcassandra.ring_delay_ms=100",
            f"-Dcassandra.jmx.local.port={CASSANDRA_JMX_PORT}",
            f"-Djava.io.tmpdir={home / 'tmp'}",
            "-cp",
            f"{jars}/*",
            "org.apache.cassandra.service.CassandraDaemon",
        ],
    )


def cassandra_healthy() -> bool:
    if not port_open(CASSANDRA_PORT):
        return False
    from cassandra.cluster import Cluster

    cluster = Cluster([HOST], port=CASSANDRA_PORT, connect_timeout=3)
    try:
        session = cluster.connect()
        return session.execute("SELECT release_version FROM system.local").one() is not None
    except Exception:
        return False
    finally:
        cluster.shutdown()


# -- Prefect server


def prefect_env() -> dict[str, str]:
    return {
        "PREFECT_HOME": str(DATA / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(PREFECT_PORT),
        "PREFECT_API_URL": f"http://{HOST}:{PREFECT_PORT}/api",
    }


def prefect_start() -> None:
    (DATA / "prefect").mkdir(parents=True, exist_ok=True)
    prefect = Path(sys.executable).parent / "prefect"
    spawn(
        "prefect",
        [str(prefect), "server", "start", "--host", HOST, "--port", str(PREFECT_PORT)],
        env=prefect_env(),
    )


def prefect_healthy() -> bool:
    import httpx

    try:
        return httpx.get(f"http://{HOST}:{PREFECT_PORT}/api/health", timeout=3).status_code == 200
    except Exception:
        return False


SERVICES = [
    Service(
        "postgres",
        [PG_PORT],
        f"postgresql://{HOST}:{PG_PORT}/cqrs",
        pg_start,
        pg_healthy,
        60,
        stop=pg_stop,
    ),
    Service(
        "kafka",
        [KAFKA_PORT, KAFKA_CONTROLLER_PORT],
        f"{HOST}:{KAFKA_PORT}",
        kafka_start,
        kafka_healthy,
        120,
    ),
    Service(
        "cassandra",
        [CASSANDRA_PORT, CASSANDRA_STORAGE_PORT, CASSANDRA_JMX_PORT],
        f"{HOST}:{CASSANDRA_PORT} (CQL)",
        cassandra_start,
        cassandra_healthy,
        240,
    ),
    Service(
        "prefect",
        [PREFECT_PORT],
        f"http://{HOST}:{PREFECT_PORT}",
        prefect_start,
        prefect_healthy,
        120,
    ),
    Service(
        "connect",
        [CONNECT_PORT],
        f"http://{HOST}:{CONNECT_PORT}",
        connect_start,
        connect_healthy,
        180,
        needs=["kafka"],
    ),
]


def select(names: list[str] | None) -> list[Service]:
    if not names:
        return SERVICES
    unknown = set(names) - {s.name for s in SERVICES}
    if unknown:
        raise StackError(
            f"unknown service(s) {sorted(unknown)}; known: {[s.name for s in SERVICES]}"
        )
    return [s for s in SERVICES if s.name in names]


def running_pid(name: str) -> int | None:
    """The pid in the service's pid file if that process still runs. Unlike alive_pid, no
    command-line check: right after spawn the child may still be inside exec, when its
    /proc/<pid>/cmdline reads empty."""
    try:
        pid = int(pid_file(name).read_text().split()[0])
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() and not _zombie(pid) else None


def wait_healthy(svc: Service) -> None:
    deadline = time.monotonic() + svc.startup_timeout
    while time.monotonic() < deadline:
        if svc.healthy():
            return
        if running_pid(svc.name) is None:
            raise StackError(
                f"{svc.name} exited during start-up; see {LOGS / svc.name}.log:\n"
                f"{_tail(LOGS / f'{svc.name}.log')}"
            )
        time.sleep(1)
    raise StackError(
        f"{svc.name} did not become healthy in {svc.startup_timeout:.0f}s; "
        f"see {LOGS / svc.name}.log:\n{_tail(LOGS / f'{svc.name}.log')}"
    )


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


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

"""Paths, ports, prerequisites and processes of the local stack (infra/stack.py is the CLI;
infra/services.py and infra/postgres.py the services). Everything lives under ``.stack/``
(``CQRS_STACK_DIR``)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
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


def running_pid(name: str) -> int | None:
    """The pid in the service's pid file if that process still runs. Unlike alive_pid, no
    command-line check: right after spawn the child may still be inside exec, when its
    /proc/<pid>/cmdline reads empty."""
    try:
        pid = int(pid_file(name).read_text().split()[0])
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() and not _zombie(pid) else None


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"

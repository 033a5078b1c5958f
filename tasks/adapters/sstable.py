"""The backfill's "sstable" load method: projected rows become SSTables written by Cassandra's
own CQLSSTableWriter and streamed to the replicas that own them (SSTableLoader, the library
behind ``sstableloader``), instead of one CQL INSERT per row.

Why: on a CQL load the cluster spends ~40 µs of CPU per row (request, commit log, memtable,
then flush and compaction) and so does the client; a streamed SSTable costs the receiving
node a few µs per row. Every cell still carries the row's version as its write timestamp
(the INSERT the writer is given says ``USING TIMESTAMP ?``), so what wins against CDC and
dual-writes is exactly what a CQL load gives.

Where it works: Apache Cassandra 4.0+ (Cassandra's streaming protocol, its SSTable format).
ScyllaDB speaks neither, so against Scylla the ``cql`` method is the one to use.

The JVM half is ``tasks/adapters/jvm/SSTableBulkWriter.java``, run as a single-file Java 17 program
with the cassandra-all jars on its classpath, one process per loader process, for the whole
load. Rows cross the pipe column after column in CQL's binary format, produced from Arrow
buffers with numpy (no Python object per cell); each chunk is written into its own directory,
streamed, and only then acknowledged, so a chunk stays the unit of checkpoint and resume.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from cassandra.cluster import Session

from tasks.core.errors import ConfigurationError, TerminalError, TransientError, classify
from tasks.core.projection import project_arrow_columns
from tasks.settings import SSTableSettings, get_settings

JAVA_SOURCE: Final = Path(__file__).resolve().parent / "jvm" / "SSTableBulkWriter.java"
# Cassandra's own JVM flags for Java 17 that its classes need outside a Cassandra node too.
JVM_FLAGS: Final = (
    "--add-exports=java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports=java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-exports=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-exports=jdk.unsupported/sun.misc=ALL-UNNAMED",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/java.nio=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "-Dio.netty.tryReflectionSetAccessible=true",
    "-Dcassandra.storagedir=/nonexistent",  # a client: never looks for a node's data
)


# --------------------------------------------------------------------------------------------
# CQL binary values from Arrow arrays


def cql_values(array: pa.Array) -> tuple[np.ndarray, bytes]:
    """(lengths as big-endian int32, -1 for NULL; the values' bytes back to back) of one
    Arrow array in CQL's binary format: uuid = its 16 bytes, bigint = 8 and int = 4 bytes
    big-endian (timestamps are bigint ms), text = UTF-8."""
    n = len(array)
    valid = (
        np.ones(n, dtype=bool)
        if array.null_count == 0
        else array.is_valid().to_numpy(zero_copy_only=False)
    )
    typ = array.type
    if pa.types.is_fixed_size_binary(typ):
        width = typ.byte_width
        raw = np.frombuffer(array.buffers()[1], dtype=np.uint8)
        cells = raw[array.offset * width : (array.offset + n) * width].reshape(n, width)
        data = cells[valid].tobytes()
        lengths = np.where(valid, width, -1)
    elif pa.types.is_int64(typ) or pa.types.is_int32(typ):
        be = ">i8" if pa.types.is_int64(typ) else ">i4"
        values = array.fill_null(0).to_numpy().astype(be)
        data = values[valid].tobytes()
        lengths = np.where(valid, values.itemsize, -1)
    elif pa.types.is_string(typ):
        if array.null_count:
            array = array.fill_null("")  # a NULL's slot then holds no bytes
        offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[
            array.offset : array.offset + n + 1
        ]
        start, end = int(offsets[0]), int(offsets[-1])
        data = (
            bytes(memoryview(array.buffers()[2])[start:end])
            if array.buffers()[2] is not None
            else b""
        )
        lengths = np.where(valid, np.diff(offsets), -1)
    else:
        raise TerminalError(f"no CQL encoding for Arrow type {typ}")
    return lengths.astype(">i4"), data


def rows_payload(arrays: Sequence[pa.Array]) -> bytes:
    """The ROWS payload: column after column, lengths then bytes (see the Java header)."""
    parts: list[bytes] = []
    for array in arrays:
        lengths, data = cql_values(array)
        parts.append(lengths.tobytes())
        parts.append(data)
    return b"".join(parts)


# --------------------------------------------------------------------------------------------
# The writer process


@dataclass(frozen=True)
class StreamReport:
    """What the JVM wrote and streamed for one chunk."""

    sstables: int
    bytes: int
    rows: int
    close_ms: int
    stream_ms: int


def _table_cql(session: Session, keyspace: str, table: str) -> str:
    """The live table definition, on one line (the protocol's fields are one line each)."""
    meta = session.cluster.metadata.keyspaces.get(keyspace)
    if meta is None or table not in meta.tables:
        try:
            session.cluster.refresh_schema_metadata()
        except Exception as exc:
            raise classify(exc, f"reading the schema of {keyspace}.{table}") from exc
        meta = session.cluster.metadata.keyspaces.get(keyspace)
    if meta is None or table not in meta.tables:
        raise ConfigurationError(f"{keyspace}.{table} does not exist: run the migrations")
    t = meta.tables[table]
    cols = ", ".join(f'"{c.name}" {c.cql_type}' for c in t.columns.values())
    pk = ", ".join(f'"{c.name}"' for c in t.partition_key)
    ck = "".join(f', "{c.name}"' for c in t.clustering_key)
    order = ", ".join(f'"{c.name}" {"DESC" if c.is_reversed else "ASC"}' for c in t.clustering_key)
    return f"CREATE TABLE {keyspace}.{table} ({cols}, PRIMARY KEY (({pk}){ck}))" + (
        f" WITH CLUSTERING ORDER BY ({order})" if order else ""
    )


def cassandra_jars(classpath: str) -> list[Path]:
    """The cassandra-all jars on a Java classpath (entries: jars, or directories/*)."""
    found: list[Path] = []
    for entry in filter(None, classpath.split(os.pathsep)):
        path = Path(entry)
        if path.name == "*":
            found += sorted(path.parent.glob("cassandra-all-*.jar"))
        elif path.name.startswith("cassandra-all-") and path.suffix == ".jar" and path.exists():
            found.append(path)
    return found


def _java(cfg: SSTableSettings) -> Path:
    """The java executable the settings name (a path, or a name on PATH), links resolved."""
    return Path(os.path.realpath(shutil.which(cfg.java) or cfg.java))


def check_available(cfg: SSTableSettings | None = None) -> None:
    """Fail before any work when the sstable method cannot run here: no Java 17, no jars."""
    cfg = cfg or get_settings().sstable
    java = _java(cfg)
    if not java.is_file() or not os.access(java, os.X_OK):
        raise ConfigurationError(
            f"the sstable load method needs Java 17: {cfg.java!r} not found (set CQRS_SSTABLE_JAVA)"
        )
    if not cassandra_jars(cfg.classpath):
        raise ConfigurationError(
            f"the sstable load method needs cassandra-all and its dependencies: no "
            f"cassandra-all-*.jar in {cfg.classpath} (set CQRS_SSTABLE_CLASSPATH; `make up` "
            f"resolves them into .stack/jars/cassandra)"
        )


@dataclass(frozen=True)
class Target:
    """The cluster the SSTables are for, and the SSTable version it writes itself."""

    release: str
    compatibility_mode: str  # Cassandra 5's storage_compatibility_mode (4.x: CASSANDRA_4)

    @property
    def sstable_version(self) -> str:
        # Until a Cassandra 5 cluster leaves its 4.x compatibility (the default), it writes
        # and accepts at startup only 4.x SSTables ("nb"); streamed "oa" files would be
        # refused as "unreadable sstables" at its next restart.
        return "oa" if self.compatibility_mode == "NONE" else "nb"

    def __str__(self) -> str:
        return (
            f"Apache Cassandra {self.release} (storage compatibility "
            f"{self.compatibility_mode}: SSTables version {self.sstable_version})"
        )


def check_target(session: Session) -> Target:
    """The cluster must be Apache Cassandra 4.0 or later: ScyllaDB neither speaks Cassandra's
    streaming protocol nor reads its current SSTable format."""
    try:
        return _check_target(session)
    except Exception as exc:
        raise classify(exc, "checking the cluster for the sstable load method") from exc


def _check_target(session: Session) -> Target:
    if "scylla_local" in session.cluster.metadata.keyspaces["system"].tables:
        raise ConfigurationError(
            "the sstable load method streams Cassandra SSTables, which ScyllaDB does not "
            "accept; use method=cql (or Scylla's own load-and-stream)"
        )
    row = session.execute("SELECT release_version FROM system.local").one()
    release = str(row.release_version)
    if int(release.split(".")[0]) < 4:
        raise ConfigurationError(
            f"the sstable load method needs Cassandra 4.0 or later, the "
            f"cluster runs {release}; use method=cql"
        )
    mode = "CASSANDRA_4"
    if int(release.split(".")[0]) >= 5:
        setting = session.execute(
            "SELECT value FROM system_views.settings WHERE name = 'storage_compatibility_mode'"
        ).one()
        # Unset (None) means the default, CASSANDRA_4; UPGRADING still writes 4.x files.
        if setting is not None and setting.value == "NONE":
            mode = "NONE"
    return Target(release, mode)


def compiled_classes(cfg: SSTableSettings) -> Path:
    """SSTableBulkWriter compiled once per source version into a cache directory (javac runs
    a few seconds and some hundred MiB; every loader process would pay that again)."""
    import hashlib

    java = _java(cfg)
    javac = java.with_name("javac")  # the same JDK as the java that will run the classes
    jars = [p.name for p in cassandra_jars(cfg.classpath)]
    key = JAVA_SOURCE.read_bytes() + repr((str(java), jars)).encode()
    cache = (
        Path(cfg.cache_dir).expanduser() / f"sstable-writer-{hashlib.sha256(key).hexdigest()[:16]}"
    )
    if (cache / "SSTableBulkWriter.class").is_file():
        return cache
    if not javac.exists():
        raise ConfigurationError(
            "the sstable load method compiles its JVM half with javac: "
            "install a JDK 17, not only a JRE (openjdk-17-jdk-headless)"
        )
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    out = subprocess.run(
        [str(javac), "-nowarn", "-d", str(staging), "-cp", cfg.classpath, str(JAVA_SOURCE)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise ConfigurationError(
            f"javac failed on {JAVA_SOURCE.name} with classpath "
            f"{cfg.classpath}: {out.stderr[-1500:]}"
        )
    try:
        staging.rename(cache)  # atomic: a concurrent loader process may have won the race
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return cache


_LOGBACK: Final = """<configuration>
  <appender name="STDERR" class="ch.qos.logback.core.ConsoleAppender">
    <target>System.err</target>
    <encoder><pattern>%d{HH:mm:ss.SSS} %-5level %logger{36} - %msg%n</pattern></encoder>
  </appender>
  <root level="WARN"><appender-ref ref="STDERR"/></root>
</configuration>
"""


_MAX_PAYLOAD: Final = 16 * 2**20  # bytes per ROWS message: the JVM holds one at a time


def _split(arrays: Sequence[pa.Array], max_bytes: int) -> list[list[pa.Array]]:
    """The arrays cut into row ranges of at most about ``max_bytes`` (zero-copy slices)."""
    n = len(arrays[0]) if arrays else 0
    nbytes = sum(a.nbytes for a in arrays)
    pieces = max(1, -(-nbytes // max_bytes))
    if pieces == 1 or n <= 1:
        return [list(arrays)]
    step = -(-n // pieces)
    return [[a.slice(i, step) for a in arrays] for i in range(0, n, step)]


def _clean_stale(root: Path) -> None:
    """Remove work directories of loader processes that are gone (killed: nothing ran
    their cleanup). Their names start with the owner's pid."""
    for d in root.glob("*-*"):
        pid = d.name.split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            continue  # alive, someone else's


class SSTableWriterProcess:
    """One JVM running SSTableBulkWriter for one loader process. ``load_chunk`` writes a
    chunk's rows into SSTables and streams them; it returns only once the cluster holds
    them, so the caller may checkpoint the chunk. Any failure in the middle of the
    conversation kills the JVM (a fresh one serves the next chunk): the two sides are never
    left out of step."""

    def __init__(
        self, session: Session, keyspace: str, settings: SSTableSettings | None = None
    ) -> None:
        self.cfg = cfg = settings or get_settings().sstable
        check_available(cfg)
        self.target = check_target(session)
        self._classes = compiled_classes(cfg)
        self.session, self.keyspace = session, keyspace
        root = Path(cfg.work_dir or tempfile.gettempdir()) / "cqrs-sstables"
        root.mkdir(parents=True, exist_ok=True)
        _clean_stale(root)
        self.work = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
        self._schemas: dict[str, str] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        cfg, target = self.cfg, self.target
        scylla = get_settings().scylla
        if self._log is not None:
            self._log.close()
        self._log = (self.work / "jvm.log").open("w+b")
        # Cassandra's classes log through logback, at DEBUG without a configuration: keep
        # warnings and errors (they reach the error raised when the process dies).
        logback = self.work / "logback.xml"
        logback.write_text(_LOGBACK)
        hosts = ",".join(f"{h}:{scylla.port}" for h in scylla.contact_points)
        env = dict(os.environ)
        if scylla.username and scylla.password:
            env["CQRS_SCYLLA_USERNAME"] = scylla.username
            env["CQRS_SCYLLA_PASSWORD"] = scylla.password.get_secret_value()
        # A killed backfill must not leave a JVM streaming behind it: the kernel kills the JVM
        # with its parent (setpriv --pdeathsig; a preexec_fn would run Python between fork
        # and exec in a process with the driver's threads).
        die_with_parent = (
            ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
        )
        self._proc = subprocess.Popen(
            # A fixed heap, touched at start: the process's memory is what the settings say
            # from the first chunk on, whatever the snapshot's size. stdout carries only the
            # replies: the JVM's own messages go to stderr.
            [
                *die_with_parent,
                cfg.java,
                *JVM_FLAGS,
                f"-Xms{cfg.heap}",
                f"-Xmx{cfg.heap}",
                "-XX:+AlwaysPreTouch",
                "-XX:+ExitOnOutOfMemoryError",
                "-Xlog:disable",
                "-Xlog:all=warning:stderr",
                "-XX:+DisplayVMOutputToStderr",
                f"-Dcqrs.sstable.buffer.mib={cfg.buffer_mib}",
                f"-Dlogback.configurationFile={logback}",
                f"-Dcqrs.sstable.version={target.sstable_version}",
                "-cp",
                f"{self._classes}{os.pathsep}{cfg.classpath}",
                "SSTableBulkWriter",
                hosts,
                str(cfg.storage_port),
                self.keyspace,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )
        self._send(b"PING\n")
        # Started (or its log says why not), and writing the version the cluster accepts.
        reply = self._reply(timeout_s=120)
        if reply != f"PONG {target.sstable_version}":
            self._kill()
            raise TerminalError(
                f"the SSTable writer answered {reply!r}; expected it to write "
                f"version {target.sstable_version} for {target}"
            )

    def _running(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        assert self._proc is not None
        return self._proc

    def _send(self, data: bytes) -> None:
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        try:
            proc.stdin.write(data)
        except (BrokenPipeError, ValueError) as exc:
            raise self._died(exc) from exc

    def _reply(self, timeout_s: float) -> str:
        """The next reply line; the JVM's death or silence beyond ``timeout_s`` raises."""
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise self._died(exc) from exc
        deadline = time.monotonic() + timeout_s
        while not select.select([proc.stdout], [], [], 1.0)[0]:
            if proc.poll() is not None:
                raise self._died(None)
            if time.monotonic() > deadline:
                self._kill()
                raise TransientError(f"the SSTable writer gave no answer in {timeout_s:.0f} s")
        line = proc.stdout.readline().decode(errors="replace").rstrip("\n")
        if not line:
            raise self._died(None)
        return line

    def _died(self, exc: BaseException | None) -> TransientError:
        proc, log = self._proc, self._log
        if proc is not None and proc.poll() is None:
            self._kill()
        tail = ""
        if log is not None:
            log.flush()
            log.seek(0)
            tail = log.read()[-2000:].decode(errors="replace")
        code = proc.returncode if proc is not None else None
        return TransientError(f"the SSTable writer process ended (exit {code}, {exc}): {tail}")

    def _kill(self) -> None:
        """End the JVM now: after a failure half-way through a command, its input and ours
        no longer line up. What it wrote for the chunk is deleted with the work directory."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()

    def _schema(self, read_model: str) -> str:
        if read_model not in self._schemas:
            self._schemas[read_model] = _table_cql(self.session, self.keyspace, read_model)
        return self._schemas[read_model]

    def load_chunk(
        self,
        path: Path,
        table: str,
        chunk_id: str,
        read_models: Collection[str] | None,
        acquire: Any = None,
        batch_rows: int = 20_000,
    ) -> tuple[int, Counter[str], StreamReport]:
        """Write and stream one chunk file; (rows read, rows written per read model, what
        was streamed). ``acquire(n)`` is called before n rows go out (the rate limit)."""
        self._running()
        chunk_dir = self.work / "".join(c if c.isalnum() or c in "-_." else "_" for c in chunk_id)
        writers: dict[str, str] = {}
        rows_read, written = 0, Counter[str]()
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
                for up in project_arrow_columns(table, batch, self.keyspace, read_models):
                    wid = writers.get(up.cql)
                    if wid is None:
                        wid = writers[up.cql] = f"w{len(writers)}"
                        target = chunk_dir / wid / self.keyspace / up.read_model
                        self._send(
                            f"OPEN\t{wid}\t{target}\t{self._schema(up.read_model)}\t"
                            f"{up.cql}\n".encode()
                        )
                    for arrays in _split(up.arrays, _MAX_PAYLOAD):
                        n = len(arrays[0])
                        if acquire:
                            acquire(n)
                        payload = rows_payload(arrays)
                        self._send(
                            f"ROWS\t{wid}\t{n}\t{len(arrays)}\t{len(payload)}\n".encode() + payload
                        )
                        written[up.read_model] += n
                rows_read += batch.num_rows
            self._send(f"STREAM\t{chunk_dir}\n".encode())
            reply = self._reply(self.cfg.stream_timeout_s)
        except BaseException:
            # Whatever failed (a bad row here, the pipe, an interrupt half-way through a
            # message): this JVM's input may be out of step. A new one serves the next chunk.
            self._kill()
            shutil.rmtree(chunk_dir, ignore_errors=True)
            raise
        fields = reply.split("\t")
        if len(fields) < 3 or fields[0] not in ("OK", "ERR") or fields[1] != str(chunk_dir):
            self._kill()
            raise TransientError(
                f"SSTable writer's answer for {chunk_id} is not one: {reply[:300]!r}"
            )
        if fields[0] == "ERR":
            error = TransientError if fields[2] == "transient" else TerminalError
            raise error(f"SSTable load of {chunk_id} failed: {' '.join(fields[3:])}")
        sstables, nbytes, rows, close_ms, stream_ms = (int(x) for x in fields[2:7])
        report = StreamReport(sstables, nbytes, rows, close_ms, stream_ms)
        if rows != sum(written.values()):
            raise TerminalError(
                f"SSTable writer wrote {rows} rows of {chunk_id}, sent {sum(written.values())}"
            )
        return rows_read, written, report

    def close(self) -> None:
        proc = self._proc
        try:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(OSError):
                    if proc.stdin is not None:
                        proc.stdin.close()  # end of input: the JVM exits
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
            self._kill()
        finally:
            if self._log is not None:
                self._log.close()
            shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> SSTableWriterProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

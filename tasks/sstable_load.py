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

The JVM half is ``tasks/jvm/SSTableBulkWriter.java``, run as a single-file Java 17 program
with the cassandra-all jars on its classpath, one process per loader process, for the whole
load. Rows cross the pipe column after column in CQL's binary format, produced from Arrow
buffers with numpy (no Python object per cell); each chunk is written into its own directory,
streamed, and only then acknowledged, so a chunk stays the unit of checkpoint and resume.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from cassandra.cluster import Session

from tasks.errors import ConfigurationError, TerminalError, TransientError
from tasks.projection import project_arrow_columns
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
    valid = (np.ones(n, dtype=bool) if array.null_count == 0
             else array.is_valid().to_numpy(zero_copy_only=False))
    typ = array.type
    if pa.types.is_fixed_size_binary(typ):
        width = typ.byte_width
        raw = np.frombuffer(array.buffers()[1], dtype=np.uint8)
        cells = raw[array.offset * width:(array.offset + n) * width].reshape(n, width)
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
        offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset:
                                                                    array.offset + n + 1]
        start, end = int(offsets[0]), int(offsets[-1])
        data = (bytes(memoryview(array.buffers()[2])[start:end])
                if array.buffers()[2] is not None else b"")
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
        session.cluster.refresh_schema_metadata()
        meta = session.cluster.metadata.keyspaces.get(keyspace)
    if meta is None or table not in meta.tables:
        raise ConfigurationError(f"{keyspace}.{table} does not exist: run the migrations")
    t = meta.tables[table]
    cols = ", ".join(f'"{c.name}" {c.cql_type}' for c in t.columns.values())
    pk = ", ".join(f'"{c.name}"' for c in t.partition_key)
    ck = "".join(f', "{c.name}"' for c in t.clustering_key)
    order = ", ".join(f'"{c.name}" {"DESC" if c.is_reversed else "ASC"}'
                      for c in t.clustering_key)
    return (f"CREATE TABLE {keyspace}.{table} ({cols}, PRIMARY KEY (({pk}){ck}))"
            + (f" WITH CLUSTERING ORDER BY ({order})" if order else ""))


def check_available(cfg: SSTableSettings | None = None) -> None:
    """Fail before any work when the sstable method cannot run here: no Java 17, no jars."""
    cfg = cfg or get_settings().sstable
    java = shutil.which(cfg.java) if os.sep not in cfg.java else cfg.java
    if not java or not os.access(java, os.X_OK):
        raise ConfigurationError(f"the sstable load method needs Java 17: {cfg.java!r} not "
                                 f"found (set CQRS_SSTABLE_JAVA)")
    jars = Path(cfg.classpath.rstrip("*").rstrip("/"))
    if not any(jars.glob("cassandra-all-*.jar")):
        raise ConfigurationError(
            f"the sstable load method needs cassandra-all and its dependencies: no "
            f"cassandra-all-*.jar in {jars} (set CQRS_SSTABLE_CLASSPATH; `make up` resolves "
            f"them into .stack/jars/cassandra)")


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
        return (f"Apache Cassandra {self.release} (storage compatibility "
                f"{self.compatibility_mode}: SSTables version {self.sstable_version})")


def check_target(session: Session) -> Target:
    """The cluster must be Apache Cassandra 4.0 or later: ScyllaDB neither speaks Cassandra's
    streaming protocol nor reads its current SSTable format."""
    if "scylla_local" in session.cluster.metadata.keyspaces["system"].tables:
        raise ConfigurationError(
            "the sstable load method streams Cassandra SSTables, which ScyllaDB does not "
            "accept; use method=cql (or Scylla's own load-and-stream)")
    row = session.execute("SELECT release_version FROM system.local").one()
    release = str(row.release_version)
    if int(release.split(".")[0]) < 4:
        raise ConfigurationError(f"the sstable load method needs Cassandra 4.0 or later, the "
                                 f"cluster runs {release}; use method=cql")
    mode = "CASSANDRA_4"
    if int(release.split(".")[0]) >= 5:
        setting = session.execute("SELECT value FROM system_views.settings "
                                  "WHERE name = 'storage_compatibility_mode'").one()
        # Unset (None) means the default, CASSANDRA_4; UPGRADING still writes 4.x files.
        if setting is not None and setting.value == "NONE":
            mode = "NONE"
    return Target(release, mode)


def compiled_classes(cfg: SSTableSettings) -> Path:
    """SSTableBulkWriter compiled once per source version into a cache directory (javac runs
    a few seconds and some hundred MiB; every loader process would pay that again)."""
    import hashlib

    java = Path(os.path.realpath(shutil.which(cfg.java) or cfg.java))
    javac = java.with_name("javac")  # the same JDK as the java that will run the classes
    jars = sorted(p.name for p in Path(cfg.classpath.rstrip("*").rstrip("/"))
                  .glob("cassandra-all-*.jar"))
    key = JAVA_SOURCE.read_bytes() + repr((str(java), jars)).encode()
    cache = (Path(cfg.cache_dir).expanduser()
             / f"sstable-writer-{hashlib.sha256(key).hexdigest()[:16]}")
    if (cache / "SSTableBulkWriter.class").is_file():
        return cache
    if not javac.exists():
        raise ConfigurationError("the sstable load method compiles its JVM half with javac: "
                                 "install a JDK 17, not only a JRE (openjdk-17-jdk-headless)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    out = subprocess.run([str(javac), "-nowarn", "-d", str(staging), "-cp", cfg.classpath,
                          str(JAVA_SOURCE)], capture_output=True, text=True)
    if out.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise ConfigurationError(f"javac failed on {JAVA_SOURCE.name} with classpath "
                                 f"{cfg.classpath}: {out.stderr[-1500:]}")
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


class SSTableWriterProcess:
    """One JVM running SSTableBulkWriter for one loader process. ``load_chunk`` writes a
    chunk's rows into SSTables and streams them; it returns only once the cluster holds
    them, so the caller may checkpoint the chunk."""

    def __init__(self, session: Session, keyspace: str,
                 settings: SSTableSettings | None = None) -> None:
        self.cfg = cfg = settings or get_settings().sstable
        check_available(cfg)
        self.target = target = check_target(session)
        classes = compiled_classes(cfg)
        scylla = get_settings().scylla
        self.session, self.keyspace = session, keyspace
        self.work = Path(tempfile.mkdtemp(prefix="cqrs-sstables-", dir=cfg.work_dir))
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
        die_with_parent = (["setpriv", "--pdeathsig", "KILL", "--"]
                           if shutil.which("setpriv") else [])
        self._proc = subprocess.Popen(
            # A fixed heap, touched at start: the process's memory is what the settings say
            # from the first chunk on, whatever the snapshot's size.
            [*die_with_parent, cfg.java, *JVM_FLAGS, f"-Xms{cfg.heap}", f"-Xmx{cfg.heap}",
             "-XX:+AlwaysPreTouch", f"-Dcqrs.sstable.buffer.mib={cfg.buffer_mib}",
             f"-Dlogback.configurationFile={logback}",
             f"-Dcqrs.sstable.version={target.sstable_version}",
             "-cp", f"{classes}{os.pathsep}{cfg.classpath}", "SSTableBulkWriter", hosts,
             str(cfg.storage_port), keyspace],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env)
        assert self._proc.stdin and self._proc.stdout
        self._in: IO[bytes] = self._proc.stdin
        self._out: IO[bytes] = self._proc.stdout
        self._schemas: dict[str, str] = {}
        self._send(b"PING\n")
        # Started (or its log says why not), and writing the version the cluster accepts.
        self._reply(f"PONG {target.sstable_version}")

    def _send(self, data: bytes) -> None:
        try:
            self._in.write(data)
        except (BrokenPipeError, ValueError) as exc:
            raise self._died(exc) from exc

    def _reply(self, expect: str | None = None) -> str:
        try:
            self._in.flush()
            line = self._out.readline().decode().rstrip("\n")
        except (BrokenPipeError, ValueError) as exc:
            raise self._died(exc) from exc
        if not line:
            raise self._died(None)
        if expect and line != expect:
            raise TerminalError(f"SSTable writer answered {line!r}, expected {expect!r}")
        return line

    def _died(self, exc: BaseException | None) -> TransientError:
        code = self._proc.poll()
        self._log.flush()
        self._log.seek(0)
        tail = self._log.read()[-2000:].decode(errors="replace")
        return TransientError(f"the SSTable writer process ended (exit {code}, {exc}): {tail}")

    def _schema(self, read_model: str) -> str:
        if read_model not in self._schemas:
            self._schemas[read_model] = _table_cql(self.session, self.keyspace, read_model)
        return self._schemas[read_model]

    def load_chunk(self, path: Path, table: str, chunk_id: str, read_models: Collection[str],
                   acquire: Any = None, batch_rows: int = 20_000
                   ) -> tuple[int, Counter[str], StreamReport]:
        """Write and stream one chunk file; (rows read, rows written per read model, what
        was streamed). ``acquire(n)`` is called before n rows go out (the rate limit)."""
        chunk_dir = self.work / "".join(c if c.isalnum() or c in "-_." else "_"
                                        for c in chunk_id)
        writers: dict[str, str] = {}
        rows_read, written = 0, Counter[str]()
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
                for up in project_arrow_columns(table, batch, self.keyspace, read_models):
                    wid = writers.get(up.cql)
                    if wid is None:
                        wid = writers[up.cql] = f"w{len(writers)}"
                        target = chunk_dir / wid / self.keyspace / up.read_model
                        self._send(f"OPEN\t{wid}\t{target}\t{self._schema(up.read_model)}\t"
                                   f"{up.cql}\n".encode())
                    if acquire:
                        acquire(batch.num_rows)
                    payload = rows_payload(up.arrays)
                    self._send(f"ROWS\t{wid}\t{batch.num_rows}\t{len(up.arrays)}\t"
                               f"{len(payload)}\n".encode() + payload)
                    written[up.read_model] += batch.num_rows
                rows_read += batch.num_rows
        except BaseException:
            if self._proc.poll() is None:
                self._send(f"ABORT\t{chunk_dir}\n".encode())
                self._in.flush()
            raise
        self._send(f"STREAM\t{chunk_dir}\n".encode())
        reply = self._reply()
        kind, _, rest = reply.partition(" ")
        if kind == "ERR":
            severity, _, why = rest.partition(" ")
            error = TransientError if severity == "transient" else TerminalError
            raise error(f"SSTable load of {chunk_id} failed: {why}")
        sstables, nbytes, rows, close_ms, stream_ms = (int(x) for x in rest.split())
        report = StreamReport(sstables, nbytes, rows, close_ms, stream_ms)
        if rows != sum(written.values()):
            raise TerminalError(f"SSTable writer wrote {rows} rows of {chunk_id}, "
                                f"sent {sum(written.values())}")
        return rows_read, written, report

    def close(self) -> None:
        try:
            if self._proc.poll() is None:
                self._in.close()
                try:
                    self._proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
        finally:
            self._log.close()
            shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> SSTableWriterProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


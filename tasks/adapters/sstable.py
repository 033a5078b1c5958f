"""The backfill's "sstable" load method: projected rows become SSTables written by Cassandra's
own CQLSSTableWriter and streamed to the replicas that own them (SSTableLoader, the library
behind ``sstableloader``), instead of one CQL INSERT per row.

Why: on a CQL load the cluster pays per row for a request, the commit log, the memtable,
then flush and compaction, and so does the client; a streamed SSTable costs the receiving
node far less per row (docs/decisions.md). Every cell still carries the row's version as its
write timestamp (the INSERT the writer is given says ``USING TIMESTAMP ?``), so what wins
against CDC and dual-writes is exactly what a CQL load gives.

Where it works: Apache Cassandra 4.0+ (Cassandra's streaming protocol, its SSTable format).
ScyllaDB speaks neither, so against Scylla the ``cql`` method is the one to use.

The JVM half is ``tasks/adapters/jvm/SSTableBulkWriter.java``, run as a single-file Java 17
program with the cassandra-all jars on its classpath, one process per loader process, for
the whole load. Rows cross the pipe column after column in CQL's binary format
(``sstable_payload``); what must hold before it starts is checked by ``sstable_setup``. Each
chunk is written into its own directory, streamed, and only then acknowledged, so a chunk
stays the unit of checkpoint and resume.
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
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

import pyarrow.parquet as pq
from cassandra.cluster import Session

from tasks.adapters.sstable_payload import MAX_PAYLOAD_BYTES, rows_payload, split_rows
from tasks.adapters.sstable_setup import check_available, check_target, compiled_classes, table_cql
from tasks.core.columnar import project_arrow_columns
from tasks.core.errors import TerminalError, TransientError
from tasks.settings import ScyllaSettings, SSTableSettings

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


_LOGBACK: Final = """<configuration>
  <appender name="STDERR" class="ch.qos.logback.core.ConsoleAppender">
    <target>System.err</target>
    <encoder><pattern>%d{HH:mm:ss.SSS} %-5level %logger{36} - %msg%n</pattern></encoder>
  </appender>
  <root level="WARN"><appender-ref ref="STDERR"/></root>
</configuration>
"""


@dataclass(frozen=True)
class StreamReport:
    """What the JVM wrote and streamed for one chunk."""

    sstables: int
    bytes: int
    rows: int
    close_ms: int
    stream_ms: int


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
    """One JVM running SSTableBulkWriter for one loader process. ``stream_chunk`` writes a
    chunk's rows into SSTables and streams them; it returns only once the cluster holds
    them, so the caller may checkpoint the chunk. Any failure in the middle of the
    conversation kills the JVM (a fresh one serves the next chunk): the two sides are never
    left out of step."""

    def __init__(
        self, session: Session, keyspace: str, settings: SSTableSettings, scylla: ScyllaSettings
    ) -> None:
        """``settings``: the JVM's; ``scylla``: the cluster the SSTables are streamed to."""
        self.cfg = cfg = settings
        self.scylla = scylla
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
        cfg, target, scylla = self.cfg, self.target, self.scylla
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
            self._schemas[read_model] = table_cql(self.session, self.keyspace, read_model)
        return self._schemas[read_model]

    def stream_chunk(
        self,
        path: Path,
        table: str,
        chunk_id: str,
        read_models: Collection[str] | None,
        acquire: Callable[[int], None] | None = None,
        record_batch_rows: int = 20_000,
    ) -> tuple[int, Counter[str], StreamReport]:
        """Write one chunk file into SSTables, reading it ``record_batch_rows`` rows at a
        time, and stream them; (rows read, rows written per read model, what was streamed).
        ``acquire(n)`` is called before n rows go out (the rate limit)."""
        self._running()
        chunk_dir = self.work / "".join(c if c.isalnum() or c in "-_." else "_" for c in chunk_id)
        writers: dict[str, str] = {}
        rows_read, written = 0, Counter[str]()
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=record_batch_rows):
                for up in project_arrow_columns(table, batch, self.keyspace, read_models):
                    wid = writers.get(up.cql)
                    if wid is None:
                        wid = writers[up.cql] = f"w{len(writers)}"
                        target = chunk_dir / wid / self.keyspace / up.read_model
                        self._send(
                            f"OPEN\t{wid}\t{target}\t{self._schema(up.read_model)}\t"
                            f"{up.cql}\n".encode()
                        )
                    for arrays in split_rows(up.arrays, MAX_PAYLOAD_BYTES):
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

"""What the backfill's "sstable" load method needs before it runs, checked before any work:
Java 17 and the cassandra-all jars here (``check_available``), the JVM half compiled once
(``compiled_classes``), an Apache Cassandra 4+ cluster there (``check_target``) and the live
definitions of the tables it writes (``table_cql``)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cassandra.cluster import Session

from tasks.core.errors import ConfigurationError, classify
from tasks.settings import SSTableSettings

JAVA_SOURCE: Final = Path(__file__).resolve().parent / "jvm" / "SSTableBulkWriter.java"


def table_cql(session: Session, keyspace: str, table: str) -> str:
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


def java_path(cfg: SSTableSettings) -> Path:
    """The java executable the settings name (a path, or a name on PATH), links resolved."""
    return Path(os.path.realpath(shutil.which(cfg.java) or cfg.java))


def check_available(cfg: SSTableSettings) -> None:
    """Fail before any work when the sstable method cannot run here: no Java 17, no jars."""
    java = java_path(cfg)
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
    if session.cluster.ssl_context is not None or session.cluster.ssl_options:
        # The JVM (SSTableBulkWriter) opens its own connections, CQL and streaming, and
        # has no TLS settings: it would not reach a node that requires TLS, or would send
        # the rows in the clear (docs/security.md, "Transport").
        raise ConfigurationError(
            "the sstable load method does not support TLS to the cluster "
            "(CQRS_SCYLLA_SSL); use method=cql"
        )
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
    java = java_path(cfg)
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

"""PostgreSQL adapter: connections per role, the migration runner for the write model, and the
replication slot's health (existence, activity, retained WAL)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import stringprep
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from tasks.core.errors import ConfigurationError, ServiceUnavailable, TransientError, classify
from tasks.settings import PostgresSettings

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas" / "postgres"
# libpq's words for a TLS set-up that cannot work: the server's certificate does not verify
# or match the host, a CA or client file is missing or unusable, the server has no TLS, or
# pg_hba refuses a connection because it is not encrypted.
_TLS_FAILURE = re.compile(
    r"certificate|private key|does not support SSL|sslmode value|SSL error: (?!.*EOF)"
    r"|pg_hba\.conf rejects connection .*no encryption",
    re.IGNORECASE,
)


def connect(role: str, settings: PostgresSettings, autocommit: bool = False) -> psycopg.Connection:
    """A connection as one of the least-privilege roles (admin, app, reader, debezium); a
    context manager: ``with postgres.connect("app", cfg.postgres) as conn:`` commits on a
    clean exit, rolls back on an exception, and closes."""
    cfg = settings
    try:
        return psycopg.connect(cfg.conninfo(role), autocommit=autocommit, connect_timeout=5)
    except psycopg.Error as exc:
        # The message names host and port but never the password.
        what = f"connecting to PostgreSQL at {cfg.host}:{cfg.port} as {role}"
        if _TLS_FAILURE.search(str(exc)):
            # A certificate that does not verify, a missing CA file, a server without TLS:
            # configuration, which no retry fixes (docs/security.md, "Transport").
            files = {"sslrootcert": cfg.sslrootcert, "sslcert": cfg.sslcert}
            named = "".join(f", {k}={v}" for k, v in files.items() if v)
            raise ConfigurationError(
                f"{what} with sslmode={cfg.sslmode}{named}: TLS failed: "
                f"{' '.join(str(exc).split())}"
            ) from exc
        error = classify(exc, what)
        if isinstance(error, TransientError):
            raise ServiceUnavailable(
                "PostgreSQL",
                f"{cfg.host}:{cfg.port} as {role}: {(str(exc).splitlines() or [''])[0]}",
            ) from exc
        raise error from exc  # bad password, unknown role or database: no retry helps


@dataclass(frozen=True)
class Migration:
    version: str
    path: Path

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def migrations(directory: Path = SCHEMA_DIR, suffix: str = ".sql") -> list[Migration]:
    return [Migration(p.stem, p) for p in sorted(directory.glob(f"*{suffix}"))]


def migrate(settings: PostgresSettings) -> list[str]:
    """Apply the write-model migrations not applied yet, each in its own transaction, and
    record them; set the roles' passwords from the settings. Returns the versions applied."""
    try:
        return _migrate(settings)
    except psycopg.Error as exc:
        raise classify(exc, "PostgreSQL migration") from exc


def _migrate(cfg: PostgresSettings) -> list[str]:
    applied_now: list[str] = []
    with connect("admin", cfg) as conn:
        conn.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
                          version text PRIMARY KEY, checksum text NOT NULL,
                          applied_at timestamptz NOT NULL DEFAULT now())""")
        conn.commit()
        rows = conn.execute("SELECT version, checksum FROM schema_migrations").fetchall()
        done: dict[str, str] = dict(rows)
        for m in migrations():
            if m.version in done:
                if done[m.version] != m.checksum:
                    raise ConfigurationError(
                        f"migration {m.path.name} changed after it was applied; add a new "
                        f"migration instead of editing an applied one"
                    )
                continue
            with conn.transaction():
                conn.execute(m.path.read_text())  # type: ignore[call-overload]
                conn.execute(
                    "INSERT INTO schema_migrations (version, checksum) VALUES (%s, %s)",
                    (m.version, m.checksum),
                )
            applied_now.append(m.version)
        # Passwords come from the environment every time, so rotating one is a re-run.
        for user, secret in (
            (cfg.app_user, cfg.app_password),
            (cfg.reader_user, cfg.reader_password),
            (cfg.debezium_user, cfg.debezium_password),
        ):
            conn.execute(
                sql.SQL("ALTER ROLE {} WITH PASSWORD {}").format(
                    sql.Identifier(user), sql.Literal(scram_verifier(secret.get_secret_value()))
                )
            )
        conn.commit()
    return applied_now


def _saslprep(password: str) -> str:
    """RFC 4013 SASLprep, as Postgres applies it to a SCRAM password (and libpq when it logs
    in): a password SASLprep refuses is used as it is, as Postgres does."""
    if password.isascii():
        return password
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in password if not stringprep.in_table_b1(c)
    )
    normal = unicodedata.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21,
        stringprep.in_table_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
        stringprep.in_table_a1,
    )
    if any(test(c) for c in normal for test in prohibited):
        return password
    return normal


def scram_verifier(password: str, *, iterations: int = 4096, salt: bytes | None = None) -> str:
    """The SCRAM-SHA-256 verifier Postgres stores for ``password`` (RFC 5802 / 7677), computed
    here so that ``ALTER ROLE ... PASSWORD`` sends the verifier, never the password: a
    statement log or pg_stat_statements would otherwise keep it in the clear. Postgres
    accepts a verifier in this form as an already-hashed password."""
    salt = os.urandom(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", _saslprep(password).encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = base64.b64encode
    return (
        f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}"
        f"${b64(stored_key).decode()}:{b64(server_key).decode()}"
    )


@dataclass(frozen=True)
class SlotStatus:
    name: str
    exists: bool
    active: bool = False
    plugin: str | None = None
    wal_status: str | None = None
    # Bytes of WAL the slot holds back (current LSN minus confirmed flush LSN).
    retained_bytes: int | None = None
    confirmed_flush_lsn: str | None = None
    current_lsn: str | None = None


def lsn_to_int(lsn: str) -> int:
    """'16/B374D848' → the 64-bit WAL position Debezium reports as an integer."""
    high, low = lsn.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def slot_gap(slot: SlotStatus, debezium_lsn: int | None) -> str | None:
    """Why changes may have been missed, or None. Debezium confirms an LSN to the slot only
    after recording it in its offsets, so a healthy slot never starts past Debezium's offset.
    A slot that does was dropped and recreated while changes were written (docs/pitfalls.md #3):
    the changes between the two positions never reached Kafka."""
    if not slot.exists:
        return f"replication slot {slot.name!r} does not exist: changes are not captured"
    if slot.wal_status == "lost":
        return f"replication slot {slot.name!r} lost WAL it needed (max_slot_wal_keep_size)"
    if debezium_lsn is not None and slot.confirmed_flush_lsn is not None:
        confirmed = lsn_to_int(slot.confirmed_flush_lsn)
        if confirmed > debezium_lsn:
            return (
                f"replication slot {slot.name!r} starts at {slot.confirmed_flush_lsn}, past "
                f"Debezium's last offset {debezium_lsn}: it was recreated and changes "
                f"between the two were not captured"
            )
    return None


def slot_gap_or_suspect(
    slot: SlotStatus, debezium_lsn: int | None
) -> tuple[str | None, str | None]:
    """``slot_gap`` split by certainty: (gap, suspect). A missing slot or lost WAL is a gap;
    a slot past Debezium's offset is only a suspect, because a healthy connector shows the
    same for a while after a restart (docs/decisions.md, "The CDC run stops on a slot gap")."""
    found = slot_gap(slot, debezium_lsn)
    certain = not slot.exists or slot.wal_status == "lost"
    return (found, None) if certain else (None, found)


def slot_status(settings: PostgresSettings) -> SlotStatus:
    cfg = settings
    try:
        with connect("reader", cfg, autocommit=True) as conn:
            current = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            row = conn.execute(
                """SELECT active, plugin, wal_status, confirmed_flush_lsn::text,
                          pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint
                     FROM pg_replication_slots WHERE slot_name = %s""",
                (cfg.slot_name,),
            ).fetchone()
    except psycopg.Error as exc:
        raise classify(exc, f"reading replication slot {cfg.slot_name!r}") from exc
    if row is None:
        return SlotStatus(cfg.slot_name, exists=False, current_lsn=current[0] if current else None)
    active, plugin, wal_status, flush, retained = row
    return SlotStatus(
        cfg.slot_name,
        True,
        bool(active),
        plugin,
        wal_status,
        int(retained) if retained is not None else None,
        flush,
        current[0] if current else None,
    )

"""PostgreSQL for the local stack: Debian's server package, a cluster of the project's own
under ``.stack/data/postgres`` with ``wal_level=logical`` (infra/conf/postgresql.conf)."""

from __future__ import annotations

import os
import pwd
import subprocess
import time
from pathlib import Path

from infra import tls
from infra.processes import (
    DATA,
    HOST,
    INFRA,
    PG_PORT,
    RUN,
    STACK,
    StackError,
    run,
    say,
    spawn,
    stop_pid,
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
    bindir = found[-1].parent
    _ensure_hll(bindir.parent.name)
    return bindir


def _ensure_hll(major: str) -> None:
    """The audit computes Cassandra's Murmur3 token of a key inside Postgres with the ``hll``
    extension's ``hll_hash_bytea`` (docs/decisions.md, "The audit buckets by token, computed
    in Postgres"): Debian packages it as postgresql-<major>-hll."""
    if Path(f"/usr/share/postgresql/{major}/extension/hll.control").exists():
        return
    package = f"postgresql-{major}-hll"
    say(f"the hll extension is missing: installing Debian's {package} package")
    if os.geteuid() != 0:
        raise StackError(
            f"{package} is missing and installing it needs root: apt-get install -y {package}"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        run(["apt-get", "install", "-y", "-q", package], env=env)
    except StackError:
        run(["apt-get", "update", "-q"])
        run(["apt-get", "install", "-y", "-q", package], env=env)


def _pg_owner() -> str | None:
    return tls.owner()


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
    # On a fresh cluster and on an existing one alike, so that a data dir initialised before
    # a change of infra/conf/pg_hba.conf, or before TLS, starts with the current rules.
    sync_hba(pgdata)
    sync_tls(pgdata)
    spawn("postgres", [str(bindir / "postgres"), "-D", str(pgdata)], user=owner)


def hba_text() -> str:
    """infra/conf/pg_hba.conf with the project's database and Debezium role filled in (the
    same environment variables the settings read)."""
    text = (INFRA / "conf" / "pg_hba.conf").read_text()
    return text.replace("@DATABASE@", os.environ.get("CQRS_PG_DATABASE", "cqrs")).replace(
        "@DEBEZIUM_USER@", os.environ.get("CQRS_PG_DEBEZIUM_USER", "cqrs_debezium")
    )


def sync_hba(pgdata: Path) -> bool:
    """Write the cluster's pg_hba.conf if it differs from the project's; True if it did.
    Written in place, which keeps the file's owner and mode (the postgres user's, 0600)."""
    path, wanted = pgdata / "pg_hba.conf", hba_text()
    if path.exists() and path.read_text() == wanted:
        return False
    path.write_text(wanted)
    return True


TLS_CONF = "cqrs_tls.conf"


def tls_conf_text() -> str:
    """The server's TLS settings: the local stack's certificate (infra/tls.py)."""

    def quoted(path: Path) -> str:
        return "'" + str(path).replace("'", "''") + "'"

    return (
        '# Written by infra/postgres.py on every `make up` (docs/security.md, "Transport").\n'
        "ssl = on\n"
        f"ssl_cert_file = {quoted(tls.SERVER_CERT)}\n"
        f"ssl_key_file = {quoted(tls.SERVER_KEY)}\n"
        "ssl_min_protocol_version = 'TLSv1.2'\n"
    )


def sync_tls(pgdata: Path) -> bool:
    """Generate the certificates if missing, write the cluster's ``cqrs_tls.conf`` if it
    differs, and include it from its postgresql.conf (written by initdb, left alone by
    ALTER SYSTEM); True if anything changed, and the server must reload."""
    owner = _pg_owner()
    changed = tls.ensure_certificates(owner)
    path, wanted = pgdata / TLS_CONF, tls_conf_text()
    if not path.exists() or path.read_text() != wanted:
        path.write_text(wanted)
        path.chmod(0o600)
        if owner:
            pw = pwd.getpwnam(owner)
            os.chown(path, pw.pw_uid, pw.pw_gid)
        changed = True
    conf = pgdata / "postgresql.conf"
    include = f"include_if_exists = '{TLS_CONF}'"
    text = conf.read_text()
    if include not in text.splitlines():
        # In place, which keeps the file's owner and mode.
        conf.write_text(
            f"{text.rstrip()}\n# The local stack's TLS (infra/postgres.py)\n{include}\n"
        )
        changed = True
    return changed


def _admin_conninfo(dbname: str = "postgres") -> str:
    from psycopg.conninfo import make_conninfo

    return make_conninfo(
        host=HOST,
        port=PG_PORT,
        dbname=dbname,
        user="postgres",
        password=os.environ.get("CQRS_PG_ADMIN_PASSWORD", "postgres-local"),
    )


def pg_healthy() -> bool:
    bindir = pg_bindir()
    ok = subprocess.run([str(bindir / "pg_isready"), "-h", HOST, "-p", str(PG_PORT), "-q"])
    if ok.returncode != 0:
        return False
    # Create the project database once the server answers.
    import psycopg

    admin = _admin_conninfo()
    db = os.environ.get("CQRS_PG_DATABASE", "cqrs")
    with psycopg.connect(admin, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone():
            conn.execute(f'CREATE DATABASE "{db}"')
        # A running server keeps the rules it loaded: a changed pg_hba.conf (a data dir from
        # before the change, a server left running across it) is written and reloaded here,
        # as `make up` checks every running service's health. So is the TLS configuration.
        pgdata = DATA / "postgres"
        if sync_hba(pgdata) | sync_tls(pgdata):
            say("pg_hba.conf or TLS changed: reloading the Postgres configuration")
            conn.execute("SELECT pg_reload_conf()")
        level = conn.execute("SHOW wal_level").fetchone()
        if not level or level[0] != "logical":
            raise StackError(f"Postgres runs with wal_level={level}, Debezium needs 'logical'")
    # In new sessions, which see the reloaded configuration: a session judges hostssl lines
    # by its own ssl setting.
    _check_tls(admin)
    with psycopg.connect(admin, autocommit=True) as conn:
        bad = conn.execute(
            "SELECT line_number, error FROM pg_hba_file_rules WHERE error IS NOT NULL"
        ).fetchall()
    if bad:
        raise StackError(f"pg_hba.conf has errors (Postgres keeps its previous rules): {bad}")
    return True


def _check_tls(admin: str) -> None:
    """The server must serve TLS: a certificate or key it cannot use at start or reload
    leaves it off, which its log explains. A reload is asynchronous: new sessions see it
    once the server has read the files, so this asks a few times."""
    import psycopg

    for _ in range(20):
        with psycopg.connect(admin, autocommit=True) as conn:
            row = conn.execute("SHOW ssl").fetchone()
        if row and row[0] == "on":
            return
        time.sleep(0.25)
    raise StackError(
        f"Postgres runs without TLS (ssl = off after loading {TLS_CONF}); see its log, "
        f".stack/logs/postgres.log, for why"
    )


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

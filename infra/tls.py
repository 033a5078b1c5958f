"""The local stack's certificates: a self-signed CA and a server certificate for
localhost/127.0.0.1 that it signs, generated once under ``.stack/data/tls`` with the
openssl command (docs/security.md, "Transport"). Postgres serves TLS with them; clients
that verify (sslmode=verify-full) trust ``ca.crt``."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path

from infra.processes import DATA, StackError, run, say

TLS_DIR = DATA / "tls"
CA_CERT, CA_KEY = TLS_DIR / "ca.crt", TLS_DIR / "ca.key"
SERVER_CERT, SERVER_KEY = TLS_DIR / "server.crt", TLS_DIR / "server.key"
FILES = (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)
# The server's key and certificate in one file: the keystore Cassandra's
# PEMBasedSslContextFactory reads (infra/conf/cassandra.yaml, client_encryption_options).
CASSANDRA_KEYSTORE = TLS_DIR / "cassandra-keystore.pem"
SERVER_NAMES = "DNS:localhost,IP:127.0.0.1"

# P-256 keys: quick to generate, and read by libpq, the JDBC driver and Python's ssl alike.
_EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
_SERVER_EXTENSIONS = f"""basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = {SERVER_NAMES}
"""


def owner() -> str | None:
    """Who the files belong to: Postgres's user when the stack runs as root (Postgres
    refuses a key it does not own), else the user running the stack."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None  # not installed yet: pg_start installs it, then owns the files
    return "postgres"


def ensure_certificates(owner: str | None = None, directory: Path = TLS_DIR) -> bool:
    """Generate the CA and the server certificate in ``directory`` (ca.crt, ca.key,
    server.crt, server.key) unless all four exist; True if it did. Either way every file is
    made mode 0600 and, when ``owner`` is given (the stack runs as root), that user's, as
    Postgres requires of its key."""
    files = [directory / f.name for f in FILES]
    generated = not all(f.exists() for f in files)
    if generated:
        _generate(directory)
    for path in (directory, *files):
        path.chmod(0o700 if path.is_dir() else 0o600)
        if owner:
            pw = pwd.getpwnam(owner)
            os.chown(path, pw.pw_uid, pw.pw_gid)
    return generated


def _generate(directory: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise StackError("openssl is needed for the local stack's TLS: apt-get install openssl")
    say(f"generating a CA and a server certificate for {SERVER_NAMES} in {directory}")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    old_umask = os.umask(0o077)
    try:
        # Generated aside and moved into place at the end: an interrupted run leaves at most
        # some of the four files, and the next one generates them all again.
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            work = Path(tmp)
            ca_key, ca_crt = work / "ca.key", work / "ca.crt"
            key, csr, crt, ext = (work / n for n in ("server.key", "server.csr", "s.crt", "x"))
            run(
                [
                    openssl,
                    "req",
                    "-x509",
                    *_EC_KEY,
                    "-keyout",
                    str(ca_key),
                    "-out",
                    str(ca_crt),
                    "-days",
                    "3650",
                    "-subj",
                    "/CN=cqrs-sync local stack CA",
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ]
            )
            run(
                [
                    openssl,
                    "req",
                    "-new",
                    *_EC_KEY,
                    "-keyout",
                    str(key),
                    "-out",
                    str(csr),
                    "-subj",
                    "/CN=localhost",
                ]
            )
            ext.write_text(_SERVER_EXTENSIONS)
            run(
                [
                    openssl,
                    "x509",
                    "-req",
                    "-in",
                    str(csr),
                    "-CA",
                    str(ca_crt),
                    "-CAkey",
                    str(ca_key),
                    "-CAcreateserial",
                    "-days",
                    "825",
                    "-sha256",
                    "-extfile",
                    str(ext),
                    "-out",
                    str(crt),
                ]
            )
            for src in (ca_key, ca_crt, key):
                src.replace(directory / src.name)
            crt.replace(directory / SERVER_CERT.name)
    finally:
        os.umask(old_umask)


def ensure_cassandra_keystore() -> Path:
    """The local stack's certificates, and Cassandra's PEM keystore made of the server's
    key and certificate (mode 0600, the user running Cassandra's), rewritten if they
    changed."""
    ensure_certificates(owner())
    wanted = SERVER_KEY.read_text() + SERVER_CERT.read_text()
    if not CASSANDRA_KEYSTORE.exists() or CASSANDRA_KEYSTORE.read_text() != wanted:
        old_umask = os.umask(0o077)
        try:
            CASSANDRA_KEYSTORE.write_text(wanted)
        finally:
            os.umask(old_umask)
    CASSANDRA_KEYSTORE.chmod(0o600)
    return CASSANDRA_KEYSTORE

"""A private PostgreSQL server that takes TLS connections only, its certificate signed by a CA
of its own, for the tests of a database URL's SSL options: the shared server has no TLS, and
must not be restarted. Made with the machine's PostgreSQL binaries and the openssl command."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Logs in with its client certificate alone (pg_hba's `cert` method).
CERTIFICATE_USER = "certificate_user"
CLIENT_KEY_PASSWORD = "client-key-password"
# Logs in with its password (scram-sha-256), which has characters a URL must escape. Every other
# role logs in with TLS alone.
PASSWORD_USER = "password_user"
PASSWORD = "p@ss:w/rd%"
DATABASE = "aidsafe"


@dataclass(frozen=True)
class TlsPostgres:
    port: int
    files: Path

    def file(self, name: str) -> str:
        """ca.crt (which signed the server's certificate and the client's), other-ca.crt (which
        signed neither), client.crt and client.key (encrypted with CLIENT_KEY_PASSWORD)."""
        return str(self.files / name)


def postgres_binaries() -> Path | None:
    """The newest PostgreSQL server's binaries installed the Debian way, if any."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda path: int(path.parts[-3]))
    return found[-1].parent if found else None


@contextmanager
def tls_postgres(binaries: Path) -> Iterator[TlsPostgres]:
    """Start the server on a free port of 127.0.0.1; stop it and delete its files after."""
    files = Path(tempfile.mkdtemp(prefix="aidsafe-tls-postgres-"))
    try:
        _issue_certificates(files)
        # PostgreSQL will not run as root: as this machine's postgres user then, who owns its files.
        as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if as_owner:
            for path in [files, *files.iterdir()]:
                shutil.chown(path, user="postgres")

        def run(program: str, *arguments: str | Path) -> None:
            subprocess.run([*as_owner, binaries / program, *arguments], check=True, capture_output=True)

        data = files / "data"
        run("initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync")
        server = TlsPostgres(_free_port(), files)
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {server.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{files}'\n"
                f"ssl = on\nssl_cert_file = '{files}/server.crt'\nssl_key_file = '{files}/server.key'\n"
                f"ssl_ca_file = '{files}/ca.crt'\nfsync = off\nmax_connections = 20\nshared_buffers = 16MB\n"
            )
        # No `host` line: a connection without TLS is refused.
        (data / "pg_hba.conf").write_text(
            f"local all all trust\nhostssl all {CERTIFICATE_USER} 127.0.0.1/32 cert\n"
            f"hostssl all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\nhostssl all all 127.0.0.1/32 trust\n"
        )
        run("pg_ctl", "-D", data, "-l", files / "server.log", "-w", "start")
        try:
            for statement in (
                f"CREATE ROLE {CERTIFICATE_USER} LOGIN",
                f"CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD '{PASSWORD}'",
                f"CREATE DATABASE {DATABASE}",
            ):
                run("psql", "-h", files, "-p", str(server.port), "-U", "postgres", "-q", "-c", statement)
            yield server
        finally:
            run("pg_ctl", "-D", data, "-m", "immediate", "stop")
    finally:
        shutil.rmtree(files)


def _issue_certificates(files: Path) -> None:
    def openssl(command: str) -> None:
        subprocess.run(["openssl", *command.split()], cwd=files, check=True, capture_output=True)

    key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1"
    signed = "-days 2 -CA ca.crt -CAkey ca.key -CAcreateserial"
    for ca in ("ca", "other-ca"):
        openssl(f"req -x509 {key} -nodes -keyout {ca}.key -out {ca}.crt -days 2 -subj /CN={ca}")
    # The server's, for the address the tests connect to (verify-full checks it).
    openssl(f"req {key} -nodes -keyout server.key -out server.csr -subj /CN=localhost")
    (files / "server.ext").write_text("subjectAltName = DNS:localhost, IP:127.0.0.1\n")
    openssl(f"x509 -req -in server.csr {signed} -extfile server.ext -out server.crt")
    os.chmod(files / "server.key", 0o600)  # PostgreSQL refuses a key others may read
    # The client's: its common name is the role it logs in as; its key is encrypted.
    client = f"-passout pass:{CLIENT_KEY_PASSWORD} -keyout client.key -subj /CN={CERTIFICATE_USER}"
    openssl(f"req {key} {client} -out client.csr")
    openssl(f"x509 -req -in client.csr {signed} -out client.crt")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port

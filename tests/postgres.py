"""A throwaway PostgreSQL server for the tests: Debian's ``postgresql`` package, no Docker.

:func:`postgres_cluster` runs ``initdb`` in a fresh directory under ``/tmp`` (its socket path must
stay short, and the directories pytest makes are private to root) and starts the server listening
on a Unix socket only (no TCP port to collide with), with ``fsync`` off: the tests need a real
server, not a durable one. ``initdb`` and ``pg_ctl`` refuse to run as root, so as root they run as
the ``postgres`` user (else ``nobody``) through ``runuser``. :meth:`Cluster.stop` and
:meth:`Cluster.start` stop and start the same cluster, for outage tests; the context manager stops
it by its data directory's ``pg_ctl`` and removes the directory.

The superuser logs in without a password (``trust``); every other role needs its password (SCRAM):
:meth:`Cluster.create_login` makes one, for the tests of password authentication and its redaction.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

#: the superuser initdb creates (trust authentication on the socket: no password)
SUPERUSER = "postgres"
#: the socket's port number (it only names the socket file: the server listens on no TCP port)
PORT = 5432
#: the database the tests' schemas are made in (created with the cluster)
TEST_DATABASE = "imaging_tests"
#: who may log in how (over the Unix socket, the only way in)
HBA = f"local all {SUPERUSER} trust\nlocal all all scram-sha-256\n"


def server_bin() -> Path | None:
    """The directory of ``initdb``/``pg_ctl`` (newest installed major version), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _server_user() -> str | None:
    """Who runs the server: None (this user) unless this is root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root and neither a postgres nor a nobody user exists for initdb")


@dataclass
class Cluster:
    """A running test server: its socket directory, data directory and superuser connection URL."""

    root: Path
    bindir: Path
    user: str | None
    #: commits wait for their WAL to be written (an immediate stop, a crash, keeps them)
    synchronous_commit: bool = False
    #: login roles made for each schema (dropped with it)
    roles: dict[str, list[str]] = field(default_factory=dict)

    @property
    def socket_dir(self) -> Path:
        return self.root

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres", user: str = SUPERUSER) -> str:
        """A libpq URL of ``database`` over the socket."""
        return f"postgresql://{user}@/{database}?host={self.socket_dir}&port={PORT}"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        return subprocess.run([*prefix, *argv], capture_output=True, text=True, check=check, timeout=120)

    def start(self) -> None:
        options = (
            f"-k {self.socket_dir} -c listen_addresses='' -p {PORT} -c fsync=off"
            f" -c synchronous_commit={'on' if self.synchronous_commit else 'off'}"
            " -c full_page_writes=off -c max_connections=300"
        )
        done = self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w",
            "-t", "60", "-o", options, "start", check=False,
        )  # fmt: skip
        if done.returncode != 0:
            log = (self.root / "log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"pg_ctl start failed: {done.stderr.strip()} {log}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect the clients; ``immediate``: as if it crashed)."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return (
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "status", check=False).returncode
            == 0
        )

    def admin(self, *statements: str) -> None:
        """Run statements as the superuser (autocommit: ``CREATE DATABASE`` may not be in a transaction)."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)

    def create_database(self) -> str:
        """A new empty database; its name (0.3 s each: tests take a schema, :meth:`create_schema`)."""
        name = "t_" + secrets.token_hex(6)
        self.admin(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending the sessions still connected to it (a store a test left open)."""
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def create_schema(self, database: str = TEST_DATABASE) -> str:
        """A new empty schema in ``database``; :meth:`schema_url` connects to it."""
        name = "t_" + secrets.token_hex(6)
        with psycopg.connect(self.url(database), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {name}")
        return name

    def drop_schema(self, name: str, database: str = TEST_DATABASE) -> None:
        """Drop the schema, its tables and the login roles made for it."""
        with psycopg.connect(self.url(database), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        for role in self.roles.pop(name, []):
            self.admin(f"DROP ROLE IF EXISTS {role}")

    def schema_url(self, schema: str, database: str = TEST_DATABASE, user: str = SUPERUSER) -> str:
        """A URL whose sessions find their tables in ``schema`` (the ``search_path`` libpq sets)."""
        return f"{self.url(database, user)}&options=-csearch_path%3D{schema}"

    def create_login(self, schema: str, password: str, database: str = TEST_DATABASE) -> str:
        """A role that logs in with ``password`` and owns ``schema`` (still empty); its name."""
        role = "r_" + secrets.token_hex(6)
        self.admin(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        self.roles.setdefault(schema, []).append(role)
        with psycopg.connect(self.url(database), autocommit=True) as conn:
            conn.execute(f"ALTER SCHEMA {schema} OWNER TO {role}")
        return role


@contextmanager
def postgres_cluster(*, synchronous_commit: bool = False) -> Iterator[Cluster]:
    """Start a throwaway cluster (see the module docstring); stop and remove it afterwards.
    ``synchronous_commit``: for tests that stop it as a crash would (``fsync`` stays off: the
    machine does not crash, the page cache keeps what was written)."""
    bindir = server_bin()
    if bindir is None:
        raise RuntimeError(
            "PostgreSQL's server programs (initdb, pg_ctl) are not installed: "
            "`make system-deps` as root installs Debian's postgresql package"
        )
    user = _server_user()
    root = Path(tempfile.mkdtemp(prefix="imaging-pg-", dir="/tmp"))
    cluster = Cluster(root, bindir, user, synchronous_commit)
    try:
        if user is not None:
            shutil.chown(root, user)
        cluster._run(
            str(bindir / "initdb"), "-D", str(cluster.data), "-A", "trust", "-U", SUPERUSER,
            "-E", "UTF8", "--locale=C", "-N",
        )  # fmt: skip
        (cluster.data / "pg_hba.conf").write_text(HBA)
        cluster.start()
        cluster.admin(f"CREATE DATABASE {TEST_DATABASE}")
        yield cluster
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            if cluster.data.exists() and cluster.running():
                cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)

"""A throwaway PostgreSQL server for the tests: Debian's ``postgresql`` binaries, one data directory, loopback only.

The cluster's MLflow keeps its store in PostgreSQL (``postgresql+psycopg2://``); tests that care how the store
behaves under concurrent writers run MLflow on this server as well as on sqlite. It listens on 127.0.0.1 alone,
its unix socket lives in its own directory, and its one role logs in with a generated password (scram-sha-256).
Durability is switched off (``fsync=off``): the data dies with the test session anyway.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services import free_port

USER = "maeclip"
# initdb and postgres refuse to run as root: as root, the server runs as Debian's `postgres` system user.
SYSTEM_USER = "postgres"


def bin_dir() -> Path:
    """The newest installed PostgreSQL's binaries (Debian: /usr/lib/postgresql/<major>/bin), else pg_config's."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        return Path(subprocess.run([pg_config, "--bindir"], check=True, capture_output=True, text=True).stdout.strip())
    raise RuntimeError("PostgreSQL is not installed: `apt-get install postgresql` (make install does it)")


def _as_server_user(root: Path) -> dict[str, Any]:
    """Popen arguments that run in ``root`` and, as root, drop to the system user (who then owns ``root``)."""
    if os.geteuid() != 0:
        return {"cwd": root}
    shutil.chown(root, SYSTEM_USER, SYSTEM_USER)
    return {"cwd": root, "user": SYSTEM_USER, "group": SYSTEM_USER, "extra_groups": []}


@dataclass
class Postgres:
    """A running server; ``database`` makes a fresh database on it."""

    port: int
    password: str
    process: subprocess.Popen
    log: Path

    def connect(self, dbname: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, password=self.password, dbname=dbname,
                                connect_timeout=5)

    def uri(self, dbname: str) -> str:
        """SQLAlchemy's URI of ``dbname``, with the driver the deployed MLflow uses."""
        return f"postgresql+psycopg2://{USER}:{self.password}@127.0.0.1:{self.port}/{dbname}"

    def database(self, name: str) -> str:
        """Create an empty database named after ``name`` (plus a unique suffix); return its URI."""
        from psycopg2 import sql

        dbname = f"{re.sub(r'[^a-z0-9_]', '_', name.lower())[:40]}_{uuid.uuid4().hex[:8]}"
        connection = self.connect()
        connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        finally:
            connection.close()
        return self.uri(dbname)


def _initdb(bindir: Path, data: Path, password: str) -> None:
    pwfile = data.parent / "pwfile"
    pwfile.write_text(password + "\n")
    owner = _as_server_user(data.parent)
    if "user" in owner:
        shutil.chown(data, SYSTEM_USER, SYSTEM_USER)
        shutil.chown(pwfile, SYSTEM_USER, SYSTEM_USER)
    subprocess.run(
        [str(bindir / "initdb"), "-D", str(data), "-U", USER, f"--pwfile={pwfile}", "--auth=scram-sha-256",
         "--encoding=UTF8", "--locale=C", "--no-sync"],
        check=True, capture_output=True, **owner,
    )
    pwfile.unlink()


def _wait_until_accepting(server: Postgres, timeout_s: float) -> None:
    """Poll with real logins: the port opens before the server has finished starting up."""
    import psycopg2

    deadline = time.time() + timeout_s
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"postgres exited with {server.process.returncode}:\n{server.log.read_text()[-3000:]}")
        try:
            server.connect().close()
            return
        except psycopg2.OperationalError:
            if time.time() > deadline:
                log = server.log.read_text()[-3000:]
                raise RuntimeError(f"postgres not ready within {timeout_s}s:\n{log}") from None
            time.sleep(0.2)


def _stop(process: subprocess.Popen) -> None:
    """Fast shutdown (SIGINT): disconnects clients (MLflow servers' pools) instead of waiting for them."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def running_postgres(root: Path, timeout_s: float = 60) -> Iterator[Postgres]:
    """A PostgreSQL server with its data in ``root``, on a free loopback port; stopped on exit.

    As root, ``root`` must be reachable by the ``postgres`` user (pytest's tmp dirs are 0700: use one under the
    system temp dir) and is handed to that user.
    """
    bindir, data, password = bin_dir(), root / "data", secrets.token_urlsafe(24)
    data.mkdir(mode=0o700)
    _initdb(bindir, data, password)
    port, log = free_port(), root / "postgres.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
             "-c", f"unix_socket_directories={data}", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=200"],
            stdout=out, stderr=subprocess.STDOUT, **_as_server_user(root),
        )
    server = Postgres(port, password, process, log)
    try:
        _wait_until_accepting(server, timeout_s)
        yield server
    finally:
        _stop(process)

"""A throwaway PostgreSQL server for one run: the operating system's binaries, a data folder and a socket of its own.

``initdb`` makes a fresh cluster in a temporary folder; ``postgres`` serves it on a Unix socket in that folder
and on no network address (``listen_addresses=''``), so only this machine's processes that can enter the
folder reach it. Durability is left as PostgreSQL ships it (fsync, synchronous commit), since the point is to
measure and test a real database.

PostgreSQL refuses to run as root: as root, the server runs as the ``postgres`` user that Debian's package
creates, and the folder is given to it. The server runs in its own process group; stopping asks for a fast
shutdown, waits, then SIGKILLs whatever is left and checks by PID that nothing remains.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

from loadtest.server import ServerProcess

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
DATABASE = "ticketlock"
USER = "ticketlock"
INSTALL_HINT = "install the operating system's PostgreSQL server, e.g. `sudo apt-get install postgresql`"


class PostgresNotFound(RuntimeError):
    """The PostgreSQL server binaries (initdb, postgres) are not installed."""


def find_binaries() -> Path:
    """The folder holding ``initdb`` and ``postgres``: $TICKETLOCK_POSTGRES_BIN, the PATH, or Debian's folders."""
    candidates = [os.environ.get("TICKETLOCK_POSTGRES_BIN", "")]
    on_path = shutil.which("initdb")
    candidates.append(str(Path(on_path).resolve().parent) if on_path else "")
    # Debian and Ubuntu keep the server's binaries off the PATH, one folder per major version: take the newest.
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted(versions, key=lambda path: int(re.sub(r"\D", "", path) or 0), reverse=True)
    for folder in filter(None, candidates):
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "postgres").is_file():
            return Path(folder)
    raise PostgresNotFound(f"PostgreSQL's server binaries (initdb, postgres) were not found: {INSTALL_HINT}")


class ThrowawayPostgres(ServerProcess):
    """``with ThrowawayPostgres() as database:`` serves ``database.url`` until the block ends."""

    what = "PostgreSQL"
    stop_signal = signal.SIGINT  # a fast shutdown: sessions are ended, the cluster stays consistent
    stop_timeout_s = STOP_TIMEOUT_S

    def __init__(self, directory: Path | None = None) -> None:
        self.binaries = find_binaries()
        self._temporary = None if directory else tempfile.TemporaryDirectory(prefix="ticketlock-postgres-")
        self.directory = Path(directory or self._temporary.name)  # type: ignore[union-attr]
        self.data = self.directory / "data"
        self.socket_folder = self.directory / "socket"
        self.log_path = self.directory / "postgres.log"
        self.process: subprocess.Popen[bytes] | None = None
        # The server may not run as root; as root, it runs as Debian's postgres user.
        self.user = "postgres" if os.geteuid() == 0 else None
        self.url = f"postgresql://{USER}@/{DATABASE}?host={self.socket_folder}"

    def start(self) -> None:
        """Make the cluster (once), start the server, and create the database (once)."""
        fresh = not self.data.exists()
        if fresh:
            self._make_cluster()
        self._serve()
        if fresh:
            with psycopg.connect(self._admin_url(), autocommit=True) as connection:
                connection.execute(f"CREATE DATABASE {DATABASE} OWNER {USER}")

    def _make_cluster(self) -> None:
        self.socket_folder.mkdir(parents=True, exist_ok=True)
        if self.user:
            entry = pwd.getpwnam(self.user)
            for path in (self.directory, self.socket_folder):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        # trust: the socket is the only way in, inside a folder only its owner (and root) can enter.
        self._run(
            [str(self.binaries / "initdb"), "--pgdata", str(self.data), "--username", USER, "--auth", "trust"],
            "initdb",
        )
        os.chmod(self.directory, 0o700)

    def _run(self, command: list[str], what: str) -> None:
        with open(self.log_path, "ab") as log:
            completed = subprocess.run(command, stdout=log, stderr=log, user=self.user, timeout=START_TIMEOUT_S)
        if completed.returncode != 0:
            raise RuntimeError(
                f"{what} failed with status {completed.returncode}; the end of its log:\n{self.log_tail()}"
            )

    def _serve(self) -> None:
        command = [
            str(self.binaries / "postgres"),
            "-D",
            str(self.data),
            "-k",
            str(self.socket_folder),
            "-c",
            "listen_addresses=",  # no TCP at all: the Unix socket only
            "-c",
            "max_connections=200",  # hosts x workers x pool size, plus tests and benchmarks
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                user=self.user,
                start_new_session=True,  # its own process group, so stop() reaches every backend
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.process.returncode}; its log:\n{self.log_tail()}")
            try:
                psycopg.connect(self._admin_url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"postgres did not accept connections within {START_TIMEOUT_S:g} s:\n{self.log_tail()}")

    def create_database(self, name: str) -> str:
        """A new, empty database on this server, owned by the service's user: its URL (for a test of its own)."""
        with psycopg.connect(self._admin_url(), autocommit=True) as connection:
            connection.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(USER))
            )
        return f"postgresql://{USER}@/{name}?host={self.socket_folder}"

    def _admin_url(self) -> str:
        return f"postgresql://{USER}@/postgres?host={self.socket_folder}"

    def restart(self, down_for_s: float = 0.0) -> None:
        """Stop the server, stay down for ``down_for_s`` seconds, and serve the same data again."""
        self.stop()
        time.sleep(down_for_s)
        self._serve()

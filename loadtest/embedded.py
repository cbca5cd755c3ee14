"""A real booking service for one run: gunicorn with several workers, a temporary db.json, a free loopback port.

Several of them, each on a loopback address of its own with its own folder (and so its own lock file), and all
on one PostgreSQL, are the hosts of ``Cluster``: separate machines, on one machine.

The listening socket is opened here and handed to gunicorn (``--bind fd://N``), so the port is known before
gunicorn starts and no other program can take it in between. gunicorn runs in its own process group; stopping
sends SIGTERM to the group, waits, then SIGKILLs whatever is left, and checks by PID that nothing remains.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from loadtest.client import ServiceClient, ServiceError, ServiceUnreachable
from loadtest.server import ServerProcess, processes_in_group
from service.serve import GUNICORN_CONF, gunicorn_command

STARTUP_TIMEOUT_S = 30.0


class EmbeddedService(ServerProcess):
    """``with EmbeddedService(workers=4) as service:`` serves ``service.url`` until the block ends."""

    what = "the service"

    def __init__(
        self,
        workers: int = 4,
        race_window_ms: int | None = None,
        admin_token: str | None = None,
        directory: Path | None = None,
        environment: dict[str, str] | None = None,
        address: str = "127.0.0.1",
        gunicorn_config: Path = GUNICORN_CONF,
    ) -> None:
        self.workers = workers
        self.gunicorn_config = gunicorn_config  # another app, or the project's settings with more hooks (bench/)
        self.address = address
        self.race_window_ms = race_window_ms
        self.admin_token = admin_token
        self.extra_environment = environment or {}
        self._temporary = None if directory else tempfile.TemporaryDirectory(prefix="ticketlock-")
        self.directory = Path(directory or self._temporary.name)  # type: ignore[union-attr]
        self.db_path = self.directory / "db.json"
        self.log_path = self.directory / "gunicorn.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        """Start gunicorn and wait until ``GET /health`` answers."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.address, 0))
        listener.listen(1024)
        listener.set_inheritable(True)
        self.url = f"http://{self.address}:{listener.getsockname()[1]}"
        with listener, open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                gunicorn_command("--bind", f"fd://{listener.fileno()}", config=self.gunicorn_config),
                env=self._environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=[listener.fileno()],
                start_new_session=True,  # its own process group, so stop() reaches every worker
            )
        self._wait_until_healthy()

    def _environment(self) -> dict[str, str]:
        # The user's own TICKETLOCK_* settings (an admin token, a db path) are for their server, not this one.
        inherited = {name: value for name, value in os.environ.items() if not name.startswith("TICKETLOCK_")}
        environment = {
            **inherited,
            "TICKETLOCK_DB": str(self.db_path),
            "TICKETLOCK_WORKERS": str(self.workers),
            **self.extra_environment,
        }
        if self.race_window_ms is not None:
            environment["TICKETLOCK_RACE_WINDOW_MS"] = str(self.race_window_ms)
        if self.admin_token is not None:
            environment["TICKETLOCK_ADMIN_TOKEN"] = self.admin_token
        return environment

    def _wait_until_healthy(self) -> None:
        assert self.process is not None
        client = ServiceClient(self.url, timeout_s=2.0)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._fail(f"gunicorn exited with {self.process.returncode} at start")
            try:
                client.health()
                return
            except (ServiceUnreachable, ServiceError):
                time.sleep(0.05)
        self._fail(f"gunicorn did not answer within {STARTUP_TIMEOUT_S:g} s")

    def _fail(self, problem: str) -> None:
        log = self.log_tail()
        self.stop()
        raise RuntimeError(f"{problem}; the end of its log:\n{log}")

    @property
    def master_pid(self) -> int | None:
        """The gunicorn master's PID (also its process group id), while it runs."""
        return self.process.pid if self.process else None

    def worker_pids(self) -> list[int]:
        """PIDs of the master's worker processes right now."""
        return [pid for pid in processes_in_group(self.master_pid or -1) if pid != self.master_pid]

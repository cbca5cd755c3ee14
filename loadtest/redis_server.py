"""A throwaway Redis server for one run: the operating system's ``redis-server``, a folder and a loopback port.

It keeps nothing on disk (no snapshots, no append-only file): a restart empties it, as a crash of a lock
service without persistence would, and the fencing tokens must still grow after it (``service/lock_service.py``
seeds them from the store). It runs in its own process group; stopping asks it to shut down, waits, then
SIGKILLs whatever is left and checks by PID that nothing remains.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from loadtest.server import ServerProcess

START_TIMEOUT_S = 20.0
INSTALL_HINT = "install the operating system's Redis server, e.g. `sudo apt-get install redis-server`"


class RedisNotFound(RuntimeError):
    """The ``redis-server`` program is not installed."""


class ThrowawayRedis(ServerProcess):
    """``with ThrowawayRedis() as server:`` serves ``server.url`` until the block ends (SIGTERM: Redis shuts down)."""

    what = "redis-server"

    def __init__(self, address: str = "127.0.0.1") -> None:
        program = shutil.which("redis-server")
        if program is None:
            raise RedisNotFound(f"redis-server was not found: {INSTALL_HINT}")
        self.program = program
        self.address = address
        self._temporary = tempfile.TemporaryDirectory(prefix="ticketlock-redis-")
        self.directory = Path(self._temporary.name)
        self.log_path = self.directory / "redis.log"
        self.port = _free_port(address)
        self.url = f"redis://{address}:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Serve on the port chosen at construction (the same one again after ``stop``), and wait for PING."""
        command = [
            self.program,
            "--bind", self.address,
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--save", "",  # no snapshots
            "--appendonly", "no",  # and no append-only file: a restart forgets every key
            "--protected-mode", "yes",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}; its log:\n{self.log_tail()}")
            try:
                client.ping()
                return
            except redis.RedisError:
                time.sleep(0.05)
            finally:
                client.close()
        self.stop()
        raise RuntimeError(f"redis-server did not answer within {START_TIMEOUT_S:g} s:\n{self.log_tail()}")

    def restart(self, down_for_s: float = 0.0) -> None:
        """Stop the server (every key is lost), stay down for ``down_for_s`` seconds, and serve again."""
        self.stop()
        time.sleep(down_for_s)
        self.start()


def _free_port(address: str) -> int:
    """A port nobody listens on now (Redis takes a port number, not a socket handed to it)."""
    with socket.socket() as probe:
        probe.bind((address, 0))
        port: int = probe.getsockname()[1]
        return port

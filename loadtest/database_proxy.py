"""A TCP proxy on loopback in front of PostgreSQL's Unix socket: it counts its clients' round trips, and can stall.

Counting: PostgreSQL's protocol ends each request the client waits on with one message, a simple ``Query`` or
the ``Sync`` that closes a batch of extended-protocol messages (one statement, or a whole pipeline); the server
answers each with ``ReadyForQuery``. The proxy reads the messages each client sends and counts those two kinds:
the request/answer turns, seen from the database's side, whatever the client's code says it does.

Stalling: ``stall()`` keeps whatever arrives, either way, until ``resume()``: bytes are accepted and nothing is
delivered, as in a network partition or with a server frozen mid-query (TCP keepalives are answered all the same).
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Self

# The messages after which a client waits for the server's ReadyForQuery: a simple Query, and a Sync.
TURN_ENDING = frozenset(b"QS")
# The untyped requests a client may send before its startup message (each answered by one byte).
SSL_REQUEST, GSSENC_REQUEST = 80877103, 80877104


class DatabaseProxy:
    """``with DatabaseProxy(socket_path) as proxy:`` forwards ``127.0.0.1:<port>`` (``proxy.url_host``) to it."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url_host = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.flowing = threading.Event()
        self.flowing.set()
        self.sockets: list[socket.socket] = []
        self._turns = 0
        self._counting = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.flowing.set()
        for open_socket in [self.listener, *self.sockets]:
            open_socket.close()

    @property
    def turns(self) -> int:
        """The request/answer turns every client has taken so far (the connections' start-ups not counted)."""
        with self._counting:
            return self._turns

    def turns_per(self, action: Callable[[], None], times: int) -> float:
        """The round trips ``action`` takes, on average over ``times`` calls, after as many to warm up (the
        connection, the settings and the count a worker sees on its first calls)."""
        for _ in range(times):
            action()
        before = self.turns
        for _ in range(times):
            action()
        return (self.turns - before) / times

    def stall(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            server = socket.socket(socket.AF_UNIX)
            server.connect(str(self.socket_path))
            self.sockets += [client, server]
            threading.Thread(target=self._pass_on, args=(client, server, _Requests(self._count)), daemon=True).start()
            threading.Thread(target=self._pass_on, args=(server, client, None), daemon=True).start()

    def _count(self, turns: int) -> None:
        with self._counting:
            self._turns += turns

    def _pass_on(self, source: socket.socket, target: socket.socket, requests: _Requests | None) -> None:
        with suppress(OSError):
            while chunk := source.recv(65536):
                if requests is not None:
                    requests.read(chunk)
                self.flowing.wait()
                target.sendall(chunk)
            target.shutdown(socket.SHUT_WR)


class _Requests:
    """The messages one client sends, split as they arrive, and the turns they end reported to ``count``."""

    def __init__(self, count: Callable[[int], None]) -> None:
        self.count = count
        self.pending = b""
        self.started = False  # past the startup message: every message now starts with its type byte

    def read(self, chunk: bytes) -> None:
        self.pending += chunk
        turns = 0
        while True:
            header = 5 if self.started else 8  # type and length; or length and request code
            if len(self.pending) < header:
                break
            if self.started:
                kind, length = self.pending[0], struct.unpack_from("!i", self.pending, 1)[0] + 1
            else:
                kind, length = 0, struct.unpack_from("!i", self.pending, 0)[0]
            if len(self.pending) < length:
                break
            if self.started:
                turns += kind in TURN_ENDING
            elif struct.unpack_from("!i", self.pending, 4)[0] not in (SSL_REQUEST, GSSENC_REQUEST):
                self.started = True  # the startup message itself
            self.pending = self.pending[length:]
        if turns:
            self.count(turns)

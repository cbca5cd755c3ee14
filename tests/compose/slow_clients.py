"""Slow clients against a running demo: do GET /health and a purchase still answer while they hang on?

Opens CONNECTIONS connections that each send a purchase's headers and then 1 byte of its 100-byte body, and keeps
them open while it times GET /health and POST /orders from a client of its own. Behind nginx (the demo's published
port) both must answer within LIMIT seconds. Straight to gunicorn's sync workers (--expect-stall, the control) a
handful of such connections hold every worker, and GET /health must not answer within LIMIT: that shows the check
can fail. Standard library only: it runs on the CI machine's python3 and inside the project's image alike.
Send it only to addresses of this machine or of the demo's own network; it stops by itself (every wait is bounded).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import socket
import sys
import time
import urllib.parse

BODY_BYTES = 100  # what each slow request announces in Content-Length; it sends only the first byte


def open_slow_connection(host: str, port: int) -> socket.socket:
    """A purchase that sends its headers and 1 byte of its body, then nothing."""
    connection = socket.create_connection((host, port), timeout=5)
    head = (
        f"POST /orders HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {BODY_BYTES}\r\n\r\n{{"
    )
    connection.sendall(head.encode("ascii"))
    return connection


def still_open(connection: socket.socket) -> bool:
    """Whether the server still holds this connection open (no EOF, no reset, nothing answered)."""
    connection.setblocking(False)
    try:
        return connection.recv(1, socket.MSG_PEEK) != b""  # data: the server answered and may close
    except BlockingIOError:
        return True  # nothing to read yet: still waiting for the rest of the body
    except OSError:
        return False
    finally:
        connection.setblocking(True)


def timed_request(
    host: str, port: int, method: str, path: str, body: dict[str, object] | None, limit_s: float, token: str | None
) -> tuple[str, float]:
    """(status or what went wrong, seconds) for one request that may take at most ``limit_s``."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    started = time.monotonic()
    connection = http.client.HTTPConnection(host, port, timeout=limit_s)
    try:
        connection.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        response = connection.getresponse()
        response.read()
        outcome = str(response.status)
    except TimeoutError:
        outcome = "no answer"
    except OSError as error:
        outcome = f"failed ({error})"
    finally:
        connection.close()
    return outcome, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--limit", type=float, default=1.0, help="seconds an answer may take (default 1)")
    parser.add_argument("--token", help="admin token: reset the store first, so that the purchase can sell")
    parser.add_argument("--expect-stall", action="store_true", help="the control: pass only if /health stalls")
    options = parser.parse_args()
    target = urllib.parse.urlsplit(options.url)
    host, port = target.hostname or "127.0.0.1", target.port or 80

    if options.token:
        status, _ = timed_request(host, port, "POST", "/reset", {}, 10, options.token)
        if status != "200":
            print(f"slow clients: POST /reset answered {status}, not 200", file=sys.stderr)
            return 1

    slow: list[socket.socket] = []
    with contextlib.ExitStack() as stack:
        for _ in range(options.connections):
            slow.append(stack.enter_context(open_slow_connection(host, port)))
        time.sleep(0.5)  # time for the server to take them in: accept, read the headers, hand them on

        health, health_s = timed_request(host, port, "GET", "/health", None, options.limit, None)
        if options.expect_stall:
            purchase, purchase_s = "not tried", 0.0
        else:
            purchase, purchase_s = timed_request(
                host, port, "POST", "/orders", {"buyer": "slow-client check"}, options.limit, None
            )
        open_count = sum(still_open(connection) for connection in slow)

    print(
        f"{options.connections} slow connections to {options.url} (headers and 1 of {BODY_BYTES} body bytes each), "
        f"{open_count} still open while measuring: GET /health -> {health} in {health_s * 1000:.0f} ms; "
        f"POST /orders -> {purchase} in {purchase_s * 1000:.0f} ms"
    )
    if options.expect_stall:
        return 0 if health == "no answer" else 1
    sold = ("201",) if options.token else ("201", "409")  # after a reset there is a ticket to sell
    healthy = health == "200" and purchase in sold and max(health_s, purchase_s) < options.limit
    return 0 if healthy and open_count == options.connections else 1


if __name__ == "__main__":
    sys.exit(main())

"""Every usual way to start the service serves from a fresh clone: no 500, no manual step.

Each command runs for real in a folder holding only the repository's own db.json, as a fresh clone has it (no
settings file, no journal): the store creates what is missing on first use, also when four workers do so at
once. The server runs in its own process group and is stopped by PID, as every test server is.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import requests

from loadtest.server import descendants, processes_in_group
from tests.conftest import ROOT, Api

BIN = Path(sys.executable).parent
STARTS = {
    "flask run": ["{bin}/flask", "--app", "service", "run", "--port", "{port}"],
    "gunicorn": ["{bin}/gunicorn", "--bind", "127.0.0.1:{port}", "service:create_app()"],
    "gunicorn -w 4": ["{bin}/gunicorn", "-w", "4", "--bind", "127.0.0.1:{port}", "service:create_app()"],
    "python -m service": ["{bin}/python", "-m", "service"],
    "ticketlock-serve": ["{bin}/ticketlock-serve"],
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def started(command: list[str], folder: Path, port: int) -> Iterator[str]:
    """Run ``command`` in ``folder`` until the block ends; yields the URL once ``GET /health`` answers."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("TICKETLOCK_")}
    environment["TICKETLOCK_BIND"] = f"127.0.0.1:{port}"  # read by the project's gunicorn settings only
    log = folder / "server.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command, cwd=folder, env=environment, stdout=output, stderr=output, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()
            with suppress(requests.ConnectionError):
                if Api(url).get("/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield url
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
        deadline = time.monotonic() + 10
        while processes_in_group(process.pid) and time.monotonic() < deadline:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            time.sleep(0.05)
        assert not processes_in_group(process.pid)


@pytest.mark.parametrize("name", STARTS)
def test_each_usual_start_command_serves_from_a_fresh_clone(tmp_path: Path, name: str) -> None:
    committed = subprocess.run(["git", "show", "HEAD:db.json"], cwd=ROOT, capture_output=True, check=True).stdout
    (tmp_path / "db.json").write_bytes(committed)
    port = _free_port()
    command = [part.format(bin=BIN, port=port) for part in STARTS[name]]

    with started(command, tmp_path, port) as url:
        api = Api(url)
        # The first requests arrive together, so several workers find the settings file missing at once.
        with ThreadPoolExecutor(max_workers=8) as pool:
            first = list(pool.map(lambda _: api.get("/tickets"), range(8)))
        order = api.post("/orders", {"buyer": "ana"})
        tickets = api.get("/tickets")

    assert {response.status_code for response in first} == {200}, [response.text for response in first]
    assert order.status_code == 201, order.text
    assert (tickets.json()["remaining"], tickets.json()["mode"]) == (9, "locked")
    assert (tmp_path / "db.json.settings").exists()


def test_a_port_in_use_stops_the_start_with_one_line_naming_the_address_and_the_setting(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        environment = {name: value for name, value in os.environ.items() if not name.startswith("TICKETLOCK_")}
        environment |= {"TICKETLOCK_BIND": address, "TICKETLOCK_DB": str(tmp_path / "db.json")}
        completed = subprocess.run(
            [BIN / "ticketlock-serve"], env=environment, capture_output=True, text=True, timeout=60, cwd=tmp_path
        )

    lines = [line for line in completed.stderr.splitlines() if line.startswith("ticketlock:")]
    assert completed.returncode != 0 and len(lines) == 1, completed.stderr
    assert address in lines[0] and "TICKETLOCK_BIND" in lines[0]
    assert "[ERROR]" not in completed.stderr and "Traceback" not in completed.stderr


# A worker that never finishes booting: its master runs, GET /health never answers.
NEVER_READY_APP = "import time\ntime.sleep(60)\n"
NEVER_READY_CONF = (
    "wsgi_app = 'never_ready:app'\npythonpath = {folder!r}\nworkers = 1\ngraceful_timeout = 1\n"
    "control_socket_disable = True\n"
)
START_EMBEDDED = (
    "import pathlib, sys\n"
    "from loadtest.embedded import EmbeddedService\n"
    "with EmbeddedService(workers=1, gunicorn_config=pathlib.Path(sys.argv[1])):\n"
    "    pass\n"
)


def test_ctrl_c_while_gunicorn_starts_stops_it_and_deletes_its_folder(tmp_path: Path) -> None:
    (tmp_path / "never_ready.py").write_text(NEVER_READY_APP)
    config = tmp_path / "never_ready.conf.py"
    config.write_text(NEVER_READY_CONF.format(folder=str(tmp_path)))
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    starter = subprocess.Popen(
        [sys.executable, "-c", START_EMBEDDED, str(config)],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(temporary)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while len(gunicorn := descendants(starter.pid)) < 2:  # the master, and its worker booting
            assert starter.poll() is None and time.monotonic() < deadline, "gunicorn did not start"
            time.sleep(0.02)
        starter.send_signal(signal.SIGINT)
        _, stderr = starter.communicate(timeout=30)
    finally:
        starter.kill()
        starter.wait()

    assert "KeyboardInterrupt" in stderr.decode()
    assert not [pid for pid in gunicorn if processes_in_group(pid)], "gunicorn outlived the interrupted start"
    assert list(temporary.iterdir()) == []

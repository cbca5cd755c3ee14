"""The compose test's private Docker engine: tests/compose/engine.sh started, awaited, used and stopped.

engine.sh does what is shell (host packages, containerd and dockerd, the stand-in images) and says on its
standard output when the engine is ready; it stops everything it started once its standard input closes, which
happens when ``private_engine`` exits or when the test's process dies. Every command the test runs against the
engine goes through ``Engine.run``: bounded in time, its output kept in the run's log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SETUP_FAILED = 75  # engine.sh's exit status when this machine could not be set up
SETUP_TIMEOUT_S = 1800  # engine.sh may first wait up to 30 minutes for another run's lock on the cache
STOP_TIMEOUT_S = 240  # engine.sh's clean-up: the containers, then each daemon up to 20 s, then the leftovers
# Run the demos as a user would, with the compose file's defaults, whatever the test's environment has set.
UNSET = (
    "TICKETLOCK_ADMIN_TOKEN",
    "TICKETLOCK_WORKERS",
    "TICKETLOCK_DB_PASSWORD",
    "TICKETLOCK_PUBLISH_ADDRESS",
    "COMPOSE_PROFILES",
    "COMPOSE_FILE",
    "COMPOSE_PROJECT_NAME",
)


class EngineUnavailable(Exception):
    """engine.sh could not set this machine up (no apt-get, a failed install, ...): outside CI, a skip.

    ``str()`` is engine.sh's one line saying what it could not do; ``output`` all it said, the log's tail included.
    """

    def __init__(self, output: list[str]) -> None:
        super().__init__(output[-1] if output else "could not set up the engine")
        self.output = "\n".join(output[:-1])


@dataclass(frozen=True)
class Engine:
    """A ready engine, as engine.sh's ready line describes it."""

    settings: Mapping[str, str]  # DOCKER_HOST, DOCKER_CONFIG, HADOLINT, LOG, RUN_DIR, DAEMON_PIDS

    @property
    def environment(self) -> dict[str, str]:
        """The demos' environment, with the docker CLI pointed at this engine and its compose plugin."""
        docker = {name: self.settings[name] for name in ("DOCKER_HOST", "DOCKER_CONFIG")}
        return {**demo_environment(), **docker}

    @property
    def log(self) -> Path:
        """The run's log, in the cache: engine.sh's steps, the daemons, and every command of the test."""
        return Path(self.settings["LOG"])

    @property
    def run_dir(self) -> Path:
        """The run's temporary folder: the engine's state, which containerd's shims name on their command line."""
        return Path(self.settings["RUN_DIR"])

    @property
    def daemon_pids(self) -> set[int]:
        """dockerd's and containerd's process ids."""
        return {int(pid) for pid in self.settings["DAEMON_PIDS"].split(",")}

    @property
    def hadolint(self) -> str:
        """The hadolint binary engine.sh installed."""
        return self.settings["HADOLINT"]

    def run(
        self,
        step: str,
        command: Sequence[str],
        timeout_s: float = 60,
        environment: Mapping[str, str] | None = None,
        merge_errors: bool = False,
    ) -> str:
        """The output of ``command``, run for at most ``timeout_s``; fails naming ``step`` unless it succeeds in time.
        Its outputs go to the log too, and its standard error into its standard output with ``merge_errors``."""
        try:
            completed = subprocess.run(
                command,
                cwd=REPO,
                env=self.environment if environment is None else environment,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT if merge_errors else subprocess.PIPE,
                text=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"compose test: FAILED: could not {step} within {timeout_s:g} s; {self.log_tail()}")
        output = completed.stdout + (completed.stderr or "")
        with self.log.open("a") as log:
            log.write(f"$ {' '.join(command)}\n{output}")
        if completed.returncode != 0:
            status = completed.returncode
            pytest.fail(f"compose test: FAILED (exit status {status}) trying to {step}:\n{last_lines(output, 40)}")
        return completed.stdout

    def log_tail(self) -> str:
        """The last lines of the run's log, for a failure's message."""
        return f"the log's last lines ({self.log}):\n{last_lines(self.log.read_text(), 40)}"


def last_lines(text: str, count: int, prefix: str = "") -> str:
    """The last ``count`` lines of ``text``, each after ``prefix``."""
    return "\n".join(prefix + line for line in text.splitlines()[-count:])


def demo_environment() -> dict[str, str]:
    """This process's environment without the settings that would change the demos (``UNSET``)."""
    return {name: value for name, value in os.environ.items() if name not in UNSET}


@contextlib.contextmanager
def private_engine(output: Path) -> Iterator[Engine]:
    """Start engine.sh, its messages written to ``output``; yield the engine once ready; stop it, pass or fail.

    Raises EngineUnavailable when engine.sh could not set this machine up, and fails the test when it stopped for
    any other reason.
    """
    with output.open("w") as messages:
        process = subprocess.Popen(
            ["bash", str(HERE / "engine.sh")],
            stdin=subprocess.PIPE,
            stdout=messages,
            stderr=subprocess.STDOUT,
            env=demo_environment(),
            start_new_session=True,  # Ctrl-C reaches pytest alone, which then stops engine.sh as below
        )
    engine: Engine | None = None
    try:
        engine = Engine(wait_until_ready(process, output))
        yield engine
    finally:
        stop(process, ready=engine is not None)


def wait_until_ready(process: subprocess.Popen[bytes], output: Path) -> dict[str, str]:
    """The settings of engine.sh's ready line, once it prints one."""
    deadline = time.monotonic() + SETUP_TIMEOUT_S
    while True:
        status = process.poll()  # before reading: all it said before it stopped
        lines = output.read_text().splitlines()
        for line in lines:
            if line.startswith("ready "):
                print(*lines[: lines.index(line)], sep="\n")
                return dict(setting.split("=", 1) for setting in line.split()[1:])
        if status == SETUP_FAILED:
            raise EngineUnavailable(lines)
        if status is not None:
            pytest.fail(f"compose test: FAILED: engine.sh stopped with exit status {status}:\n" + "\n".join(lines))
        if time.monotonic() > deadline:
            pytest.fail(f"compose test: FAILED: no engine after {SETUP_TIMEOUT_S} s:\n" + "\n".join(lines))
        time.sleep(0.5)


def stop(process: subprocess.Popen[bytes], ready: bool) -> None:
    """Have engine.sh clean up and wait for it: a ready one once its standard input closes, one still setting up
    on SIGTERM (a ready one gets none: it could cut its clean-up short)."""
    assert process.stdin is not None
    process.stdin.close()
    if not ready and process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its own process group (start_new_session): daemons included
        process.wait()

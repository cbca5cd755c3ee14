"""The two demos of docker-compose.yml as the compose test runs them: the part each service plays, and bringing a
demo up (its load tester run to the end) and down again on the private engine."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from service.config import SETTINGS
from tests.compose.engine import HERE, REPO, Engine, last_lines

# The admin token docker-compose.yml and the README give the demo when TICKETLOCK_ADMIN_TOKEN is not set.
DEMO_TOKEN = "ticketlock-demo"
# The CI override laid over the real file (docker-compose.ci.yml), under a project name of its own.
CI_COMPOSE = [
    "docker",
    "compose",
    "--project-name",
    "ticketlock-ci",
    "--file",
    str(REPO / "docker-compose.yml"),
    "--file",
    str(HERE / "docker-compose.ci.yml"),
]
PUBLISHED_PORT = 8000  # where docker-compose.yml publishes the load balancer


@dataclass(frozen=True)
class Demo:
    """One demo of docker-compose.yml: its profile, and the services that play each part in it."""

    profile: str
    api: str  # the booking API, one container or several replicas
    lb: str  # nginx in front of it, the only service that publishes a port
    loadtest: str  # the load tester, which runs its phases through lb and exits
    store: str  # the store the api's answers name
    modes: tuple[str, ...] = ()  # the phases the load tester must run; () for every mode the store offers
    database: str = ""  # the service without which the api is unhealthy, if any
    default: bool = False  # the demo .env selects: started with a plain `docker compose up`, as a user would

    @property
    def services(self) -> set[str]:
        """The services the demo starts."""
        return {self.api, self.lb, self.loadtest} | ({self.database} if self.database else set())

    @property
    def command(self) -> list[str]:
        """``docker compose`` for this demo."""
        return CI_COMPOSE if self.default else [*CI_COMPOSE, "--profile", self.profile]


SINGLE_HOST = Demo("single-host", "api", "lb", "loadtest", "file", modes=("unlocked", "locked"), default=True)
CLUSTER = Demo("cluster", "cluster-api", "cluster-lb", "cluster-loadtest", "postgres", database="db")
DEMOS = (SINGLE_HOST, CLUSTER)


@dataclass(frozen=True)
class Project:
    """The demos' docker compose project: the private engine, and the loopback address lb is published on."""

    engine: Engine
    publish_address: str

    @property
    def url(self) -> str:
        """The load balancer of the demo that is up, as this machine reaches it."""
        return f"http://{self.publish_address}:{PUBLISHED_PORT}"

    @property
    def environment(self) -> dict[str, str]:
        """The engine's environment, with the compose file's TICKETLOCK_PUBLISH_ADDRESS."""
        return {**self.engine.environment, "TICKETLOCK_PUBLISH_ADDRESS": self.publish_address}

    def run(self, step: str, command: list[str], timeout_s: float = 60) -> str:
        """Run ``command`` in this project's environment; its output."""
        return self.engine.run(step, command, timeout_s, self.environment)

    def compose(self, demo: Demo, step: str, *arguments: str, timeout_s: float = 60) -> str:
        """Run ``docker compose ARGUMENTS`` on ``demo``; its output."""
        return self.run(step, [*demo.command, *arguments], timeout_s)


@dataclass(frozen=True)
class RunningDemo:
    """A demo that is up, its load tester finished."""

    demo: Demo
    project: Project
    hosts: int  # the api's replicas
    workers: int  # gunicorn workers in each
    report: str  # what the load tester printed
    lapsed: bool = False  # whether its race window outlives the api's lease (service/modes.py, Mode.holds_for)

    @property
    def url(self) -> str:
        """The demo's load balancer, as this machine reaches it."""
        return self.project.url

    @property
    def engine(self) -> Engine:
        """The engine the demo runs on."""
        return self.project.engine

    def compose(self, step: str, *arguments: str, timeout_s: float = 60) -> str:
        """Run ``docker compose ARGUMENTS`` on this demo; its output."""
        return self.project.compose(self.demo, step, *arguments, timeout_s=timeout_s)

    def containers(self, *services: str) -> list[str]:
        """The ids of the running containers of ``services`` (of every service when none is named)."""
        return self.compose(
            f"list the containers of {' '.join(services) or 'the demo'}", "ps", "--quiet", *services
        ).split()


@contextlib.contextmanager
def running(project: Project, demo: Demo) -> Iterator[RunningDemo]:
    """``demo`` up, built, healthy and its load tester finished; taken down with its volumes afterwards."""
    print(f"compose test: the {demo.profile} demo")
    try:
        started = time.monotonic()
        project.compose(demo, f"start the {demo.profile} demo", "up", "--build", "--detach", timeout_s=900)
        print(f"compose test: up --build: images built, every service healthy in {time.monotonic() - started:.0f} s")
        config = json.loads(project.compose(demo, "read the demo's configuration", "config", "--format", "json"))
        hosts, workers = deployment(config["services"][demo.api])
        lapsed = outlives_the_lease(config["services"][demo.api], config["services"][demo.loadtest])
        yield RunningDemo(demo, project, hosts, workers, wait_for_loadtest(project, demo), lapsed)
    finally:
        down = ("down", "--volumes", "--remove-orphans", "--timeout", "10")
        project.compose(demo, f"take the {demo.profile} demo down", *down, timeout_s=120)


def deployment(api: dict[str, Any]) -> tuple[int, int]:
    """(replicas, gunicorn workers in each) of an api service, as compose's resolved configuration gives them."""
    replicas = int(api.get("deploy", {}).get("replicas", 1))
    return replicas, int(api["environment"]["TICKETLOCK_WORKERS"])


def outlives_the_lease(api: dict[str, Any], loadtest: dict[str, Any]) -> bool:
    """Whether the load tester's race window is at least the api's lease (their settings, or the defaults)."""
    environment = api["environment"]
    defaults = {setting.variable: setting.default for setting in SETTINGS}
    lease_ms = int(environment.get("TICKETLOCK_LEASE_MS", defaults["TICKETLOCK_LEASE_MS"]))
    command = loadtest["command"]
    window = environment.get("TICKETLOCK_RACE_WINDOW_MS", defaults["TICKETLOCK_RACE_WINDOW_MS"])
    if "--race-window-ms" in command:
        window = command[command.index("--race-window-ms") + 1]
    return int(window) >= lease_ms


def wait_for_loadtest(project: Project, demo: Demo) -> str:
    """What the demo's load tester printed, once it exited; fails unless it exited 0."""
    started = time.monotonic()
    service = demo.loadtest
    container = project.compose(demo, f"find the {service} container", "ps", "--all", "--quiet", service).strip()
    engine = project.engine
    status = engine.run(f"wait for {service} to exit", ["docker", "wait", container], timeout_s=600).strip()
    report = engine.run(f"read {service}'s output", ["docker", "logs", container], merge_errors=True)
    print(f"compose test: {service} exited with status {status} after {time.monotonic() - started:.0f} s")
    assert status == "0", f"{service} exited with status {status}; its last lines:\n{last_lines(report, 15, '  | ')}"
    return report


def free_loopback_address() -> str:
    """A random address of 127.0.0.0/8 (all of it this host's loopback) where the published port is free.

    The demos publish their load balancer there, through the compose file's own TICKETLOCK_PUBLISH_ADDRESS, without
    clashing with anything on this machine that holds 127.0.0.1:8000.
    """
    for _ in range(20):
        address = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
        with socket.socket() as probe:
            try:
                probe.bind((address, PUBLISHED_PORT))
            except OSError:
                continue
        return address
    raise AssertionError(f"port {PUBLISHED_PORT} is taken on every loopback address tried")

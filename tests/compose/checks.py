"""What the compose test checks: the compose files and the Dockerfiles, then on a running demo the answers through
its load balancer, who publishes and who listens on this machine, slow clients, and the replicas' health without
their database.

Each check prints what it saw (pytest shows it when a check fails, or always with -s) and fails with a sentence
saying what went wrong.
"""

from __future__ import annotations

import ipaddress
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import requests

from tests.compose.demos import CI_COMPOSE, DEMO_TOKEN, DEMOS, SINGLE_HOST, Project, RunningDemo
from tests.compose.engine import HERE, REPO, Engine, last_lines
from tests.compose.verdicts import check_verdicts

# What every GET /tickets answers, whatever the store.
TICKET_FIELDS = {"event", "total", "remaining", "sold", "mode", "race_window_ms", "worker_pid", "host", "store"}
ADMIN = {"Authorization": f"Bearer {DEMO_TOKEN}"}
SLOW_CLIENTS = HERE / "slow_clients.py"
LISTENING = ["ss", "--no-header", "--listening", "--numeric", "--tcp", "--udp", "--processes"]
PORTS = "{{.Name}} {{json .NetworkSettings.Ports}}"  # docker inspect's: "/name {"5432/tcp": null}"
SOCKET_USER = re.compile(r'\("(?P<program>[^"]*)",pid=(?P<pid>\d+)')  # ss: users:(("docker-proxy",pid=1,fd=4))


def check_compose_files(project: Project) -> None:
    """Both profiles are valid, alone and with the CI override; .env makes single-host the default; and by default
    only the load balancers publish a port, on 127.0.0.1."""
    engine = project.engine
    user = ["docker", "compose"]  # in the repository, as a user types it: no CI override, no publish address
    for demo in DEMOS:
        engine.run(f"validate the {demo.profile} profile", [*user, "--profile", demo.profile, "config", "--quiet"])
        with_override = [*CI_COMPOSE, "--profile", demo.profile, "config", "--quiet"]
        project.run(f"validate the {demo.profile} profile with the CI override", with_override)
    default = engine.run("list the services of a plain docker compose", [*user, "config", "--services"]).split()
    assert set(default) == SINGLE_HOST.services, f"a plain `docker compose` selects {default}, see .env"
    config = json.loads(engine.run("read every profile", [*user, "--profile", "*", "config", "--format", "json"]))
    published = {
        name: [port["host_ip"] for port in service["ports"]]
        for name, service in config["services"].items()
        if service.get("ports")
    }
    assert published == {demo.lb: ["127.0.0.1"] for demo in DEMOS}, f"docker-compose.yml publishes {published}"
    print("compose test: both profiles valid, alone and with the CI override; by default only", end=" ")
    print(f"{' and '.join(sorted(published))} publish a port, on 127.0.0.1")


def check_dockerfiles(engine: Engine) -> None:
    """hadolint finds no error in the project's Dockerfile nor in any stand-in's."""
    for dockerfile in [REPO / "Dockerfile", *sorted(HERE.glob("stand-ins/*/Dockerfile"))]:
        lint = [engine.hadolint, "--no-color", "--failure-threshold", "error", str(dockerfile)]
        name = dockerfile.relative_to(REPO)
        warnings = engine.run(f"lint {name} with hadolint", lint).strip()
        print(f"compose test: hadolint: no errors in {name}", *([warnings] if warnings else []), sep="\n")


def check_demo(running: RunningDemo) -> None:
    """What every demo shows through its load balancer: each verdict the modes table expects of it, the documented
    answers and the live page, and on this machine only the load balancer's port, on loopback, which slow clients
    cannot stall."""
    modes = running.demo.modes or available_modes(running.url)
    check_verdicts(running.report, modes, running.hosts, running.workers, running.lapsed)
    check_answers(running)
    check_live_page(running.url)
    check_only_lb_publishes(running)
    check_only_loopback_listens(running.engine)
    check_slow_clients_cannot_stall(running)


def answer(url: str, method: str, path: str, status: int, show: bool = True, **request: Any) -> Any:
    """The JSON body of ``method path`` through the load balancer at ``url``, shown unless ``show`` is false; fails
    unless it answered ``status``."""
    response = requests.request(method, url + path, timeout=10, **request)
    print(f"  {method} {path} -> {response.status_code} {response.text.strip() if show else ''}")
    assert response.status_code == status, f"{method} {path} answered {response.status_code}, not {status}"
    return response.json()


def available_modes(url: str) -> list[str]:
    """The modes the demo's store can run, as GET /modes lists them."""
    available = [mode["name"] for mode in answer(url, "GET", "/modes", 200, show=False)["modes"] if mode["available"]]
    print(f"  the store runs {', '.join(available)}")
    return available


def check_answers(running: RunningDemo) -> None:
    """curl's documented answers through the load balancer: health, the admin token, a purchase that counts."""
    url = running.url
    print(f"compose test: through {running.demo.lb} at {url}:")
    assert answer(url, "GET", "/health", 200) == {"status": "ok"}
    assert answer(url, "POST", "/reset", 401)["error"] == "unauthorized"
    reset = answer(url, "POST", "/reset", 200, headers=ADMIN)
    assert reset["remaining"] == reset["total"] and reset["sold"] == 0, "POST /reset did not put every ticket back"
    tickets = answer(url, "GET", "/tickets", 200)
    assert tickets.keys() >= TICKET_FIELDS, f"GET /tickets lacks {', '.join(TICKET_FIELDS - tickets.keys())}"
    assert tickets["store"] == running.demo.store and tickets["host"], "GET /tickets names no host, or another store"
    order = answer(url, "POST", "/orders", 201, json={"buyer": "ana"})
    assert order["buyer"] == "ana" and order["quantity"] == 1 and order["order_id"], "POST /orders sold no ticket"
    assert order["store"] == running.demo.store and order["host"], "POST /orders names no host, or another store"
    after = answer(url, "GET", "/tickets", 200)
    assert after["sold"] == 1 and after["remaining"] == after["total"] - 1, "the purchase is not counted"


def check_live_page(url: str) -> None:
    """The live page (GET /) comes through nginx whole, with the service's Content-Security-Policy."""
    response = requests.get(url + "/", timeout=10)
    print(f"  GET / -> {response.status_code} {response.headers.get('Content-Type')}, {len(response.content)} bytes")
    assert response.status_code == 200, f"GET / through the load balancer answered {response.status_code}"
    assert response.headers.get("Content-Type", "").startswith("text/html"), "GET / is not an HTML page"
    assert "Content-Security-Policy" in response.headers, "GET / lost its Content-Security-Policy"


def check_round_robin(running: RunningDemo) -> None:
    """GET /tickets twice per replica: nginx hands the requests to the replicas in turn, so the host changes on
    every answer and every replica answers."""
    hosts = [answer(running.url, "GET", "/tickets", 200)["host"] for _ in range(2 * running.hosts)]
    print(f"  hosts, answer by answer: {' '.join(hosts)}")
    assert len(set(hosts)) == running.hosts, f"answers came from {set(hosts)}, not from {running.hosts} hosts"
    repeats = [number for number in range(1, len(hosts)) if hosts[number] == hosts[number - 1]]
    assert not repeats, f"answers {repeats[0]} and {repeats[0] + 1} came from one host"


def check_only_lb_publishes(running: RunningDemo) -> None:
    """Every container of the demo but the load balancer publishes no port: the database, say, is reached only
    on the compose network."""
    lb = set(running.containers(running.demo.lb))
    for container in set(running.containers()) - lb:
        line = running.engine.run("read a container's ports", ["docker", "inspect", "--format", PORTS, container])
        name, ports = line.split(" ", 1)
        print(f"  {name.lstrip('/')}: ports {ports.strip()}")
        published = {port: hosts for port, hosts in json.loads(ports).items() if hosts}
        assert not published, f"{name.lstrip('/')} publishes {published}"


def check_only_loopback_listens(engine: Engine) -> None:
    """Whatever the demo made listen on this machine listens on a loopback address: nobody else on the network can
    reach the demo, its admin token or its database."""
    sockets = engine_sockets(engine)
    print(f"  listening on this machine for the demo: {'; '.join(sockets)}")
    assert sockets, "the engine listens on nothing: the load balancer's published port is missing"
    exposed = [socket for socket in sockets if not is_loopback(socket.split()[1])]
    assert not exposed, f"the demo listens on an address other than loopback: {'; '.join(exposed)}"


def engine_sockets(engine: Engine) -> list[str]:
    """The listening TCP and UDP sockets of this machine (its own network namespace, not the containers') that
    the engine opened, as "protocol address:port program". Other programs on this machine are none of the test's
    business, and may come and go while it runs."""
    ours = engine_processes(engine)
    sockets = set()
    for line in engine.run("list the listening sockets", LISTENING).splitlines():
        fields = line.split()
        owners = [user["program"] for user in SOCKET_USER.finditer(line) if int(user["pid"]) in ours]
        if owners:
            sockets.add(f"{fields[0]} {fields[4]} {owners[0]}")
    return sorted(sockets)


def engine_processes(engine: Engine) -> set[int]:
    """dockerd, containerd, the processes that name the run's folder (containerd's shims), and all their
    descendants (docker-proxy, which publishes a port; a container on the host's network)."""
    parents: dict[int, int] = {}
    roots = set(engine.daemon_pids)
    for process in Path("/proc").glob("[0-9]*"):
        try:
            stat = (process / "stat").read_text()
            command_line = (process / "cmdline").read_bytes()
        except OSError:
            continue  # it ended meanwhile
        parents[int(process.name)] = int(stat.rsplit(")", 1)[1].split()[1])  # "pid (name) state ppid ..."
        if f"{engine.run_dir}/".encode() in command_line:
            roots.add(int(process.name))
    return {pid for pid in parents if descends(pid, roots, parents)}


def descends(pid: int, roots: set[int], parents: dict[int, int]) -> bool:
    """Whether ``pid`` is one of ``roots`` or their descendant: climb from it to its ancestors."""
    while pid > 1:
        if pid in roots:
            return True
        pid = parents.get(pid, 0)
    return False


def is_loopback(address_and_port: str) -> bool:
    """Whether ss's "address:port" is on loopback (127.0.0.0/8, ::1, or 127.x mapped into IPv6)."""
    host = address_and_port.rsplit(":", 1)[0].strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # "*", or an address scoped to an interface: not loopback-only
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def check_slow_clients_cannot_stall(running: RunningDemo) -> None:
    """50 connections that send a purchase's headers and 1 byte of its body, held open while GET /health and a
    purchase through the published port must answer within a second each (slow_clients.py)."""
    command = [sys.executable, str(SLOW_CLIENTS), running.url, "--connections", "50", "--limit", "1"]
    step = "show that 50 slow clients cannot stall the demo"
    report = running.engine.run(step, [*command, "--token", DEMO_TOKEN], merge_errors=True)
    print(f"  {last_lines(report, 1)}")


def check_slow_clients_stall_gunicorn(running: RunningDemo) -> None:
    """The control: the same trick straight at gunicorn's sync workers (on the compose network, since the api
    publishes nothing) stalls them: the check above would catch an nginx that stopped buffering."""
    connections, api = running.workers + 2, running.demo.api
    control = ["--connections", str(connections), "--limit", "2", "--expect-stall"]
    mount = f"{SLOW_CLIENTS}:/tmp/slow_clients.py:ro"
    arguments = ["run", "--rm", "--no-deps", "--entrypoint", "python3", "--volume", mount, running.demo.loadtest]
    command = [*running.demo.command, *arguments, "/tmp/slow_clients.py", f"http://{api}:8000", *control]
    step = (
        f"show that {connections} slow clients stall {api}'s {running.workers} workers (else the check proves nothing)"
    )
    report = running.engine.run(step, command, 60, running.project.environment, merge_errors=True)
    print(f"  control, straight at gunicorn: {last_lines(report, 1)}")


def check_replicas_unhealthy_without_database(running: RunningDemo) -> None:
    """A replica is healthy only while it reaches the database: stop it, and GET /health through the load balancer
    says why, and the replicas' healthchecks turn unhealthy within a minute. (It leaves the demo without its
    database: the last check.)"""
    database, api = running.demo.database, running.demo.api
    running.compose(f"stop {database}", "stop", database)
    assert answer(running.url, "GET", "/health", 503)["error"] == "store_unavailable"
    replicas = running.containers(api)
    deadline = time.monotonic() + 60
    for replica in replicas:
        while (state := health(running.engine, replica)) != "unhealthy":
            assert time.monotonic() < deadline, f"replica {replica} is still {state} a minute after {database} stopped"
            time.sleep(1)
    print(f"  {database} stopped: all {len(replicas)} {api} replicas unhealthy")


def health(engine: Engine, container: str) -> str:
    """The container's health, as its healthcheck last found it."""
    status = ["docker", "inspect", "--format", "{{.State.Health.Status}}", container]
    return engine.run("read a replica's health", status).strip()

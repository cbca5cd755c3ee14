"""Both docker-compose demos, run for real on a private Docker engine (docs/compose.md).

  single-host (the default profile): api (one container, 4 workers, db.json), lb (nginx), loadtest: the
    unlocked phase oversells, the locked phase is correct.
  cluster (--profile cluster): db (PostgreSQL), cluster-api (three replicas, a lock file each), cluster-lb,
    cluster-loadtest: every mode the store offers, through the load balancer; the file lock oversells across the
    replicas, the database's mutexes are correct, and the host changes from answer to answer.

tests/compose/engine.sh sets the engine up and tears it down (as root it installs Debian's docker.io and builds
stand-ins for the images the compose file names: no registry is needed); the demos, the verdicts the modes table
expects of them and the checks through their load balancers are in tests/compose/. The test passes only if each
demo's load tester exits 0 having shown every expected verdict, curl's answers are the documented ones, nothing
listens on an address of this machine other than loopback, and slow clients cannot stall the API behind nginx.

Outside CI, a machine that cannot run the engine (not root, no apt-get, a failed install) is skipped with one
line, and so is a run with TICKETLOCK_COMPOSE_TEST=skip. With CI=true the test always runs: the request to skip
is ignored, and a machine that cannot run the engine is a failure.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import NoReturn

import pytest

from tests.compose.checks import (
    check_compose_files,
    check_demo,
    check_dockerfiles,
    check_replicas_unhealthy_without_database,
    check_round_robin,
    check_slow_clients_stall_gunicorn,
)
from tests.compose.demos import CLUSTER, SINGLE_HOST, Project, free_loopback_address, running
from tests.compose.engine import Engine, EngineUnavailable, private_engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """The private engine; outside CI, a skip saying in one line why there is none."""
    if os.environ.get("TICKETLOCK_COMPOSE_TEST") == "skip" and os.environ.get("CI") != "true":
        pytest.skip("compose test: skipped on request (TICKETLOCK_COMPOSE_TEST=skip; CI=true ignores it)")
    if os.geteuid() != 0:
        cannot_run("needs root to run a Docker engine")
    with contextlib.ExitStack() as stack:
        try:
            ready = stack.enter_context(private_engine(tmp_path_factory.mktemp("compose") / "engine.out"))
        except EngineUnavailable as error:
            cannot_run(str(error), error.output)
        yield ready


def cannot_run(reason: str, details: str = "") -> NoReturn:
    """A machine that cannot run the engine: a skip with one line, or under CI=true a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"compose test: FAILED: {reason}\n{details}".strip())
    pytest.skip(f"compose test: skipped: {reason}; set CI=true to make this fatal")


@pytest.fixture(scope="module")
def project(engine: Engine) -> Project:
    """The demos' compose project, publishing its load balancer on a free loopback address."""
    return Project(engine, free_loopback_address())


def test_both_compose_demos_show_every_expected_verdict_through_their_load_balancer(project: Project) -> None:
    check_compose_files(project)
    check_dockerfiles(project.engine)
    with running(project, SINGLE_HOST) as demo:
        check_demo(demo)
        check_slow_clients_stall_gunicorn(demo)
    with running(project, CLUSTER) as demo:
        check_demo(demo)
        check_round_robin(demo)
        check_replicas_unhealthy_without_database(demo)

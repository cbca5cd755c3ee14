"""Several hosts on one machine: embedded services on loopback addresses of their own, sharing one PostgreSQL.

Each host is a gunicorn master with its workers (``EmbeddedService``) on 127.0.0.N, with a folder of its own,
and therefore a lock file of its own, as separate machines would have. With the file store there is one host
(db.json is one machine's file); with the postgres store, a throwaway PostgreSQL (``ThrowawayPostgres``) is
started first and every host sells from it, and a throwaway Redis (``ThrowawayRedis``) as their lock service
for the lease modes, when the operating system has ``redis-server``. Everything is stopped in reverse order
when the block ends, also on Ctrl-C, and each part checks by PID that nothing of it survives.
"""

from __future__ import annotations

from contextlib import ExitStack
from types import TracebackType

from loadtest.embedded import EmbeddedService
from loadtest.postgres import ThrowawayPostgres
from loadtest.redis_server import RedisNotFound, ThrowawayRedis

STORES = ("file", "postgres")


class Cluster:
    """``with Cluster(hosts=3, store="postgres") as cluster:`` serves ``cluster.urls`` until the block ends."""

    def __init__(
        self,
        hosts: int = 1,
        workers: int = 4,
        store: str = "file",
        race_window_ms: int | None = None,
        admin_token: str | None = None,
        environment: dict[str, str] | None = None,
        database_url: str | None = None,
        redis_url: str | None = None,
    ) -> None:
        if store not in STORES:
            raise ValueError(f"store must be one of {', '.join(STORES)}, not {store!r}")
        if hosts > 1 and store != "postgres":
            raise ValueError("several hosts need the postgres store: they share one database, never one db.json")
        self.host_count = hosts
        self.workers = workers
        self.store = store
        self.race_window_ms = race_window_ms
        self.admin_token = admin_token
        self.environment = environment or {}
        self.database_url = database_url  # a running database's, instead of a throwaway one
        self.database: ThrowawayPostgres | None = None
        self.redis_url = redis_url  # a running lock service's, instead of a throwaway one
        self.redis: ThrowawayRedis | None = None
        self.without_lock_service = ""  # why the hosts have no lock service, when they have none
        self.hosts: list[EmbeddedService] = []
        self._stack = ExitStack()

    @property
    def urls(self) -> list[str]:
        """One URL per host."""
        return [host.url for host in self.hosts]

    def __enter__(self) -> Cluster:
        with ExitStack() as starting:  # a failed start stops what already started
            environment = dict(self.environment)
            if self.store == "postgres" and self.database_url is None:
                self.database = starting.enter_context(ThrowawayPostgres())
                self.database_url = self.database.url
            if self.store == "postgres":
                environment["TICKETLOCK_DATABASE_URL"] = str(self.database_url)
                self._start_lock_service(starting)
            if self.redis_url:
                environment["TICKETLOCK_REDIS_URL"] = self.redis_url
            for number in range(1, self.host_count + 1):
                host = EmbeddedService(
                    workers=self.workers,
                    race_window_ms=self.race_window_ms,
                    admin_token=self.admin_token,
                    environment={**environment, "TICKETLOCK_HOST_NAME": f"host-{number}"},
                    address=f"127.0.0.{number}",
                )
                self.hosts.append(starting.enter_context(host))
            self._stack = starting.pop_all()
        return self

    def _start_lock_service(self, starting: ExitStack) -> None:
        """A throwaway Redis for the lease modes, unless one was given; without redis-server, none."""
        if self.redis_url is not None:
            return
        try:
            self.redis = starting.enter_context(ThrowawayRedis())
        except RedisNotFound as error:
            self.without_lock_service = str(error)
            return
        self.redis_url = self.redis.url

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._stack.close()

    def service_pids(self) -> list[int]:
        """The master and worker PIDs of every host, and the database's and the lock service's, right now."""
        pids = [pid for host in self.hosts for pid in [host.master_pid or 0, *host.worker_pids()]]
        servers = [self.database.pid if self.database else None, self.redis.pid if self.redis else None]
        return pids + [pid for pid in servers if pid]

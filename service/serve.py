"""Starting the service: the gunicorn command line, and the ``ticketlock-serve`` console script."""

from __future__ import annotations

import errno
import os
import socket
import sys
from collections.abc import Iterable
from pathlib import Path

from service.config import ConfigError

GUNICORN_CONF = Path(__file__).with_name("gunicorn.conf.py")


def gunicorn_command(*extra_arguments: str, config: Path = GUNICORN_CONF) -> list[str]:
    """The command that runs the service under gunicorn with the project's configuration file (or ``config``)."""
    return [sys.executable, "-m", "gunicorn", "--config", str(config), *extra_arguments]


def refuse_addresses_in_use(addresses: Iterable[object]) -> None:
    """ConfigError naming the first TCP address, of gunicorn's parsed ``bind``, that another program listens on.

    gunicorn itself would try five times, a second apart, and log ten ERROR lines that never name the setting.
    """
    for address in addresses:
        if not isinstance(address, tuple):
            continue  # a Unix socket, or a descriptor handed over (fd://)
        host, port = address
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
            try:
                probe.bind((host, port))
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    continue  # gunicorn reports the rest itself
                shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                raise ConfigError(
                    f"{shown} is in use by another program: stop it, or listen elsewhere with TICKETLOCK_BIND "
                    f"(e.g. TICKETLOCK_BIND=127.0.0.1:{port + 1}) or gunicorn's --bind"
                ) from None


def main() -> None:
    """Replace this process with gunicorn; extra arguments go to gunicorn (for example ``--workers 8``)."""
    command = gunicorn_command(*sys.argv[1:])
    os.execv(command[0], command)


if __name__ == "__main__":
    main()

"""Starting the service: the gunicorn command line, and the ``ticketlock-serve`` console script."""

from __future__ import annotations

import os
import sys
from pathlib import Path

GUNICORN_CONF = Path(__file__).with_name("gunicorn.conf.py")


def gunicorn_command(*extra_arguments: str, config: Path = GUNICORN_CONF) -> list[str]:
    """The command that runs the service under gunicorn with the project's configuration file (or ``config``)."""
    return [sys.executable, "-m", "gunicorn", "--config", str(config), *extra_arguments]


def main() -> None:
    """Replace this process with gunicorn; extra arguments go to gunicorn (for example ``--workers 8``)."""
    command = gunicorn_command(*sys.argv[1:])
    os.execv(command[0], command)


if __name__ == "__main__":
    main()

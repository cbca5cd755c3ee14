"""``python -m loadtest``: the same as the ``ticketlock-loadtest`` command."""

from loadtest.cli import main

main()

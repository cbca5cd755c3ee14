"""``python -m loadtest.lesson``: the same as the ``ticketlock-lesson`` command."""

from loadtest.lesson.cli import main

main()

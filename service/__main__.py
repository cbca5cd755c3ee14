"""``python -m service`` starts the service under gunicorn, like the ``ticketlock-serve`` console script."""

from service.serve import main

main()

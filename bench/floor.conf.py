"""gunicorn settings for the framework floor (bench/floor_app.py): the service's worker model, nothing else."""

import os
from pathlib import Path

wsgi_app = "floor_app:create_app()"
pythonpath = str(Path(__file__).parent)
workers = int(os.environ.get("TICKETLOCK_WORKERS", "4"))
worker_class = "sync"
control_socket_disable = True  # gunicorn's control socket is one path per user: several servers would collide

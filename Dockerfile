# One image for both services of docker-compose.yml: the booking API (gunicorn, the entry point) and the load
# tester (the compose file swaps the entry point for ticketlock-loadtest).
FROM python:3.11-slim-bookworm

# A virtualenv keeps pip away from the system Python: the same steps work on the official image and on Debian's
# own python3, which refuses installs outside a venv (PEP 668).
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN python3 -m venv /opt/venv

# README.md is part of the package metadata (pyproject.toml's readme); the sources are removed once installed.
COPY pyproject.toml README.md /src/
COPY service/ /src/service/
COPY loadtest/ /src/loadtest/
RUN pip install --no-cache-dir /src && rm -rf /src

# An unprivileged user that owns only /data. A named volume mounted there starts as a copy of this folder, owner
# included, so the service can write db.json and the files beside it. Fixed ids keep an existing volume writable
# after a rebuild, and a numeric USER lets a runtime check that it is not root without reading /etc/passwd.
RUN groupadd --gid 10001 ticketlock \
    && useradd --uid 10001 --gid ticketlock --no-log-init --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin ticketlock \
    && mkdir /data \
    && chown ticketlock:ticketlock /data
USER 10001:10001
WORKDIR /data

ENV TICKETLOCK_BIND=0.0.0.0:8000 \
    TICKETLOCK_DB=/data/db.json
EXPOSE 8000

# GET /health wherever gunicorn listens (TICKETLOCK_BIND; a wildcard address is reached through loopback).
# urlopen raises on a refused connection, a timeout or an error status, and the exit status says unhealthy.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; \
        bind = os.environ['TICKETLOCK_BIND'].replace('0.0.0.0', '127.0.0.1'); \
        urllib.request.urlopen(f'http://{bind}/health', timeout=2)"]

# ticketlock-serve replaces itself with gunicorn (service/serve.py), so gunicorn is PID 1 and gets SIGTERM from
# `docker stop`; arguments after the image name go to gunicorn, e.g. `--workers 8`.
ENTRYPOINT ["ticketlock-serve"]

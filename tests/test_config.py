"""Configuration: every setting read and checked as declared, and one clear line for a bad one at start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.config import SETTINGS, ConfigError, load_config, load_server_settings
from service.stores import BY_SCHEME, DEFAULT_STORE, open_store


def test_the_defaults_are_the_declared_ones() -> None:
    config = load_config(environ={})
    server = load_server_settings(environ={})

    for setting in SETTINGS:
        value = getattr(server if setting.server else config, setting.field)
        if setting.field != "host_name":
            assert value == setting.default, setting.variable


@pytest.mark.parametrize(
    ("variable", "text", "said"),
    [
        ("TICKETLOCK_RACE_WINDOW_MS", "5001", "from 0 to 5000"),
        ("TICKETLOCK_LOCK_TIMEOUT", "soon", "is not a number"),
        ("TICKETLOCK_MODE", "careful", "must be one of unlocked, locked"),
        ("TICKETLOCK_WORKERS", "0", "from 1 up"),
        ("TICKETLOCK_WORKER_CLASS", "gevent", "must be one of sync, gthread"),
        ("TICKETLOCK_ALLOWED_HOSTS", "ticketlock.example:8000", "without ports"),
    ],
)
def test_a_bad_value_is_refused_naming_its_variable_and_what_it_takes(variable: str, text: str, said: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(environ={variable: text})
        load_server_settings(environ={variable: text})

    assert f"{variable}={text!r}" in str(refused.value) and said in str(refused.value)


def test_the_worker_timeout_must_outlast_the_longest_wait() -> None:
    with pytest.raises(ConfigError, match="TICKETLOCK_WORKER_TIMEOUT=10 must exceed"):
        load_server_settings(environ={"TICKETLOCK_WORKER_TIMEOUT": "10"})
    # With a database, the write after the deadline may take one more database timeout: 20 + 5 + 6 s.
    database = {
        "TICKETLOCK_DATABASE_URL": "postgresql://ticketlock@127.0.0.1/ticketlock",
        "TICKETLOCK_LOCK_TIMEOUT": "20",
    }
    assert load_server_settings(environ=database).worker_timeout_s == 30
    with pytest.raises(ConfigError, match="plus the database timeout"):
        load_server_settings(environ={**database, "TICKETLOCK_DATABASE_TIMEOUT": "6"})


def test_the_store_is_the_one_the_url_scheme_names(tmp_path: Path) -> None:
    assert isinstance(open_store(load_config({"db_path": tmp_path / "db.json"})), DEFAULT_STORE)
    for scheme, store in BY_SCHEME.items():
        url = f"{scheme}://user:secret@127.0.0.1:1/ticketlock"
        assert isinstance(open_store(load_config({"db_path": tmp_path / "db.json", "database_url": url})), store)

    with pytest.raises(ConfigError) as refused:
        open_store(load_config({"database_url": "mysql://user:secret@127.0.0.1/ticketlock"}))
    assert "mysql://" in str(refused.value) and "postgresql://" in str(refused.value)
    assert "secret" not in str(refused.value)


def test_a_bad_setting_stops_the_start_with_one_line(tmp_path: Path) -> None:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("TICKETLOCK_")}
    environment |= {"TICKETLOCK_DATABASE_URL": "mysql://u:s3cret@127.0.0.1/x", "TICKETLOCK_BIND": "127.0.0.1:0"}
    serve = Path(sys.executable).with_name("ticketlock-serve")
    completed = subprocess.run([serve], env=environment, capture_output=True, text=True, timeout=60, cwd=tmp_path)

    lines = [line for line in completed.stderr.splitlines() if line.startswith("ticketlock:")]
    assert completed.returncode != 0 and len(lines) == 1, completed.stderr
    assert "no store opens mysql:// URLs" in lines[0] and "Traceback" not in completed.stderr

"""Database setup: migrations, drift, clear errors for bad URLs and unreachable servers."""
from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import inspect

from store.db import get_engine, normalize_url
from store.errors import DatabaseConfigError, DatabaseUnavailableError
from store.migrate import check_drift, current_revision, head_revision, upgrade
from tests.support.net import port_of, refusing_socket


def test_migrations_apply_on_empty_database_without_drift(empty_db_url):
    assert current_revision(empty_db_url) is None
    upgrade(empty_db_url)
    assert current_revision(empty_db_url) == head_revision()
    tables = set(inspect(get_engine(empty_db_url)).get_table_names())
    assert {"conversation", "message", "feedback", "example", "trainingrun", "modelversion", "alias",
            "auditevent", "slackeventreceipt", "gatewayreplica", "lease", "datasetsnapshot"} <= tables
    check_drift(empty_db_url)  # raises if models and migrations disagree
    upgrade(empty_db_url)  # idempotent


def test_sqlite_uses_wal(db_url):
    if not db_url.startswith("sqlite"):
        pytest.skip("SQLite only")
    with get_engine(db_url).connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


@pytest.mark.parametrize("url", ["mysql://u@h/db", "mongodb://h", "sqlite+pysqlcipher:///x.db", "not a url"])
def test_unsupported_urls_are_refused_clearly(url):
    with pytest.raises(DatabaseConfigError, match="sqlite:///|unsupported|malformed"):
        normalize_url(url)


def test_plain_postgresql_url_gets_psycopg_driver():
    assert normalize_url("postgresql://u:p@h:5/db").startswith("postgresql+psycopg://u:p@h:5/db")


def test_unreachable_database_is_a_clear_error():
    with refusing_socket() as held:  # bound, never listening: nobody can answer on that port
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port_of(held)}/nope"
        with pytest.raises(DatabaseUnavailableError, match="cannot reach the database"):
            upgrade(url)


def test_cli_reports_bad_url_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flywheel", "db", "upgrade"], capture_output=True, text=True,
                          env={"FLYWHEEL_DATABASE_URL": "mysql://u@h/db", "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert proc.returncode == 2
    assert "unsupported database URL scheme 'mysql'" in proc.stderr
    assert "Traceback" not in proc.stderr

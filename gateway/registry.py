"""Which versions this replica serves: the production pointer, the loaded adapters, and the
in-flight requests on each (so an old version is unloaded only after it drains).

Who may ask for a version by name: anyone for `production`, `base`, the production version
and the one before it, and versions an admin approved; rejected, gate-failed and unreviewed
versions only with the admin token (to everyone else they do not exist: 404).

Everything here runs on the event loop, so resolve + acquire is atomic without locks."""
from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import model_not_found

BASE = "base"
PRODUCTION = "production"
# Store statuses (store.models.VersionStatus) that anyone may name.
OPEN_STATUSES = frozenset({"approved", "production"})


@dataclass
class LoadedVersion:
    name: str
    path: Path
    sha256: str
    status: str | None = None  # the store's status, refreshed every sync round
    loaded_at: float = field(default_factory=time.time)
    inflight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    draining: bool = False
    drained: asyncio.Event = field(default_factory=asyncio.Event)


class Registry:
    def __init__(self) -> None:
        self.production: str | None = None  # None: the base model
        self.previous: str | None = None  # kept loaded for an instant rollback
        self.store_previous: str | None = None  # the store's production before the current one
        self.loading: set[str] = set()  # versions being loaded right now (for /admin/status)
        self.loaded: dict[str, LoadedVersion] = {}
        self.base_inflight = 0
        self.synced = False  # True once the production alias has been read from the store
        self.store_target: str | None = None
        self.last_error: str | None = None
        self.swapped_at: float | None = None

    @staticmethod
    def label(version: str | None) -> str:
        return version or BASE

    def may_serve(self, name: str, status: str | None, admin: bool = False) -> bool:
        """Whether a client may name this version (see the module docstring)."""
        if admin:
            return True
        if status == "rejected":  # rejected since it was live: gone for everyone but admins
            return False
        return status in OPEN_STATUSES or (
            name is not None and name in (self.production, self.previous, self.store_previous))

    def names(self, admin: bool = False) -> list[str]:
        return [BASE, PRODUCTION, *sorted(n for n, v in self.loaded.items()
                                          if not v.draining and self.may_serve(n, v.status, admin))]

    def resolve(self, requested: str, admin: bool = False) -> str | None:
        """Map a client's model name to a version (None = base); unknown names, and versions the
        client may not name, are a 404."""
        if requested == PRODUCTION:
            return self.production
        if requested == BASE:
            return None
        entry = self.loaded.get(requested)
        if entry is None or entry.draining or not self.may_serve(requested, entry.status, admin):
            raise model_not_found(requested, self.names(admin))
        return requested

    @contextmanager
    def use(self, version: str | None):
        """Count a request against the version it runs on for as long as it runs."""
        entry = self.loaded.get(version) if version else None
        if entry is None:
            self.base_inflight += 1
        else:
            entry.inflight += 1
            entry.last_used = time.monotonic()
        try:
            yield
        finally:
            if entry is None:
                self.base_inflight -= 1
            else:
                entry.inflight -= 1
                if entry.inflight == 0:
                    entry.drained.set()

    def add(self, name: str, path: Path, sha256: str, status: str | None = None) -> LoadedVersion:
        entry = LoadedVersion(name=name, path=path, sha256=sha256, status=status)
        entry.drained.set()
        self.loaded[name] = entry
        return entry

    def switch(self, target: str | None) -> list[str]:
        """Point production at `target` (atomically); returns versions no longer needed."""
        if target == self.production:
            return []
        self.previous, self.production = self.production, target
        self.swapped_at = time.time()
        keep = {self.production, self.previous}
        return [n for n in self.loaded if n not in keep and not self.loaded[n].draining]

    def extras(self) -> list[str]:
        """Versions loaded on request by name (neither production nor previous), least recently used first."""
        keep = {self.production, self.previous}
        names = [n for n, v in self.loaded.items() if n not in keep and not v.draining]
        return sorted(names, key=lambda n: self.loaded[n].last_used)

    def start_drain(self, name: str) -> LoadedVersion | None:
        entry = self.loaded.get(name)
        if entry is None:
            return None
        entry.draining = True
        if entry.inflight == 0:
            entry.drained.set()
        else:
            entry.drained.clear()
        return entry

    def served(self) -> dict:
        return {PRODUCTION: self.label(self.production), "previous": self.label(self.previous)}

    def snapshot(self) -> dict:
        return {
            "production": self.label(self.production), "previous": self.label(self.previous),
            "store_target": self.label(self.store_target), "synced": self.synced,
            "loaded": {n: {"sha256": v.sha256, "inflight": v.inflight, "draining": v.draining,
                           "status": v.status} for n, v in sorted(self.loaded.items())},
            "loading": sorted(self.loading),
            "base_inflight": self.base_inflight, "last_error": self.last_error,
        }

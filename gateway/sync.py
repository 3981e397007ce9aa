"""The sync loop: watch the store's production alias and hot-swap to the version it names.

On a change: check the adapter (path inside the adapters dir, registered sha256, our base
model), load it, warm it up with one request, switch atomically, keep the previous version
for an instant rollback, and unload older ones once their in-flight requests are done.
A failed load keeps the old version serving and is retried with exponential backoff.

Versions a request names are loaded under their own lock, never the sync lock: a slow or stuck
load on request cannot hold up a promotion or a rollback. A version both want is loaded once."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from flywheel.adapters import AdapterError, verify_adapter
from flywheel.logs import get_logger
from gateway.errors import GatewayError, model_not_found, unavailable
from gateway.schemas import ChatCompletionRequest

log = get_logger("gateway.sync")


@dataclass
class VersionInfo:
    name: str
    adapter_path: str
    adapter_sha256: str
    base_model: str
    status: str | None = None


def _info(row) -> VersionInfo:
    return VersionInfo(row.name, row.adapter_path, row.adapter_sha256, row.base_model, str(row.status))


def resolve_adapter_path(raw: str, adapters_dir: Path) -> Path:
    """Where an adapter lives, refusing anything that resolves outside `adapters_dir`
    (`..`, absolute paths elsewhere, symlinks out). Relative paths are taken from the
    working directory (as the trainer records them) or else from the adapters dir."""
    if not raw or "\x00" in raw:
        raise AdapterError(f"invalid adapter path {raw!r}")
    root = adapters_dir.resolve()
    path = Path(raw)
    if ".." in path.parts:
        raise AdapterError(f"adapter path {raw!r} contains '..'; refusing to load it")
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, root / path]
    inside = []
    for candidate in candidates:
        resolved = candidate.resolve()
        if resolved != root and root in resolved.parents:
            inside.append(resolved)
    if not inside:
        raise AdapterError(f"adapter path {raw!r} is outside the adapters directory {root}; refusing to load it")
    return next((p for p in inside if p.is_dir()), inside[0])


class Syncer:
    def __init__(self, gateway) -> None:
        self.gw = gateway
        self.settings = gateway.settings
        self.registry = gateway.registry
        self.metrics = gateway.metrics
        self.backend = gateway.backend
        self.base = gateway.base_identity
        self.wake = asyncio.Event()
        self.lock = asyncio.Lock()  # one sync round at a time
        self.request_lock = asyncio.Lock()  # one load on request at a time (never self.lock)
        self.loading: dict[str, asyncio.Task] = {}
        self.failures: dict[str | None, tuple[int, float]] = {}  # version -> (attempts, next try at)
        self.unloading: dict[str, asyncio.Task] = {}

    async def run_forever(self) -> None:
        while True:
            try:
                await self.sync_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the loop die; the next round retries
                log.exception("sync_failed", error=str(exc))
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=self.settings.sync_interval_s)
            except TimeoutError:
                pass
            self.wake.clear()

    async def close(self) -> None:
        for task in [*self.unloading.values(), *self.loading.values()]:
            task.cancel()

    # ---- one round -------------------------------------------------------------------------
    async def sync_once(self, force: bool = False) -> dict:
        async with self.lock:
            try:
                target, info, previous, statuses = await asyncio.to_thread(self._read_store, sorted(self.registry.loaded))
            except Exception as exc:  # noqa: BLE001 - the loop must survive anything
                self.registry.last_error = f"cannot read the production alias from the store: {exc}"
                self.metrics.sync_errors.inc()
                log.warning("store_read_failed", error=str(exc))
                return self.registry.snapshot()
            self.registry.store_target = target
            self.registry.store_previous = previous
            for name, status in statuses.items():  # an admin may have rejected a loaded version since
                if name in self.registry.loaded:
                    self.registry.loaded[name].status = status
            self.registry.synced = True
            if target != self.registry.production:
                await self._swap(target, info, force)
            else:  # in step with the store again (also after an alias moved back from a bad version)
                self.registry.last_error = None
                self.failures.clear()
            try:
                await self.backend.check(sorted(self.registry.loaded))
            except Exception as exc:  # noqa: BLE001 - the loop must survive anything
                log.warning("backend_check_failed", error=str(exc))
            await self._heartbeat()
            return self.registry.snapshot()

    def _read_store(self, loaded: list[str]):
        """The production target (and its row), the production before it, and the statuses of
        the versions loaded here."""
        from sqlmodel import col, select

        from store.db import session_scope
        from store.models import ModelVersion
        from store.versions import PRODUCTION, alias_history, alias_target, find_version

        with session_scope() as session:
            name = alias_target(session, PRODUCTION)
            history = alias_history(session, PRODUCTION, limit=1)
            previous = history[0]["from"] if history and history[0]["to"] == name else None
            statuses = {row.name: str(row.status) for row in session.exec(
                select(ModelVersion).where(col(ModelVersion.name).in_(loaded)))} if loaded else {}
            if name is None:
                return None, None, previous, statuses
            row = find_version(session, name)
            return name, (_info(row) if row else None), previous, statuses

    async def ensure_loaded(self, name: str, admin: bool = False) -> None:
        """Load a registered version that a request names directly (not production): only one a
        client may name (see registry), checked like any other, kept as one of at most
        `max_extra_versions` extras (least recently used goes)."""
        from store.versions import validate_version_name

        reg = self.registry
        try:
            validate_version_name(name)
        except ValueError:
            raise model_not_found(name, reg.names(admin)) from None
        async with self.request_lock:
            entry = reg.loaded.get(name)
            if entry is not None and not entry.draining:
                return
            if name in self.unloading:
                await asyncio.gather(self.unloading[name], return_exceptions=True)
            try:
                info = await asyncio.to_thread(self._read_version, name)
            except Exception as exc:  # the store is down: say so, without its details
                log.warning("version_lookup_failed", version=name, error=str(exc))
                raise unavailable("cannot look up this version right now; retry shortly",
                                  code="store_unavailable") from exc
            if info is None or not reg.may_serve(name, info.status, admin):
                raise model_not_found(name, reg.names(admin))
            try:
                await self._load_shared(name, info)
            except Exception as exc:  # refused adapters: the client gets the reason (paths masked)
                log.warning("load_on_request_failed", version=name, error=str(exc))
                raise GatewayError(404, f"version {name} is registered but cannot be served here: {exc}",
                                   code="model_unavailable", param="model") from exc
            log.info("loaded_on_request", version=name)
            for old in reg.extras()[: max(0, len(reg.extras()) - self.settings.max_extra_versions)]:
                if old != name:
                    self.unloading[old] = asyncio.create_task(self._drain_and_unload(old))
            self.metrics.loaded.set(len(reg.loaded))

    def _read_version(self, name: str) -> VersionInfo | None:
        from store.db import session_scope
        from store.versions import find_version

        with session_scope() as session:
            row = find_version(session, name)
            return _info(row) if row else None

    async def _heartbeat(self) -> None:
        from store.db import session_scope
        from store.replicas import heartbeat_replica

        reg = self.registry

        def write():
            with session_scope() as session:
                heartbeat_replica(session, self.settings.replica_id, backend=self.backend.kind,
                                  served=reg.served(), loaded=sorted(reg.loaded), error=reg.last_error)

        try:
            await asyncio.to_thread(write)
        except Exception as exc:  # noqa: BLE001 - the loop must survive anything
            log.warning("heartbeat_failed", error=str(exc))

    # ---- swapping --------------------------------------------------------------------------
    async def _swap(self, target: str | None, info: VersionInfo | None, force: bool) -> None:
        reg = self.registry
        started = time.perf_counter()
        if target is not None and target not in reg.loaded or (target in reg.loaded and reg.loaded[target].draining):
            attempts, next_at = self.failures.get(target, (0, 0.0))
            if not force and time.monotonic() < next_at:
                return  # backing off; the old version keeps serving
            if target in self.unloading:  # it was being unloaded: let that finish, then load afresh
                await asyncio.gather(self.unloading[target], return_exceptions=True)
            try:
                await self._load_shared(target, info)
            except Exception as exc:  # noqa: BLE001 - the loop must survive anything
                delay = min(self.settings.retry_backoff_s * (2 ** attempts), self.settings.retry_backoff_max_s)
                self.failures[target] = (attempts + 1, time.monotonic() + delay)
                reg.last_error = f"could not load {target}: {exc}"
                self.metrics.swap_failures.inc()
                log.error("swap_failed", version=target, error=str(exc), attempt=attempts + 1,
                          retry_in_s=round(delay, 2), serving=reg.label(reg.production))
                return
        old = reg.production
        for name in reg.switch(target):
            self.unloading[name] = asyncio.create_task(self._drain_and_unload(name))
        self.failures.pop(target, None)
        reg.last_error = None
        self.metrics.swaps.inc()
        self.metrics.set_production(reg.label(target))
        self.metrics.swap_seconds.observe(time.perf_counter() - started)
        self.metrics.loaded.set(len(reg.loaded))
        log.info("swapped", production=reg.label(target), previous=reg.label(old),
                 seconds=round(time.perf_counter() - started, 3))

    async def _load_shared(self, name: str, info: VersionInfo | None) -> None:
        """Load `name` once even if the sync loop and a request both want it now."""
        task = self.loading.get(name)
        if task is None:
            task = asyncio.create_task(self._load(name, info), name=f"load-{name}")
            self.loading[name] = task
            self.registry.loading.add(name)

            def done(_task, name=name):
                self.loading.pop(name, None)
                self.registry.loading.discard(name)

            task.add_done_callback(done)
        await asyncio.shield(task)

    async def _load(self, name: str, info: VersionInfo | None) -> None:
        from store.versions import validate_version_name

        if info is None:
            raise AdapterError(f"the production alias points at {name!r}, which is not a registered version")
        try:
            validate_version_name(name)
        except ValueError as exc:
            raise AdapterError(str(exc)) from exc
        if not self.base.accepts(info.base_model):
            raise AdapterError(f"{name} was trained on base model {info.base_model!r}, but this gateway serves "
                               f"{self.base.id!r}")
        if info.base_model != self.base.id:
            log.warning("adapter_base_by_folder_name", version=name, registered=info.base_model, base=self.base.id,
                        note="registered before base model identities; trusted by the folder-name rule")
        path = resolve_adapter_path(info.adapter_path, Path(self.settings.adapters_dir))
        await asyncio.to_thread(verify_adapter, path, expected_sha256=info.adapter_sha256)
        await self.backend.load_adapter(name, path)
        self.registry.add(name, path, info.adapter_sha256, info.status)
        try:
            await self._warm_up(name)
        except Exception:
            self.registry.loaded.pop(name, None)
            await self.backend.unload_adapter(name)
            raise

    async def _warm_up(self, name: str) -> None:
        req = ChatCompletionRequest(model=name, messages=[{"role": "user", "content": "Hello"}],
                                    max_tokens=1, temperature=0)
        with self.registry.use(name):
            await self.backend.generate(name, "chat", req)

    async def _drain_and_unload(self, name: str) -> None:
        reg = self.registry
        entry = reg.start_drain(name)
        try:
            if entry is None:
                return
            try:
                await asyncio.wait_for(entry.drained.wait(), timeout=self.settings.drain_timeout_s)
            except TimeoutError:
                log.warning("drain_timeout", version=name, inflight=entry.inflight)
            await self.backend.unload_adapter(name)
            reg.loaded.pop(name, None)
            self.metrics.loaded.set(len(reg.loaded))
            log.info("unloaded", version=name)
        except Exception as exc:  # noqa: BLE001 - the loop must survive anything
            log.warning("unload_failed", version=name, error=str(exc))
        finally:
            self.unloading.pop(name, None)

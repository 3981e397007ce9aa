"""One gateway replica's moving parts: settings, backend, version registry, metrics, store sync."""
from __future__ import annotations

import asyncio
from functools import cached_property

from flywheel.basemodel import Identity, resolve
from flywheel.logs import get_logger
from gateway.admission import Admission
from gateway.backends import make_backend
from gateway.metrics import Metrics
from gateway.registry import Registry
from gateway.settings import GatewaySettings

log = get_logger("gateway")


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.backend = make_backend(settings)
        self.registry = Registry()
        self.metrics = Metrics()
        self.metrics.set_production("base")
        self.admission = Admission(settings.concurrency(), settings.max_queue)
        self.metrics.bind_admission(self.admission)
        self.backend.on_discarded = self.metrics.discarded_tokens.inc
        self.syncer = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Start loading in the background so /healthz answers at once and /readyz tells the story."""
        self._tasks.append(asyncio.create_task(self._boot(), name="gateway-boot"))

    async def _boot(self) -> None:
        try:
            await self.backend.start()
        except Exception as exc:  # noqa: BLE001 - logged by the backend; /readyz reports backend.error
            log.error("backend_start_failed", backend=self.backend.kind, error=str(exc)[:500])
            return
        try:
            await asyncio.to_thread(lambda: self.base_identity)
        except Exception as exc:  # noqa: BLE001 - no adapter can be checked; /readyz says why
            self.registry.last_error = f"cannot identify the base model: {exc}"
            log.error("base_model_identity_failed", error=str(exc)[:500])
            return
        from gateway.sync import Syncer

        self.syncer = Syncer(self)
        await self.syncer.run_forever()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception) as exc:  # noqa: BLE001 - shutting down anyway
                log.debug("task_stopped", task=task.get_name(), error=repr(exc))
        if self.syncer is not None:
            await self.syncer.close()
        await self.backend.close()

    def public_readiness(self) -> tuple[bool, dict]:
        """What /readyz tells anyone: ready or not and the version served, no error text (the
        reasons, which may name paths and servers, are in /admin/status)."""
        ready, detail = self.readiness()
        return ready, {"ready": ready, "production": detail["production"],
                       "backend": {"kind": self.backend.kind, "ready": self.backend.ready}}

    def readiness(self) -> tuple[bool, dict]:
        reg = self.registry
        reasons = []
        if not self.backend.ready:
            reasons.append(self.backend.error or f"{self.backend.kind} backend is starting")
        if not reg.synced:
            reasons.append(f"production alias not read from the store yet ({reg.last_error or 'syncing'})")
        elif reg.store_target != reg.production:
            reasons.append(f"production is {reg.label(reg.store_target)} in the store but "
                           f"{reg.label(reg.production)} here ({reg.last_error or 'loading'})")
        ready = self.backend.ready and reg.synced and (reg.store_target == reg.production or reg.swapped_at is not None)
        admission = {"running": self.admission.running, "waiting": self.admission.waiting,
                     "rejected": self.admission.rejected}
        return ready, {"ready": ready, "reasons": reasons, "backend": self.backend.status(), **reg.snapshot(),
                       "admission": admission}

    @cached_property
    def base_identity(self) -> Identity:
        """The base model's identity, which adapters must be registered against (computed once:
        it may read the Hub's cache or the weights' headers)."""
        return resolve(self.settings.base_model, weights=False).identity

    def base_model_name(self) -> str:
        return self.base_identity.id

"""One training run at a time, across processes and machines: the store's "trainer" lease,
renewed by a heartbeat thread that also keeps the running TrainingRun's heartbeat fresh.
If a renewal fails (the lease expired and someone else took it) the run stops at its next step."""
from __future__ import annotations

import os
import socket
import threading
import uuid

from flywheel.logs import get_logger
from store.db import session_scope
from store.leases import acquire_lease, lease_holder, release_lease, renew_lease
from store.runs import update_run

log = get_logger("trainer.lease")
LEASE_NAME = "trainer"


class LeaseBusy(RuntimeError):
    """Another trainer holds the lease."""


class LeaseLost(RuntimeError):
    """We held the lease but it expired and was taken: stop without registering anything."""


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class TrainerLease:
    def __init__(self, *, ttl_s: float, heartbeat_s: float, owner: str | None = None, engine=None):
        self.ttl_s, self.heartbeat_s = ttl_s, min(heartbeat_s, ttl_s / 3)
        self.owner = owner or default_owner()
        self.engine = engine
        self.run_id: int | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> TrainerLease:
        with session_scope(self.engine) as s:
            if not acquire_lease(s, LEASE_NAME, self.owner, self.ttl_s):
                holder = lease_holder(s, LEASE_NAME)
                who = f"{holder.owner} (until {holder.expires_at:%H:%M:%S} UTC)" if holder else "another trainer"
                raise LeaseBusy(f"another training run is in progress: the trainer lease is held by {who}")
        self._thread = threading.Thread(target=self._beat, name="trainer-lease", daemon=True)
        self._thread.start()
        log.info("lease acquired", owner=self.owner, ttl_s=self.ttl_s)
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                with session_scope(self.engine) as s:
                    if not renew_lease(s, LEASE_NAME, self.owner, self.ttl_s):
                        self.lost = True
                        log.error("lease lost", owner=self.owner)
                        return
                    if self.run_id is not None:
                        update_run(s, self.run_id)
            except Exception as exc:  # a database hiccup: try again next beat; expiry is the backstop
                log.warning("lease heartbeat failed", error=str(exc))

    def check(self) -> None:
        if self.lost:
            raise LeaseLost("the trainer lease expired and was taken by another trainer; stopping this run")

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 5)
        try:
            with session_scope(self.engine) as s:
                release_lease(s, LEASE_NAME, self.owner)
        except Exception as err:  # it expires on its own
            log.warning("could not release lease", error=str(err))

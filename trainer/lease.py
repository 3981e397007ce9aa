"""One training run at a time, across processes and machines: the store's "trainer" lease,
renewed by a heartbeat thread that also keeps the running TrainingRun's heartbeat fresh.
If a renewal fails (the lease expired and someone else took it) the run stops at its next step.

The heartbeat follows the run's progress, not the clock: once a run is followed, each training
step and evaluation batch reports progress (`progressed`); with none for `stall_s` the heartbeat
stops renewing, fails the run with the reason (the bot reports it), frees the lease and calls
`on_stall` (the command line ends the hung process there); the run, should it wake, stops at its
next step."""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from flywheel.logs import get_logger
from store.db import session_scope
from store.leases import acquire_lease, lease_holder, release_lease, renew_lease
from store.models import RunStatus
from store.runs import finish_run, get_run, update_run

log = get_logger("trainer.lease")
LEASE_NAME = "trainer"


class LeaseBusy(RuntimeError):
    """Another trainer holds the lease."""


class LeaseLost(RuntimeError):
    """We held the lease but it expired and was taken: stop without registering anything."""


class RunStalled(RuntimeError):
    """The run made no progress for stall_s: it is already failed and the lease freed."""


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class TrainerLease:
    def __init__(self, *, ttl_s: float, heartbeat_s: float, stall_s: float, owner: str | None = None, engine=None,
                 on_stall: Callable[[], None] | None = None):
        self.ttl_s, self.heartbeat_s, self.stall_s = ttl_s, min(heartbeat_s, ttl_s / 3), stall_s
        self.owner = owner or default_owner()
        self.engine = engine
        self.on_stall = on_stall
        self.run_id: int | None = None
        self.lost = False
        self.stalled = False
        self._progress_at = time.monotonic()
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

    def follow(self, run_id: int) -> None:
        """From now on the heartbeat follows this run's progress."""
        self._progress_at = time.monotonic()
        self.run_id = run_id

    def progressed(self) -> None:
        """The run moved on (a step, an evaluation batch, a phase): stop here if the lease is gone."""
        self.check()
        self._progress_at = time.monotonic()

    def _idle_s(self) -> float:
        return time.monotonic() - self._progress_at

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if self.run_id is not None and self._idle_s() >= self.stall_s:
                if self._give_up():
                    return
                continue  # the store is away: the lease, no longer renewed, expires on its own
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

    def _give_up(self) -> bool:
        """No progress for stall_s: fail the run, free the lease, tell on_stall. False when the
        store could not be written (tried again next beat)."""
        error = (f"stalled: no training progress for {self._idle_s():.0f} s (FLYWHEEL_STALL_S={self.stall_s:g}); "
                 "the run was stopped and the trainer lease freed")
        try:
            with session_scope(self.engine) as s:
                if get_run(s, self.run_id).status == RunStatus.running:
                    finish_run(s, self.run_id, RunStatus.failed, error=error)
                release_lease(s, LEASE_NAME, self.owner)
        except Exception as exc:  # a database hiccup: try again next beat
            log.warning("could not fail the stalled run", run=self.run_id, error=str(exc))
            return False
        self.stalled = True
        log.error("run stalled: failed it and freed the lease", run=self.run_id, error=error)
        if self.on_stall is not None:
            self.on_stall()
        return True

    def check(self) -> None:
        if self.stalled:
            raise RunStalled(f"run {self.run_id} made no progress for {self.stall_s:g} s; it was failed and the "
                             "trainer lease freed")
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

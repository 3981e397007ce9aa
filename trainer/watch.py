"""`flywheel train watch`: a daemon that starts a cycle when an admin queued a run, or when
enough new examples and feedback have arrived and the cooldown since the last run has passed."""
from __future__ import annotations

import signal
import threading
from datetime import timedelta

from prometheus_client import Counter

from flywheel.logs import get_logger
from store.db import session_scope
from store.examples import count_examples
from store.feedback import count_feedback_since
from store.models import utcnow
from store.runs import has_queued_run, list_runs
from trainer.lease import LeaseBusy

log = get_logger("trainer.watch")
CHECKS = Counter("flywheel_trainer_watch_checks_total", "The watch daemon's polls by outcome (ok / failed)",
                 ["outcome"])


def due(session, settings) -> tuple[bool, str]:
    """Whether a cycle should start now, and why (or why not)."""
    if has_queued_run(session):
        return True, "a run was queued"
    runs = [r for r in list_runs(session, limit=20) if r.status != "queued"]
    last = runs[0] if runs else None
    since = (last.finished_at or last.started_at or last.created_at) if last else None
    if last is not None and since is not None:
        wait = timedelta(seconds=settings.watch_cooldown_s) - (utcnow() - since)
        if wait.total_seconds() > 0:
            return False, f"cooling down for {int(wait.total_seconds())} s more"
    new = count_examples(session, since=since)["total"] + count_feedback_since(session, since)
    if new >= settings.watch_min_new:
        return True, f"{new} new examples and votes since the last run"
    return False, f"{new} new examples and votes, waiting for {settings.watch_min_new}"


def watch(settings, *, max_cycles: int | None = None, once: bool = False, stop: threading.Event | None = None) -> int:
    """Poll until stopped (SIGTERM/SIGINT or `stop`); returns the number of cycles started."""
    from trainer.cycle import run_cycle

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    cycles, failures = 0, 0
    while not stop.is_set():
        try:
            with session_scope() as s:
                go, why = due(s, settings)
        except Exception as exc:  # the database is away (restart, network): back off and poll again
            failures += 1
            CHECKS.labels("failed").inc()
            delay = min(settings.watch_poll_s * 2 ** min(failures - 1, 10), settings.watch_max_backoff_s)
            log.warning("watch check failed; polling again", error=type(exc).__name__, failures=failures,
                        retry_in_s=round(delay, 1))
            stop.wait(delay)
            continue
        CHECKS.labels("ok").inc()
        if failures:
            log.info("watch check works again", after_failures=failures)
            failures = 0
        log.info("watch check", run=go, reason=why)
        if go:
            cycles += 1
            try:
                outcome = run_cycle(settings)
                log.info("cycle done", status=outcome.status, message=outcome.message)
            except LeaseBusy as exc:
                log.info("another trainer is running", detail=str(exc))
            except Exception as exc:  # the run is marked failed; the daemon keeps going
                log.error("cycle failed", error=f"{type(exc).__name__}: {exc}")
        if once or (max_cycles is not None and cycles >= max_cycles):
            break
        stop.wait(settings.watch_poll_s)
    return cycles

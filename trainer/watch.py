"""`flywheel train watch`: a daemon that starts a cycle when an admin queued a run, or when
enough new examples and feedback have arrived and the cooldown since the last run has passed."""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable
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


def watch(settings, *, max_cycles: int | None = None, once: bool = False, stop: threading.Event | None = None,
          on_stall: Callable[[], None] | None = None) -> int:
    """Poll until stopped (SIGTERM/SIGINT or `stop`); returns the number of cycles started. A cycle
    that fails before its run starts (trainer.cycle.RunNotStarted) is retried, due or not, after a
    back-off that doubles up to watch_max_backoff_s. `on_stall`: run_cycle's."""
    from trainer.cycle import (  # its trainer.dataset loads `datasets`: only once a cycle runs
        RunNotStarted,
        run_cycle,
    )

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    cycles, failures, not_started = 0, 0, 0
    while not stop.is_set():
        if not_started:
            go, why = True, f"retrying a run that could not start ({not_started} failure(s) in a row)"
        else:
            try:
                with session_scope() as s:
                    go, why = due(s, settings)
            except Exception as exc:  # the database is away (restart, network): back off and poll again
                failures += 1
                CHECKS.labels("failed").inc()
                delay = _backoff(settings, failures)
                log.warning("watch check failed; polling again", error=type(exc).__name__, failures=failures,
                            retry_in_s=round(delay, 1))
                stop.wait(delay)
                continue
            CHECKS.labels("ok").inc()
            if failures:
                log.info("watch check works again", after_failures=failures)
                failures = 0
        log.info("watch check", run=go, reason=why)
        wait = settings.watch_poll_s
        if go:
            cycles += 1
            try:
                outcome = run_cycle(settings, on_stall=on_stall)
                not_started = 0
                log.info("cycle done", status=outcome.status, message=outcome.message)
            except LeaseBusy as exc:
                not_started = 0
                log.info("another trainer is running", detail=str(exc))
            except RunNotStarted as exc:  # failed and reported (once) by run_cycle: try again, less often
                not_started += 1
                wait = _backoff(settings, not_started)
                log.error("run could not start; retrying", error=str(exc), failures=not_started,
                          retry_in_s=round(wait, 1))
            except Exception as exc:  # the run is marked failed; the daemon keeps going
                not_started = 0
                log.error("cycle failed", error=f"{type(exc).__name__}: {exc}")
        if once or (max_cycles is not None and cycles >= max_cycles):
            break
        stop.wait(wait)
    return cycles


def _backoff(settings, failures: int) -> float:
    """The wait after `failures` failures in a row: the poll interval, doubled each time, capped."""
    return min(settings.watch_poll_s * 2 ** min(failures - 1, 10), settings.watch_max_backoff_s)

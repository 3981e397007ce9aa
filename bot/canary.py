"""Canary releases (per deployment: FLYWHEEL_CANARY_PERCENT, default 0 = off): while an admin
has put a version on the `candidate` alias (`/flywheel canary <version>`), that share of people
is answered by it and everyone else by production. The split is sticky by person (a hash of the
user id, salted with the version so each canary picks its own share): nobody switches version in
the middle of a thread. Answers record which version gave them, so the version watch compares
the two on the same days' traffic."""
from __future__ import annotations

import hashlib
import threading
import time

from bot.settings import BotSettings
from flywheel.logs import describe_exception, get_logger
from store.db import session_scope
from store.versions import CANDIDATE, alias_target

log = get_logger("bot.canary")
READ_EVERY_S = 5.0  # how stale the bot's view of the candidate alias may be


def in_canary(user: str, percent: float, version: str) -> bool:
    """Whether `user` belongs to the canary share for `version` (stable: same inputs, same answer)."""
    bucket = int.from_bytes(hashlib.sha256(f"{version}:{user}".encode()).digest()[:8], "big") % 10_000
    return bucket < round(percent * 100)


class Canary:
    def __init__(self, settings: BotSettings) -> None:
        self.percent = settings.canary_percent
        self._lock = threading.Lock()
        self._version: str | None = None
        self._read_at = float("-inf")

    def version(self) -> str | None:
        """The candidate alias's version, re-read from the store at most every READ_EVERY_S."""
        with self._lock:
            if time.monotonic() - self._read_at >= READ_EVERY_S:
                try:
                    with session_scope() as s:
                        self._version = alias_target(s, CANDIDATE)
                except Exception as exc:  # the store is away: production answers everyone meanwhile
                    log.warning("cannot read the canary; production answers", error=describe_exception(exc))
                    self._version = None
                self._read_at = time.monotonic()
            return self._version

    def forget(self) -> None:
        """Read the alias again at the next answer (this process just moved it); other bot
        replicas follow within READ_EVERY_S."""
        with self._lock:
            self._read_at = float("-inf")

    def model_for(self, user: str | None) -> str | None:
        """The version to ask for this person's answer, or None for production."""
        if self.percent <= 0 or not user:
            return None
        version = self.version()
        return version if version and in_canary(user, self.percent, version) else None

"""One background round every few seconds, for the bot's sweepers and pollers (placeholders a
crash left, retention, run reports): a round at start, then one every `every_s` until stopped;
a failed round (the database away, Slack refusing) is logged and the next one tries again."""
from __future__ import annotations

import threading
from collections.abc import Callable

from flywheel.logs import get_logger

log = get_logger("bot.periodic")


class Periodic:
    def __init__(self, name: str, every_s: float, one_round: Callable[[], object]) -> None:
        self.name, self.every_s, self.one_round = name, every_s, one_round
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> bool:
        """Stop after the round under way (waiting up to 10 s); whether it had been started."""
        self._stop.set()
        if self._thread.ident is None:
            return False
        self._thread.join(timeout=10)
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.one_round()
            except Exception:  # the next round may succeed (the database back, Slack answering)
                log.exception("background round failed", round=self.name)
            self._stop.wait(self.every_s)

"""Start the real services as child processes, wait until they answer, stop them cleanly.
Used by the demo, `flywheel up` and the end-to-end test, so all three run the same way."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from flywheel.net import free_port  # noqa: F401  (re-exported for callers)


class ServiceError(RuntimeError):
    """A service exited or did not become ready; the message quotes its log."""


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_children_on_sigterm() -> None:
    """SIGTERM (docker stop, systemd, kill) ends this process like Ctrl-C does, so its `finally`
    stops the services: they run in sessions of their own and would otherwise be left behind."""
    signal.signal(signal.SIGTERM, _interrupt)


@dataclass
class Service:
    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    ready_url: str | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> "Service":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flywheel", *self.args], env={**os.environ, **self.env},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        return self

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout_s: float = 300.0, progress=None) -> None:
        """Poll `ready_url` until it answers 200; fail fast if the process exits."""
        if self.ready_url is None:
            return
        deadline, last_note = time.monotonic() + timeout_s, 0.0
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServiceError(f"{self.name} exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.ready_url, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if progress and time.monotonic() - last_note > 10:
                progress(f"  waiting for {self.name} to become ready…")
                last_note = time.monotonic()
            time.sleep(0.25)
        raise ServiceError(f"{self.name} not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def run_flywheel(args: list[str], env: dict[str, str], log_path: Path | None = None, echo: bool = True) -> int:
    """Run a `flywheel` subcommand to completion, its output shown (progress bars included)."""
    if log_path:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab") if log_path else None
    try:
        proc = subprocess.run([sys.executable, "-m", "flywheel", *args], env={**os.environ, **env},
                              stdout=None if echo else log, stderr=None if echo else log)
    finally:
        if log:
            log.close()
    return proc.returncode

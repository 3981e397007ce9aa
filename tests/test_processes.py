"""A SIGTERM to `flywheel up` or `flywheel demo run` (docker stop, systemd, kill) stops the
services they started: those run in sessions of their own and would otherwise be orphaned."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

SCRIPT = textwrap.dedent("""
    import subprocess, sys, time
    from flywheel.app.demo.processes import Service, stop_children_on_sigterm

    class Sleeper(Service):
        def start(self):
            self.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                                         start_new_session=True)
            return self

    stop_children_on_sigterm()
    svc = Sleeper("sleeper", [], {}, None).start()
    try:
        print(svc.proc.pid, flush=True)
        time.sleep(120)
    finally:
        svc.stop()
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its (gone) parent counts as stopped
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


def test_sigterm_stops_the_started_services():
    parent = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.send_signal(signal.SIGTERM)
    parent.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the service outlived the process that started it"

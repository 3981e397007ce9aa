"""Run a real gateway (uvicorn on loopback) inside the test process, in a thread."""
from __future__ import annotations

import threading
import time

import httpx

from flywheel.net import free_port  # noqa: F401  (re-exported for callers)


class GatewayServer:
    def __init__(self, settings, port: int | None = None) -> None:
        import uvicorn

        from gateway.app import create_app

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"gateway-{self.port}", daemon=True)

    def start(self, ready_timeout_s: float = 120.0, require_ready: bool = True) -> GatewayServer:
        self.thread.start()
        deadline = time.monotonic() + ready_timeout_s
        last = None
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError("gateway server thread exited during startup")
            try:
                resp = httpx.get(f"{self.url}/readyz", timeout=2)
                last = resp.text
                if resp.status_code == 200 or (not require_ready and self.server.started):
                    return self
            except httpx.TransportError as exc:
                last = str(exc)
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gateway not ready after {ready_timeout_s}s: {last}")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def gateway(self):
        return self.app.state.gateway

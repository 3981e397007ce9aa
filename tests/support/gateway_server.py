"""Run a real gateway (uvicorn on loopback) inside the test process, in a thread. It serves on
a socket bound to port 0 (the kernel's pick) and reports the port it got."""
from __future__ import annotations

import threading
import time

import httpx

from tests.support.net import listening_socket, port_of


class GatewayServer:
    def __init__(self, settings) -> None:
        import uvicorn

        from gateway.app import create_app

        self.sock = listening_socket()
        self.port = port_of(self.sock)
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name=f"gateway-{self.port}", daemon=True)

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
        self.sock.close()

    @property
    def gateway(self):
        return self.app.state.gateway

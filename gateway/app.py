"""The FastAPI app: OpenAI routes, health, readiness, metrics and the admin sync trigger."""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.api import install_routes
from gateway.auth import require_admin
from gateway.errors import install_handlers, unavailable
from gateway.service import Gateway
from gateway.settings import GatewaySettings


def create_app(settings: GatewaySettings) -> FastAPI:

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        gateway = Gateway(settings)
        app.state.gateway = gateway
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="Flywheel gateway", version="0.1.0", lifespan=lifespan)
    install_handlers(app)
    install_routes(app)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request):
        ready, detail = request.app.state.gateway.public_readiness()
        return JSONResponse(detail, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics(request: Request):
        return Response(request.app.state.gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/sync", dependencies=[Depends(require_admin)])
    async def admin_sync(request: Request):
        """Read the production alias now (skipping any retry backoff) and swap if it moved."""
        gateway = request.app.state.gateway
        if gateway.syncer is None:
            raise unavailable("the backend is not ready (see /admin/status); try again shortly", code="not_ready")
        snapshot = await gateway.syncer.sync_once(force=True)
        return {"synced": True, **snapshot}

    @app.get("/admin/status", dependencies=[Depends(require_admin)])
    async def admin_status(request: Request):
        return request.app.state.gateway.readiness()[1]

    return app

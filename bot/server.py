"""Serving the bot: an ASGI app (uvicorn) with /slack/events for the HTTP Events API, /healthz
and /metrics; in Socket Mode the same app serves health and metrics while a websocket
carries the events. The report poller runs for the app's lifetime."""
from __future__ import annotations

import time
from contextlib import asynccontextmanager

import anyio.to_thread
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from slack_bolt import App, BoltRequest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bot import metrics
from bot.app import create_app
from bot.gateway_client import GatewayClient
from bot.reports import ReportPoller
from bot.settings import BotSettings
from flywheel.logs import get_logger

log = get_logger("bot.server")
EVENTS_PATH = "/slack/events"


def _kind(body: bytes, content_type: str) -> str:
    if "json" in content_type:
        return "event"
    if body.startswith(b"payload="):
        return "interactive"
    return "command"


def create_asgi(settings: BotSettings | None = None, *, socket_mode: bool = False,
                app: App | None = None) -> Starlette:
    settings = settings or BotSettings()
    gateway = GatewayClient(settings)
    bolt = app or create_app(settings, gateway=gateway, socket_mode=socket_mode)
    poller = ReportPoller(settings, bolt.client)
    holder: dict = {}

    async def slack_events(request: Request) -> Response:
        """Bolt runs in a worker thread, so the event loop keeps accepting while it verifies
        and acks; listeners continue on Bolt's executor after the response."""
        started = time.perf_counter()
        body = await request.body()
        bolt_request = BoltRequest(body=body.decode("utf-8", errors="replace"), query=request.query_params,
                                   headers=dict(request.headers))
        resp = await anyio.to_thread.run_sync(bolt.dispatch, bolt_request)
        metrics.REQUESTS.labels(_kind(body, request.headers.get("content-type", ""))).observe(
            time.perf_counter() - started)
        return Response(content=resp.body, status_code=resp.status, headers=resp.first_headers_without_set_cookie())

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"ok": True, "mode": "socket" if socket_mode else "http"})

    async def prometheus(_request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @asynccontextmanager
    async def lifespan(_app):
        if settings.reports_enabled:
            poller.start()
        if socket_mode:
            from slack_bolt.adapter.socket_mode import SocketModeHandler

            handler = SocketModeHandler(bolt, settings.slack_app_token)
            await anyio.to_thread.run_sync(handler.connect)
            holder["socket"] = handler
            log.info("connected to Slack over Socket Mode")
        try:
            yield
        finally:
            if "socket" in holder:
                holder["socket"].close()
            await anyio.to_thread.run_sync(poller.stop)
            gateway.close()

    routes = [Route("/healthz", healthz), Route("/metrics", prometheus)]
    if not socket_mode:
        routes.append(Route(EVENTS_PATH, slack_events, methods=["POST"]))
    asgi = Starlette(routes=routes, lifespan=lifespan)
    asgi.state.bolt, asgi.state.poller, asgi.state.settings = bolt, poller, settings
    return asgi

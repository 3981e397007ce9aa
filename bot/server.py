"""Serving the bot: an ASGI app (uvicorn) with /slack/events for the HTTP Events API, /healthz
and /metrics; in Socket Mode the same app serves health and metrics while a websocket
carries the events. The report poller runs for the app's lifetime."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import anyio.to_thread
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from slack_bolt import App, BoltRequest
from slack_bolt.adapter.socket_mode import SocketModeHandler
from slack_sdk.signature import SignatureVerifier
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bot import metrics
from bot.answering import PlaceholderSweeper
from bot.app import create_app
from bot.forgetting import RetentionSweeper
from bot.gateway_client import GatewayClient
from bot.reports import ReportPoller
from bot.settings import BotSettings
from bot.slack_http import EVENTS_PATH, _kind, verified_body
from flywheel.logs import describe_exception, get_logger

log = get_logger("bot.server")


def prestart(executor: ThreadPoolExecutor, threads: int) -> None:
    """Start a pool's threads now: ThreadPoolExecutor starts them one per submit, and under load
    each start took ~20 ms, stalling the first burst of events behind it."""
    barrier = threading.Barrier(threads + 1)
    for _ in range(threads):
        executor.submit(barrier.wait, 10)
    barrier.wait(10)


def drain(bolt, dispatcher: ThreadPoolExecutor, timeout_s: float) -> None:
    """Shutdown, in order: the events received are dispatched and their placeholders posted,
    then the answers finish (or apologise at `timeout_s`), so none is left "Thinking…"."""
    dispatcher.shutdown(wait=True, cancel_futures=False)
    bolt.flywheel["executor"].shutdown(wait=True)
    bolt.flywheel["answerer"].drain(timeout_s)


def create_asgi(settings: BotSettings, *, socket_mode: bool = False) -> Starlette:
    """The bot as an ASGI app for uvicorn; `app.state.bolt` is the Bolt app inside."""
    gateway = GatewayClient(settings)
    try:
        bolt = create_app(settings, gateway=gateway, socket_mode=socket_mode)
    except Exception:
        gateway.close()
        raise
    poller = ReportPoller(settings, bolt.client)
    placeholders = PlaceholderSweeper(settings, bolt.client)
    sweeper = RetentionSweeper(settings)
    dispatcher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bot-dispatch")
    routes = [Route("/healthz", health_endpoint(socket_mode)), Route("/metrics", prometheus)]
    if not socket_mode:
        routes.append(Route(EVENTS_PATH, events_endpoint(settings, bolt, dispatcher), methods=["POST"]))
    lifespan = make_lifespan(settings, bolt, dispatcher, gateway, (poller, placeholders, sweeper),
                             socket_mode=socket_mode)
    asgi = Starlette(routes=routes, lifespan=lifespan)
    asgi.state.bolt, asgi.state.poller, asgi.state.settings = bolt, poller, settings
    asgi.state.sweeper = sweeper
    return asgi


def events_endpoint(settings: BotSettings, bolt: App, dispatcher: ThreadPoolExecutor):
    """The /slack/events endpoint of the HTTP Events API."""
    verifier = SignatureVerifier(settings.slack_signing_secret)

    async def slack_events(request: Request) -> Response:
        """Nothing reads a request before its size and signature are checked; a refused one is
        logged by kind and reason only. Events API deliveries are then acked at once (Slack's
        3-second budget does not wait for Bolt's middleware) and dispatched on a worker thread.
        Interactivity and commands need Bolt's response body, so they go through Bolt before
        the response, in a worker thread (Bolt checks the signature again: harmless)."""
        started = time.perf_counter()
        body = await verified_body(request, verifier, settings.max_body_bytes)
        if isinstance(body, Response):
            return body
        kind = _kind(body, request.headers.get("content-type", ""))
        text = body.decode("utf-8")
        headers = dict(request.headers)
        query = request.url.query
        if kind == "event" and '"event_callback"' in text:
            dispatcher.submit(dispatch_later, bolt, text, query, headers)
            metrics.REQUESTS.labels(kind).observe(time.perf_counter() - started)
            return Response(status_code=200)
        bolt_request = BoltRequest(body=text, query=query, headers=headers)
        resp = await anyio.to_thread.run_sync(bolt.dispatch, bolt_request)
        metrics.REQUESTS.labels(kind).observe(time.perf_counter() - started)
        return Response(content=resp.body, status_code=resp.status, headers=resp.first_headers_without_set_cookie())

    return slack_events


def dispatch_later(bolt: App, text: str, query: str, headers: dict) -> None:
    """An acked event through Bolt, on a dispatcher thread; a failure is logged."""
    try:  # the request is parsed here, off the event loop
        resp = bolt.dispatch(BoltRequest(body=text, query=query, headers=headers))
        if resp.status >= 400:
            log.warning("event not handled", status=resp.status)
    except Exception as exc:
        log.error("event dispatch failed", error=describe_exception(exc))


def health_endpoint(socket_mode: bool):
    """/healthz: the process answers, and in which mode."""
    async def healthz(_request: Request) -> Response:
        return JSONResponse({"ok": True, "mode": "socket" if socket_mode else "http"})

    return healthz


async def prometheus(_request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def make_lifespan(settings: BotSettings, bolt: App, dispatcher: ThreadPoolExecutor, gateway: GatewayClient,
                  background: tuple[ReportPoller, PlaceholderSweeper, RetentionSweeper], *, socket_mode: bool):
    """Start-up (thread pools, answers, background rounds, the Socket Mode connection) and
    shutdown in the reverse order, the gateway client closed last."""
    poller, placeholders, sweeper = background

    @asynccontextmanager
    async def lifespan(_app):
        await prestart_pools(bolt, dispatcher)
        bolt.flywheel["answers"].start()
        placeholders.start()  # what a crash left "Thinking…" becomes an apology
        if settings.reports_enabled:
            poller.start()
        sweeper.start()
        socket = await connect_socket_mode(bolt, settings) if socket_mode else None
        try:
            yield
        finally:
            if socket is not None:
                socket.close()
            await anyio.to_thread.run_sync(poller.stop)
            await anyio.to_thread.run_sync(sweeper.stop)
            await anyio.to_thread.run_sync(placeholders.stop)
            await anyio.to_thread.run_sync(drain, bolt, dispatcher, settings.answer_drain_s)
            gateway.close()  # only now: no answer is left to need it

    return lifespan


async def prestart_pools(bolt: App, dispatcher: ThreadPoolExecutor) -> None:
    """Every thread of the dispatcher and of the listener lanes started before the first request."""
    await anyio.to_thread.run_sync(prestart, dispatcher, 2)
    lanes = bolt.flywheel["executor"]
    for lane, pool in lanes.pools.items():
        await anyio.to_thread.run_sync(prestart, pool, lanes.sizes[lane])


async def connect_socket_mode(bolt: App, settings: BotSettings) -> SocketModeHandler:
    handler = SocketModeHandler(bolt, settings.slack_app_token)
    await anyio.to_thread.run_sync(handler.connect)
    log.info("connected to Slack over Socket Mode")
    return handler

"""The OpenAI-compatible routes: chat completions, completions, models.

Each request: the body validated (_parse), limits (gateway.limits), a turn from admission (429
when the line is full), the version it may name, then the backend. Until the response starts, a
client that hangs up cancels all of it, generation included (gateway.disconnect); once
streaming, Starlette does. JSON is encoded with orjson (about 20x faster than json here)."""
from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import anyio
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from flywheel.logs import get_logger
from gateway.auth import is_admin, require_api_key
from gateway.backends.base import Endpoint
from gateway.disconnect import unless_disconnected
from gateway.errors import GatewayError, bad_request, too_large
from gateway.limits import apply_limits
from gateway.registry import BASE, PRODUCTION
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.sse import DONE, event

VERSION_HEADER = "X-Flywheel-Model-Version"
log = get_logger("gateway.requests")
router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


def _is_json(content_type: str) -> bool:
    mime = content_type.partition(";")[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


async def _parse(request: Request, schema: type[BaseModel]):
    """The body, validated by the schema straight from the bytes by pydantic's own JSON parser:
    one pass, no dict in between. Measured as cheap as orjson.loads + validation (about 2 µs for
    a chat request either way, json.loads + validation 4 µs), and exact for integers past 64
    bits, which orjson.loads turns into floats (a `seed` would silently change). Errors reach
    the handler FastAPI's own validation errors go to (same shape); like FastAPI, a body not
    sent as JSON is refused."""
    if not _is_json(request.headers.get("content-type", "")):
        raise bad_request("the body must be sent as JSON (a JSON Content-Type header)", code="invalid_request")
    body = await _bounded_body(request, request.app.state.gateway.settings.max_request_bytes)
    try:
        return schema.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


async def _bounded_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 once it passes `limit` bytes: by its Content-Length before a
    byte is read, or while a chunked body streams in (never held whole past the limit)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _count_tokens(gw, label: str, usage: dict | None) -> None:
    if usage:
        gw.metrics.tokens.labels("prompt", label).inc(usage.get("prompt_tokens") or 0)
        gw.metrics.tokens.labels("completion", label).inc(usage.get("completion_tokens") or 0)


def _log_failure(path: str, label: str, exc: GatewayError) -> None:
    """Server-side failures are worth a line; client mistakes (4xx) only at debug level."""
    if exc.status >= 500:
        log.warning("request_failed", path=path, version=label, status=exc.status, code=exc.code, error=exc.message)
    else:
        log.debug("request_refused", path=path, version=label, status=exc.status, code=exc.code, error=exc.message)


async def _serve(request: Request, endpoint: str, req) -> Response:
    gw = request.app.state.gateway
    path = f"/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}"
    try:
        apply_limits(req, gw.settings)
        turn = gw.admission.try_acquire()
        if turn is None:
            turn = await unless_disconnected(request, gw.admission.acquire())
    except GatewayError as exc:
        gw.metrics.requests.labels(path, "none", str(exc.status)).inc()
        raise
    if turn is None:  # the client left while waiting for a turn
        gw.metrics.cancelled.labels("waiting").inc()
        gw.metrics.requests.labels(path, "none", "499").inc()
        return Response(status_code=499)
    handed_over = False
    try:
        response = await unless_disconnected(request, _run(request, gw, endpoint, path, req, turn))
        handed_over = isinstance(response, StreamingResponse)  # its body releases the turn
    finally:
        if not handed_over:
            gw.admission.release(turn)
    if response is None:  # the client left; its work was cancelled (generation included)
        gw.metrics.cancelled.labels("running").inc()
        gw.metrics.requests.labels(path, "none", "499").inc()
        return Response(status_code=499)
    return response


@dataclass(frozen=True)
class _Call:
    """One admitted request on the version it resolved to."""
    gw: object
    endpoint: str
    path: str
    req: object
    version: str | None
    label: str
    started: float


async def _run(request: Request, gw, endpoint: str, path: str, req, turn: float) -> Response:
    """The request on the version it names, answered whole or streamed."""
    started = time.perf_counter()
    version = await _resolve(request, gw, req, path)
    call = _Call(gw, endpoint, path, req, version, gw.registry.label(version), started)
    if req.stream:
        return await _streamed(call, turn)
    return await _full(call)


async def _resolve(request: Request, gw, req, path: str) -> str | None:
    """The version the request may run on; a registered one named directly is loaded first."""
    admin = is_admin(request)
    try:
        try:
            return gw.registry.resolve(req.model, admin)
        except GatewayError:
            if gw.syncer is None or gw.settings.max_extra_versions == 0:
                raise
            await gw.syncer.ensure_loaded(req.model, admin)  # a registered version named directly
            return gw.registry.resolve(req.model, admin)
    except GatewayError as exc:
        gw.metrics.requests.labels(path, "none", str(exc.status)).inc()
        raise


@contextmanager
def _in_flight(call: _Call):
    """The request counted as running, and against the version it runs on (the registry's lease)."""
    call.gw.metrics.inflight.inc()
    try:
        with call.gw.registry.use(call.version):
            yield
    finally:
        call.gw.metrics.inflight.dec()


def _failed(call: _Call, exc: GatewayError) -> None:
    """A backend error before any answer was sent: counted, logged, and its version named."""
    exc.headers.setdefault(VERSION_HEADER, call.label)
    call.gw.metrics.requests.labels(call.path, call.label, str(exc.status)).inc()
    _log_failure(call.path, call.label, exc)


async def _full(call: _Call) -> Response:
    """The whole answer in one JSON body."""
    gw = call.gw
    with _in_flight(call):
        try:
            body = await gw.backend.generate(call.version, call.endpoint, call.req)
        except GatewayError as exc:
            _failed(call, exc)
            raise
    body["model"] = call.label
    _count_tokens(gw, call.label, body.get("usage"))
    gw.metrics.requests.labels(call.path, call.label, "200").inc()
    gw.metrics.latency.labels(call.path, "false").observe(time.perf_counter() - call.started)
    return Response(orjson.dumps(body), media_type="application/json", headers={VERSION_HEADER: call.label})


async def _streamed(call: _Call, turn: float) -> Response:
    """Server-sent events. The lease and the admission turn are held until the stream closes
    (_stream_response), unless it fails before its first chunk."""
    held = ExitStack()
    held.enter_context(_in_flight(call))
    chunks = None
    try:
        chunks = call.gw.backend.sse(call.version, call.endpoint, call.req, call.label)
        try:  # errors found before the first chunk still get a proper status code
            first = await chunks.__anext__()
        except GatewayError as exc:
            _failed(call, exc)
            raise
    except BaseException:
        held.close()
        if chunks is not None:
            with anyio.CancelScope(shield=True):
                await chunks.aclose()
        raise
    call.gw.metrics.first_token.labels(call.path).observe(time.perf_counter() - call.started)
    return _stream_response(call, turn, held, chunks, first)


def _stream_response(call: _Call, turn: float, held: ExitStack, chunks, first) -> Response:
    gw, path, label = call.gw, call.path, call.label
    status = "200"
    closed = False

    async def close() -> None:
        """Book-keeping first (no awaits), then close the engine's stream even if the client
        left and this task is being cancelled. Runs once, from whichever end gets here first."""
        nonlocal closed
        if closed:
            return
        closed = True
        held.close()
        gw.admission.release(turn)
        gw.metrics.requests.labels(path, label, status).inc()
        gw.metrics.latency.labels(path, "true").observe(time.perf_counter() - call.started)
        with anyio.CancelScope(shield=True):
            await chunks.aclose()

    def counted(item: tuple[bytes, dict | None]) -> bytes:
        data, usage = item
        _count_tokens(gw, label, usage)
        return data

    async def body_iter():
        nonlocal status
        try:
            yield counted(first)
            async for item in chunks:
                yield counted(item)
            yield DONE
        except GatewayError as exc:  # mid-stream: headers are gone, report in OpenAI's stream style
            status = str(exc.status)
            _log_failure(path, label, exc)
            yield event(exc.body())
        finally:
            await close()

    headers = {VERSION_HEADER: label, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return _Stream(body_iter(), close, media_type="text/event-stream", headers=headers)


class _Stream(StreamingResponse):
    """A streaming response that always runs its `close` (lease, admission turn, engine stream),
    also when the client left before Starlette started iterating the body."""

    def __init__(self, content, close, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._close = close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._close()


def _completions_route(endpoint: Endpoint, schema: type[BaseModel]):
    async def handle(request: Request) -> Response:
        await require_api_key(request)
        return await _serve(request, endpoint, await _parse(request, schema))

    return handle


def install_routes(app) -> None:
    """/v1/models through the router; the two completion routes as plain Starlette routes, which
    check the API key first, as the router's dependency does: FastAPI's per-route machinery
    (dependency solving, parameters) cost ~25 µs a request, a tenth of the gateway's own CPU.
    (So they are not in /openapi.json.)"""
    app.include_router(router)
    app.add_route("/v1/chat/completions", _completions_route("chat", ChatCompletionRequest), methods=["POST"])
    app.add_route("/v1/completions", _completions_route("completions", CompletionRequest), methods=["POST"])


@router.get("/models")
async def list_models(request: Request):
    gw = request.app.state.gateway
    reg = gw.registry
    created = int(reg.swapped_at or time.time())
    base_id = gw.base_model_name()
    data = [
        {"id": BASE, "object": "model", "created": created, "owned_by": "flywheel", "root": base_id,
         "parent": None, "flywheel": {"kind": "base"}},
        {"id": PRODUCTION, "object": "model", "created": created, "owned_by": "flywheel", "root": base_id,
         "parent": None, "flywheel": {"kind": "alias", "target": reg.label(reg.production)}},
    ]
    admin = is_admin(request)
    for name, entry in sorted(reg.loaded.items()):
        if not entry.draining and reg.may_serve(name, entry.status, admin):
            data.append({"id": name, "object": "model", "created": int(entry.loaded_at), "owned_by": "flywheel",
                         "root": base_id, "parent": BASE,
                         "flywheel": {"kind": "adapter", "sha256": entry.sha256,
                                      "production": name == reg.production}})
    return {"object": "list", "data": data}

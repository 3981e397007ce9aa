"""Checks on a Slack HTTP request that need nothing heavy (starlette, slack_sdk's
SignatureVerifier, the bot's metrics and logs): the body's size, Slack's signature and timestamp, all on the raw
bytes before anything parses them, and the request's kind. Shared by the bot's own server
(bot/server.py) and the lean ack front (bot/front.py)."""
from __future__ import annotations

import hmac
import time

from slack_sdk.signature import SignatureVerifier
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bot import metrics
from flywheel.logs import get_logger

log = get_logger("bot.slack_http")

EVENTS_PATH = "/slack/events"
MAX_CLOCK_SKEW_S = 60 * 5  # Slack's own rule: older (or newer) signatures are replays


class Rejected(Exception):
    """A request refused before anything parsed it; `reason` is all that is logged of it."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 past `limit` bytes: by its Content-Length before a byte is
    read, and by counting while reading (chunked bodies have no length)."""
    declared = request.headers.get("content-length")
    numeric = declared is not None and declared.isascii() and declared.isdigit()  # '²'.isdigit() is True
    if declared is not None and (not numeric or int(declared) > limit):
        raise Rejected(413 if numeric else 400, "too large" if numeric else "bad length")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Rejected(413, "too large")
    return bytes(body)


def check_signature(verifier: SignatureVerifier, body: bytes, headers) -> None:
    """Slack's signature over `v0:{timestamp}:{body}`, checked on the raw bytes before any
    parsing; a missing or non-numeric timestamp is a bad request like a forged one (401)."""
    timestamp = headers.get("x-slack-request-timestamp") or ""
    signature = headers.get("x-slack-signature") or ""
    if not signature or not timestamp:
        raise Rejected(401, "unsigned")
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 12:
        raise Rejected(401, "bad timestamp")
    if abs(time.time() - int(timestamp)) > MAX_CLOCK_SKEW_S:
        raise Rejected(401, "stale timestamp")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected(401, "bad signature") from None  # Slack signs UTF-8 text
    expected = verifier.generate_signature(timestamp=timestamp, body=text)
    # hmac.compare_digest raises on non-ASCII text (a forged header would be a 500): compare bytes
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "surrogateescape")):
        raise Rejected(401, "bad signature")


def _kind(body: bytes, content_type: str) -> str:
    if "json" in content_type:
        return "event"
    if body.startswith(b"payload="):
        return "interactive"
    return "command"


async def verified_body(request: Request, verifier: SignatureVerifier, limit: int) -> bytes | Response:
    """The raw body once its size and signature pass; else the refusal to send, counted and
    logged by kind and reason only (nothing of the request itself)."""
    try:
        body = await read_body(request, limit)
        check_signature(verifier, body, request.headers)
    except Rejected as exc:
        metrics.REJECTED.labels(exc.reason).inc()
        log.warning("request rejected", kind="event" if "json" in request.headers.get("content-type", "") else "form",
                    reason=exc.reason, status=exc.status)
        return JSONResponse({"error": exc.reason}, status_code=exc.status)
    return body

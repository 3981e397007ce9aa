"""Slash commands, button clicks and modal submissions are handled once. Slack signs a request
with a timestamp and accepts it for five minutes (bot/slack_http.py), so a captured
`/flywheel rollback` could be sent again inside that window and roll back once more. Each such
request carries a trigger_id Slack never reuses; a Bolt middleware claims it in the store's
receipts (the same table that handles each event id once, so every bot replica sees the
claim) and acks a second delivery without running it. Events have their own ids and are
deduplicated where they are handled (bot/answering.py, bot/feedback.py)."""
from __future__ import annotations

import hashlib

from slack_bolt import BoltResponse
from sqlalchemy.exc import DBAPIError

from bot import metrics
from flywheel.logs import describe_exception, get_logger
from store.db import session_scope
from store.errors import DatabaseUnavailableError
from store.receipts import record_event_once

log = get_logger("bot.replays")


def request_key(body: dict, raw_body: str) -> str | None:
    """What identifies one command, click or submission: its trigger id (else a digest of the
    signed body); None for events and Slack's own checks, which are not deduplicated here."""
    if body.get("type") in ("event_callback", "url_verification", "app_rate_limited"):
        return None
    if body.get("trigger_id"):
        return "trigger:" + str(body["trigger_id"])[:100]
    return "request:" + hashlib.sha256(raw_body.encode()).hexdigest()


def once_only(body, request, next):  # Bolt injects arguments by these names
    """Run a command or interaction the first time its key is seen; ack a replay with nothing
    done. When the store cannot say, the request runs (its own handler meets the same outage
    and answers with an apology)."""
    key = request_key(body or {}, request.raw_body or "")
    if key is None:
        return next()
    try:
        with session_scope() as s:
            first = record_event_once(s, key, kind="interaction")
    except (DBAPIError, DatabaseUnavailableError) as exc:
        log.warning("cannot check a request for replay; running it", error=describe_exception(exc))
        return next()
    if first:
        return next()
    metrics.IGNORED.labels("replayed").inc()
    log.warning("replayed command or interaction ignored", key=key[:24])
    return BoltResponse(status=200, body="")

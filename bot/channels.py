"""Who may see what was said in a channel. A correction made in a public channel may help
everyone; one made in a DM, a group DM, a private channel or a Slack Connect channel (shared with
another organisation) stays there. Slack says which is which through conversations.info; the
answer is cached per process for a while (FLYWHEEL_CHANNEL_VISIBILITY_TTL_S) and dropped when
Slack reports a change (channel_shared, channel_unshared, a channel made private). Any doubt (an
error, a missing scope) counts as private, so nothing leaks by accident.

Each answer recorded in the store is for the trainer too: every lookup is written to the store
(store.channels), whose rule decides what may train the model everyone uses."""
from __future__ import annotations

import threading
import time

from slack_sdk.errors import SlackApiError
from slack_sdk.web import WebClient
from sqlalchemy.exc import DBAPIError

from flywheel.logs import describe_exception, get_logger
from store.channels import record_channel_visibility
from store.db import session_scope
from store.errors import DatabaseUnavailableError
from store.models import Visibility

log = get_logger("bot.channels")
DEFAULT_TTL_S = 600.0
# Slack's events that change who may see a channel (a channel made private arrives as a message
# with this subtype in the channel itself).
CHANGE_EVENTS = ("channel_shared", "channel_unshared")
MADE_PRIVATE_SUBTYPE = "channel_convert_to_private"


def visibility_from_info(info: dict) -> Visibility:
    """conversations.info's channel object → who may see it."""
    if info.get("is_im"):
        return Visibility.direct
    if info.get("is_ext_shared") or info.get("is_pending_ext_shared"):
        return Visibility.external
    if info.get("is_private") or info.get("is_mpim") or info.get("is_group"):
        return Visibility.private
    return Visibility.public


class ChannelVisibility:
    def __init__(self, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._known: dict[str, tuple[Visibility, float]] = {}  # channel → (visibility, monotonic expiry)
        self._lock = threading.Lock()

    def visibility(self, client: WebClient, channel: str) -> Visibility:
        if not channel:
            return Visibility.unknown
        if channel.startswith("D"):  # a DM: no need to ask
            return self._remember(channel, Visibility.direct, asked=False)
        with self._lock:
            known = self._known.get(channel)
        if known is not None and known[1] > time.monotonic():
            return known[0]
        try:
            seen = visibility_from_info(client.conversations_info(channel=channel)["channel"])
        except (SlackApiError, KeyError, TypeError) as exc:
            reason = exc.response.get("error") if isinstance(exc, SlackApiError) else type(exc).__name__
            log.warning("channel visibility unknown; treating it as private", channel=channel, error=reason)
            seen = Visibility.private if channel.startswith("G") else Visibility.unknown
        return self._remember(channel, seen, asked=True)

    def _remember(self, channel: str, seen: Visibility, *, asked: bool) -> Visibility:
        """Cache what was seen; write it to the store when Slack was asked (its checked_at moves
        on) or when it is new to this process or changed."""
        with self._lock:
            cached = self._known.get(channel)
            self._known[channel] = (seen, time.monotonic() + self.ttl_s)
        if asked or cached is None or cached[0] != seen:
            self._record(channel, seen)
        return seen

    @staticmethod
    def _record(channel: str, seen: Visibility) -> None:
        """The trainer reads it from the store; a store that is down only delays that (the next
        lookup writes it again), it never blocks an answer."""
        try:
            with session_scope() as s:
                record_channel_visibility(s, channel, seen)
        except (DBAPIError, DatabaseUnavailableError) as exc:
            log.warning("cannot record a channel's visibility", channel=channel, error=describe_exception(exc))

    def is_public(self, client: WebClient, channel: str) -> bool:
        return self.visibility(client, channel) == Visibility.public

    def visible_in(self, client: WebClient, channel: str) -> str | None:
        """The memory scope of something taught in `channel`: None (everywhere) or the channel."""
        return None if self.is_public(client, channel) else channel

    def changed(self, client: WebClient, channel: str | None) -> None:
        """Slack says who may see `channel` changed: ask again now, so the store and the memory
        follow at once (a channel made private takes its memory items back from everyone)."""
        if not channel:
            return
        with self._lock:
            self._known.pop(channel, None)
        log.info("channel visibility changed", channel=channel, now=str(self.visibility(client, channel)))

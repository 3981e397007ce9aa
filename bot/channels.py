"""Who may see what was taught in a channel: a correction made in a public channel may help
everyone; one made in a DM, a group DM or a private channel stays there. Slack says which is
which through conversations.info; the answer is cached per process, and any doubt (an error,
a missing scope) counts as private, so nothing leaks by accident."""
from __future__ import annotations

import threading

from slack_sdk.errors import SlackApiError
from slack_sdk.web import WebClient

from flywheel.logs import get_logger

log = get_logger("bot.channels")


class ChannelVisibility:
    def __init__(self) -> None:
        self._public: dict[str, bool] = {}
        self._lock = threading.Lock()

    def is_public(self, client: WebClient, channel: str) -> bool:
        if not channel or channel.startswith(("D", "G")):  # DMs, group DMs, legacy private groups
            return False
        with self._lock:
            known = self._public.get(channel)
        if known is not None:
            return known
        try:
            info = client.conversations_info(channel=channel)["channel"]
            public = not (info.get("is_private") or info.get("is_im") or info.get("is_mpim"))
        except (SlackApiError, KeyError, TypeError) as exc:
            reason = exc.response.get("error") if isinstance(exc, SlackApiError) else type(exc).__name__
            log.warning("channel visibility unknown; treating it as private", channel=channel, error=reason)
            return False
        with self._lock:
            self._public[channel] = public
        return public

    def visible_in(self, client: WebClient, channel: str) -> str | None:
        """The memory scope of something taught in `channel`: None (everywhere) or the channel."""
        return None if self.is_public(client, channel) else channel

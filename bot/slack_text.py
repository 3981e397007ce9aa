"""Slack mrkdwn ↔ plain text. Questions are stored as Slack sent them (the trainer cleans them
for training); the model sees plain text, and Slack gets its three characters escaped."""
from __future__ import annotations

import html
import re

_USER = re.compile(r"<@([UW][A-Z0-9]+)(?:\|([^>]*))?>")
_CHANNEL = re.compile(r"<#(C[A-Z0-9]+)(?:\|([^>]*))?>")
_SUBTEAM = re.compile(r"<!subteam\^[A-Z0-9]+(?:\|([^>]*))?>")
_SPECIAL = re.compile(r"<!(here|channel|everyone)(?:\|[^>]*)?>")
_LINK = re.compile(r"<((?:https?|mailto):[^|>]+)(?:\|([^>]*))?>")
_EMOJI = re.compile(r":[a-z0-9_+\-']+(?:::skin-tone-\d)?:")
_SPACES = re.compile(r"[ \t]+")


def strip_leading_mention(text: str, bot_user_id: str | None) -> str:
    """`<@BOT> question` → `question`: the mention only addressed the bot."""
    if not bot_user_id:
        return text.strip()
    return re.sub(rf"^\s*<@{re.escape(bot_user_id)}(?:\|[^>]*)?>[\s,:]*", "", text).strip()


def to_plain(text: str, bot_user_id: str | None = None) -> str:
    """Slack's markup → what a person would read; the bot's own mentions disappear."""
    text = strip_leading_mention(text or "", bot_user_id)
    text = _USER.sub(lambda m: "" if m.group(1) == bot_user_id else "@" + (m.group(2) or m.group(1)), text)
    text = _CHANNEL.sub(lambda m: "#" + (m.group(2) or m.group(1)), text)
    text = _SUBTEAM.sub(lambda m: m.group(1) or "@team", text)
    text = _SPECIAL.sub(lambda m: "@" + m.group(1), text)
    text = _LINK.sub(lambda m: m.group(2) or m.group(1).removeprefix("mailto:"), text)
    text = _EMOJI.sub("", text)
    text = html.unescape(text)
    return "\n".join(_SPACES.sub(" ", line).strip() for line in text.splitlines()).strip()


def escape(text: str) -> str:
    """Plain text → Slack mrkdwn: Slack asks for exactly &, < and > to be escaped."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def base_emoji(name: str) -> str:
    """`+1::skin-tone-3` → `+1`: skin tones do not change the meaning of a reaction."""
    return name.split("::", 1)[0].strip(":")

"""Slack mrkdwn rules for what the bot posts: Slack gets exactly three characters escaped, and
reactions lose their skin tone (the escaping itself is flywheel.mrkdwn, shared with the memory). (Slack text → model text is flywheel.prompt.normalize, shared
with the trainer so serving and training read a message the same way.)"""
from __future__ import annotations

from flywheel.mrkdwn import escape


def escape_within(text: str, limit: int) -> str:
    """Escaped text that fits `limit` characters *after* escaping (an `&` grows to five), cut
    with "…" and never inside an entity: Slack refuses a section over 3000 characters."""
    out = escape(text)
    if len(out) <= limit:
        return out
    cut = out[:max(limit - 1, 0)]
    amp = cut.rfind("&")
    if amp != -1 and ";" not in cut[amp:]:
        cut = cut[:amp]
    return cut + "…"


def base_emoji(name: str) -> str:
    """`+1::skin-tone-3` → `+1`: skin tones do not change the meaning of a reaction."""
    return name.split("::", 1)[0].strip(":")

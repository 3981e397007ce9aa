"""Turn Slack markup, HTML and messy whitespace into the plain text a model should learn from.
Order matters: Slack's <…> markup first, then raw HTML tags, then entity escapes (so a user's
literal "&lt;b&gt;" survives as "<b>"), then emoji codes and whitespace."""
from __future__ import annotations

import html
import re

_SLACK = re.compile(r"<([@#!][^<>]*|(?:https?|mailto|tel|ftp):[^<>]*)>")
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>")
_BLOCK_TAG = re.compile(r"<(?:br|/p|/div|/li|/h[1-6]|/tr)\s*/?>", re.IGNORECASE)
_EMOJI = re.compile(r"(?<![\w:])(?::[a-z0-9_+'\-]*[a-z+][a-z0-9_+'\-]*:)+(?![\w])")
_SPACES = re.compile(r"[ \t\f\v\u00a0]+")
_NEWLINES = re.compile(r"\n{3,}")
_LEADING_MENTION = re.compile(r"^\s*<@[UW][A-Z0-9]+(?:\|[^>]*)?>[\s,:]*")


def _slack_token(match: re.Match, bot_user_id: str | None) -> str:
    body = match.group(1)
    target, _, label = body.partition("|")
    if target.startswith("@"):
        if bot_user_id and target[1:] == bot_user_id:
            return ""
        return f"@{label}" if label else "@user"
    if target.startswith("#"):
        return f"#{label}" if label else "#channel"
    if target.startswith("!"):
        special = target[1:]
        if special in ("here", "channel", "everyone"):
            return f"@{special}"
        if special.startswith("subteam^"):
            return label if label.startswith("@") else f"@{label or 'group'}"
        return label  # <!date^…|fallback> and friends: the fallback text
    if target.startswith("mailto:"):
        return label or target[len("mailto:"):]
    if target.startswith("tel:"):
        return label or target[len("tel:"):]
    return label or target  # a link: its visible text


def clean_text(text: str | None, *, bot_user_id: str | None = None) -> str:
    """Plain text: Slack markup resolved, the bot's leading mention dropped, HTML stripped."""
    if not text:
        return ""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _LEADING_MENTION.sub("", text, count=1)
    text = _SLACK.sub(lambda m: _slack_token(m, bot_user_id), text)
    text = _BLOCK_TAG.sub("\n", text)
    text = _TAG.sub("", text)
    text = html.unescape(text)
    text = _EMOJI.sub("", text)
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    text = _NEWLINES.sub("\n\n", text)
    return text.strip()


def normalize_for_hash(text: str) -> str:
    """Case, punctuation and spacing do not make an item different (exact-dedup key)."""
    text = text.lower()
    text = re.sub(r"[^\w\s\[\]]", " ", text)
    return " ".join(text.split())

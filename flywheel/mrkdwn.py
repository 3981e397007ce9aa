"""Plain text → Slack mrkdwn, one definition for every layer that writes what the bot posts (the
bot's blocks and the memory's citations): Slack asks for exactly &, < and > to be escaped."""
from __future__ import annotations


def escape(text: str) -> str:
    """Plain text → Slack mrkdwn: Slack asks for exactly &, < and > to be escaped."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

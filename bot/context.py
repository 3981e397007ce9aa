"""The dialogue context for one answer: the thread's stored history, oldest first, trimmed
from the old end until it fits the model's window (messages and characters)."""
from __future__ import annotations

from bot.slack_text import to_plain
from store.models import Message, Role

ROLES = {Role.user.value: "user", Role.assistant.value: "assistant"}


def build_context(history: list[Message], *, bot_user_id: str | None, max_messages: int,
                  max_chars: int, system_prompt: str | None = None) -> list[dict]:
    """OpenAI chat messages for the history whose last entry is the question being answered.
    Failed answers (error set) are left out: they are apologies, not dialogue."""
    turns = []
    for msg in history:
        if msg.error or msg.role not in ROLES:
            continue
        text = to_plain(msg.text, bot_user_id)
        if text:
            turns.append({"role": ROLES[msg.role], "content": text})
    budget = max_chars - len(system_prompt or "")
    kept: list[dict] = []
    for turn in reversed(turns):
        if len(kept) >= max_messages:
            break
        if kept and len(turn["content"]) > budget:
            break
        if not kept and len(turn["content"]) > budget:  # the question itself: keep its start
            turn = {**turn, "content": turn["content"][:max(budget, 1)]}
        kept.append(turn)
        budget -= len(turn["content"])
    kept.reverse()
    while kept and kept[0]["role"] != "user":  # chat templates expect a user turn first
        kept.pop(0)
    if system_prompt:
        kept.insert(0, {"role": "system", "content": system_prompt})
    return kept

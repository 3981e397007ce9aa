"""A scripted team workspace: people who ask the bot, react and correct, and one admin.
Everything goes through the real bot over signed Slack requests; what the bot posts lands in
the local Slack double, and what it stored is read back from the store."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from bot.blocks import (
    CORRECTION_BLOCK,
    CORRECTION_INPUT,
    CORRECTION_VIEW,
    REVIEW_APPROVE,
    SOURCE_MARK,
    SUGGEST_ACTION,
    THINKING,
)
from store.conversations import get_message
from store.db import session_scope
from flywheel.app.demo.slack_double import BOT_USER_ID, SlackDouble, SlackSender


@dataclass
class Answer:
    question: str
    question_ts: str
    ts: str
    text: str
    model_version: str | None
    source: str | None = None  # what the answer says it is based on (the citation under it)


class Workspace:
    def __init__(self, sender: SlackSender, slack: SlackDouble, *, channel: str = "CGENERAL1",
                 admin: str = "UADMIN01", answer_timeout_s: float = 180.0) -> None:
        self.sender, self.slack, self.channel, self.admin = sender, slack, channel, admin
        self.answer_timeout_s = answer_timeout_s

    def ask(self, question: str, *, user: str) -> Answer:
        """Mention the bot and wait for its finished answer: the reply the bot stored (an answer
        with feedback buttons, or the bot's apology when the model failed)."""
        ts, resp = self.sender.mention(question, user=user, channel=self.channel)
        if resp.status_code != 200:
            raise RuntimeError(f"the bot refused the event: HTTP {resp.status_code} {resp.text[:200]}")
        deadline = time.monotonic() + self.answer_timeout_s
        while time.monotonic() < deadline:
            for msg in self.slack.thread(self.channel, ts):
                if msg.get("user") != BOT_USER_ID or msg.get("text") == THINKING:
                    continue
                with session_scope() as session:
                    stored = get_message(session, self.channel, msg["ts"])
                if stored is not None and (_finished(msg) or stored.error):
                    return Answer(question, ts, msg["ts"], stored.text, stored.model_version, _source(msg))
            time.sleep(0.1)
        raise TimeoutError(f"no answer to {question!r} within {self.answer_timeout_s:.0f} s")

    def react(self, answer: Answer, emoji: str, *, user: str) -> None:
        self._ok(self.sender.reaction(emoji, channel=self.channel, ts=answer.ts, user=user))

    def correct(self, answer: Answer, better: str, *, user: str) -> None:
        """Click "Suggest a better answer", then submit the modal the bot opened."""
        opened_before = len(self.slack.calls_to("views.open"))
        self._ok(self.sender.block_action(action_id=SUGGEST_ACTION, value="suggest", channel=self.channel,
                                          message_ts=answer.ts, thread_ts=answer.question_ts, user=user))
        call = self.slack.wait_for("views.open", count=opened_before + 1, timeout=30)[-1]
        view = call.args["view"]
        view = json.loads(view) if isinstance(view, str) else view
        values = {CORRECTION_BLOCK: {CORRECTION_INPUT: {"type": "plain_text_input", "value": better}}}
        self._ok(self.sender.view_submission(callback_id=CORRECTION_VIEW, values=values,
                                             private_metadata=view.get("private_metadata", ""), user=user))

    def approve_corrections(self, admin_channel: str, count: int, timeout_s: float = 60.0) -> int:
        """The review step: the admin presses Approve on every correction the bot posted to the
        admin channel for review; returns how many were approved."""
        def request(call) -> bool:
            return call.args.get("channel") == admin_channel and REVIEW_APPROVE in json.dumps(call.args.get("blocks"))

        posts = self.slack.wait_for("chat.postMessage", request, count=count, timeout=timeout_s) if count else []
        for post in posts:
            blocks = post.args["blocks"]
            blocks = json.loads(blocks) if isinstance(blocks, str) else blocks
            value = next(e["value"] for b in blocks if b.get("type") == "actions"
                         for e in b["elements"] if e.get("action_id") == REVIEW_APPROVE)
            self._ok(self.sender.block_action(action_id=REVIEW_APPROVE, value=value, channel=admin_channel,
                                              message_ts=post.response["ts"], user=self.admin,
                                              message={"type": "message", "ts": post.response["ts"],
                                                       "text": "", "blocks": blocks}))
        return len(posts)

    def command(self, text: str, *, user: str | None = None) -> None:
        self._ok(self.sender.command(text, user=user or self.admin, channel=self.channel))

    @staticmethod
    def _ok(resp) -> None:
        if resp.status_code != 200:
            raise RuntimeError(f"the bot answered HTTP {resp.status_code}: {resp.text[:200]}")


def _blocks(msg: dict) -> list[dict]:
    blocks = msg.get("blocks") or []
    return json.loads(blocks) if isinstance(blocks, str) else blocks


def _finished(msg: dict) -> bool:
    return any(b.get("block_id") == "feedback" for b in _blocks(msg))


def _source(msg: dict) -> str | None:
    """The citation under an answer: its context line after the bookmark (bot.blocks.answer_blocks)."""
    for block in _blocks(msg):
        for element in block.get("elements", []) if block.get("type") == "context" else []:
            text = element.get("text", "")
            if text.startswith(SOURCE_MARK):
                return text[len(SOURCE_MARK):].strip()
    return None

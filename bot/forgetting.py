"""What the team unsays is forgotten: Slack's `message_deleted` and `message_changed` events
(store/forget.py removes or updates what the message taught), and the retention sweep that
purges old conversations nobody taught from (FLYWHEEL_RETENTION_DAYS).

The sweep runs in the bot, at start-up and then every `retention_sweep_s`: the bot is the one
service every deployment runs all the time, and it writes the conversations it purges; the
trainer may be a CronJob that runs rarely or not at all, and untaught conversations never reach
a snapshot anyway (only feedback derives examples), so nothing waits on the trainer."""
from __future__ import annotations

from datetime import timedelta

from slack_sdk.web import WebClient

from bot import metrics
from bot.feedback import Feedback
from bot.periodic import Periodic
from bot.review import Review
from bot.settings import BotSettings
from flywheel.logs import get_logger
from store.db import session_scope
from store.forget import edit_message, forget_message, purge_untaught
from store.memory import deactivate_memory_item, memory_item
from store.models import Message, utcnow
from store.review import reopen_corrections

log = get_logger("bot.forgetting")
DELETED, CHANGED = "message_deleted", "message_changed"
SUBTYPES = (DELETED, CHANGED)


class Forgetting:
    def __init__(self, settings: BotSettings, feedback: Feedback, review: Review) -> None:
        self.settings, self.feedback, self.review = settings, feedback, review

    def on_message(self, event: dict, client: WebClient, bot_user_id: str | None) -> None:
        """A `message` event of a SUBTYPES subtype. Both are idempotent (a retried delivery finds
        nothing left to do), so no receipt is kept; a database outage is waited out as for votes."""
        metrics.EVENTS.labels(event["subtype"]).inc()
        if event["subtype"] == DELETED:
            self.feedback.until_stored("forget", lambda: self.deleted(event))
        else:
            self.feedback.until_stored("edit", lambda: self.changed(event, client, bot_user_id))

    def deleted(self, event: dict) -> None:
        previous = event.get("previous_message") or {}
        channel, ts = event.get("channel"), event.get("deleted_ts") or previous.get("ts")
        if not channel or not ts:
            return
        with session_scope() as s:
            gone = forget_message(s, channel, ts, actor=previous.get("user") or "slack")
        if gone is None:
            metrics.IGNORED.labels("deleted_unknown").inc()
            return
        metrics.FORGOTTEN.labels("deleted").inc()
        log.info("deleted message forgotten", channel=channel, ts=ts, answers=gone.answers,
                 examples=gone.examples, memory_items=gone.memory_items, versions=gone.versions)

    def changed(self, event: dict, client: WebClient, bot_user_id: str | None) -> None:
        """A person edited a message: the store takes the new text; what the bot's answers to it
        taught goes back to review (review on, and the editor no reviewer) or is taught again
        with the new question."""
        message = event.get("message") or {}
        editor, channel, ts = message.get("user"), event.get("channel"), message.get("ts")
        if message.get("bot_id") or not editor or editor == bot_user_id or not channel or not ts:
            metrics.IGNORED.labels("edit_not_a_person").inc()  # our own chat.update, among others
            return
        with session_scope() as s:
            answers = edit_message(s, channel, ts, message.get("text") or "", actor=editor)
        if answers is None:
            metrics.IGNORED.labels("edit_unchanged").inc()
            return
        metrics.FORGOTTEN.labels("edited").inc()
        reopened = self._back_to_review(client, answers, editor) if self.feedback.needs_review(editor) else set()
        for answer in answers:
            if answer.id not in reopened:
                self._teach_again(client, answer)
        log.info("edited message updated", channel=channel, ts=ts, answers=len(answers), reviews=len(reopened))

    def _back_to_review(self, client: WebClient, answers: list[Message], editor: str) -> set[int]:
        """The counted corrections of these answers wait for a reviewer again; their memory items
        are off until one approves (approval teaches the memory with the new question)."""
        with session_scope() as s:
            rows = reopen_corrections(s, [a.id for a in answers], actor=editor, reason="question edited")
            for message_id in {r.message_id for r in rows}:
                deactivate_memory_item(s, f"message:{message_id}")
        by_id = {a.id: a for a in answers}
        for row in rows:
            self.review.submitted(client, row, by_id[row.message_id])
        return {r.message_id for r in rows}

    def _teach_again(self, client: WebClient, answer: Message) -> None:
        """The answer's memory item, keyed by the edited question now."""
        with session_scope() as s:
            item = memory_item(s, f"message:{answer.id}")
        if item is not None:
            self.feedback.remember(client, answer, item.author, item.answer, source=item.source)


class RetentionSweeper:
    """FLYWHEEL_RETENTION_DAYS > 0: purge conversations nobody taught from once their last message
    is that old, at start-up and every `retention_sweep_s` (each sweep in batches until done)."""

    def __init__(self, settings: BotSettings) -> None:
        self.settings = settings
        self.rounds = Periodic("retention-sweep", settings.retention_sweep_s, self.sweep_once)

    def start(self) -> None:
        if self.settings.retention_days > 0:
            self.rounds.start()

    def stop(self) -> None:
        self.rounds.stop()

    def sweep_once(self) -> int:
        """Purge every expired, untaught conversation; returns how many went."""
        before = utcnow() - timedelta(days=self.settings.retention_days)
        total = 0
        while not self.rounds.stopping:
            with session_scope() as s:
                gone = purge_untaught(s, before=before)
            if not gone.anything:
                break
            total += gone.conversations
            metrics.FORGOTTEN.labels("retention").inc(gone.messages + gone.answers)
            log.info("retention purge", conversations=gone.conversations, messages=gone.messages,
                     answers=gone.answers, days=self.settings.retention_days)
        return total

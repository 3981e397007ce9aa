"""Feedback on the bot's answers: reactions, buttons, the correction modal, and the message
shortcuts. Everything lands in store.feedback as one vote per user, message and kind."""
from __future__ import annotations

import time

from slack_sdk.errors import SlackApiError
from slack_sdk.web import WebClient
from sqlalchemy.exc import DBAPIError

from bot import blocks, metrics
from bot.channels import ChannelVisibility
from bot.docflags import flag_sections
from bot.settings import BotSettings
from bot.slack_text import base_emoji
from flywheel.logs import get_logger
from flywheel.memory import Memory
from flywheel.prompt import PromptSettings, normalize
from store.audit import record_audit
from store.conversations import get_message, previous_user_message
from store.db import session_scope
from store.errors import DatabaseUnavailableError
from store.feedback import retract_vote, upsert_vote
from store.memory import memory_item
from store.models import Feedback as FeedbackRow
from store.models import FeedbackKind, Message, ReviewState, Role
from store.receipts import record_event_once

log = get_logger("bot.feedback")
NOT_AN_ANSWER = "Feedback only counts on my own answers, and this message is not one of them."


def find_answer(channel: str | None, ts: str | None) -> Message | None:
    """The stored bot answer at (channel, ts), or None for anything else (people's messages,
    apologies for a failed answer, messages from before the bot stored them)."""
    if not channel or not ts:
        return None
    with session_scope() as s:
        msg = get_message(s, channel, ts)
    if msg is None or msg.role != Role.assistant or msg.error:
        return None
    return msg


class Feedback:
    def __init__(self, settings: BotSettings, memory: Memory | None, visibility: ChannelVisibility,
                 prompt: PromptSettings) -> None:
        self.memory, self.visibility, self.prompt = memory, visibility, prompt
        self.settings = settings
        self.review = None  # bot.review.Review, set by the app (it needs this object too)

    def reaction_meaning(self, emoji: str) -> tuple[str, str] | None:
        """(kind, value) for a reaction, or None for emojis that mean nothing here."""
        emoji = base_emoji(emoji)
        if emoji in self.settings.up_emojis:
            return FeedbackKind.reaction.value, "up"
        if emoji in self.settings.down_emojis:
            return FeedbackKind.reaction.value, "down"
        if emoji in self.settings.label_emojis:
            return FeedbackKind.label.value, self.settings.label_emojis[emoji]
        return None

    def _vote(self, msg: Message, user: str, kind: str, value: str, correction: str | None = None,
              review: str | None = None) -> FeedbackRow:
        with session_scope() as s:
            row = upsert_vote(s, message_id=msg.id, user=user, kind=kind, value=value, correction=correction,
                              is_admin=self.settings.is_admin(user), review=review)
        metrics.FEEDBACK.labels(kind, value if kind != FeedbackKind.label else "label").inc()
        log.info("feedback", kind=kind, value=value, message_id=msg.id, user=user)
        return row

    def needs_review(self, user: str) -> bool:
        """What people who are neither admins nor reviewers teach (a correction, a 👍, "Add to
        training data") waits for a reviewer while review is on."""
        return self.settings.review_corrections and not self.settings.is_reviewer(user)

    def _teach(self, client: WebClient, msg: Message, user: str, kind: str, value: str) -> FeedbackRow:
        """Store a vote; a 👍 or an "Add to training data" that needs review waits (and is posted
        for it), one by an admin or a reviewer is approved as given; review off: as before (None)."""
        teaches = value == "up" or kind == FeedbackKind.shortcut
        review = None
        if teaches and self.settings.review_corrections:
            review = ReviewState.pending if self.needs_review(user) else ReviewState.approved
        row = self._vote(msg, user, kind, value, review=review)
        if review == ReviewState.pending and self.review is not None:
            self.review.submitted(client, row, msg)
        return row

    def until_stored(self, what: str, store):
        """Run `store()`; while the database is away (a restart, a network blip) try again with
        backoff for up to FLYWHEEL_FEEDBACK_RETRY_S, so a vote given during an outage is kept;
        returns what `store()` returned, None when it was given up.
        Slack does not redeliver an event we already acked: this retry is its only chance."""
        deadline, delay = time.monotonic() + self.settings.feedback_retry_s, 0.25
        while True:
            try:
                return store()
            except (DBAPIError, DatabaseUnavailableError) as exc:
                if time.monotonic() + delay > deadline:
                    metrics.FEEDBACK.labels(what, "lost").inc()
                    log.error("feedback lost: the database stayed unavailable", what=what,
                              error=type(exc).__name__)
                    return None
                metrics.FEEDBACK.labels(what, "retried").inc()
                log.warning("database unavailable; keeping the feedback and retrying", what=what,
                            error=type(exc).__name__, retry_in_s=delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- reactions -------------------------------------------------------------------------------
    def on_reaction(self, event: dict, body: dict, client: WebClient, bot_user_id: str | None,
                    removed: bool) -> None:
        claimed: set[str] = set()  # this delivery's receipt, once written: a retry must not read it as a duplicate
        self.until_stored("reaction", lambda: self._on_reaction(event, body, client, bot_user_id, removed, claimed))

    def _on_reaction(self, event: dict, body: dict, client: WebClient, bot_user_id: str | None, removed: bool,
                     claimed: set[str]) -> None:
        meaning = self.reaction_meaning(event.get("reaction", ""))
        item = event.get("item") or {}
        if meaning is None or item.get("type") != "message" or not event.get("user"):
            return
        if bot_user_id and event.get("item_user") not in (None, bot_user_id):
            metrics.IGNORED.labels("not_an_answer").inc()  # someone else's message
            return
        msg = find_answer(item.get("channel"), item.get("ts"))
        if msg is None:
            metrics.IGNORED.labels("not_an_answer").inc()
            return
        event_id = body.get("event_id")
        if event_id and event_id not in claimed:
            try:
                with session_scope() as s:
                    fresh = record_event_once(s, event_id, kind=event.get("type", "reaction"))
            except (DBAPIError, DatabaseUnavailableError):
                # the connection died during the commit: the receipt may be written (by us) or not
                claimed.add("uncertain:" + event_id)
                raise
            if not fresh and "uncertain:" + event_id not in claimed:
                metrics.DUPLICATES.inc()
                return
            claimed.add(event_id)  # a vote is idempotent, so "maybe ours" is handled as ours
        kind, value = meaning
        if removed:
            with session_scope() as s:
                row = retract_vote(s, message_id=msg.id, user=event["user"], kind=kind, value=value)
            if row is not None:
                metrics.FEEDBACK.labels(kind, "retracted").inc()
                log.info("feedback retracted", kind=kind, value=value, message_id=msg.id, user=event["user"])
        else:
            self._teach(client, msg, event["user"], kind, value)

    # -- buttons under an answer -----------------------------------------------------------------
    def on_vote_button(self, ack, body: dict, respond, client: WebClient) -> None:
        ack()
        action = body["actions"][0]
        value = action.get("value")
        if value not in ("up", "down"):
            log.warning("vote button with an unexpected value", value=value)
            return
        msg = self.until_stored("button", lambda: find_answer(*_container(body)) or False)
        if msg is None:  # the database stayed away: the vote is lost, and the person hears it
            respond(text="Sorry, I could not save that vote right now; please try again in a minute.",
                    response_type="ephemeral", replace_original=False)
            return
        if msg is False:
            respond(text=NOT_AN_ANSWER, response_type="ephemeral", replace_original=False)
            return
        row = self.until_stored("button", lambda: self._teach(client, msg, body["user"]["id"],
                                                              FeedbackKind.button.value, value))
        if row is None:
            respond(text="Sorry, I could not save that vote right now; please try again in a minute.",
                    response_type="ephemeral", replace_original=False)
            return
        if action.get("type") == "button":  # classic buttons show no state of their own
            later = (": a reviewer checks this answer before I learn from it"
                     if row.review == ReviewState.pending else "")
            respond(text=f"Thanks, noted {'👍' if value == 'up' else '👎'}{later}", response_type="ephemeral",
                    replace_original=False)

    def on_suggest(self, ack, body: dict, client: WebClient, respond) -> None:
        ack()
        channel, ts = _container(body)
        msg = find_answer(channel, ts)
        if msg is None:
            respond(text=NOT_AN_ANSWER, response_type="ephemeral", replace_original=False)
            return
        with session_scope() as s:
            question = previous_user_message(s, msg)
        view = blocks.correction_modal(channel=channel, ts=ts, question=question.text if question else None,
                                       answer=msg.text)
        try:
            client.views_open(trigger_id=body["trigger_id"], view=view)
        except SlackApiError as exc:
            log.error("cannot open the correction modal", error=exc.response.get("error"))

    def on_correction(self, ack, body: dict, view: dict, client: WebClient) -> None:
        """The modal's text becomes a correction; empty text or a vanished answer keeps the modal
        open with the reason (Slack shows it under the field)."""
        text = blocks.modal_text(view)
        if not text:
            ack(response_action="errors", errors={blocks.CORRECTION_BLOCK: "Please write the better answer."})
            return
        meta = blocks.modal_metadata(view)
        msg = find_answer(meta.get("channel"), meta.get("ts"))
        if msg is None:
            ack(response_action="errors",
                errors={blocks.CORRECTION_BLOCK: "I can no longer find the answer this corrects."})
            return
        user = body["user"]["id"]
        pending = self.needs_review(user)
        try:
            row = self._vote(msg, user, FeedbackKind.correction.value, "correction", correction=text,
                             review=ReviewState.pending if pending else ReviewState.approved)
        except Exception:
            log.exception("cannot store the correction")
            ack(response_action="errors",
                errors={blocks.CORRECTION_BLOCK: "Saving failed; please try again in a moment."})
            return
        ack()
        if pending:
            if self.review is not None:
                self.review.submitted(client, row, msg)
            thanks = "Thanks! Your answer is saved; once a reviewer approves it, I use it and learn from it."
        else:
            if self.settings.review_corrections:  # a reviewer's own correction: approved as written
                with session_scope() as s:
                    record_audit(s, actor=user, action="correction.approve", target=f"feedback {row.id}",
                                 detail={"author": user, "message_id": msg.id, "own": True})
            remembered = self.remember(client, msg, user, text, source="correction")
            thanks = ("Thanks! Your answer is saved: I use it from now on and in the next training."
                      if remembered else "Thanks! Your answer is saved and will be used for training.")
        try:
            client.chat_postEphemeral(channel=msg.channel, user=user, text=thanks)
        except SlackApiError as exc:
            log.info("could not confirm the correction", error=exc.response.get("error"))
        flag_sections(self.settings, self.visibility, client, row, msg)  # an answer from a document: flagged

    def remember(self, client: WebClient, msg: Message, user: str, answer: str, *, source: str) -> bool:
        """Put a taught answer into the correction memory, visible where it was taught (public
        channels: everywhere). Best effort: the vote is stored already, training will use it."""
        if self.memory is None or not self.memory.settings.memory:
            return False
        try:
            with session_scope() as s:
                question = previous_user_message(s, msg)
                current = memory_item(s, f"message:{msg.id}")
            text = normalize(question.text, bot_user_id=self.prompt.bot_user_id) if question else ""
            if not text:
                return False
            if current is not None and self.settings.is_admin(current.author) and not self.settings.is_admin(user):
                return False  # an admin's correction of this answer stays what the memory says
            visible_in = self.visibility.visible_in(client, msg.channel)
            with session_scope() as s:
                self.memory.remember(s, key=f"message:{msg.id}", question=text, answer=answer.strip(),
                                     source=source, author=user, channel=msg.channel, visible_in=visible_in)
            metrics.MEMORY.labels("remembered").inc()
            return True
        except Exception as exc:
            metrics.MEMORY.labels("error").inc()
            log.warning("could not add the correction to the memory", error=f"{type(exc).__name__}: {exc}")
            return False

    # -- message shortcuts -----------------------------------------------------------------------
    def on_include_shortcut(self, ack, body: dict, respond, client: WebClient) -> None:
        ack()
        msg = find_answer(body.get("channel", {}).get("id"), (body.get("message") or {}).get("ts"))
        if msg is None:
            respond(text=NOT_AN_ANSWER, response_type="ephemeral")
            return
        row = self._teach(client, msg, body["user"]["id"], FeedbackKind.shortcut.value, "include")
        if row.review == ReviewState.pending:
            respond(text="Thanks! A reviewer checks this answer before it goes into the training data.",
                    response_type="ephemeral")
        else:
            respond(text="Added to the training data. Thanks!", response_type="ephemeral")

    def on_golden_shortcut(self, ack, body: dict, respond, client: WebClient) -> None:
        """Admins mark an answer as a golden (regression) item; others are refused and audited."""
        ack()
        user = body["user"]["id"]
        channel, ts = body.get("channel", {}).get("id"), (body.get("message") or {}).get("ts")
        target = f"message {channel}/{ts}"
        with session_scope() as s:
            if not self.settings.is_admin(user):
                record_audit(s, actor=user, action="answer.golden", target=target, outcome="refused",
                             detail={"reason": "not an admin"})
                metrics.ADMIN.labels("golden", "refused").inc()
                respond(text="Only Flywheel admins can mark golden examples.", response_type="ephemeral")
                return
        msg = find_answer(channel, ts)
        if msg is None:
            respond(text=NOT_AN_ANSWER, response_type="ephemeral")
            return
        self._vote(msg, user, FeedbackKind.golden.value, "golden")
        with session_scope() as s:
            record_audit(s, actor=user, action="answer.golden", target=f"message {msg.id}",
                         detail={"channel": channel, "ts": ts})
        metrics.ADMIN.labels("golden", "ok").inc()
        with session_scope() as s:
            corrected = memory_item(s, f"message:{msg.id}") is not None  # its correction is the answer
        if not corrected:
            self.remember(client, msg, user, msg.text, source="golden")
        respond(text="Marked as a golden example: later models must keep getting it right.",
                response_type="ephemeral")


def _container(body: dict) -> tuple[str | None, str | None]:
    """(channel, ts) of the message a button sits on."""
    container = body.get("container") or {}
    channel = container.get("channel_id") or (body.get("channel") or {}).get("id")
    ts = container.get("message_ts") or (body.get("message") or {}).get("ts")
    return channel, ts
